"""``python tools/status.py RUN_DIR [--json] [--watch [SECONDS]]``: where a run stands.

The ledger's view (stages, shards, attempts, metrics) beside the scheduler's live one (state,
pending reason, node, elapsed time, exit code), from one scheduler query.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pipeline.console import console as make_console
from pipeline.loop.summary import summarize
from pipeline.scheduling.watch import job_rows
from pipeline.views.tables import (
    hacking_lines,
    iteration_table,
    services_table,
    stage_table,
)

COLUMNS = ("iteration", "task", "status", "attempts", "job_id", "scheduler_state", "reason", "node", "elapsed", "exit_code")


def jobs_table(rows: list[dict]) -> Table:
    """The jobs not done yet (or failed), with the scheduler's word beside the ledger's."""
    open_rows = [row for row in rows if row["status"] != "done"]
    unavailable = {row["reason"] for row in rows if row["scheduler_state"] == "UNAVAILABLE"}
    caption = f"{len(rows) - len(open_rows)} of {len(rows)} jobs done"
    if unavailable:
        caption += f"; scheduler not reachable: {unavailable.pop()}"
    table = Table(title="open jobs (ledger and scheduler)", caption=caption)
    for column in COLUMNS:
        table.add_column(column.replace("_", " "))
    for row in open_rows:
        table.add_row(*["-" if row[k] is None or row[k] == "UNAVAILABLE" else str(row[k]) for k in COLUMNS])
    return table


def report(run_dir: Path, cluster: str) -> tuple[dict, Group]:
    summary = summarize(run_dir)
    summary["jobs"] = job_rows(summary, cluster)
    tables: list[Any] = [stage_table(summary), jobs_table(summary["jobs"]), iteration_table(summary)]
    if summary["services"]:
        tables.insert(1, services_table(summary))
    tables += [Text(line, style="yellow") for line in hacking_lines(summary)]
    if summary["export"]["path"]:
        tables.append(Text(f"final model exported to {summary['export']['path']}"))
    return summary, Group(*tables)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/status.py", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON for scripts")
    parser.add_argument("--watch", type=float, nargs="?", const=5.0, metavar="SECONDS", help="refresh in place")
    args = parser.parse_args(argv)
    config = args.run_dir / "config.yaml"
    if not (args.run_dir / "ledger").is_dir() or not config.is_file():
        print(f"error: {args.run_dir}: not a run directory (no ledger/ and config.yaml in it)", file=sys.stderr)
        return 2
    cluster = yaml.safe_load(config.read_text())["executor"]["cluster"]
    summary, view = report(args.run_dir, cluster)
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    console = make_console()
    if not args.watch:
        console.print(view)
        return 0
    with Live(view, console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(args.watch)
                live.update(report(args.run_dir, cluster)[1], refresh=True)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
