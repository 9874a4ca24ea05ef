"""Straggler re-split against none, side by side on the local SLURM cluster.

    python tools/bench/resplit_bench.py [--problems 960] [--slow-tokens 400] [--rounds 1]

One iteration of the tiny demo model over ``--problems`` problems in 3 shards, where the middle
shard's problems ask for ``--slow-tokens`` tokens instead of 12 (a shard made slow for real: its
items take many times longer). Each round runs it twice, alternating which goes first: with
``executor.generate.resplit: false`` and with re-split (thresholds suited to a run this short).
Prints, per round, the generation stage's wall time and the whole run's, and the ratio; checks
each time that every problem was generated exactly once. Starts the local SLURM cluster
(tools/local_slurm.sh) if none is up; the demo's tiny model is built offline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from jobs.problems.data import read_jsonl
from state import Ledger
from tools.demo import build

ROOT = Path(__file__).resolve().parents[2]
SLOW_SHARD = 1
# Thresholds for a run of a minute or two: judge once a shard is done, from 2 s of progress; split in 2 (2 CPUs here).
SHORT_RUN_POLICY = {"min_done_fraction": 0.3, "eta_ratio": 3, "min_remaining_items": 4, "max_parts": 2, "progress_every_s": 2}


def straggler_config(assets: Path, folder: Path, resplit: bool | dict[str, Any], problems: int = 96,
                     slow_tokens: int = 400) -> Path:
    """A one-iteration run over ``problems`` problems in 3 shards; the middle shard's ask for
    ``slow_tokens`` tokens instead of 12."""
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = problems // 3
    records = read_jsonl(assets / "train.jsonl")[: per_shard * 3]
    for record in records[per_shard * SLOW_SHARD: per_shard * (SLOW_SHARD + 1)]:
        record["max_tokens"] = slow_tokens
    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {
        "run_name": "straggler", "runs_dir": str(folder / "runs"), "export_dir": str(folder / "models"),
        "num_iterations": 1,
        "model": {"path": str(assets / "random_init")},
        "data": {"train": str(train), "heldout": None},
        "generate": {"num_samples": 2, "max_tokens": 12, "batch_size": 1, "num_shards": 3},
        "filter": {"verifier": "numeric", "strategy": "all"},
        "train": {"method": "lora", "load_in_4bit": False, "lora_r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                  "max_steps": 2,
                  "batch_size": 4, "gradient_accumulation_steps": 1, "gradient_checkpointing": False,
                  "replay_data": str(assets / "warmstart.jsonl"), "learning_rates": [1e-3]},
        "executor": {"cluster": "slurm", "poll_interval_s": 0.5, "max_poll_interval_s": 1.0,
                     "generate": {"cpus_per_task": 1, "timeout_min": 30, "resplit": resplit}},
    }
    path = folder / "straggler.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def every_problem_once(run_dir: Path, expected: int) -> bool:
    ids = [r["id"] for shard in (run_dir / "iter_001" / "generate").glob("shard_*.jsonl") for r in read_jsonl(shard)]
    return len(ids) == expected == len(set(ids))


def timed_run(config: Path, problems: int) -> dict[str, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipeline.run", str(config)], cwd=ROOT, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"run failed ({config}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    run_dir = config.parent / "runs" / "straggler"
    stage = Ledger(run_dir).read("iter_001/generate")
    if not every_problem_once(run_dir, problems):
        raise SystemExit(f"{run_dir}: a problem is missing or generated twice")
    return {"generate_s": stage["metrics"]["wall_seconds"], "run_s": seconds, "tasks": stage["num_tasks"]}


def ensure_cluster() -> None:
    if os.environ.get("SLURM_CONF"):
        return
    start = subprocess.run(["bash", str(ROOT / "tools" / "local_slurm.sh"), "start"], capture_output=True, text=True, check=True)
    os.environ["SLURM_CONF"] = start.stdout.strip().split("=", 1)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/bench/resplit_bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=960)
    parser.add_argument("--slow-tokens", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    ensure_cluster()
    ratios = []
    with tempfile.TemporaryDirectory(prefix="resplit_bench_") as scratch:
        folder = Path(scratch)
        build(folder / "assets", with_warm_start=False)
        problems = args.problems // 3 * 3
        for number in range(1, args.rounds + 1):
            kinds = {"without re-split": False, "with re-split": SHORT_RUN_POLICY}
            order = list(kinds) if number % 2 else list(reversed(kinds))
            figures = {}
            for kind in order:
                config = straggler_config(folder / "assets", folder / f"round_{number}_{kinds[kind] is False}", kinds[kind],
                                          problems, args.slow_tokens)
                figures[kind] = timed_run(config, problems)
                f = figures[kind]
                print(f"round {number}, {kind}: generation {f['generate_s']:.1f} s ({f['tasks']} tasks), whole run {f['run_s']:.1f} s",
                      flush=True)
            ratio = figures["with re-split"]["generate_s"] / figures["without re-split"]["generate_s"]
            ratios.append(ratio)
            print(f"round {number}: generation with re-split / without: {ratio:.2f}", flush=True)
    print(f"median over {args.rounds} round(s): {statistics.median(ratios):.2f} (below 1: re-split is faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
