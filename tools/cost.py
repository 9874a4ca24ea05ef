"""``python tools/cost.py RUN_DIR [--json]``: what each iteration and stage of a run cost.

A SLURM run: GPU-hours (elapsed x allocated GPUs) and CPU-hours (elapsed x allocated CPUs) from
SLURM's accounting, queue wait (start - submit), and for stages that start vLLM servers the share
of their time spent starting them rather than generating. Every attempt of every job counts,
requeued runs too; the total is what sacct reports for the run's jobs.

A local run (``executor.cluster: local``): what each job measured of itself and recorded in its
ledger record (``usage``): wall seconds from its start to its end, and CPU seconds (user + system)
of its process and of the child processes it waited for (vLLM servers, filter workers); only the
first process of a multi-process job reports. Every execution counts; a job killed before it could
report (SIGKILL, out of memory) is counted as unmeasured. A stage's elapsed time runs from its
first job's start to its last job's end (its jobs may run side by side).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.table import Table

from pipeline.config import read_run_config
from pipeline.console import console as make_console
from pipeline.scheduling.watch import SchedulerUnavailable
from pipeline.views.accounting import cost_table, run_cost, stage_records

FIGURES = ("jobs", "executions", "unmeasured", "wall_seconds", "cpu_seconds")


def local_cost(run_dir: Path) -> dict[str, Any]:
    """A local run's wall and CPU seconds per stage, per iteration and in all, from its ledger."""
    _, groups = stage_records(run_dir)
    stages = []
    for cost, records in groups:
        ran = [r for r in records if r.get("job_ids") or r.get("usage")]
        if not ran:
            continue
        usage = [r.get("usage") or {} for r in ran]
        stages.append({
            "iteration": cost.iteration, "stage": cost.stage,
            "jobs": sum(len(r.get("job_ids", [])) for r in ran),
            "executions": sum(u.get("executions", 0) for u in usage),
            # Ended without a word of its usage: killed, or run by an earlier version.
            "unmeasured": sum(not u and r.get("status") in ("done", "failed") for r, u in zip(ran, usage, strict=True)),
            "wall_seconds": round(sum(u.get("wall_s", 0.0) for u in usage), 1),
            "cpu_seconds": round(sum(u.get("cpu_s", 0.0) for u in usage), 1),
            "started_at": min((r["started_at"] for r in ran if r.get("started_at")), default=None),
            "ended_at": max((r["ended_at"] for r in ran if r.get("ended_at")), default=None),
        })
    iterations = sorted({s["iteration"] for s in stages if s["iteration"] is not None})
    return {
        "run_dir": str(run_dir.resolve()),
        "stages": [_elapsed(s) for s in stages],
        "iterations": [_total(i, [s for s in stages if s["iteration"] == i]) for i in iterations],
        "total": _total(None, stages),
    }


def _elapsed(row: dict[str, Any]) -> dict[str, Any]:
    start, end = row["started_at"], row["ended_at"]
    elapsed = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds() if start and end and end >= start else None
    return {**row, "elapsed_seconds": elapsed}


def _total(iteration: int | None, rows: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"iteration": iteration, "stage": "all", **{k: sum(r[k] for r in rows) for k in FIGURES}}
    total["wall_seconds"], total["cpu_seconds"] = round(total["wall_seconds"], 1), round(total["cpu_seconds"], 1)
    total["started_at"] = min((r["started_at"] for r in rows if r["started_at"]), default=None)
    total["ended_at"] = max((r["ended_at"] for r in rows if r["ended_at"]), default=None)
    return _elapsed(total)


def local_table(cost: dict[str, Any]) -> Table:
    table = Table(title=f"cost of {cost['run_dir']} (the jobs' own measures)",
                  caption="wall, CPU: summed over the stage's jobs; elapsed: first start to last end")
    for column in ("iteration", "stage", "jobs", "wall s", "CPU s", "elapsed s", "unmeasured"):
        table.add_column(column, justify="left" if column in ("iteration", "stage") else "right")
    for index, row in enumerate(cost["stages"]):
        table.add_row(*_cells(row))
        following = cost["stages"][index + 1]["iteration"] if index + 1 < len(cost["stages"]) else object()
        if row["iteration"] is not None and following != row["iteration"]:
            table.add_row(*_cells(next(i for i in cost["iterations"] if i["iteration"] == row["iteration"])),
                          style="bold", end_section=True)
    table.add_row(*_cells({**cost["total"], "iteration": "run"}), style="bold")
    return table


def _cells(row: dict[str, Any]) -> list[str]:
    iteration = row["iteration"]
    label = "run" if iteration == "run" else "services" if iteration is None else "baseline" if iteration == 0 else str(iteration)
    elapsed = row["elapsed_seconds"]
    return [label, row["stage"], str(row["jobs"]), f"{row['wall_seconds']:.0f}", f"{row['cpu_seconds']:.0f}",
            "-" if elapsed is None else f"{elapsed:.0f}", str(row["unmeasured"])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/cost.py", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON (seconds, and hours for SLURM)")
    args = parser.parse_args(argv)
    if not (args.run_dir / "ledger").is_dir() or not (args.run_dir / "config.yaml").is_file():
        print(f"error: {args.run_dir}: not a run directory (no ledger/ and config.yaml in it)", file=sys.stderr)
        return 2
    cluster = read_run_config(args.run_dir / "config.yaml").executor.cluster
    if cluster == "debug":
        print(f"error: {args.run_dir} ran on executor.cluster=debug, inside the driver's process: its jobs have no figures of their own",
              file=sys.stderr)
        return 2
    try:
        cost, table = (run_cost(args.run_dir), cost_table) if cluster == "slurm" else (local_cost(args.run_dir), local_table)
    except SchedulerUnavailable as error:
        print(f"error: SLURM's accounting could not be asked: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(cost, indent=2))
    else:
        make_console().print(table(cost))
    return 0


if __name__ == "__main__":
    sys.exit(main())
