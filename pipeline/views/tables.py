"""Tables of where a run stands (tools/status.py, tools/report.py, the driver's log), from ``summarize``'s data."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.table import Table

from jobs.scoring.learning_zone import RATE_BUCKETS
from pipeline.loop.hacking import describe, reward_rise

CATEGORY_ROWS = (
    ("too_hard", "Too hard (0 correct)", "Decreasing"),
    ("challenging", "Challenging", ""),
    ("learning_zone", "Learning zone", "Increasing then plateau"),
    ("almost_mastered", "Almost mastered", ""),
    ("mastered", "Mastered", "Increasing"),
)


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
        cells = [_percent((e["metrics"].get("categories") or {}).get(key)) if e["metrics"].get("categories") else "-"
                 for e in summary["iterations"]]
        table.add_row(label, *empty, *cells, trend)
    table.add_row(
        "Mean correct rate", *empty, *[_percent(e["metrics"].get("mean_correct_rate")) for e in summary["iterations"]], "Increasing"
    )
    table.add_row(
        "Filtered samples", *empty,
        *[str(e["metrics"]["filtered_samples"]) if e["metrics"].get("filtered_samples") is not None else "-"
          for e in summary["iterations"]],
        "",
    )
    if any(e["metrics"].get("final_reward") is not None for e in summary["iterations"]):
        table.add_row("Method", *empty, *[e["method"] for e in summary["iterations"]], "")
        table.add_row("Training reward (last step)", *empty, *[_number(e["metrics"].get("final_reward")) for e in summary["iterations"]],
                      "Increasing")
        # Each reward's mean over the first and the last quarter of the iteration's steps (what the
        # hacking check compares): a reward that climbs while held-out accuracy falls is being gamed.
        rises = [reward_rise((e["stages"].get("train", {}).get("metrics") or {}).get("step_log") or []) for e in summary["iterations"]]
        for name in dict.fromkeys(name for rise in rises for name in rise):
            table.add_row(f"  reward {name} (start -> end)", *empty,
                          *[f"{rise[name][0]:.3f} -> {rise[name][1]:.3f}" if name in rise else "-" for rise in rises], "")
        table.add_row("Problems trained on (band)", *empty,
                      *[_selected(e["metrics"].get("selection")) for e in summary["iterations"]], "")
    table.add_row(
        "Held-out accuracy", _percent(summary["base_heldout_accuracy"]),
        *[_percent(e["metrics"].get("heldout_accuracy")) for e in summary["iterations"]], "Increasing",
    )
    return table


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _selected(selection: dict[str, Any] | None) -> str:
    return "-" if not selection else f"{selection['selected']} of {selection['problems']}"


def hacking_lines(summary: dict[str, Any]) -> list[str]:
    """The reward-hacking check's flags, a line each."""
    return [f"reward hacking? {describe(flag)}" for flag in summary["hacking"]]


def distribution_table(summary: dict[str, Any]) -> Table:
    """Per iteration: problems by correct rate and by number of correct candidates (the histogram)."""
    table = Table(title=f"{summary['run_name']}: correct-rate distribution per iteration")
    table.add_column("Problems with")
    for entry in summary["iterations"]:
        table.add_column(f"Iteration {entry['iteration']}", justify="right")
    metrics = [entry["metrics"] for entry in summary["iterations"]]
    # The ledger stores keys sorted as text ("10" before "2"): order them as numbers and buckets.
    max_k = max((int(k) for m in metrics for k in m.get("correct_count_histogram") or {}), default=-1)
    rows = [("correct_rate_buckets", bucket, f"{bucket} correct rate") for bucket in RATE_BUCKETS]
    rows += [("correct_count_histogram", str(count), f"{count} correct") for count in range(max_k + 1)]
    for key, name, label in rows:
        cells = []
        for m in metrics:
            counts = m.get(key) or {}
            total = sum(counts.values())
            cells.append(f"{counts.get(name, 0)} ({counts.get(name, 0) / total:.0%})" if total else "-")
        table.add_row(label, *cells)
    return table


# The seed's "Tips & Troubleshooting" warning signs: (what, threshold, meaning, advice). Flags are
# the config keys of this project.
TOO_MANY_TOO_HARD = (
    "Too many \"too hard\" problems (>50%)",
    "the model is too weak for the dataset",
    [
        "Increase samples per problem (16 -> 32 -> 64): generate.num_samples",
        "Increase temperature (0.8 -> 1.0 -> 1.2): generate.temperature",
        "Do more SFT first before starting ReST",
        "Add easier problems to the dataset",
    ],
)
TOO_MANY_MASTERED = (
    "Too many \"mastered\" problems (>50%)",
    "the dataset is too easy",
    [
        "Model has likely learned this dataset - consider stopping ReST",
        "Add harder problems to the dataset",
        "Move to GRPO for further refinement",
    ],
)
SMALL_FILTERED_SET = (
    "Very small filtered dataset (<1000 samples)",
    "risk of overfitting",
    [
        "Include more categories: filter.include_mastered=true",
        "Reduce filtering aggressiveness: filter.strategy=all, or a larger filter.top_k",
        "Train for fewer epochs (1 instead of 2): train.num_epochs=1",
        "Use a lower learning rate: train.learning_rates",
    ],
)
WARNING_SHARE = 0.5
MIN_FILTERED_SAMPLES = 1000


def warning_signs(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The seed's warning signs each iteration shows, with the seed's advice."""
    signs = []
    for entry in summary["iterations"]:
        metrics = entry["metrics"]
        categories = metrics.get("categories") or {}
        found = []
        for key, sign in (("too_hard", TOO_MANY_TOO_HARD), ("mastered", TOO_MANY_MASTERED)):
            if categories.get(key, 0) > WARNING_SHARE:
                found.append((sign, f"{categories[key]:.1%} {key}"))
        if metrics.get("filtered_samples") is not None and metrics["filtered_samples"] < MIN_FILTERED_SAMPLES:
            found.append((SMALL_FILTERED_SET, f"{metrics['filtered_samples']} samples"))
        for (title, meaning, advice), value in found:
            signs.append({"iteration": entry["iteration"], "sign": title, "value": value, "meaning": meaning, "advice": advice})
    return signs


def stage_table(summary: dict[str, Any]) -> Table:
    """Iterations x stages: status, shard counts by status, attempts, job ids."""
    caption = f"run {summary['status'] or 'not started'}" + (f": {summary['error']}" if summary["error"] else "")
    table = Table(title=f"{summary['run_name']} ({summary['run_dir']})", caption=caption)
    table.add_column("Iteration", justify="right")
    for name in summary["stage_names"]:
        table.add_column(name)
    for entry in summary["iterations"]:
        cells = []
        for name in summary["stage_names"]:
            info = entry["stages"].get(name)
            if info is None:
                cells.append("-")
                continue
            text = info["status"]
            if info.get("shards"):
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


def services_table(summary: dict[str, Any]) -> Table:
    """The run's services: where each serves (node, endpoint), its job and how often it was started again."""
    table = Table(title="services")
    for column in ("service", "status", "job", "node", "endpoint", "restarts", "error"):
        table.add_column(column)
    for name, info in summary["services"].items():
        job = info["job_ids"][-1] if info["job_ids"] else None
        table.add_row(name, info["status"], *["-" if v is None else str(v) for v in (job, info["node"], info["endpoint"],
                                                                                       info["restarts"], info["error"])])
    return table
