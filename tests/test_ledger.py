import multiprocessing
from pathlib import Path

from state import Ledger, Status


def _bump(run_dir: str, worker: int, updates: int) -> None:
    ledger = Ledger(run_dir)
    for i in range(updates):
        # Every worker writes the same record and a record of its own: both must keep every update.
        ledger.update("iter_001/generate", mutate=lambda r: r.__setitem__("count", r.get("count", 0) + 1))
        ledger.update(f"iter_001/generate/shard_{worker:05d}", {"last": i}, lambda r: r.__setitem__("n", r.get("n", 0) + 1))


def test_64_processes_lose_no_update(tmp_path: Path) -> None:
    workers, updates = 64, 100
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_bump, args=(str(tmp_path), w, updates)) for w in range(workers)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=300)
        assert p.exitcode == 0
    ledger = Ledger(tmp_path)
    assert ledger.read("iter_001/generate")["count"] == workers * updates
    shards = ledger.children("iter_001/generate")
    assert len(shards) == workers
    assert all(r["n"] == updates and r["last"] == updates - 1 for r in shards.values())
    assert not list(ledger.root.rglob("*.tmp")), "no temp file may be left behind"


def test_status_timestamps_and_missing_records(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    assert ledger.read("iter_001/filter") == {}
    assert ledger.children("iter_001/generate") == {}
    ledger.set_status(["iter_001/filter"], Status.RUNNING)
    ledger.set_status(["iter_001/filter"], Status.DONE, metrics={"kept": 3})
    record = ledger.read("iter_001/filter")
    assert record["status"] == "done" and record["metrics"] == {"kept": 3}
    assert record["started_at"] <= record["ended_at"]
