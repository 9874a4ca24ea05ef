"""Straggler re-split on the local SLURM cluster: a shard made slow for real (its problems ask for
many more tokens) is stopped at an item boundary and the rest of its items split into new array
tasks; every problem is generated exactly once (the run is tools/bench/resplit_bench.py's, which
also times it against the same run without re-split)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.problems.data import read_jsonl
from pipeline.scheduling.resplit import Resplit, cut, stragglers
from state import Ledger
from tests.conftest import run_cli
from tests.test_pipeline import assert_each_problem_once
from tools.bench.resplit_bench import SHORT_RUN_POLICY, SLOW_SHARD, straggler_config


def kept_indices(run_dir: Path) -> list[int]:
    """Where the stopped shard's finished problems are in the training set."""
    ids = [p["id"] for p in read_jsonl(run_dir / "data" / "train.jsonl")]
    return [ids.index(r["id"]) for r in read_jsonl(run_dir / "iter_001" / "generate" / f"shard_{SLOW_SHARD:05d}.jsonl")]




def test_the_rule_picks_only_a_running_task_far_behind_the_finished_ones() -> None:
    policy = Resplit(min_done_fraction=0.5, eta_ratio=3, min_remaining_items=4)
    done = {"status": "done", "metrics": {"seconds": 10.0, "server_start_s": 2.0}}

    def running(done_items: int, rate: float) -> dict:
        return {"status": "running", "progress": {"done": done_items, "total": 40, "problems_per_s": rate}}

    records = {"a": done, "b": done, "slow": running(4, 0.5), "ok": running(30, 2.0)}
    assert stragglers(records, policy) == {"slow": 72.0}, "ETA 36 items / 0.5 per s >= 3 x the median 12 s"
    assert stragglers({**records, "b": running(0, 1.0)}, policy) == {}, "too few done to judge"
    assert stragglers({**records, "slow": running(37, 0.01)}, policy) == {}, "too few items left to split"
    assert cut(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]] and cut([5], 4) == [[5]]


@pytest.mark.slow
def test_a_straggler_is_stopped_and_its_rest_split_with_every_problem_once(
    slurm_cluster: str, tiny_assets: Path, tmp_path: Path
) -> None:
    config = straggler_config(tiny_assets, tmp_path, SHORT_RUN_POLICY)
    result = run_cli("-m", "pipeline.run", str(config), timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = tmp_path / "runs" / "straggler"
    ledger = Ledger(run_dir)
    stage = ledger.read("iter_001/generate")
    split = stage["splits"][f"shard_{SLOW_SHARD:05d}"]
    assert split["state"] == "split" and split["job_id"], split
    assert 1 <= len(split["parts"]) <= 2 and split["kept"] + sum(map(len, split["parts"])) == 32
    assert sorted(i for part in split["parts"] for i in part) == sorted(set(range(32, 64)) - set(kept_indices(run_dir)))
    stopped = ledger.read(f"iter_001/generate/shard_{SLOW_SHARD:05d}")
    assert stopped["status"] == "done" and "stopped as a straggler" in stopped["note"]
    assert stage["num_tasks"] == 3 + len(split["parts"]) and stage["metrics"]["shards"] == 3 + len(split["parts"])
    assert_each_problem_once(run_dir, 1, 96)
    assert ledger.read("iter_001/filter")["status"] == "done", "the filter found every problem once"
    assert "straggler" in result.stdout
    status = json.loads(run_cli("tools/status.py", str(run_dir), "--json").stdout)
    names = [s["name"] for s in status["iterations"][0]["stages"]["generate"]["shards"]]
    assert [n for n in names if "_split_" in n] == [f"shard_{SLOW_SHARD:05d}_split_{j:02d}" for j in range(len(split["parts"]))]
    print(f"generation with re-split: {stage['metrics']['wall_seconds']} s")
