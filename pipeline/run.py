"""``python -m pipeline.run CONFIG [key=value ...] [--dry-run | --detach]``: run (or resume) a self-training run.

Attached (the default), this process drives the run and waits for its jobs. ``--detach``
(SLURM only) submits the current iteration as a dependency chain and exits: jobs on the
cluster drive the rest (pipeline/loop/detach.py).

Everything the user gave is checked before anything is written or submitted: a bad config,
bad data or a changed config for an existing run gives one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from jobs.problems.data import load_problems, write_jsonl
from jobs.problems.prompts import check_backend_takes, check_media
from pipeline.config import (
    STORED_FIX,
    RunConfig,
    differences,
    dump_yaml,
    load_config,
    read_yaml,
    with_defaults,
)
from pipeline.console import console as make_console
from pipeline.layout import RunLayout
from pipeline.loop.detach import advance_in_flight, submit_chain
from pipeline.loop.driver import Driver
from pipeline.loop.hacking import RunStopped
from pipeline.loop.services import service_plan
from pipeline.loop.submitter import job_name
from pipeline.loop.summary import summarize
from pipeline.planning.planner import Planner
from pipeline.planning.stage import StageFailed
from pipeline.rules import check_problems, check_run, gpu_warning
from pipeline.scheduling.executors import (
    missing_scheduler,
    require_scheduler,
    sbatch_script,
)
from pipeline.views.tables import iteration_table
from state import InputError, Ledger, atomic_write_bytes
from state.ledger import now


def check_resumable(config: RunConfig, source: str) -> bool:
    """True if the run exists with the same config; refuse a different one."""
    stored = RunLayout(config.run_dir).config
    if not stored.exists():
        return False
    changed = differences(with_defaults(read_yaml(stored, STORED_FIX)), yaml.safe_load(dump_yaml(config)))
    if changed:
        raise InputError(
            f"{source}: run {config.run_name!r} exists in {config.run_dir} with a different config ("
            + "; ".join(changed)
            + "); rerun with the same config to resume, or start a new run with run_name=NEW_NAME"
        )
    return True


def print_plan(config: RunConfig, planner: Planner, num_heldout: int, console: Console) -> None:
    console.print(f"run {config.run_name!r} in {planner.run_dir}, cluster {config.executor.cluster}")
    console.print(f"{planner.num_train} training problems, {num_heldout} held-out, {config.num_iterations} iterations")
    stages = planner.stages()
    services = {name: service_plan(planner, name, [s.key for s in stages if name in s.services])
                for name in dict.fromkeys(n for s in stages for n in s.services)}
    table = Table("stage", "jobs", "resources", "writes")
    for stage in stages:
        needs = f" (needs service {', '.join(stage.services)})" if stage.services else ""
        resplit = "stragglers re-split" if stage.resplit else ""
        table.add_row(stage.label + needs, stage.jobs_text,
                      ", ".join(filter(None, [_resources(stage.resources), stage.detail, resplit])), stage.writes)
    for name, service in services.items():
        table.add_row(f"service {name}", service.jobs_text, _resources(service.resources), service.writes)
    console.print(table)
    if config.executor.cluster == "slurm":
        for stage in [*stages, *services.values()]:
            folder = planner.layout.job_logs(stage.key, "<submission>")
            # Printed as is (no rich wrapping): this is the exact text sbatch gets.
            print(f"# ---- sbatch script of {stage.key} ----")
            print(sbatch_script(folder, stage.resources, job_name(config, stage), len(stage.tasks)), flush=True)
    missing = missing_scheduler(config.executor.cluster)
    if missing:
        console.print(f"{', '.join(missing)} not found on this machine: the scripts are as sbatch would get them, but the"
                      " cluster was not asked whether it takes them (partitions, GPUs, limits), nor was vLLM's install"
                      " checked; submit from a login node of the cluster", highlight=False, soft_wrap=True)
    console.print("dry run: nothing submitted")


def _resources(resources: object) -> str:
    """What the scheduler is asked for (re-split is the driver's, said apart)."""
    fields = vars(resources)
    return ", ".join(f"{k}={v}" for k, v in fields.items() if v and k != "resplit")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. generate.num_samples=8")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, submit nothing")
    parser.add_argument("--detach", action="store_true",
                        help="submit the run as SLURM dependency chains and exit; follow it with tools/status.py")
    # Options may come anywhere: after the overrides too (CONFIG key=value --dry-run).
    args = parser.parse_intermixed_args(argv)
    console = make_console()
    try:
        config = load_config(args.config, args.overrides, check=check_run)
        if not args.dry_run:  # a dry run previews a SLURM run's scripts anywhere (print_plan says what it did not check)
            require_scheduler(config.executor.cluster)
        train = load_problems(config.data.train)
        heldout = load_problems(config.data.heldout) if config.data.heldout else []
        dev = load_problems(config.data.dev) if config.data.dev else []
        check_problems(config, train)
        check_backend_takes(train, config.generate.backend, config.generate.media_dir, config.data.train, "generate.backend")
        check_backend_takes(heldout, config.eval.backend, config.generate.media_dir, str(config.data.heldout), "eval.backend")
        check_backend_takes(dev, config.eval.backend, config.generate.media_dir, str(config.data.dev), "eval.backend")
        if config.generate.media_dir:
            check_media(train, config.generate.media_dir, config.data.train)
            check_media(heldout, config.generate.media_dir, str(config.data.heldout))
            check_media(dev, config.generate.media_dir, str(config.data.dev))
        resuming = check_resumable(config, str(args.config))
        if args.detach and config.executor.cluster != "slurm":
            raise InputError(f"{args.config}: --detach needs executor.cluster: slurm (the chain waits on SLURM dependencies)")
        if args.detach and config.grpo.max_staleness:
            raise InputError(f"{args.config}: grpo.max_staleness: {config.grpo.max_staleness} overlaps rounds that the attached driver"
                             " starts side by side; a detached run chains each iteration after the last: run it without --detach")
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return InputError.exit_code
    warning = gpu_warning(config)
    if warning:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
    planner = Planner(config, config.run_dir, len(train))
    if args.dry_run:
        print_plan(config, planner, len(heldout), console)
        return 0

    driver = Driver(config, planner, console, on_iteration_done=lambda summary: console.print(iteration_table(summary)))
    detached = advance_in_flight(driver) if resuming else None
    if detached and not args.detach:
        print(f"error: run {config.run_name!r} is detached: its advance job {detached} is queued; follow it with"
              f" python tools/status.py {config.run_dir} (scancel it to drive the run from here)", file=sys.stderr)
        return InputError.exit_code
    ledger = Ledger(config.run_dir)
    if not resuming:
        write_jsonl(planner.layout.train_problems, train)
        if heldout:
            write_jsonl(planner.layout.heldout_problems, heldout)
        if dev:
            write_jsonl(planner.layout.dev_problems, dev)
        ledger.update("run", {"run_name": config.run_name, "created_at": now(), "num_iterations": config.num_iterations,
                              "num_train": len(train)})
        # Written last: its presence means the run directory is complete and resumable.
        atomic_write_bytes(planner.layout.config, dump_yaml(config).encode())
    else:
        console.print(f"resuming run {config.run_name!r} from {config.run_dir}")
    ledger.update("run", {"status": "running", "num_iterations": config.num_iterations})
    try:
        if args.detach:
            console.print(submit_chain(driver), highlight=False)
            console.print(f"detached: follow the run with python tools/status.py {config.run_dir}")
            return 0
        driver.run()
    except InputError as error:
        ledger.update("run", {"status": "failed", "error": str(error)})
        print(f"error: {error}", file=sys.stderr)
        return InputError.exit_code
    except StageFailed as error:
        ledger.update("run", {"status": "failed", "error": str(error).splitlines()[0]})
        console.print(f"[red]run stopped:[/red] {error}", markup=True, highlight=False)
        return 1
    except RunStopped as error:
        console.print(f"[red]run stopped:[/red] {error}", markup=True, highlight=False)
        return RunStopped.exit_code
    summary = summarize(config.run_dir)
    console.print(f"run {config.run_name!r} done: {summary['run_dir']}; final model: {summary['export']['choice']}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
