import json
import multiprocessing
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import state.ledger
from state import Ledger, Status
from state.ledger import MARKERS, SNAPSHOT, STORED_AT

# The ledger's own behaviour, in process and with a few processes at once (the durability tests,
# with crashes and FUSE mounts, are tests/test_ledger_durability.py).
pytestmark = pytest.mark.unit

STAGE = "iter_001/generate"


def _bump(run_dir: str, worker: int, updates: int) -> None:
    ledger = Ledger(run_dir)
    for i in range(updates):
        # Every worker writes the same record and a record of its own: both must keep every update.
        ledger.update(STAGE, mutate=lambda r: r.__setitem__("count", r.get("count", 0) + 1))
        ledger.update(f"{STAGE}/shard_{worker:05d}", {"last": i}, lambda r: r.__setitem__("n", r.get("n", 0) + 1))


def _at_once(target: Callable[..., None], args: list[tuple]) -> None:
    """``target(*a)`` for each ``a`` of ``args``, each in a process of its own, all at once."""
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=target, args=a) for a in args]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=300)
        assert p.exitcode == 0


def test_64_processes_lose_no_update(tmp_path: Path) -> None:
    workers, updates = 64, 8
    _at_once(_bump, [(str(tmp_path), w, updates) for w in range(workers)])
    ledger = Ledger(tmp_path)
    assert ledger.read(STAGE)["count"] == workers * updates
    shards = ledger.children(STAGE)
    assert len(shards) == workers
    assert all(r["n"] == updates and r["last"] == updates - 1 for r in shards.values())
    assert not list(ledger.root.rglob("*.tmp")), "no temp file may be left behind"


def _bump_one(run_dir: str, updates: int) -> None:
    ledger = Ledger(run_dir)
    for _ in range(updates):
        ledger.update(STAGE, mutate=lambda r: r.__setitem__("count", r.get("count", 0) + 1))


def test_writers_waiting_on_a_record_whose_file_is_written_anew_lose_no_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A writer locks the record's file itself; a file grown past its limit is replaced by a new one
    # while others wait on the old one's lock: each must notice and lock the new file.
    monkeypatch.setattr(state.ledger, "COMPACT_AT", 600)
    workers, updates = 16, 25
    _at_once(_bump_one, [(str(tmp_path), updates)] * workers)
    ledger = Ledger(tmp_path)
    assert ledger.read(STAGE)["count"] == workers * updates
    versions = [json.loads(line)["_version"] for line in (ledger.root / f"{STAGE}.jsonl").read_bytes().splitlines()]
    assert versions[-1] == workers * updates and versions[0] > 1, "the file was written anew"


def test_status_timestamps_and_missing_records(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    assert ledger.read("iter_001/filter") == {}
    assert ledger.children(STAGE) == {}
    assert ledger.read_many(["iter_001/filter", f"{STAGE}/shard_00000"]) == {"iter_001/filter": {}, f"{STAGE}/shard_00000": {}}
    ledger.set_status(["iter_001/filter"], Status.RUNNING)
    ledger.set_status(["iter_001/filter"], Status.DONE, metrics={"kept": 3})
    record = ledger.read("iter_001/filter")
    assert record["status"] == "done" and record["metrics"] == {"kept": 3}
    assert record["started_at"] <= record["ended_at"]


def test_a_run_written_by_the_previous_ledger_is_read_and_updated(tmp_path: Path) -> None:
    # Exactly what the ledger with one lock per run wrote: records, a lock file, nothing else.
    old = {
        "run": {"run_name": "small", "status": "running", "updated_at": "2026-11-30T10:00:00+00:00"},
        STAGE: {"status": "running", "num_tasks": 3, "updated_at": "2026-11-30T10:00:01+00:00"},
        **{f"{STAGE}/shard_{i:05d}": {"status": "running", "attempts": 1, "job_id": f"7_{i}", "updated_at": "2026-11-30T10:00:02+00:00"}
           for i in range(3)},
    }
    for key, record in old.items():
        path = tmp_path / "ledger" / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    (tmp_path / "ledger.lock").touch()

    ledger = Ledger(tmp_path)
    assert ledger.read("run") == old["run"]
    assert ledger.read_many(old) == old
    assert ledger.children(STAGE) == {f"shard_{i:05d}": old[f"{STAGE}/shard_{i:05d}"] for i in range(3)}
    # The shard reports as a job does, after the driver's poll stored a snapshot without it.
    ledger.set_status([f"{STAGE}/shard_00001"], Status.DONE, metrics={"problems": 8})
    shards = Ledger(tmp_path).children(STAGE)
    assert [s["status"] for s in shards.values()] == ["running", "done", "running"]
    assert shards["shard_00001"]["job_id"] == "7_1" and shards["shard_00001"]["metrics"] == {"problems": 8}
    # Its file is now a record file of versions; the others stay as they were until their own update.
    folder = tmp_path / "ledger" / STAGE
    assert sorted(p.name for p in folder.glob("shard_*")) == ["shard_00000.json", "shard_00001.jsonl", "shard_00002.json"]
    assert ledger.read(f"{STAGE}/shard_00001")["status"] == "done"


def test_a_torn_last_line_is_passed_over_and_cut_by_the_next_update(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    key = f"{STAGE}/shard_00000"
    ledger.update(key, {"status": "running"})
    ledger.update(key, {"progress": 1})
    path = ledger.root / f"{key}.jsonl"
    whole = path.read_bytes()
    assert len(whole.splitlines()) == 2  # one line per version: the first, then an append
    # A writer killed in the middle of its append, or a crash before its fdatasync returned.
    for torn in (b'{"progress":2,"stat', b"\0" * 300 + b"\n"):
        path.write_bytes(whole + torn)
        assert ledger.read(key)["progress"] == 1
        assert ledger.children(STAGE)["shard_00000"]["progress"] == 1
    ledger.update(key, {"status": "done"})
    lines = path.read_bytes().splitlines()
    assert len(lines) == 3 and [json.loads(line)["_version"] for line in lines] == [1, 2, 3]
    record = ledger.read(key)
    assert record["status"] == "done" and record["progress"] == 1


def test_a_record_file_grown_past_its_limit_is_written_anew(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state.ledger, "COMPACT_AT", 2000)
    ledger = Ledger(tmp_path)
    key = f"{STAGE}/shard_00000"
    for i in range(40):
        ledger.update(key, {"progress": i}, lambda r: r.__setitem__("n", r.get("n", 0) + 1))
    path = ledger.root / f"{key}.jsonl"
    assert path.stat().st_size <= 2000
    assert ledger.read(key)["n"] == 40 and ledger.read(key)["progress"] == 39
    assert json.loads(path.read_bytes().splitlines()[-1])["_version"] == 40


def test_polls_see_every_update_whatever_snapshot_they_find(tmp_path: Path) -> None:
    driver, job = Ledger(tmp_path), Ledger(tmp_path)
    keys = [f"{STAGE}/shard_{i:05d}" for i in range(200)]
    driver.update_many({k: {"status": "submitted"} for k in keys}, lambda r: r.__setitem__("attempts", r.get("attempts", 0) + 1))
    assert all(r == driver.read(k) for k, r in driver.read_many(keys).items())
    snapshot = driver.root / STAGE / SNAPSHOT
    when_submitted = snapshot.read_bytes()

    def done() -> list[int]:
        records = driver.read_many(keys)
        assert all(r["attempts"] == 1 and "_version" not in r for r in records.values())
        return [i for i, k in enumerate(keys) if records[k]["status"] == "done"]

    # Shards finish one by one, each by itself: more of them than a poll reads before it stores
    # the snapshot again, and fewer.
    for count in (70, 75, 76):
        for key in keys[len(done()) : count]:
            job.set_status([key], Status.DONE)
        assert done() == list(range(count))
    # A slow reader stores what it saw long ago, or a snapshot is torn: polls still see the truth.
    snapshot.write_bytes(when_submitted)
    assert done() == list(range(76))
    snapshot.write_bytes(when_submitted[: len(when_submitted) // 2])
    assert done() == list(range(76))
    assert driver.children(STAGE) == {k.rsplit("/", 1)[1]: driver.read(k) for k in keys}


def _markers(folder: Path, name: str) -> list[Path]:
    return sorted(folder.glob(f"{MARKERS}/*/{name}@*"), key=lambda p: p.name)


def test_a_writer_that_died_between_its_marker_and_its_record(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    key = f"{STAGE}/shard_00000"
    ledger.update(key, {"status": "running"})
    folder = ledger.root / STAGE
    [marker] = _markers(folder, "shard_00000")
    assert marker.name == "shard_00000@1"
    # Its next writer renamed the marker to version 2 and was killed before replacing the record.
    marker.rename(marker.with_name("shard_00000@2"))
    assert ledger.children(STAGE)["shard_00000"]["status"] == "running"
    ledger.update(key, {"status": "done"})
    assert ledger.children(STAGE)["shard_00000"]["status"] == "done"
    assert ledger.read_many([key])[key]["status"] == "done"
    assert [p.name for p in _markers(folder, "shard_00000")] == ["shard_00000@2"]


def test_markers_beside_their_records_as_earlier_ledgers_kept_them(tmp_path: Path) -> None:
    driver, job = Ledger(tmp_path), Ledger(tmp_path)
    keys = [f"{STAGE}/shard_{i:05d}" for i in range(3)]
    driver.update_many({k: {"status": "running"} for k in keys})
    driver.read_many(keys)
    folder = driver.root / STAGE
    for marker in folder.glob(f"{MARKERS}/*/*"):
        marker.rename(folder / f".{marker.name}")
    shutil.rmtree(folder / MARKERS)
    # A job of the earlier ledger finished shard 1: its marker beside it, renamed to the new version.
    job.update(keys[1], {"status": "done"})
    [moved] = _markers(folder, "shard_00001")
    moved.rename(folder / ".shard_00001@2")
    assert [r["status"] for r in driver.read_many(keys).values()] == ["running", "done", "running"]
    # This ledger's next update of it makes its marker in the buckets, and removes the one beside it.
    job.update(keys[1], {"note": "next"})
    assert [p.name for p in _markers(folder, "shard_00001")] == ["shard_00001@3"]
    assert not list(folder.glob(".shard_00001@*"))
    assert driver.read_many(keys)[keys[1]]["note"] == "next"


def test_a_snapshot_stored_before_this_machine_booted_is_not_trusted(tmp_path: Path) -> None:
    """An update does not sync its marker's rename: on some filesystems a crash loses it while the
    version it announced is on disk. Polls after the crash must not answer from a snapshot copy the
    lost marker would have shown out of date."""
    driver, job = Ledger(tmp_path), Ledger(tmp_path)
    keys = [f"{STAGE}/shard_{i:05d}" for i in range(3)]
    driver.update_many({k: {"status": "running"} for k in keys})
    assert {r["status"] for r in driver.read_many(keys).values()} == {"running"}
    folder, snapshot = driver.root / STAGE, driver.root / STAGE / SNAPSHOT
    stored = json.loads(snapshot.read_bytes())
    job.set_status([keys[0]], Status.DONE)
    # The crash: shard 0's marker went back to the version the snapshot holds; its record file kept "done".
    [marker] = _markers(folder, "shard_00000")
    marker.rename(marker.with_name("shard_00000@1"))

    def polled_with(stamp: dict[str, float]) -> str:
        snapshot.write_text(json.dumps({**{k: v for k, v in stored.items() if k != STORED_AT}, **stamp}))
        return driver.read_many(keys)[keys[0]]["status"]

    booted_at = state.ledger._booted_at()
    # Stored since this machine booted, the snapshot is trusted: the lost marker hides the update
    # (which the stamp is there for); stored before the boot, or by an earlier ledger that stamped
    # nothing, it is not, and the records are read.
    assert polled_with({STORED_AT: stored[STORED_AT]}) == "running"
    assert polled_with({STORED_AT: booted_at - 60}) == "done"
    assert polled_with({}) == "done"
    # That reader stored the snapshot anew, and the record's next update makes a new marker beside
    # the one left behind: the highest counts.
    assert json.loads(snapshot.read_bytes())[STORED_AT] > booted_at
    job.update(keys[0], {"note": "next"})
    assert [p.name for p in _markers(folder, "shard_00000")] == ["shard_00000@1", "shard_00000@3"]
    record = driver.read_many(keys)[keys[0]]
    assert (record["status"], record["note"]) == ("done", "next")
