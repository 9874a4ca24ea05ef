"""``python tools/report.py RUN_DIR``: a run's analytics across iterations, its warning signs, a chart.

Prints the seed's "Interpreting Analytics Across Iterations" table for the whole run (category
shares, mean correct rate, filtered samples, training reward, held-out accuracy), the correct-rate
distribution per iteration, the seed's warning signs with its advice, and what the reward-hacking
check flagged; writes RUN_DIR/report.png with the category shares, the held-out accuracy per
iteration and, for runs that trained on rewards (GRPO), each reward's mean per step. A SLURM run's
report also has its cost per iteration and stage (GPU- and CPU-hours, queue wait, server start
share; ``tools/cost.py``).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console

from pipeline.loop.summary import summarize
from pipeline.scheduling.watch import SchedulerUnavailable
from pipeline.views.accounting import CostUnavailable, cost_table, run_cost
from pipeline.views.tables import (
    CATEGORY_ROWS,
    distribution_table,
    hacking_lines,
    iteration_table,
    warning_signs,
)
from state import atomic_write_bytes

# From hard to easy: red to green.
CATEGORY_COLORS = ("#c0392b", "#e67e22", "#f1c40f", "#7fb347", "#27ae60")


def plot(summary: dict[str, Any]) -> bytes:
    """PNG: category shares per iteration (stacked bars) and held-out accuracy (base = iteration 0)."""
    # A GRPO iteration without the pass-rate band has no filter, hence no categories.
    iterations = [e for e in summary["iterations"] if e["metrics"].get("categories")]
    curves = reward_curves(summary)
    figure = Figure(figsize=(16 if curves else 11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)  # files only, no display: cluster nodes have none
    shares, accuracy, *more = figure.subplots(1, 3 if curves else 2)
    figure.suptitle(f"{summary['run_name']}: analytics across iterations")
    bottom = [0.0] * len(iterations)
    x = [e["iteration"] for e in iterations]
    for (key, label, _), color in zip(CATEGORY_ROWS, CATEGORY_COLORS, strict=True):
        values = [100 * e["metrics"]["categories"].get(key, 0.0) for e in iterations]
        shares.bar(x, values, bottom=bottom, color=color, label=label, width=0.6)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    shares.set(title="Problems by learning-zone category", xlabel="Iteration", ylabel="% of problems", ylim=(0, 100))
    shares.set_xticks(x)
    shares.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    if not iterations:
        shares.text(0.5, 0.5, "no filter results yet", ha="center", va="center", transform=shares.transAxes)

    points = [(0, summary["base_heldout_accuracy"])] + [
        (e["iteration"], e["metrics"].get("heldout_accuracy")) for e in summary["iterations"]
    ]
    points = [(i, 100 * a) for i, a in points if a is not None]
    accuracy.plot([i for i, _ in points], [a for _, a in points], marker="o", color="#2c3e50")
    for i, a in points:
        accuracy.annotate(f"{a:.1f}%", (i, a), textcoords="offset points", xytext=(0, 6), ha="center", fontsize="small")
    accuracy.set(title="Held-out accuracy", xlabel="Iteration (0 = base model)", ylabel="% correct", ylim=(0, 105))
    accuracy.set_xticks(range(len(summary["iterations"]) + 1))
    if not points:
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


def reward_curves(summary: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Per reward, (step, mean) over the run's training steps, iteration after iteration."""
    curves: dict[str, list[tuple[int, float]]] = {}
    offset = 0
    for _, step_log in _step_logs(summary):
        for entry in step_log:
            for key, value in entry.items():
                if key.startswith("rewards/") and key.endswith("/mean") and value is not None:
                    curves.setdefault(key[len("rewards/"):-len("/mean")], []).append((offset + entry["step"], value))
        offset += max((entry["step"] for entry in step_log), default=0)
    return curves


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
    args = parser.parse_args(argv)
    if not (args.run_dir / "ledger").is_dir() or not (args.run_dir / "config.yaml").is_file():
        print(f"error: {args.run_dir}: not a run directory (no ledger/ and config.yaml in it)", file=sys.stderr)
        return 2
    summary = summarize(args.run_dir)
    # Piped to a file or a job log, rich would fit the tables into 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(iteration_table(summary))
    console.print(distribution_table(summary))
    print_warning_signs(console, warning_signs(summary))
    for line in hacking_lines(summary):
        console.print(line, style="yellow", markup=False)
    try:
        console.print(cost_table(run_cost(args.run_dir)))
    except CostUnavailable:
        pass  # not a SLURM run: no accounting to count from
    except SchedulerUnavailable as error:
        console.print(f"cost: SLURM's accounting could not be asked: {error}", style="yellow", markup=False)
    png = args.png or args.run_dir / "report.png"
    atomic_write_bytes(png, plot(summary))
    console.print(f"chart: {png}", markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
