"""``python -m pipeline.run_task RUN_DIR KEY``: run one task of a run in this process, now.

For job scripts submitted by hand (sbatch/train_multinode.sbatch runs it under torchrun on every
node): the task is the one the driver would submit for ``KEY`` (``iter_002/train``,
``iter_001/generate/shard_00003``), from the config and data frozen in the run directory, and it
reports to the same ledger record. It runs whatever that record says, so it also redoes a task.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.console import console
from pipeline.loop.driver import Driver
from state import InputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.run_task", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("key", help="the task's ledger key, e.g. iter_002/train")
    args = parser.parse_args(argv)
    try:
        driver = Driver.open(args.run_dir, console())
        tasks = {task.key: task for stage in driver.planner.stages() for task in stage.tasks}
        if args.key not in tasks:
            raise InputError(f"{args.run_dir}: no task {args.key!r} in this run (e.g. {next(iter(tasks))!r})")
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return InputError.exit_code
    task = tasks[args.key]
    task.function(task.spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
