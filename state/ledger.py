"""Filesystem ledger of a run: iterations -> stages -> shards, one small file of JSON lines per record.

The filesystem is the source of truth (as in datatrove): jobs write their own records, the driver
reads them back, and rerunning the driver resumes from them. Record ``a/b/c`` is the file
``ledger/a/b/c.jsonl``: the record's versions, one JSON line each, oldest first; the last whole line
is the record. An update appends its version to the file, so that writers of different records
change no folder but by their marker's rename (below) and share nothing but the disk's flushes.
Once a file has grown past COMPACT_AT, the next update writes it anew with its own version alone.
Beside the records, in the same folder, hidden files the ledger keeps for itself:

- The record's lock. An update is a read-modify-write under the lock of that record alone, so
  thousands of shards finishing at once do not wait on each other. The lock is flock on the
  record's file itself, which the update opens anyway; a record without a file yet is locked
  through ``.locks/c``, under which its first file is made. A file written anew (past COMPACT_AT)
  replaces the one that waiters hold open: a waiter that gets the lock of a file no longer linked
  locks the new one. Where the filesystem refuses flock (Lustre mounted without ``-o flock``, NFS
  without a lock manager: ENOLCK, ENOSYS, EOPNOTSUPP) the lock is a lease file ``.locks/c.lease``
  created exclusively (filelock's SoftFileLease): its holder refreshes it while it holds it; a
  waiter takes it over at once when its holder was a dead process of the same host, and when it
  has not been refreshed for LEASE_S seconds otherwise (a crashed node). Where flock works on each
  node but not across nodes (Lustre ``-o localflock``, NFS ``local_lock=flock``), set
  SELFTRAIN_LEDGER_LOCKS=soft for every process of the run (the driver and, through sbatch's
  environment, its jobs) to use the leases.
- ``.markers/BB/c@N``: the record's version marker, in one of BUCKETS folders (``BB``: a hash of
  the record's name). Every update raises the version ``N`` stored in the record (key VERSION) and
  renames the record's marker to the new version *before* it writes the version, so a record's
  marker is never older than its file. Markers are empty: listings of the buckets tell every
  record's version without opening a file. Ledgers before BUCKETS kept a record's marker beside it
  (``.c@N``): those are read too, and the record's next update removes it.
- ``.snapshot``: the folder's records as some reader (or a batch update) last saw them, each with
  its version. ``children`` and ``read_many`` list the folder and its buckets, load the snapshot,
  and read only the records whose marker is newer than their copy there (in threads where each
  read takes over a millisecond: a network filesystem), storing the snapshot again once
  SNAPSHOT_AFTER copies were out of date. The snapshot is only a cache: each copy in it is a whole
  record with its own version, so a lost, older, torn or concurrently overwritten snapshot costs
  reads, never a stale answer. A poll of a 10,000-shard stage thus reads BUCKETS + 2 listings, one
  snapshot and the records that changed since the snapshot.

Durability: an update returns once its version is on disk, so a record reported done survives a
crash of the node that wrote it. An appended version is fdatasynced. A new file (a record's first
version, or a file written anew) is written aside, fsynced and renamed into place, and then its
folder is fsynced (once per folder for a batch). The rename of a marker is not synced by itself:
a directory's fsync waits for the journal to commit every other writer's rename in that folder
(tools/bench/ledger_bench.py shows the cost: "new + marker's folder fsync per update"), and a
marker is no part of the record, only the readers' cue that a snapshot copy is out of date. A lost marker can
only come from a crash of the machine whose kernel held the rename, which for a local disk is the
machine of every reader too: NFS servers commit renames before they answer, Lustre's metadata
server keeps them through a client's crash, and on ext4 and XFS the version's fdatasync commits the
journal that holds its marker's earlier rename; on btrfs, or ext4 with fast_commit, it may not. So a
snapshot holds the time it was stored, and a reader does not trust one stored before its machine
last booted: after a crash the first poll reads every record of the folder and stores the snapshot
anew (which also drops copies of versions a reader saw before a crash lost them). On a shared
filesystem that costs one such read to a machine that booted since the snapshot was stored. Where
a marker was lost, the record's next update makes a new one: a record's highest marker counts.

A reader never sees half a record: a writer killed in the middle of its append, or a crash before
the append's fdatasync returned, leaves at most a torn line (part of the line, or zeros) after the
last whole version; readers pass over it, and the next update cuts it off before it appends (a
version glued to it would be lost). A reader that meets a version being appended reads the one
before it, and reads the record again at its next poll, since the marker is already newer.

A batch (``update_many``: a whole array's submission) updates each record atomically under its
own lock, many at once in threads (their fsyncs then share the journal's commits); it is not one
transaction. That is enough because every other writer of those records is the job of one record
(claiming or finishing it), which touches no other record: any interleaving equals one where each
job's update comes wholly before or after the batch's update of its record; and readers never took
a lock, so they could always see a batch half applied. A crash in the middle of a batch leaves
some of its records updated, as before.

Runs written by earlier ledgers read and update unchanged: a record file of theirs (``c.json``, one
JSON document) is read while there is no ``c.jsonl``; the record's first update here writes
``c.jsonl`` and then removes ``c.json``. A record without a version counts as version 0, and its
first update gives it a marker. Do not change selftrain's version while jobs of a run are running:
a job of the old code would neither take the record's lock nor write its record file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import enum
import errno
import fcntl
import functools
import json
import logging
import os
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson
from filelock import SoftFileLease

log = logging.getLogger(__name__)

Record = dict[str, Any]
T = TypeVar("T")
U = TypeVar("U")

VERSION = "_version"  # the record's version, raised by every update; not part of what readers get
SNAPSHOT = ".snapshot"
STORED_AT = ".stored_at"  # when a snapshot was stored (time.time()): see the module docstring
LOCKS = ".locks"
MARKERS = ".markers"
# Folders the markers of one folder's records are spread over: renames in one folder wait on each
# other (the folder's lock, held while the journal has room for the rename), which halved the rate
# of 256 writers; 16 cost a poll 16 listings more.
BUCKETS = 16
LOCKS_ENV = "SELFTRAIN_LEDGER_LOCKS"
LEASE_S = 30.0
# flock's answers that mean "this filesystem does not do flock", as opposed to a failure.
NO_FLOCK = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP})
RECORD = ".jsonl"  # a record's file: its versions, one JSON line each; the last whole line is the record
LEGACY = ".json"  # a record as ledgers before append-only records wrote it: one JSON document
# Past this size, an update writes the record's file anew with its new version alone: so that a
# read of the record is one read of a small file (a version is a few KiB; a shard reporting its
# progress every 30 s appends ~400 bytes each time).
COMPACT_AT = 1 << 16
# Record files read or written at once, where there are many.
PARALLEL = 32
# Records read from their files, past which a reader stores the folder's snapshot again.
SNAPSHOT_AFTER = 64
_announced: set[str] = set()
_announcing = threading.Lock()


class Status(str, enum.Enum):
    PLANNED = "planned"
    SUBMITTED = "submitted"
    RUNNING = "running"
    # A service of the run (a reward model server) that is up and answering.
    SERVING = "serving"
    DONE = "done"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _fsync_folder(folder: Path | str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as error:
        # Some filesystems cannot sync a directory (and make renames durable by themselves).
        if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_temp(folder: Path, name: str, data: bytes, durable: bool) -> str:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        # mkstemp makes 0600 files; outputs are meant to be read by the user's group like any other.
        os.fchmod(fd, 0o644)
        _write_all(fd, data)
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def _replace(path: Path, data: bytes, durable: bool) -> None:
    """Readers see the old file or the whole new one; ``durable``: on disk before it replaces the old."""
    tmp = _write_temp(path.parent, path.name, data, durable)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, even after a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace(path, data, durable=True)
    _fsync_folder(path.parent)


def _encode(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode()


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, _encode(obj))


def read_json(path: Path) -> Any:
    with open(path, "rb") as f:
        return json.load(f)


def _public(record: Record) -> Record:
    return {k: v for k, v in record.items() if k != VERSION}


def _read_all(fd: int) -> bytes:
    chunks = []
    # 64 KiB at a time: a record file in one read, and no buffer past malloc's mmap threshold.
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _read_bytes(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return _read_all(fd)
    finally:
        os.close(fd)


def _line(record: Record) -> bytes:
    """One version of a record, as a line of its file."""
    return (json.dumps(record, sort_keys=True, separators=(",", ":"), default=str) + "\n").encode()


def _last_whole(data: bytes) -> tuple[Record | None, int]:
    """The last whole version in ``data`` (a record file) and the offset where its line ends. After
    it there may be a torn line: a writer killed in the middle of its append, or a crash before the
    append's fdatasync returned (a part of the line, or zeros)."""
    end = len(data)
    while (stop := data.rfind(b"\n", 0, end)) >= 0:
        start = data.rfind(b"\n", 0, stop) + 1
        try:
            record = json.loads(data[start:stop])
        except ValueError:
            record = None
        if isinstance(record, dict):
            return record, stop + 1
        end = start
    return None, 0




def _read_record(path: str) -> Record | None:
    """The record in ``path``: a record file's last whole version, or a whole legacy file; None if
    there is no such file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        data = _read_all(fd)
        return json.loads(data) if path.endswith(LEGACY) else _last_whole(data)[0]
    finally:
        os.close(fd)


def _open_record(path: str) -> int | None:
    """A record's file, open to read and append; None if it has none."""
    try:
        return os.open(path, os.O_RDWR | os.O_APPEND)
    except FileNotFoundError:
        return None


def _linked(fd: int) -> bool:
    """Whether ``fd``'s file is still the record's: not replaced by its file written anew (a network
    filesystem may answer ESTALE for a file removed by another client)."""
    try:
        return os.fstat(fd).st_nlink > 0
    except OSError as error:
        if error.errno != errno.ESTALE:
            raise
        return False


def _read_records(paths: list[str]) -> list[Record | None]:
    """The records in the files: one after the other while each takes under a millisecond (a local
    disk), the rest in threads otherwise (a network filesystem, where each read waits on the server)."""
    records: list[Record | None] = []
    start = time.monotonic()
    for path in paths:
        if len(records) >= 8 and time.monotonic() - start > len(records) * 0.001:
            return records + _map(_read_record, paths[len(records) :])
        records.append(_read_record(path))
    return records


def _map(function: Callable[[T], U], items: list[T]) -> list[U]:
    """``function`` over ``items``, in threads when there are several: on a network filesystem each
    file operation waits on the server, and concurrent fsyncs share the journal's commits."""
    if len(items) < 2:
        return [function(item) for item in items]
    with ThreadPoolExecutor(PARALLEL) as pool:
        return list(pool.map(function, items))


def _note_markers(newest: dict[str, int], markers: Iterable[str]) -> None:
    """Count ``markers`` (``<name>@<version>`` each) in ``newest``, the highest version seen per record:
    a marker lost to a crash leaves an older one behind (module docstring)."""
    for marker in markers:
        record, at, version = marker.rpartition("@")
        if at and version.isdigit() and int(version) > newest.get(record, 0):
            newest[record] = int(version)


def marker_bucket(folder: str, name: str) -> str:
    """The folder of record ``name``'s version marker (``folder`` is the record's folder)."""
    return f"{folder}/{MARKERS}/{zlib.crc32(name.encode()) % BUCKETS:02d}"


def _create_marker(bucket: str, marker: str) -> None:
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT, 0o644))
    except FileNotFoundError:  # the bucket's first marker
        os.makedirs(bucket, exist_ok=True)
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT, 0o644))


@functools.cache
def _booted_at() -> float:
    """When this machine booted, on the wall clock (seconds since the epoch)."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def _load_snapshot(folder: Path) -> dict[str, Record]:
    """The folder's snapshot; empty if there is none, it is torn, or it was stored before this
    machine's last boot, when a crash may have lost a record's marker (module docstring)."""
    try:
        # orjson: a 10,000-record snapshot parses in a fourth of json's time (tools/bench/status_bench.py).
        snapshot = orjson.loads(_read_bytes(folder / SNAPSHOT) or b"{}")
    except (OSError, ValueError):  # orjson.JSONDecodeError is a ValueError
        return {}
    stored_at = snapshot.pop(STORED_AT, None)
    return snapshot if isinstance(stored_at, float) and stored_at > _booted_at() else {}


class Ledger:
    """Records addressed by slash-separated keys, e.g. ``iter_001/generate/shard_00003``."""

    def __init__(self, run_dir: Path | str):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "ledger"
        self._root = str(self.root)
        # None until the first lock tells whether this filesystem does flock.
        self._soft: bool | None = True if os.environ.get(LOCKS_ENV) == "soft" else None

    def _place(self, key: str) -> tuple[str, str]:
        """The folder of record ``key`` and the record's name there. Strings: an update builds a
        few paths, and pathlib costs a writer of many updates a third of its time."""
        parent, _, name = key.rpartition("/")
        return (f"{self._root}/{parent}" if parent else self._root), name

    def exists(self) -> bool:
        return self.root.is_dir()

    def read(self, key: str) -> Record:
        folder, name = self._place(key)
        path = f"{folder}/{name}"
        # The record file, else a legacy one; the record file again if its first update moved it meanwhile.
        for candidate in (path + RECORD, path + LEGACY, path + RECORD):
            if (record := _read_record(candidate)) is not None:
                return _public(record)
        return {}

    def children(self, key: str) -> dict[str, Record]:
        """All records directly below ``key`` (e.g. the shards of a stage), by name, sorted."""
        records = self._folder(self.root / key)
        return {name: records[name] for name in sorted(records)}

    def read_many(self, keys: Iterable[str]) -> dict[str, Record]:
        """``{key: read(key)}`` for many keys, in a few file reads per folder (see the module docstring)."""
        split = {key: key.rpartition("/") for key in keys}
        folders = {parent: self._folder(self.root / parent) for parent in {parent for parent, _, _ in split.values()}}
        return {key: folders[parent].get(name) or {} for key, (parent, _, name) in split.items()}

    def _folder(self, folder: Path) -> dict[str, Record]:
        """The records of ``folder`` by name: the snapshot's copies, and the records newer than them from their files."""
        # Listings of names (listdir, not scandir): a 10,000-record folder has 10,000 markers too.
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return {}
        files: dict[str, str] = {}  # name -> its file's suffix: its record file, else a legacy one
        hidden = []  # markers as ledgers before MARKERS kept them, ".<name>@<version>", and hidden files
        for name in names:
            if name[0] == ".":
                hidden.append(name[1:])
            elif name.endswith(RECORD):
                files[name[: -len(RECORD)]] = RECORD
            elif name.endswith(LEGACY):
                files.setdefault(name[: -len(LEGACY)], LEGACY)
        newest: dict[str, int] = {}
        _note_markers(newest, hidden)
        with contextlib.suppress(FileNotFoundError):
            for bucket in os.listdir(f"{folder}/{MARKERS}"):
                _note_markers(newest, os.listdir(f"{folder}/{MARKERS}/{bucket}"))
        snapshot = _load_snapshot(folder)
        # A record without markers was last written before markers existed: its snapshot copy holds.
        records = {n: snapshot[n] for n in files if n in snapshot}
        stale = [n for n in files if n not in records or newest.get(n, 0) > records[n].get(VERSION, 0)]
        changed = len(records) < len(snapshot)
        for name, record in zip(stale, _read_records([f"{folder}/{n}{files[n]}" for n in stale]), strict=True):
            if record is not None:
                old = records.get(name, {}).get(VERSION)
                records[name] = record
                changed += old is None or record.get(VERSION, 0) != old
        # Rewriting the whole snapshot costs more than reading a few records again at the next poll.
        if changed >= SNAPSHOT_AFTER or (changed and len(files) < SNAPSHOT_AFTER):
            self._store_snapshot(folder, records)
        for record in records.values():
            record.pop(VERSION, None)
        return records

    @staticmethod
    def _store_snapshot(folder: Path, records: dict[str, Record]) -> None:
        # A cache: not fsynced, and a reader who may not write to the run (another user) goes without.
        data = json.dumps({STORED_AT: time.time(), **records}, separators=(",", ":"), default=str).encode()
        with contextlib.suppress(OSError):
            _replace(folder / SNAPSHOT, data, durable=False)

    def update(
        self,
        key: str,
        changes: Record | None = None,
        mutate: Callable[[Record], None] | None = None,
    ) -> Record:
        """Apply ``changes`` (and then ``mutate``) to one record under its lock; return it. As
        ``update_many`` of one record, without its threads and bookkeeping (a sixth of an update's CPU)."""
        record, renamed = self._update_one(key, changes or {}, mutate)
        if renamed:
            _fsync_folder(self._place(key)[0])
        return _public(record)

    def update_many(
        self, changes: dict[str, Record], mutate: Callable[[Record], None] | None = None
    ) -> dict[str, Record]:
        """Several records, each atomically and durably (a whole array's submission is one call).

        Each record is updated under its own lock; many are updated in threads. The first error of
        any record is raised once the others are done.
        """

        def one(key: str) -> tuple[Record, bool] | BaseException:
            try:
                return self._update_one(key, changes[key], mutate)
            except BaseException as error:  # noqa: BLE001 (raised below, once every record's update has settled)
                return error

        outcomes = dict(zip(changes, _map(one, list(changes)), strict=True))
        written: dict[str, dict[str, Record]] = {}
        renamed: set[str] = set()  # folders where a file was renamed into place
        for key, outcome in outcomes.items():
            if not isinstance(outcome, BaseException):
                folder, name = self._place(key)
                written.setdefault(folder, {})[name] = outcome[0]
                if outcome[1]:
                    renamed.add(folder)
        for folder, records in written.items():
            if folder in renamed:
                _fsync_folder(folder)
            if len(records) > 1:
                # A batch brings the snapshot up to date, so that the next poll reads no record file.
                self._store_snapshot(Path(folder), {**_load_snapshot(Path(folder)), **records})
        out: dict[str, Record] = {}
        for key, outcome in outcomes.items():
            if isinstance(outcome, BaseException):
                raise outcome  # SystemExit too: a job stepping aside from its claim
            out[key] = _public(outcome[0])
        return out

    def _update_one(
        self, key: str, changes: Record, mutate: Callable[[Record], None] | None
    ) -> tuple[Record, bool]:
        """Read-modify-write of one record under its lock: its new version, durable once its folder
        is synced if the second value says a file was renamed into place, and at once otherwise.

        The lock is flock on the record's file itself, which the update opens anyway (a lock file
        of its own cost a writer of many updates a fifth of its rate); a record without a file yet
        is locked through its lock file, under which its first file is made. A file written anew
        replaces the one its waiters hold: a waiter that gets the lock of a file no longer linked
        locks the new one."""
        folder, name = self._place(key)
        path = f"{folder}/{name}{RECORD}"
        while True:
            if self._soft:
                os.makedirs(f"{folder}/{LOCKS}", exist_ok=True)
                with SoftFileLease(self._lock_path(folder, name) + ".lease", lease_duration=LEASE_S, poll_interval=0.01):
                    fd = _open_record(path)
                    try:
                        return self._write_version(folder, name, path, fd, changes, mutate)
                    finally:
                        if fd is not None:
                            os.close(fd)
            if (fd := _open_record(path)) is not None:
                try:
                    if self._flock(fd) and _linked(fd):
                        return self._write_version(folder, name, path, fd, changes, mutate)
                finally:
                    os.close(fd)  # which releases the flock
                continue
            # The record's first version, or its first since a legacy file.
            lock = self._lock_path(folder, name)
            try:
                # Without O_CREAT while the lock file exists: creating locks its folder for everyone.
                fd = os.open(lock, os.O_RDWR)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(lock), exist_ok=True)
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                # Once the lock is held, a file made by another writer meanwhile is locked instead.
                if self._flock(fd) and not os.path.exists(path):
                    return self._write_version(folder, name, path, None, changes, mutate)
            finally:
                os.close(fd)

    @staticmethod
    def _write_version(
        folder: str, name: str, path: str, fd: int | None, changes: Record, mutate: Callable[[Record], None] | None
    ) -> tuple[Record, bool]:
        """The record's next version, with the record's lock held; ``fd``: its file, None if it has none."""
        record: Record | None = None
        end = size = 0
        if fd is not None:
            data = _read_all(fd)
            record, end = _last_whole(data)
            size = len(data)
        if record is None:
            record = _read_record(f"{folder}/{name}{LEGACY}") or {}
        version = record.pop(VERSION, 0) + 1
        record.update(changes)
        if mutate is not None:
            mutate(record)
        record["updated_at"] = now()
        record[VERSION] = version
        line = _line(record)
        # The new marker first, so that a reader who sees the new version also sees its marker;
        # renamed from the old one, so that its bucket changes once for both.
        bucket = marker_bucket(folder, name)
        marker = f"{bucket}/{name}@{version}"
        try:
            os.rename(f"{bucket}/{name}@{version - 1}", marker)
        except FileNotFoundError:  # the record's first version, or its first in MARKERS
            _create_marker(bucket, marker)
            if version > 1:  # its marker beside it, by an earlier ledger
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{folder}/.{name}@{version - 1}")
        if fd is not None and end + len(line) <= COMPACT_AT:
            if end < size:  # a torn line after the last whole version: the next would be glued to it
                os.ftruncate(fd, end)
            _write_all(fd, line)
            os.fdatasync(fd)
            return record, False
        # A new file, or one grown past COMPACT_AT: the new version alone, replacing it whole.
        _replace(Path(path), line, durable=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{folder}/{name}{LEGACY}")
        return record, True

    @staticmethod
    def _lock_path(folder: str, name: str) -> str:
        return f"{folder}/{LOCKS}/{name}"

    def _flock(self, fd: int) -> bool:
        """Lock ``fd``; False where the filesystem refuses flock (the ledger uses leases from then on)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in NO_FLOCK:
                raise
            self._use_leases(error)
            return False
        self._soft = False
        return True

    def _use_leases(self, error: OSError) -> None:
        self._soft = True
        with _announcing:  # a batch's threads may all learn it at once
            if str(self.root) in _announced:
                return
            _announced.add(str(self.root))
            log.warning(
                "%s: the filesystem refuses flock (%s); the ledger locks its records with lease files instead",
                self.root, os.strerror(error.errno or 0),
            )

    def set_status(self, keys: Iterable[str], status: Status, **fields: Any) -> None:
        stamp = {Status.RUNNING: "started_at", Status.DONE: "ended_at", Status.FAILED: "ended_at"}
        change: Record = {"status": str(status), **fields}
        if status in stamp:
            change[stamp[status]] = now()
        self.update_many({k: dict(change) for k in keys})
