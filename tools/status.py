"""``python tools/status.py RUN_DIR [--json] [--watch [SECONDS]]``: where a run stands.

The ledger's view (stages, shards, attempts, metrics, a training job's step and ETA) beside the
scheduler's live one (state, pending reason, node, elapsed time, exit code), from one scheduler
query; whether the process driving the run still runs (and how to resume it when not); the
warnings (completions cut at max_tokens, and each filter's own: answers not extracted, problems
left unjudged), the reward-hacking and collapse flags, and the final model: which iteration was
exported and why.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pipeline.console import console as make_console
from pipeline.loop.summary import stored_config, summarize
from pipeline.scheduling.watch import IN_FLIGHT, SLURM_ALIVE, job_rows
from pipeline.views.tables import (
    collapse_lines,
    driver_line,
    export_line,
    fits,
    fitted,
    grpo_tables,
    hacking_lines,
    iteration_table,
    new_table,
    services_table,
    stage_table,
    warning_lines,
)
from state import InputError

# States in which the scheduler says nothing final about a job.
UNDECIDED = ("UNKNOWN", "UNAVAILABLE")


def reconcile(rows: list[dict[str, Any]], cluster: str) -> None:
    """Say the scheduler's word in terms the ledger's agrees with. The local executor knows only
    whether a job's process runs: one that ended is ``ENDED`` (submitit's FINISHED, whatever its exit),
    and the ledger says how (done, failed). A job the ledger has in flight that the scheduler says has
    ended without reporting is ``lost``: the driver fails it at its next poll and resubmits it."""
    for row in rows:
        if cluster != "slurm" and row["scheduler_state"] == "FINISHED":
            row["scheduler_state"] = "ENDED"
        alive = row["scheduler_state"] in (SLURM_ALIVE if cluster == "slurm" else ("RUNNING",))
        row["lost"] = row["status"] in IN_FLIGHT and not alive and row["scheduler_state"] not in UNDECIDED


def jobs_table(rows: list[dict]) -> Table:
    """The jobs not done yet (or failed), with the scheduler's word beside the ledger's."""
    open_rows = [row for row in rows if row["status"] != "done"]
    unavailable = {row["reason"] for row in rows if row["scheduler_state"] == "UNAVAILABLE"}
    caption = f"{len(rows) - len(open_rows)} of {len(rows)} jobs done"
    if unavailable:
        caption += f"; scheduler not reachable: {unavailable.pop()}"
    table = new_table("open jobs (ledger and scheduler)", "task", "ledger", "job", "scheduler", caption=caption)
    for row in open_rows:
        task = row["task"] if row["iteration"] is None else f"iteration {row['iteration']} {row['task']}"
        ledger = f"{row['status']}, attempt {row['attempts']}" + (" (lost: its job ended without reporting)" if row["lost"] else "")
        scheduler = "-" if row["scheduler_state"] == "UNAVAILABLE" else row["scheduler_state"]
        if row["exit_code"] and row["exit_code"] != "0:0":
            scheduler += f", exit {row['exit_code']}"
        scheduler += "".join(f", {label} {row[key]}" for key, label in (("reason", "why"), ("node", "on"), ("elapsed", "for"))
                             if row[key] and row["scheduler_state"] != "UNAVAILABLE")
        table.add_row(task, ledger, row["job_id"], scheduler)
    return table


def report(run_dir: Path, cluster: str, console: Console) -> tuple[dict, Group]:
    # A big run's summary is a million small objects, made at once: the cycle collector, run again and
    # again while they are made, cost a sixth of status's time (tools/bench/status_bench.py).
    gc.disable()
    try:
        return _report(run_dir, cluster, console)
    finally:
        gc.enable()


def _report(run_dir: Path, cluster: str, console: Console) -> tuple[dict, Group]:
    summary = summarize(run_dir)
    summary["jobs"] = job_rows(summary, cluster)
    reconcile(summary["jobs"], cluster)
    parts: list[Any] = [stage_table(summary), *([services_table(summary)] if summary["services"] else []), jobs_table(summary["jobs"])]
    for table in parts:
        fits(console, table)  # rows, not columns, grow with the run: a word too long for 80 columns is folded
    parts += fitted(console, lambda iterations: iteration_table(summary, iterations), summary["iterations"])
    parts += grpo_tables(console, summary)
    parts += [Text(line, style="yellow") for line in [*warning_lines(summary), *hacking_lines(summary), *collapse_lines(summary)]]
    if line := driver_line(summary):
        parts.append(Text(line, style="bold red"))
    if line := export_line(summary):
        parts.append(Text(line))
    return summary, Group(*parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/status.py", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON for scripts")
    parser.add_argument("--watch", type=float, nargs="?", const=5.0, metavar="SECONDS", help="refresh in place")
    args = parser.parse_args(argv)
    try:
        cluster = stored_config(args.run_dir).executor.cluster
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return InputError.exit_code
    # COLUMNS, where given, is the width even in a pipe (rich reads it); else a log gets room for the columns.
    console = Console() if "COLUMNS" in os.environ else make_console()
    summary, view = report(args.run_dir, cluster, console)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    if not args.watch:
        console.print(view)
        return 0
    with Live(view, console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(args.watch)
                live.update(report(args.run_dir, cluster, console)[1], refresh=True)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
