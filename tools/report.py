"""``python tools/report.py RUN_DIR``: a run's analytics across iterations, its warning signs, a chart.

Prints the seed's "Interpreting Analytics Across Iterations" table for the whole run (category
shares, mean correct rate, filtered samples, held-out accuracy), the correct-rate distribution
per iteration, and the seed's warning signs with its advice; writes RUN_DIR/report.png with the
category shares and the held-out accuracy per iteration.
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

from pipeline.status import (
    CATEGORY_ROWS,
    distribution_table,
    iteration_table,
    summarize,
    warning_signs,
)
from state import atomic_write_bytes

# From hard to easy: red to green.
CATEGORY_COLORS = ("#c0392b", "#e67e22", "#f1c40f", "#7fb347", "#27ae60")


def plot(summary: dict[str, Any]) -> bytes:
    """PNG: category shares per iteration (stacked bars) and held-out accuracy (base = iteration 0)."""
    iterations = [e for e in summary["iterations"] if e["metrics"]["categories"]]
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)  # files only, no display: cluster nodes have none
    shares, accuracy = figure.subplots(1, 2)
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
        (e["iteration"], e["metrics"]["heldout_accuracy"]) for e in summary["iterations"]
    ]
    points = [(i, 100 * a) for i, a in points if a is not None]
    accuracy.plot([i for i, _ in points], [a for _, a in points], marker="o", color="#2c3e50")
    for i, a in points:
        accuracy.annotate(f"{a:.1f}%", (i, a), textcoords="offset points", xytext=(0, 6), ha="center", fontsize="small")
    accuracy.set(title="Held-out accuracy", xlabel="Iteration (0 = base model)", ylabel="% correct", ylim=(0, 105))
    accuracy.set_xticks(range(len(summary["iterations"]) + 1))
    if not points:
        accuracy.text(0.5, 0.5, "no held-out evaluation", ha="center", va="center", transform=accuracy.transAxes)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


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
    png = args.png or args.run_dir / "report.png"
    atomic_write_bytes(png, plot(summary))
    console.print(f"chart: {png}", markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
