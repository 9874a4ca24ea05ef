"""Tables of where a run stands (tools/status.py, tools/report.py, the driver's log), from ``summarize``'s data."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from jobs.scoring.learning_zone import RATE_BUCKETS
from pipeline.loop.hacking import describe, describe_collapse, reward_rise

CATEGORY_ROWS = (
    ("too_hard", "Too hard (0 correct)", "Decreasing"),
    ("challenging", "Challenging", ""),
    ("learning_zone", "Learning zone", "Increasing then plateau"),
    ("almost_mastered", "Almost mastered", ""),
    ("mastered", "Mastered", "Increasing"),
)


T = TypeVar("T")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def run_title(summary: dict[str, Any]) -> str:
    """The run's name; its folder's before the ledger has one (a run whose first record is not written)."""
    return summary["run_name"] or summary["run_dir"].rstrip("/").rpartition("/")[2]


def new_table(title: str, *columns: str, caption: str | None = None) -> Table:
    """A table whose cells wrap between words, never cut: a word longer than its column is folded (whole)."""
    table = Table(title=title, caption=caption)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def fits(console: Console, table: Table) -> bool:
    """Whether ``table`` fits the console without cutting a word; if so, and only by wrapping its cells,
    its columns get widths that do (rich's own narrowing takes from the widest column, words or not):
    each its longest word, and the room left shared as the columns' longest lines ask."""
    ranges = [(max(m.minimum for m in sizes), max(m.maximum for m in sizes)) for sizes in
              ([Measurement.get(console, console.options, cell) for cell in (column.header, *column.cells)] for column in table.columns)]
    room = console.width - 3 * len(ranges) - 1  # a space each side of a cell, and the borders
    if sum(high for _, high in ranges) <= room:
        return True
    spare, slack = room - sum(low for low, _ in ranges), sum(high - low for low, high in ranges)
    if spare < 0:
        return False
    for column, (low, high) in zip(table.columns, ranges, strict=True):
        column.width = low + spare * (high - low) // slack
    return True


def fitted(console: Console, build: Callable[[Sequence[T]], Table], items: Sequence[T]) -> list[Table]:
    """``build(items)``, or, where the console is too narrow for it without cutting a word, ``build`` of
    consecutive parts of ``items`` (a table's iteration columns), each fitted to the console."""
    table = build(items)
    if len(items) <= 1 or fits(console, table):
        return [table]
    half = (len(items) + 1) // 2
    return fitted(console, build, items[:half]) + fitted(console, build, items[half:])


def _filtered(entry: dict[str, Any]) -> bool:
    return bool(entry["metrics"].get("categories"))


def iteration_table(summary: dict[str, Any], iterations: Sequence[dict[str, Any]] | None = None) -> Table:
    """The seed's "Interpreting Analytics Across Iterations" table for the run so far (or ``iterations``
    of it). Rows of the filter's learning-zone analytics only where some iteration has them (a GRPO
    iteration without a pass-rate band has no filter)."""
    iterations = summary["iterations"] if iterations is None else iterations
    table = new_table(f"{run_title(summary)}: analytics across iterations", "Metric", "Base",
                      *[f"Iteration {e['iteration']}" for e in iterations], "Healthy trend")
    for column in table.columns[1:-1]:
        column.justify = "right"
    empty = ["-"]
    if any(_filtered(e) for e in summary["iterations"]):
        for key, label, trend in CATEGORY_ROWS:
            table.add_row(label, *empty, *[_percent(e["metrics"]["categories"].get(key)) if _filtered(e) else "-" for e in iterations], trend)
        table.add_row("Mean correct rate", *empty, *[_percent(e["metrics"].get("mean_correct_rate")) for e in iterations], "Increasing")
        table.add_row(
            "Filtered samples", *empty,
            *[str(e["metrics"]["filtered_samples"]) if e["metrics"].get("filtered_samples") is not None else "-" for e in iterations],
            "",
        )
    if any(e["metrics"].get("final_reward") is not None for e in summary["iterations"]):
        table.add_row("Method", *empty, *[e["method"] for e in iterations], "")
        table.add_row("Training reward (last step)", *empty, *[_number(e["metrics"].get("final_reward")) for e in iterations],
                      "Increasing")
        # Each reward's mean over the first and the last quarter of the iteration's steps (what the
        # hacking check compares): a reward that climbs while held-out accuracy falls is being gamed.
        rises = [reward_rise(_step_log(e)) for e in iterations]
        for name in dict.fromkeys(name for rise in rises for name in rise):
            table.add_row(f"  reward {name} (start -> end)", *empty,
                          *[f"{rise[name][0]:.3f} -> {rise[name][1]:.3f}" if name in rise else "-" for rise in rises], "")
        table.add_row("Problems trained on (band)", *empty, *[_selected(e["metrics"].get("selection")) for e in iterations], "")
    if any(e["metrics"].get("round") for e in summary["iterations"]):
        # GRPO over the arrays: the score job's groups (jobs/scoring/rounds.py).
        table.add_row("Groups trained on (round)", *empty, *[_round_groups(e["metrics"].get("round")) for e in iterations], "")
    table.add_row(
        "Held-out accuracy", _percent(summary["base_heldout_accuracy"]),
        *[_percent(e["metrics"].get("heldout_accuracy")) for e in iterations], "Increasing",
    )
    # The held-out accuracy per category, and each GRPO reward's mean over the greedy answers.
    columns = [summary["base_heldout_categories"] or {}, *[e["metrics"].get("heldout_categories") or {} for e in iterations]]
    for category in dict.fromkeys(c for column in columns for c in column):
        table.add_row(f"  {category}", *[_percent(column[category]["accuracy"]) if category in column else "-" for column in columns],
                      "Increasing")
    columns = [summary["base_heldout_rewards"] or {}, *[e["metrics"].get("heldout_rewards") or {} for e in iterations]]
    for name in dict.fromkeys(n for column in columns for n in column):
        table.add_row(f"Held-out reward {name}", *[_number(column[name]["mean"]) if name in column else "-" for column in columns], "")
    # data.dev: the figure the exported iteration is chosen on and the collapse guard watches.
    if summary["base_dev_accuracy"] is not None or any(e["metrics"].get("dev_accuracy") is not None for e in summary["iterations"]):
        table.add_row("Dev accuracy", _percent(summary["base_dev_accuracy"]),
                      *[_percent(e["metrics"].get("dev_accuracy")) for e in iterations], "Increasing")
    return table


def _step_log(entry: dict[str, Any]) -> list[dict[str, Any]]:
    return (entry["stages"].get("train", {}).get("metrics") or {}).get("step_log") or []


def grpo_rounds(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """A GRPO iteration's rollout rounds (a generation batch, trained on for one or more steps): the
    first logged step of each, which carries the round's rollout metrics; empty for other iterations."""
    rounds: dict[int, dict[str, Any]] = {}
    for step in _step_log(entry):
        if step.get("policy_step") is not None:
            rounds.setdefault(step["policy_step"], step)
    return list(rounds.values())


# A round's rollout metrics as GRPO logs them (jobs/training/grpo.py's STEP_LOG_KEYS), with their rows.
ROUND_ROWS = (
    ("reward", "Reward, mean"),
    ("reward_std", "Reward, std"),
    # The pass-rate distribution: groups (a prompt's samples) in which no sample, some or all pass,
    # a sample passing when the run's verifier accepts it (jobs/training/grpo_trainer.py).
    ("groups/none_pass", "Groups where no sample passes"),
    ("groups/some_pass", "Groups where some pass"),
    ("groups/all_pass", "Groups where all pass"),
    # Groups whose samples all got the same total reward: no learning signal.
    ("frac_reward_zero_std", "Groups of one reward (no signal)"),
    ("completions/clipped_ratio", "Completions cut at max length"),
)
# Rows of shares, shown as percentages.
SHARES = ("frac_", "groups/", "completions/")
MAX_ROUNDS = 8


def grpo_table(entry: dict[str, Any], rounds: Sequence[dict[str, Any]]) -> Table:
    """Rounds of one GRPO iteration (columns) by what their rollouts scored: mean and spread of the
    reward, the shares of groups in which no sample, some or all pass, of groups whose samples all
    scored alike, completions cut off, and each reward's mean."""
    table = new_table(f"iteration {entry['iteration']}: GRPO rollouts by round (step of the policy)", "Rollouts",
                      *[f"step {r['policy_step']}" for r in rounds])
    for column in table.columns[1:]:
        column.justify = "right"
    names = dict.fromkeys(k for r in rounds for k in r if k.startswith("rewards/") and k.endswith("/mean"))
    for key, label in (*ROUND_ROWS, *[(name, f"  reward {name.split('/')[1]}, mean") for name in names]):
        if any(r.get(key) is not None for r in rounds):
            table.add_row(label, *[_percent(r.get(key)) if key.startswith(SHARES) else _number(r.get(key)) for r in rounds])
    return table


def grpo_tables(console: Console, summary: dict[str, Any]) -> list[Table]:
    """Each GRPO iteration's rounds (at most MAX_ROUNDS of them, first and last among them), fitted to the console."""
    tables = []
    for entry in summary["iterations"]:
        rounds = grpo_rounds(entry)
        if len(rounds) > MAX_ROUNDS:
            rounds = [rounds[round(i * (len(rounds) - 1) / (MAX_ROUNDS - 1))] for i in range(MAX_ROUNDS)]
        if rounds:
            tables += fitted(console, lambda part, entry=entry: grpo_table(entry, part), rounds)
    return tables


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _round_groups(figures: dict[str, Any] | None) -> str:
    """The groups a round trained on, of those it asked for; those scored alike (no signal), the
    shortfall, and how many rounds old the policy that sampled them was (grpo.max_staleness)."""
    if not figures:
        return "-"
    text = f"{figures['kept_groups']} of {figures['target_groups']}, {figures['zero_std_groups']} alike"
    text += f", {figures['shortfall']} short" if figures["shortfall"] else ""
    return text + (f", {figures['staleness']} stale" if figures.get("staleness") else "")


def _selected(selection: dict[str, Any] | None) -> str:
    return "-" if not selection else f"{selection['selected']} of {selection['problems']}"


def hacking_lines(summary: dict[str, Any]) -> list[str]:
    """The reward-hacking check's flags, a line each."""
    return [f"reward hacking? {describe(flag)}" for flag in summary["hacking"]]


def collapse_lines(summary: dict[str, Any]) -> list[str]:
    """The collapse guard's flags, a line each (one in the last iteration, which stops nothing, too)."""
    return [f"collapse: {describe_collapse(flag)}" for flag in summary["collapse"]]


def export_line(summary: dict[str, Any]) -> str | None:
    """The final model: which iteration export.iteration chose and why (on which accuracy, or that no
    iteration beat the base model), and where it went; or the export's failure."""
    export = summary["export"]
    if export["choice"]:
        return f"final model: {export['choice']}"
    if export["status"] == "failed":
        return f"final model: the export failed: {export['error']}"
    return None


def accuracy_points(summary: dict[str, Any]) -> list[tuple[int, float]]:
    """(iteration, held-out accuracy) from the base model (iteration 0) on, where it was measured."""
    points = [(0, summary["base_heldout_accuracy"])] + [(e["iteration"], e["metrics"].get("heldout_accuracy")) for e in summary["iterations"]]
    return [(i, a) for i, a in points if a is not None]


def control_line(summary: dict[str, Any], control: dict[str, Any], control_name: str) -> str:
    """Held-out accuracy from the base model to the last iteration both runs measured, in the run
    and in its control (a run with filter.control: the same steps, samples kept without the
    verifier), and the gain self-training adds over the control."""
    ours, theirs = dict(accuracy_points(summary)), dict(accuracy_points(control))
    common = sorted(set(ours) & set(theirs) - {0})
    if 0 not in ours or 0 not in theirs or not common:
        return f"control {control_name}: no held-out accuracy measured in both runs yet"
    last = common[-1]
    gain, drift = ours[last] - ours[0], theirs[last] - theirs[0]
    return (f"held-out accuracy to iteration {last}: self-training {ours[0]:.1%} -> {ours[last]:.1%} ({100 * gain:+.1f} points),"
            f" control {control_name} {theirs[0]:.1%} -> {theirs[last]:.1%} ({100 * drift:+.1f}); self-training adds"
            f" {100 * (gain - drift):+.1f} points over the control")


def distribution_table(summary: dict[str, Any], iterations: Sequence[dict[str, Any]]) -> Table:
    """Per iteration (of those filtered): problems by correct rate and by number of correct candidates (the histogram)."""
    table = new_table(f"{run_title(summary)}: correct-rate distribution per iteration", "Problems with",
                      *[f"Iteration {e['iteration']}" for e in iterations])
    for column in table.columns[1:]:
        column.justify = "right"
    metrics = [entry["metrics"] for entry in iterations]
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


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def progress_text(progress: dict[str, Any], unit: str) -> str:
    """``step 40/100, ETA 3 min``: from what a running job last reported (its rate then, less the time since)."""
    text = f"{unit} {progress['done']}/{progress['total']}"
    rate, left = progress.get("problems_per_s") or 0, progress["total"] - progress["done"]
    if rate > 0 and left > 0:
        since = (datetime.now(UTC) - datetime.fromisoformat(progress["at"])).total_seconds()
        text += f", ETA {_duration(max(left / rate - since, 0))}"
    return text


def driver_line(summary: dict[str, Any]) -> str | None:
    """What status says about the run's driver when the run cannot go on without one being started."""
    driver = summary["driver"]
    if driver["state"] != "gone":
        return None
    return (f"driver gone: process {driver['pid']} on {driver['host']} that drove the run has ended (Ctrl-C, killed) while"
            f" the ledger says the run is running; jobs still running finish on their own; to go on: {driver['resume']}")


def stage_table(summary: dict[str, Any]) -> Table:
    """Iterations x stages: status, shard counts by status, attempts, job ids, a training job's step and ETA."""
    caption = f"run {summary['status'] or 'not started'}" + (f": {summary['error']}" if summary["error"] else "")
    if summary["driver"]["state"] == "gone":
        caption += " (its driver is gone)"
    elif summary["driver"]["state"] == "detached":
        caption += " (detached: its jobs drive it)"
    caption += f"; {summary['run_dir']}"  # a caption's line may break where a cell's may not: a path is one long word
    table = new_table(run_title(summary), "Iteration", *summary["stage_names"], caption=caption)
    table.columns[0].justify = "right"
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
            if info.get("progress"):
                text += "\n" + progress_text(info["progress"], "step" if name == "train" else "problem")
            if attempts:
                text += f"\nattempts {attempts}"
            if jobs:
                text += "\njobs " + ", ".join(jobs[:3]) + (f" +{len(jobs) - 3}" if len(jobs) > 3 else "")
            cells.append(text)
        table.add_row(str(entry["iteration"]), *cells)
    return table


def services_table(summary: dict[str, Any]) -> Table:
    """The run's services: where each serves (node, endpoint), its job and how often it was started again."""
    table = new_table("services", "service", "status", "job", "where", "error")
    for name, info in summary["services"].items():
        job = info["job_ids"][-1] if info["job_ids"] else "-"
        where = " ".join(str(v) for v in (info["node"], info["endpoint"]) if v) or "-"
        table.add_row(name, f"{info['status']}, restarts {info['restarts']}", job, where, info["error"] or "-")
    return table


def warning_lines(summary: dict[str, Any]) -> list[str]:
    """The run's warnings, a line each, iteration by iteration: completions cut at max_tokens (the run's
    threshold) and what each filter job warned of itself (its ``warnings`` metric: problems left
    unjudged, candidates without a text, answers not extracted)."""
    found = [(warning["iteration"], warning["message"]) for warning in summary["warnings"]]
    found += [(entry["iteration"], f"iteration {entry['iteration']} filter: {warning}")
              for entry in summary["iterations"] for warning in entry["metrics"].get("warnings") or []]
    return [line for _, line in sorted(found, key=lambda item: item[0])]
