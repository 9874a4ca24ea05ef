"""``python tools/cost.py RUN_DIR [--json]``: what each iteration and stage of a SLURM run cost.

GPU-hours (elapsed x allocated GPUs) and CPU-hours (elapsed x allocated CPUs) from SLURM's
accounting, queue wait (start - submit), and for stages that start vLLM servers the share of their
time spent starting them rather than generating. Every attempt of every job counts, requeued runs
too; the total is what sacct reports for the run's jobs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.console import console as make_console
from pipeline.scheduling.watch import SchedulerUnavailable
from pipeline.views.accounting import CostUnavailable, cost_table, run_cost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/cost.py", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON (seconds and hours)")
    args = parser.parse_args(argv)
    if not (args.run_dir / "ledger").is_dir() or not (args.run_dir / "config.yaml").is_file():
        print(f"error: {args.run_dir}: not a run directory (no ledger/ and config.yaml in it)", file=sys.stderr)
        return 2
    try:
        cost = run_cost(args.run_dir)
    except CostUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except SchedulerUnavailable as error:
        print(f"error: SLURM's accounting could not be asked: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(cost, indent=2))
    else:
        make_console().print(cost_table(cost))
    return 0


if __name__ == "__main__":
    sys.exit(main())
