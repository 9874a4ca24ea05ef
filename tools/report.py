"""``python tools/report.py RUN_DIR``: a run's analytics across iterations, its warning signs, a chart.

Prints the seed's "Interpreting Analytics Across Iterations" table for the whole run (category
shares, mean correct rate, filtered samples, training reward, held-out accuracy), the correct-rate
distribution per iteration that has a filter, GRPO's rollouts by round (reward, the shares of
groups in which no sample, some or all pass, each reward's mean), the seed's warning signs with its
advice, the run's warnings (completions cut at max_tokens, each filter's own), what the
reward-hacking check and the collapse guard flagged, and the final model (which iteration, why);
writes RUN_DIR/report.png with the category shares (for a GRPO run without a filter: the share of
rollout groups of one reward per step), the held-out accuracy per iteration and, for runs that
trained on rewards (GRPO), each reward's mean per step. A SLURM run's
report also has its cost per iteration and stage (GPU- and CPU-hours, queue wait, server start
share; ``tools/cost.py``). With ``--control CONTROL_RUN`` (the same run with filter.control: samples
kept at random at the filter's keep rate, without the verifier) the accuracy chart draws the
control's curve beside the run's, and a line gives the gain self-training adds over the control.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console

from pipeline.loop.summary import stored_config, summarize
from pipeline.scheduling.watch import SchedulerUnavailable
from pipeline.views.accounting import CostUnavailable, cost_table, run_cost
from pipeline.views.tables import (
    CATEGORY_ROWS,
    accuracy_points,
    collapse_lines,
    control_line,
    distribution_table,
    export_line,
    fitted,
    grpo_tables,
    hacking_lines,
    iteration_table,
    run_title,
    warning_lines,
    warning_signs,
)
from state import InputError, atomic_write_bytes

# From hard to easy: red to green.
CATEGORY_COLORS = ("#c0392b", "#e67e22", "#f1c40f", "#7fb347", "#27ae60")


def plot(summary: dict[str, Any], control: tuple[str, dict[str, Any]] | None = None) -> bytes:
    """PNG: category shares per iteration (stacked bars) and held-out accuracy (base = iteration 0),
    with the ``control`` run's (its name, its summary) beside it."""
    # A GRPO iteration without the pass-rate band has no filter, hence no categories.
    iterations = [e for e in summary["iterations"] if e["metrics"].get("categories")]
    curves = reward_curves(summary)
    figure = Figure(figsize=(16 if curves else 11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)  # files only, no display: cluster nodes have none
    shares, accuracy, *more = figure.subplots(1, 3 if curves else 2)
    figure.suptitle(f"{run_title(summary)}: analytics across iterations")
    bottom = [0.0] * len(iterations)
    x = [e["iteration"] for e in iterations]
    for (key, label, _), color in zip(CATEGORY_ROWS, CATEGORY_COLORS, strict=True):
        values = [100 * e["metrics"]["categories"].get(key, 0.0) for e in iterations]
        shares.bar(x, values, bottom=bottom, color=color, label=label, width=0.6)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    shares.set(title="Problems by learning-zone category", xlabel="Iteration", ylabel="% of problems", ylim=(0, 100))
    shares.set_xticks(x)
    shares.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    if not iterations and (zero_std := step_curve(summary, "frac_reward_zero_std")):
        # GRPO without a filter: its own measure of problems too hard or mastered, per step.
        shares.clear()
        shares.plot([s for s, _ in zero_std], [100 * v for _, v in zero_std], marker=".", color="#c0392b")
        shares.set(title="Rollout groups of one reward (no signal)", xlabel="Step (iterations in a row)", ylabel="% of groups",
                   ylim=(0, 105))
    elif not iterations:
        shares.text(0.5, 0.5, "no filter results yet", ha="center", va="center", transform=shares.transAxes)

    lines = [("self-training", summary, "#2c3e50", 6)] + ([(f"control: {control[0]}", control[1], "#95a5a6", -12)] if control else [])
    for label, run, color, offset in lines:
        points = [(i, 100 * a) for i, a in accuracy_points(run)]
        accuracy.plot([i for i, _ in points], [a for _, a in points], marker="o", color=color, label=label)
        for i, a in points:
            accuracy.annotate(f"{a:.1f}%", (i, a), textcoords="offset points", xytext=(0, offset), ha="center", fontsize="small",
                              color=color)
    if control:
        accuracy.legend(fontsize="small", loc="upper left")
    accuracy.set(title="Held-out accuracy", xlabel="Iteration (0 = base model)", ylabel="% correct", ylim=(0, 105))
    accuracy.set_xticks(range(len(summary["iterations"]) + 1))
    if not accuracy_points(summary):
        accuracy.text(0.5, 0.5, "no held-out evaluation", ha="center", va="center", transform=accuracy.transAxes)
    if curves:
        (rewards,) = more
        for name, points in curves.items():
            rewards.plot([x for x, _ in points], [y for _, y in points], marker=".", label=name)
        for flag in summary["hacking"]:
            rewards.axvspan(*iteration_span(summary, flag["iteration"]), color="#c0392b", alpha=0.12)
        rewards.set(title="Training rewards per step (red: hacking flagged)", xlabel="Step (iterations in a row)", ylabel="Mean reward")
        rewards.legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _step_logs(summary: dict[str, Any]) -> list[tuple[int, list[dict[str, Any]]]]:
    return [(e["iteration"], (e["stages"].get("train", {}).get("metrics") or {}).get("step_log") or []) for e in summary["iterations"]]


def step_curves(summary: dict[str, Any], keys: Callable[[str], str | None]) -> dict[str, list[tuple[int, float]]]:
    """Per name ``keys`` gives a logged key, (step, value) over the run's training steps, iteration after iteration."""
    curves: dict[str, list[tuple[int, float]]] = {}
    offset = 0
    for _, step_log in _step_logs(summary):
        for entry in step_log:
            for key, value in entry.items():
                if (name := keys(key)) is not None and value is not None:
                    curves.setdefault(name, []).append((offset + entry["step"], value))
        offset += max((entry["step"] for entry in step_log), default=0)
    return curves


def reward_curves(summary: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Per reward, (step, mean) over the run's training steps, iteration after iteration."""
    return step_curves(summary, lambda key: key[len("rewards/"):-len("/mean")] if key.startswith("rewards/") and key.endswith("/mean") else None)


def step_curve(summary: dict[str, Any], key: str) -> list[tuple[int, float]]:
    """(step, value) of one logged key over the run's training steps."""
    return step_curves(summary, lambda logged: key if logged == key else None).get(key, [])


def iteration_span(summary: dict[str, Any], iteration: int) -> tuple[int, int]:
    """The steps iteration ``iteration`` covers on the reward chart's axis."""
    offset = 0
    for number, step_log in _step_logs(summary):
        last = max((entry["step"] for entry in step_log), default=0)
        if number == iteration:
            return offset, offset + last
        offset += last
    return offset, offset


def print_warning_signs(console: Console, signs: list[dict[str, Any]]) -> None:
    """Each sign once, with the iterations that show it, then the seed's advice."""
    if not signs:
        console.print("No warning signs (too_hard > 50 %, mastered > 50 %, filtered set < 1000 samples).")
        return
    console.print("[bold]Warning signs[/bold] (the seed's Tips & Troubleshooting)")
    by_sign: dict[str, list[dict[str, Any]]] = {}
    for sign in signs:
        by_sign.setdefault(sign["sign"], []).append(sign)
    for title, found in by_sign.items():
        where = ", ".join(f"iteration {s['iteration']} ({s['value']})" for s in found)
        console.print(f"{title}: {where}: {found[0]['meaning']}", style="yellow", markup=False)
        for advice in found[0]["advice"]:
            console.print(f"  - {advice}", markup=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/report.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--png", type=Path, help="where to write the chart (default RUN_DIR/report.png)")
    parser.add_argument("--control", type=Path, metavar="CONTROL_RUN",
                        help="the same run made with filter.control: true, drawn beside this one")
    args = parser.parse_args(argv)
    try:
        for run_dir in (args.run_dir, args.control):
            if run_dir is not None:
                stored_config(run_dir)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return InputError.exit_code
    summary = summarize(args.run_dir)
    control = (args.control.name, summarize(args.control)) if args.control else None
    # Piped to a file or a job log, rich would fit the tables into 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    for table in fitted(console, lambda iterations: iteration_table(summary, iterations), summary["iterations"]):
        console.print(table)
    filtered = [entry for entry in summary["iterations"] if entry["metrics"].get("categories")]
    if filtered:
        for table in fitted(console, lambda iterations: distribution_table(summary, iterations), filtered):
            console.print(table)
    for table in grpo_tables(console, summary):
        console.print(table)
    print_warning_signs(console, warning_signs(summary))
    for line in [*warning_lines(summary), *hacking_lines(summary), *collapse_lines(summary)]:
        console.print(line, style="yellow", markup=False)
    if line := export_line(summary):
        console.print(line, markup=False, highlight=False)
    if control:
        console.print(control_line(summary, control[1], control[0]), markup=False, highlight=False)
    try:
        console.print(cost_table(run_cost(args.run_dir)))
    except CostUnavailable:
        pass  # not a SLURM run: no accounting to count from
    except SchedulerUnavailable as error:
        console.print(f"cost: SLURM's accounting could not be asked: {error}", style="yellow", markup=False)
    png = args.png or args.run_dir / "report.png"
    atomic_write_bytes(png, plot(summary, control))
    console.print(f"chart: {png}", markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
