"""Filesystem ledger of a run: iterations -> stages -> shards, one small JSON file per record.

The filesystem is the source of truth (as in datatrove): jobs write their own records, the driver
reads them back, and rerunning the driver resumes from them. One record per file keeps each update
small when thousands of shards finish at once; a single file lock serializes read-modify-write
cycles so that no concurrent update is lost, and every write is a temp-file + rename so a reader
never sees half a record.
"""

from __future__ import annotations

import datetime as _dt
import enum
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from filelock import FileLock

Record = dict[str, Any]


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes 0600 files; outputs are meant to be read by the user's group like any other.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())


def read_json(path: Path) -> Any:
    with open(path, "rb") as f:
        return json.load(f)


class Ledger:
    """Records addressed by slash-separated keys, e.g. ``iter_001/generate/shard_00003``."""

    def __init__(self, run_dir: Path | str):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "ledger"
        self._lock = FileLock(str(self.run_dir / "ledger.lock"))

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def exists(self) -> bool:
        return self.root.is_dir()

    def read(self, key: str) -> Record:
        try:
            return read_json(self._path(key))
        except FileNotFoundError:
            return {}

    def children(self, key: str) -> dict[str, Record]:
        """All records directly below ``key`` (e.g. the shards of a stage), by name, sorted."""
        folder = self.root / key
        if not folder.is_dir():
            return {}
        return {p.stem: read_json(p) for p in sorted(folder.glob("*.json"))}

    def update(
        self,
        key: str,
        changes: Record | None = None,
        mutate: Callable[[Record], None] | None = None,
    ) -> Record:
        """Apply ``changes`` (and then ``mutate``) to one record under the lock; return it."""
        return self.update_many({key: changes or {}}, mutate)[key]

    def update_many(
        self, changes: dict[str, Record], mutate: Callable[[Record], None] | None = None
    ) -> dict[str, Record]:
        """Several records in one critical section (a whole array's submission is one update)."""
        out: dict[str, Record] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock:
            for key, change in changes.items():
                record = self.read(key)
                record.update(change)
                if mutate is not None:
                    mutate(record)
                record["updated_at"] = now()
                atomic_write_json(self._path(key), record)
                out[key] = record
        return out

    def set_status(self, keys: Iterable[str], status: Status, **fields: Any) -> None:
        stamp = {Status.RUNNING: "started_at", Status.DONE: "ended_at", Status.FAILED: "ended_at"}
        change: Record = {"status": str(status), **fields}
        if status in stamp:
            change[stamp[status]] = now()
        self.update_many({k: dict(change) for k in keys})
