"""``python tools/status.py RUN_DIR [--json]``: where a run stands, from its ledger."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from pipeline.status import iteration_table, stage_table, summarize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/status.py", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON for scripts")
    args = parser.parse_args(argv)
    if not (args.run_dir / "ledger").is_dir():
        print(f"error: {args.run_dir}: not a run directory (no ledger/ in it)", file=sys.stderr)
        return 2
    summary = summarize(args.run_dir)
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    console = Console()
    console.print(stage_table(summary))
    console.print(iteration_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
