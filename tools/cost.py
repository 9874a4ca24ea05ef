"""``python tools/cost.py RUN_DIR [--json]``: what each iteration and stage of a run cost.

A SLURM run: GPU-hours (elapsed x allocated GPUs) and CPU-hours (elapsed x allocated CPUs) from
SLURM's accounting, queue wait (start - submit), and for stages that start vLLM servers the share
of their time spent starting them rather than generating. Every attempt of every job counts,
requeued runs too; the total is what sacct reports for the run's jobs.

A local run (``executor.cluster: local``): what each job measured of itself and recorded in its
ledger record (``usage``): wall seconds from its start to its end, and CPU seconds (user + system)
of its process and of the child processes it waited for (vLLM servers, filter workers); only the
first process of a multi-process job reports. Every execution counts; a job killed before it could
report (SIGKILL, out of memory) is counted as unmeasured. A stage's elapsed time runs from its
first job's start to its last job's end (its jobs may run side by side).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.console import console as make_console
from pipeline.loop.summary import stored_config
from pipeline.scheduling.watch import SchedulerUnavailable
from pipeline.views.accounting import (
    CostUnavailable,
    cost_table,
    local_cost,
    local_table,
    run_cost,
)
from state import InputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/cost.py", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON (seconds, and hours for SLURM)")
    args = parser.parse_args(argv)
    try:
        slurm = stored_config(args.run_dir).executor.cluster == "slurm"
        cost = run_cost(args.run_dir) if slurm else local_cost(args.run_dir)
    except (InputError, CostUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return InputError.exit_code
    except SchedulerUnavailable as error:
        print(f"error: SLURM's accounting could not be asked: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(cost, indent=2))
    else:
        make_console().print((cost_table if slurm else local_table)(cost))
    return 0


if __name__ == "__main__":
    sys.exit(main())
