"""Where a run stands, read from its ledger: the data behind tools/status.py and the driver's tables."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from rich.table import Table

from pipeline.plan import BASELINE, STAGES, iteration_name, stage_key
from state import Ledger

CATEGORY_ROWS = (
    ("too_hard", "Too hard (0 correct)", "Decreasing"),
    ("challenging", "Challenging", ""),
    ("learning_zone", "Learning zone", "Increasing then plateau"),
    ("almost_mastered", "Almost mastered", ""),
    ("mastered", "Mastered", "Increasing"),
)


def _job_fields(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "status": record.get("status", "planned"),
        "attempts": record.get("attempts", 0),
        "job_ids": record.get("job_ids", []),
        "restart_count": record.get("restart_count", 0),
        "error": record.get("error"),
    }


def summarize(run_dir: Path | str) -> dict[str, Any]:
    ledger = Ledger(run_dir)
    run = ledger.read("run")
    base = ledger.read(f"{BASELINE}/eval")
    iterations = []
    for iteration in range(1, run.get("num_iterations", 0) + 1):
        stages: dict[str, Any] = {}
        for stage in STAGES:
            record = ledger.read(stage_key(iteration, stage))
            stages[stage] = {**_job_fields(record), "metrics": record.get("metrics") or {}}
        shards = ledger.children(stage_key(iteration, "generate"))
        stages["generate"]["shards"] = [
            {"index": int(name.rsplit("_", 1)[1]), **_job_fields(record), "executions": record.get("executions", 0)}
            for name, record in shards.items()
        ]
        filtered, evaluated = stages["filter"]["metrics"], stages["eval"]["metrics"]
        iterations.append(
            {
                "iteration": iteration,
                "name": iteration_name(iteration),
                "stages": stages,
                "metrics": {
                    "heldout_accuracy": evaluated.get("heldout_accuracy"),
                    "mean_correct_rate": filtered.get("mean_correct_rate"),
                    "categories": filtered.get("categories"),
                    "filtered_samples": filtered.get("filtered_samples"),
                    "final_loss": stages["train"]["metrics"].get("final_loss"),
                },
            }
        )
    return {
        "run_dir": str(Path(run_dir).resolve()),
        "run_name": run.get("run_name"),
        "status": run.get("status"),
        "base_heldout_accuracy": (base.get("metrics") or {}).get("heldout_accuracy"),
        "iterations": iterations,
    }


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def iteration_table(summary: dict[str, Any]) -> Table:
    """The seed's "Interpreting Analytics Across Iterations" table for the run so far."""
    table = Table(title=f"{summary['run_name']}: analytics across iterations")
    table.add_column("Metric")
    table.add_column("Base", justify="right")
    for entry in summary["iterations"]:
        table.add_column(f"Iteration {entry['iteration']}", justify="right")
    table.add_column("Healthy trend")
    empty = ["-"]
    for key, label, trend in CATEGORY_ROWS:
        cells = [_percent((e["metrics"]["categories"] or {}).get(key)) if e["metrics"]["categories"] else "-" for e in summary["iterations"]]
        table.add_row(label, *empty, *cells, trend)
    table.add_row(
        "Mean correct rate", *empty, *[_percent(e["metrics"]["mean_correct_rate"]) for e in summary["iterations"]], "Increasing"
    )
    table.add_row(
        "Filtered samples", *empty,
        *[str(e["metrics"]["filtered_samples"]) if e["metrics"]["filtered_samples"] is not None else "-" for e in summary["iterations"]],
        "",
    )
    table.add_row(
        "Held-out accuracy", _percent(summary["base_heldout_accuracy"]),
        *[_percent(e["metrics"]["heldout_accuracy"]) for e in summary["iterations"]], "Increasing",
    )
    return table


def stage_table(summary: dict[str, Any]) -> Table:
    """Iterations x stages: status, shard counts by status, attempts, job ids."""
    table = Table(title=f"{summary['run_name']} ({summary['run_dir']})")
    table.add_column("Iteration", justify="right")
    for stage in STAGES:
        table.add_column(stage)
    for entry in summary["iterations"]:
        cells = []
        for stage in STAGES:
            info = entry["stages"][stage]
            text = info["status"]
            if stage == "generate" and info["shards"]:
                counts = Counter(s["status"] for s in info["shards"])
                text += " (" + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + ")"
                attempts = max(s["attempts"] for s in info["shards"])
                jobs = sorted({j for s in info["shards"] for j in s["job_ids"]})
            else:
                attempts, jobs = info["attempts"], info["job_ids"]
            if attempts:
                text += f"\nattempts {attempts}"
            if jobs:
                text += "\njobs " + ", ".join(jobs[:3]) + (f" +{len(jobs) - 3}" if len(jobs) > 3 else "")
            cells.append(text)
        table.add_row(str(entry["iteration"]), *cells)
    return table
