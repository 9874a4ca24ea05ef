"""``python tools/requeue.py RUN_DIR [--dry-run]``: resubmit the failed tasks of the current stage.

Failed, cancelled or timed-out shards (the scheduler is asked about jobs the ledger still thinks
are running) go back as one new array of exactly those indices; the ledger records the new job
ids and attempt numbers. A driver still waiting on the stage picks them up; otherwise rerun it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.console import console as make_console
from pipeline.loop.driver import Driver
from state import InputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/requeue.py", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="show what would be submitted, submit nothing")
    args = parser.parse_args(argv)
    console = make_console()
    try:
        driver = Driver.open(args.run_dir, console)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stage = driver.current_stage()
    if stage is None:
        console.print("the run is complete: nothing to requeue")
        return 0
    failed = driver.failed_tasks(stage)
    if not failed:
        console.print(f"{stage.key}: no failed task to requeue")
        return 0
    names = ", ".join(task.key.rsplit("/", 1)[-1] for task in failed)
    if args.dry_run:
        console.print(f"would resubmit {stage.key} as one array of {len(failed)}: {names}")
        return 0
    driver.submitter.submit(stage, failed)
    records = [driver.ledger.read(task.key) for task in failed]
    for task, record in zip(failed, records, strict=True):
        console.print(f"{task.key}: attempt {record['attempts']}, job {record['job_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
