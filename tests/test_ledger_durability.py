"""The ledger where it matters: killed writers, filesystems that refuse flock or answer slowly.

The filesystems are real FUSE mounts (tools/bench/loopfs.py): one that answers flock with ENOLCK as
Lustre without ``-o flock`` does, one that takes 5 ms per metadata operation, one that logs the
operations that make a record durable. They need /dev/fuse, root, libfuse3 and mfusepy; elsewhere
they are skipped, except under CI, where that is a failure.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import state.ledger
from state import Ledger, Status
from tools.bench.loopfs import drop_page_cache, fuse_unavailable, mounted

ROOT = Path(__file__).resolve().parent.parent
STAGE = "iter_001/generate"


@pytest.fixture(scope="module")
def fuse(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A FUSE mount can be made here (installing Debian's libfuse3 where it is missing and we may)."""
    why = fuse_unavailable()
    if why and "libfuse" in why and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "libfuse3-3"], capture_output=True, check=False)
        why = fuse_unavailable()
    if why is None:
        folder = tmp_path_factory.mktemp("probe")
        try:
            with mounted(folder / "backing", folder / "mount"):
                pass
        except RuntimeError as error:
            why = str(error)
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"no FUSE mount under CI: {why}")
        pytest.skip(f"no FUSE mount here: {why}")


def _count(record: dict) -> None:
    record["n"] = record.get("n", 0) + 1


def test_a_refused_flock_switches_to_lease_files_and_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A fake, only to show the switch; the real refusal is the FUSE test below.
    def refuse(fd: int, operation: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(state.ledger.fcntl, "flock", refuse)
    with caplog.at_level(logging.WARNING, logger="state.ledger"):
        for _ in range(2):
            ledger = Ledger(tmp_path)
            for i in range(3):
                ledger.update(f"{STAGE}/shard_{i:05d}", mutate=_count)
    assert [r["n"] for r in Ledger(tmp_path).children(STAGE).values()] == [2, 2, 2]
    assert len([r for r in caplog.records if "refuses flock" in r.getMessage()]) == 1

    def fail(fd: int, operation: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    # Any other failure is a failure, not a reason to lock differently.
    monkeypatch.setattr(state.ledger.fcntl, "flock", fail)
    with pytest.raises(OSError, match="Input/output error"):
        Ledger(tmp_path / "other").update("run", {"status": "running"})


HAMMER = """
import sys
from state import Ledger
def count(record): record["n"] = record.get("n", 0) + 1
ledger = Ledger(sys.argv[1])
for _ in range(int(sys.argv[3])):
    ledger.update("iter_001/generate", mutate=count)
    ledger.update(f"iter_001/generate/shard_{int(sys.argv[2]):05d}", mutate=count)
"""


def test_on_a_filesystem_that_refuses_flock(fuse: None, tmp_path: Path) -> None:
    with mounted(tmp_path / "backing", tmp_path / "mount", refuse_flock=True) as mount:
        with open(mount / "probe", "w") as probe, pytest.raises(OSError) as refused:
            fcntl.flock(probe.fileno(), fcntl.LOCK_EX)
        assert refused.value.errno == errno.ENOLCK
        run_dir = mount / "run"
        workers, updates = 8, 4
        processes = [subprocess.Popen([sys.executable, "-c", HAMMER, str(run_dir), str(w), str(updates)], cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(workers)]
        said = [p.communicate(timeout=300) for p in processes]
        assert all(p.returncode == 0 for p in processes), said
        ledger = Ledger(run_dir)
        assert ledger.read(STAGE)["n"] == workers * updates
        assert [r["n"] for r in ledger.children(STAGE).values()] == [updates] * workers
        assert [err.count("refuses flock") for _, err in said] == [1] * workers, "each process says it once"

        # A writer killed while it holds a record's lease leaves the lease behind: the next writer
        # on this host sees its holder is gone and takes it over.
        key = f"{STAGE}/shard_00000"
        die = lambda record: os.kill(os.getpid(), signal.SIGKILL)
        killed = multiprocessing.get_context("fork").Process(target=Ledger(run_dir).update, args=(key, None, die))
        killed.start()
        killed.join()
        assert killed.exitcode == -signal.SIGKILL
        assert list((run_dir / "ledger" / STAGE / ".locks").glob("shard_00000.lease"))
        started = time.monotonic()
        assert ledger.update(key, mutate=_count)["n"] == updates + 1
        assert time.monotonic() - started < 10


def test_an_update_is_on_disk_before_it_returns(fuse: None, tmp_path: Path) -> None:
    ops = tmp_path / "ops.log"
    folder = f"/run/ledger/{STAGE}"
    with mounted(tmp_path / "backing", tmp_path / "mount", log=ops) as mount:
        ledger = Ledger(mount / "run")
        ledger.update(f"{STAGE}/shard_00000", {"status": "running"})
        # A record that exists: its marker renamed, then its new version appended and synced; no
        # folder is synced (the marker is the readers' cue, not the record: state/ledger.py).
        ops.write_text("")
        ledger.update(f"{STAGE}/shard_00000", {"status": "running", "progress": 1})
        seen = ops.read_text().splitlines()
        rename = next(line for line in seen if line.startswith("rename ") and line.endswith("/shard_00000@2"))
        assert rename.startswith(f"rename {folder}/.markers/"), rename
        steps = [rename, f"fsync {folder}/shard_00000.jsonl"]
        assert [seen.index(step) for step in steps] == sorted(seen.index(step) for step in steps), seen
        assert not any(line.startswith("fsyncdir ") for line in seen), seen
        assert not any(line.startswith("create ") and "shard_00000.jsonl" in line for line in seen), "an update of a record appends"
        # A batch with new records: each new file written and synced aside and renamed into place,
        # then the folder synced, once.
        ops.write_text("")
        ledger.update_many({f"{STAGE}/shard_{i:05d}": {"status": "done"} for i in range(3)})
        seen = ops.read_text().splitlines()
    assert seen.count(f"fsyncdir {folder}") == 1, seen
    synced = seen.index(f"fsyncdir {folder}")
    assert seen.index(f"fsync {folder}/shard_00000.jsonl") < synced
    for name in ("shard_00001", "shard_00002"):
        tmp = next(line.split()[1] for line in seen if line.startswith(f"create {folder}/.{name}.jsonl."))
        marker = next(line for line in seen if line.startswith(f"create {folder}/.markers/") and line.endswith(f"/{name}@1"))
        steps = [marker, f"create {tmp}", f"fsync {tmp}", f"rename {tmp} {folder}/{name}.jsonl"]
        assert [seen.index(step) for step in steps] == sorted(seen.index(step) for step in steps), seen
        assert seen.index(steps[-1]) < synced
    # The batch's snapshot is a cache: written after, and not synced.
    assert not any(line.startswith("fsync ") and ".snapshot" in line for line in seen)


WRITER = """
import hashlib, json, random, sys
from state import Ledger
ledger, rng = Ledger(sys.argv[1]), random.Random(int(sys.argv[2]))
print("ready", flush=True)
while True:
    payload = "x" * rng.choice([1, 1000, 100_000, 1_000_000])
    digest = hashlib.sha256(payload.encode()).hexdigest()
    ledger.update(f"iter_001/generate/shard_{rng.randrange(4):05d}", {"payload": payload, "sha256": digest})
"""


def _check_records(run_dir: Path) -> int:
    """Every record whole as readers get it (its payload matches its checksum), and every line of its
    file but a torn last one (a writer killed in its append) a whole version. The records' number."""
    ledger = Ledger(run_dir)
    files = sorted((run_dir / "ledger" / STAGE).glob("*.jsonl"))
    for path in files:
        record = ledger.read(f"{STAGE}/{path.stem}")
        assert record, f"{path} holds no whole version"
        assert hashlib.sha256(record["payload"].encode()).hexdigest() == record["sha256"], path
        lines = path.read_bytes().split(b"\n")
        for line in lines[:-1]:
            version = json.loads(line)
            assert hashlib.sha256(version["payload"].encode()).hexdigest() == version["sha256"], path
    return len(files)


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[Callable[[int], subprocess.Popen]]:
    started: list[subprocess.Popen] = []

    def start(seed: int) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "run"), str(seed)], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout.readline() == "ready\n", process.stderr.read()
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_writer_killed_at_random_points_never_leaves_a_record_empty_or_half_written(
    tmp_path: Path, writer: Callable[[int], subprocess.Popen]
) -> None:
    rng = random.Random(13)
    for kill in range(30):
        process = writer(kill)
        time.sleep(rng.uniform(0.01, 0.4))
        process.send_signal(signal.SIGKILL)
        process.wait()
        _check_records(tmp_path / "run")
    assert _check_records(tmp_path / "run") == 4
    if drop_page_cache():
        assert _check_records(tmp_path / "run") == 4
    # Killed writers leave no lock held: every record takes another update, and the records a poll
    # reads through the snapshot are the files'.
    ledger = Ledger(tmp_path / "run")
    ledger.set_status([f"{STAGE}/shard_{i:05d}" for i in range(4)], Status.DONE)
    assert ledger.children(STAGE) == {f"shard_{i:05d}": ledger.read(f"{STAGE}/shard_{i:05d}") for i in range(4)}
    assert all(r["status"] == "done" for r in ledger.children(STAGE).values())


def test_polls_of_10000_shards_on_a_filesystem_with_5_ms_per_operation(fuse: None, tmp_path: Path) -> None:
    keys = [f"{STAGE}/shard_{i:05d}" for i in range(10_000)]
    # Written on the local disk, as the jobs would have left it; then seen through the slow mount.
    Ledger(tmp_path / "backing" / "run").update_many({k: {"status": "submitted", "attempts": 1, "job_id": f"9_{i}"} for i, k in enumerate(keys)})
    with mounted(tmp_path / "backing", tmp_path / "mount", delay_ms=5) as mount:
        driver, jobs = Ledger(mount / "run"), Ledger(mount / "run")
        started = time.monotonic()
        records = driver.read_many(keys)
        assert time.monotonic() - started < 10
        assert [records[k]["job_id"] for k in keys] == [f"9_{i}" for i in range(10_000)]
        for key in keys[:20]:
            jobs.set_status([key], Status.DONE)
        started = time.monotonic()
        shards = driver.children(STAGE)
        assert time.monotonic() - started < 10
        assert [name for name, r in shards.items() if r["status"] == "done"] == [f"shard_{i:05d}" for i in range(20)]
