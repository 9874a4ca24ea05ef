"""The run loop: every stage of every iteration, as the method's recipe lists them, resumable from the ledger.

Every stage goes through ``run_stage``: it starts the services the stage needs, submits the
stage's tasks that are not done, waits while the ledger says they are in flight and the watcher
says their job lives, resubmits failed ones up to ``executor.max_attempts``, and stops with a
summary when that is not enough. Nothing done is redone: a rerun finds ``done`` records and skips
them, and reattaches to live jobs.
"""

from __future__ import annotations

import contextlib
import io
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from submitit.core.utils import FailedJobError

from pipeline.config import RunConfig, load_config
from pipeline.executors import (
    make_executor,
    max_array_size,
    require_scheduler,
    submit_array,
)
from pipeline.hacking import RunStopped, describe
from pipeline.layout import RunLayout
from pipeline.plan import Planner, StagePlan, Task
from pipeline.resplit import Splitter
from pipeline.services import ServiceKeeper
from pipeline.status import iteration_table, summarize
from pipeline.watch import (
    UNKNOWN,
    JobInfo,
    JobWatcher,
    SchedulerUnavailable,
)
from state import InputError, Ledger, Status
from state.ledger import now

IN_FLIGHT = (str(Status.SUBMITTED), str(Status.RUNNING), str(Status.SERVING))
# sacct's reason for a job cancelled while it waited on a dependency that failed (--kill-on-invalid-dep).
NEVER_SATISFIED = ("Dependency", "DependencyNeverSatisfied")
# What a new attempt must not inherit from the one before.
FRESH_ATTEMPT = {"job_id": None, "error": None, "slurm_state": None, "exit_code": None, "note": None, "progress": None}
HEADLINE_METRICS = ("problems_generated", "failed_items", "tokens_per_s", "mean_correct_rate", "filtered_samples", "final_loss", "heldout_accuracy")


class StageFailed(Exception):
    """A stage's tasks failed ``max_attempts`` times; the message says which and why."""


class SubmissionRefused(InputError):
    """The scheduler refused a job as asked for (e.g. GPUs on a cluster without any): fix the config."""


def withdraw(record: dict[str, Any], why: str) -> None:
    """A submitted job that will never run (its dependency failed) is not an attempt."""
    if record.get("status") in IN_FLIGHT:
        record.update(status=str(Status.PLANNED), attempts=max(record.get("attempts", 1) - 1, 0), note=why)


def job_name(config: RunConfig, stage: StagePlan) -> str:
    """``demo.iter_002.generate``: squeue shows which run, iteration and stage a job is."""
    return f"{config.run_name}.{stage.key.replace('/', '.')}"


def log_tail(path: str | None, lines: int = 15) -> str:
    if not path or not Path(path).exists():
        return ""
    text = Path(path).read_text(errors="replace").splitlines()
    return "\n".join("    " + line for line in text[-lines:])


class Driver:
    def __init__(self, config: RunConfig, planner: Planner, console: Console):
        self.config = config
        self.planner = planner
        self.run_dir = planner.run_dir
        self.ledger = Ledger(self.run_dir)
        self.watcher = JobWatcher(config.executor.cluster)
        self.console = console
        self.max_array_size = max_array_size(config.executor.cluster)
        self.services = ServiceKeeper(self)

    @classmethod
    def open(cls, run_dir: Path, console: Console) -> Driver:
        """A driver for an existing run directory, from the config and data frozen in it."""
        config_path = RunLayout(run_dir).config
        if not config_path.is_file():
            raise InputError(f"{run_dir}: not a run directory (no config.yaml in it)")
        config = load_config(config_path)
        require_scheduler(config.executor.cluster)
        return cls(config, Planner(config, run_dir), console)

    # -- one stage -----------------------------------------------------------------------

    def submit(self, stage: StagePlan, tasks: list[Task], dependency: str | None = None) -> list[str]:
        """Submit ``tasks`` as one array; the ledger knows the attempt before the job can start.

        ``dependency`` is sbatch's (``afterok:123``); returns the new job ids.
        """

        def next_attempt(record: dict[str, Any]) -> None:
            record["attempts"] = record.get("attempts", 0) + 1

        # Unique across driver processes: a rerun may submit while a lost submission's jobs start.
        submission = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.ledger.update_many(
            {t.key: {"status": str(Status.SUBMITTED), "submitted_at": now(), "submission": submission, **FRESH_ATTEMPT}
             for t in tasks},
            next_attempt,
        )
        folder = self.planner.layout.job_logs(stage.key, submission)
        executor = make_executor(self.config.executor.cluster, folder, stage.resources, job_name(self.config, stage), dependency)
        specs = [replace(t.spec, target=replace(t.spec.target, submission=submission)) for t in tasks]
        try:
            # submitit prints sbatch's refusal itself; we report it once, in our own words.
            with contextlib.redirect_stderr(io.StringIO()):
                jobs = submit_array(executor, tasks[0].function, specs, self.max_array_size)
        except FailedJobError as error:
            message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
            self.ledger.set_status([t.key for t in tasks], Status.FAILED, error=f"submission refused: {message}")
            raise SubmissionRefused(f"{stage.key}: the scheduler refused the job: {message}") from None
        self.watcher.track(jobs)

        def append_job_id(record: dict[str, Any]) -> None:
            record["job_ids"] = [*record.get("job_ids", []), record["job_id"]]

        self.ledger.update_many(
            {t.key: {"job_id": job.job_id, "log": str(job.paths.stderr)} for t, job in zip(tasks, jobs, strict=True)},
            append_job_id,
        )
        return [job.job_id for job in jobs]

    def mark_lost(self, tasks: list[Task], records: dict[str, dict[str, Any]]) -> None:
        """Fail the in-flight tasks whose job is gone without reporting (killed from outside)."""
        in_flight = {t.key: records[t.key] for t in tasks if records[t.key].get("status") in IN_FLIGHT}
        try:
            infos = self.watcher.poll(r.get("job_id") for r in in_flight.values())
        except SchedulerUnavailable as error:
            # A controller restart or a sacct hiccup says nothing about the jobs: ask again later.
            self.console.log(f"cannot ask the scheduler about jobs now: {error}")
            return
        for key, record in in_flight.items():
            job_id = record.get("job_id")
            info = infos.get(job_id, UNKNOWN)
            if job_id and self.watcher.alive(job_id, info):
                continue

            def fail(current: dict[str, Any], job_id: str | None = job_id, info: JobInfo = info) -> None:
                # The job may have reported between our read and the poll: its word wins.
                if current.get("status") not in IN_FLIGHT or current.get("job_id") != job_id:
                    return
                if info.state == "CANCELLED" and info.reason in NEVER_SATISFIED:
                    withdraw(current, f"job {job_id} never ran: a job it depended on failed")
                else:
                    current.update(
                        status=str(Status.FAILED), ended_at=now(), slurm_state=info.state,
                        exit_code=info.exit_code, error=f"job {job_id} ended ({info.describe()}) without reporting",
                    )

            records[key] = self.ledger.update(key, mutate=fail)

    def current_stage(self) -> StagePlan | None:
        """The first stage that is not done, or None when the run is complete."""
        pending = (s for s in self.planner.stages() if self.ledger.read(s.key).get("status") != str(Status.DONE))
        return next(pending, None)

    def failed_tasks(self, stage: StagePlan) -> list[Task]:
        """Tasks that failed, were cancelled or timed out (after asking the scheduler)."""
        records = self.ledger.read_many(t.key for t in stage.tasks)
        self.mark_lost(stage.tasks, records)
        return [t for t in stage.tasks if records[t.key].get("status") == str(Status.FAILED)]

    def run_stage(self, stage: StagePlan, on_progress: Callable[[int, int], None] | None = None) -> bool:
        """Run a stage to its end; True when it gained tasks on the way (a re-split straggler's rest),
        whose outputs the stages after it must be planned again to read."""
        if self.ledger.read(stage.key).get("status") == str(Status.DONE):
            return False
        if stage.is_array:
            self.start_array(stage)
        self.services.ensure(stage)
        executor = self.config.executor
        interval, last_seen, resplit = executor.poll_interval_s, None, False
        splitter = Splitter(self.ledger, stage.key, stage.resplit, self.watcher.cancel, self.console.log) if stage.resplit else None
        while True:
            records = self.ledger.read_many(t.key for t in stage.tasks)
            self.mark_lost(stage.tasks, records)
            if splitter and stage.split and splitter.step(stage.split, records):
                stage = self.planner.stage(stage.key)  # with the tasks of the straggler's rest
                self.ledger.update(stage.key, {"num_tasks": len(stage.tasks)})
                resplit = True
                continue
            statuses = [records[t.key].get("status") for t in stage.tasks]
            done = statuses.count(str(Status.DONE))
            if on_progress:
                on_progress(done, len(stage.tasks))
            if done == len(stage.tasks):
                break
            failed = [t for t in stage.tasks if records[t.key].get("status") in (None, str(Status.FAILED), str(Status.PLANNED))]
            retry = [t for t in failed if records[t.key].get("attempts", 0) < executor.max_attempts]
            exhausted = [t for t in failed if t not in retry]
            if exhausted and not any(status in IN_FLIGHT for status in statuses):
                if stage.is_array:
                    self.ledger.set_status([stage.key], Status.FAILED, error=f"{len(exhausted)} task(s) failed")
                raise StageFailed(self.failure_summary(exhausted, records))
            if retry:
                self.submit(stage, retry)
                continue
            self.services.check(stage)
            # Back off while nothing changes, so that a long stage costs the scheduler few queries.
            interval = executor.poll_interval_s if statuses != last_seen else min(interval * 1.5, executor.max_poll_interval_s)
            last_seen = statuses
            time.sleep(interval)
        if stage.is_array:
            self.finish_array(stage, records)
        return resplit

    def failure_summary(self, tasks: list[Task], records: dict[str, dict[str, Any]]) -> str:
        lines = []
        for task in tasks:
            record = records[task.key]
            lines.append(f"{task.key} failed after {record.get('attempts', 0)} attempt(s): {record.get('error')}")
            tail = log_tail(record.get("log"))
            if tail:
                lines.append(f"  last lines of {record.get('log')}:\n{tail}")
        return "\n".join(lines)

    def start_array(self, stage: StagePlan) -> None:
        def first_start(record: dict[str, Any]) -> None:
            record.setdefault("started_at", now())

        self.ledger.update(stage.key, {"status": str(Status.RUNNING), "num_tasks": len(stage.tasks)}, first_start)

    def finish_array(self, stage: StagePlan, records: dict[str, dict[str, Any]]) -> None:
        """Mark an array stage whose tasks are all done as done, with its totals."""
        started = self.ledger.read(stage.key).get("started_at")
        seconds = (datetime.now(UTC) - datetime.fromisoformat(started)).total_seconds() if started else 0.0
        totals = stage.totals([records[t.key].get("metrics") or {} for t in stage.tasks]) if stage.totals else {}
        tokens = totals.get("generated_tokens")
        totals.update(shards=len(stage.tasks), wall_seconds=round(seconds, 2))
        if tokens is not None:
            totals["tokens_per_s"] = round(tokens / seconds, 1) if seconds else None
        self.ledger.set_status([stage.key], Status.DONE, metrics=totals)

    def watch(self, summary: dict[str, Any], iteration: int, can_stop: bool = True) -> None:
        """After an iteration: say what the reward-hacking watch saw, and stop the run before the next
        iteration if grpo.stop_on_hacking says so."""
        flags = [flag for flag in summary["hacking"] if flag["iteration"] == iteration]
        for flag in flags:
            self.console.print(f"[yellow]reward hacking?[/yellow] {describe(flag)}", highlight=False)
        if flags and can_stop and self.config.grpo.stop_on_hacking:
            why = f"stopped by grpo.stop_on_hacking: {describe(flags[0])}"
            self.ledger.update("run", {"status": "stopped", "error": why, "ended_at": now()})
            raise RunStopped(why)

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        plan = self.planner.stages()
        # Bars on a terminal; in a log file (a batch job, CI) one line per stage is easier to read.
        with Progress(*columns, console=self.console, disable=not self.console.is_terminal) as progress:
            try:
                for index in range(len(plan)):
                    stage = plan[index]
                    bar = progress.add_task(stage.label, total=len(stage.tasks))
                    started = time.monotonic()
                    if self.run_stage(stage, lambda done, total, bar=bar: progress.update(bar, completed=done, total=total)):
                        plan = self.planner.stages()  # the stages after it read the outputs the re-split added
                    following = plan[index + 1] if index + 1 < len(plan) else None
                    # A service no later stage needs right away gives its resources back.
                    self.services.release(keep=following.services if following else ())
                    metrics = self.ledger.read(stage.key).get("metrics") or {}
                    shown = {k: v for k, v in metrics.items() if k in HEADLINE_METRICS}
                    self.console.log(f"{stage.label}: done in {time.monotonic() - started:.0f} s {shown}", highlight=False)
                    if stage.iteration and (following is None or following.iteration != stage.iteration):
                        summary = summarize(self.run_dir)
                        self.console.print(iteration_table(summary))
                        self.watch(summary, stage.iteration, can_stop=following is not None)
            except (StageFailed, RunStopped):
                self.services.release()
                raise
        self.ledger.update("run", {"status": str(Status.DONE), "ended_at": now()})
