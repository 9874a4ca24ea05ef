"""tools/status.py on a big run: 10,000 generation shards x 3 iterations, built through the ledger.

    python tools/bench/status_bench.py                      # 10,000 shards x 3 iterations
    python tools/bench/status_bench.py --shards 500 --iterations 2   # a quick run
    python tools/bench/status_bench.py --baseline-rev HEAD  # the checkout's status.py beside another commit's

It writes a synthetic run into a temporary folder with the ledger's own API (``update_many``, as the
driver's submission and the shards' jobs leave it: every shard submitted, given a job id, done with
metrics; each iteration's filter, train and eval done with theirs; the last iteration's training
running), then times ``python tools/status.py RUN`` and ``python tools/status.py RUN --json`` as a
user runs them (a fresh interpreter each time: imports included, from a bytecode cache in the
temporary folder, as an installed package has one, even where PYTHONDONTWRITEBYTECODE is set),
``--repeat`` times each, keeping the fastest and the median, with the CPU time (user + system) of
the fastest. The first call after the run was written reads every record from its file (the
snapshot of each folder is then stored) and compiles the modules; the others read the snapshots.

With ``--baseline-rev``, the same commands of that commit (its tools/, pipeline/, jobs/ and state/,
exported from git into a temporary folder) run on the same run directory, side by side.
Target (issue 27): both under 1 s.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.loop.summary import run_planner
from state import Ledger

SUBMISSION = "20261201-000000-abcdef12"


def synthetic_run(run_dir: Path, shards: int, iterations: int) -> None:
    """A local run of ``iterations`` iterations of ``shards`` generation shards each, as the driver and
    its jobs leave it; the last iteration's training is running (a dead job id: its process is gone)."""
    run_dir.mkdir(parents=True)
    config = {"run_name": "bench", "model": {"path": "/nonexistent"}, "data": {"train": "/nonexistent", "heldout": "/nonexistent"},
              "num_iterations": iterations, "train": {"learning_rates": [1e-5] * iterations, "max_steps": 100},
              "generate": {"num_shards": shards}, "executor": {"cluster": "local"}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    ledger = Ledger(run_dir)
    ledger.update("run", {"run_name": "bench", "num_train": 100 * shards, "num_iterations": iterations, "status": "running"})
    ledger.set_status(["baseline/eval"], "done", metrics={"heldout_accuracy": 0.2, "truncated": 3, "truncated_fraction": 0.01})
    planner = run_planner(run_dir)
    pid = 4_000_000  # above pid_max: no such process
    for iteration in range(1, iterations + 1):
        for stage in planner.iteration(iteration):
            keys = [t.key for t in stage.tasks]
            if stage.is_array:
                ledger.update(stage.key, {"status": "running", "num_tasks": len(keys)})

            def next_attempt(record: dict[str, Any]) -> None:
                record["attempts"] = record.get("attempts", 0) + 1

            ledger.update_many({k: {"status": "submitted", "submission": SUBMISSION} for k in keys}, next_attempt)
            ledger.update_many({k: {"job_id": str(pid + i), "job_ids": [str(pid + i)], "log": f"{run_dir}/submitit/{k}/{pid + i}_0_log.err"}
                                for i, k in enumerate(keys)})
            pid += len(keys)
            if iteration == iterations and stage.name == "train":
                ledger.update_many({k: {"status": "running", "started_at": "2026-12-01T00:00:00+00:00",
                                        "progress": {"done": 40, "total": 100, "problems_per_s": 0.5, "at": "2026-12-01T00:01:20+00:00"}}
                                    for k in keys})
                return
            ledger.update_many({k: {"status": "done", "executions": 1, "host": "node001", "pid": 4242, "started_at": "2026-12-01T00:00:00+00:00",
                                    "ended_at": "2026-12-01T00:10:00+00:00", "error": None, "metrics": metrics(stage.name)}
                                for k in keys})
            if stage.is_array:
                ledger.set_status([stage.key], "done", metrics={"shards": len(keys), "problems": 100 * len(keys), "truncated": 12 * len(keys),
                                                                 "truncated_fraction": 0.03})


def metrics(stage: str) -> dict[str, Any]:
    """What a task of ``stage`` reports, roughly as large as the real ones."""
    if stage == "generate":
        return {"problems": 100, "generated_tokens": 51200, "failed_items": 0, "tokens_per_s": 85.3, "truncated": 12, "truncated_fraction": 0.03}
    if stage == "filter":
        return {"mean_correct_rate": 0.41, "filtered_samples": 123456, "total_candidates": 1_600_000,
                "categories": {"too_hard": 0.1, "challenging": 0.2, "learning_zone": 0.4, "almost_mastered": 0.2, "mastered": 0.1}}
    if stage == "train":
        return {"final_loss": 0.5, "step_log": [{"step": s, "loss": 1 / s, "learning_rate": 1e-5} for s in range(1, 101)]}
    return {"heldout_accuracy": 0.3, "truncated": 2, "truncated_fraction": 0.01}


def time_command(command: list[str], code: Path, cache: Path, repeat: int) -> tuple[float, float, float, float]:
    """Seconds of the first call, the fastest and the median of the rest, and the fastest's CPU seconds
    (``code``: whose modules it imports; ``cache``: the bytecode cache)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(COLUMNS="120", PYTHONPATH=str(code), PYTHONPYCACHEPREFIX=str(cache))
    times = []
    for _ in range(repeat + 1):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False, env=env)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        times.append((wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime))
        if result.returncode != 0:
            sys.exit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr.decode()[-2000:]}")
    rest = sorted(times[1:])
    return times[0][0], rest[0][0], statistics.median(wall for wall, _ in rest), rest[0][1]


def export_commit(rev: str, folder: Path) -> Path:
    """The code of commit ``rev`` in ``folder`` (git archive of what status.py imports)."""
    folder.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "tools", "pipeline", "jobs", "state"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5, help="timed calls after the first, per command")
    parser.add_argument("--baseline-rev", help="also time this commit's status.py on the same run")
    parser.add_argument("--dir", type=Path, help="where the temporary run goes (default: the system's temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        run_dir = Path(tmp) / "bench"
        start = time.perf_counter()
        synthetic_run(run_dir, args.shards, args.iterations)
        print(f"built a run of {args.shards} shards x {args.iterations} iterations in {time.perf_counter() - start:.1f} s")
        checkouts = {"this checkout": ROOT}
        if args.baseline_rev:
            checkouts[args.baseline_rev] = export_commit(args.baseline_rev, Path(tmp) / "baseline")
        print(f"{'code':<16} {'command':<20} {'first s':>8} {'fastest s':>10} {'median s':>9} {'CPU s (fastest)':>16}")
        for name, code in checkouts.items():
            for flags in ([], ["--json"]):
                command = [sys.executable, str(code / "tools" / "status.py"), str(run_dir), *flags]
                label = " ".join(["status.py", *flags])
                first, fastest, median, cpu = time_command(command, code, Path(tmp) / "pycache" / name, args.repeat)
                print(f"{name:<16} {label:<20} {first:>8.2f} {fastest:>10.2f} {median:>9.2f} {cpu:>16.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
