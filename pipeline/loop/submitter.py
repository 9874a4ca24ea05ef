"""Submission as a narrow interface: submit tasks as job arrays, mark the jobs that died without
reporting as failed, withdraw a job that will never run, cancel a job. The driver, the service
keeper and the detached chain all submit through one ``Submitter``; the ledger knows every attempt
before its job can start.
"""

from __future__ import annotations

import contextlib
import io
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from submitit.core.utils import FailedJobError

from pipeline.config import RunConfig
from pipeline.layout import RunLayout
from pipeline.planning.stage import StagePlan, Task
from pipeline.scheduling.executors import make_executor, max_array_size, submit_array
from pipeline.scheduling.watch import (
    IN_FLIGHT,
    UNKNOWN,
    JobInfo,
    JobWatcher,
    SchedulerUnavailable,
)
from state import InputError, Ledger, Status
from state.ledger import now

# sacct's reason for a job cancelled while it waited on a dependency that failed (--kill-on-invalid-dep).
NEVER_SATISFIED = ("Dependency", "DependencyNeverSatisfied")
# What a new attempt must not inherit from the one before.
FRESH_ATTEMPT = {"job_id": None, "error": None, "slurm_state": None, "exit_code": None, "note": None, "progress": None,
                 "permanent": None}


class SubmissionRefused(InputError):
    """The scheduler refused a job as asked for (e.g. GPUs on a cluster without any): fix the config."""


def may_retry(record: dict[str, Any], max_attempts: int) -> bool:
    """Whether a task that is not done may be submitted again: it has attempts left, and its last job
    did not fail for good (``permanent``: nothing to train on, a model that does not load, bad data;
    a retry would fail the same way). A job lost or timed out is retried."""
    return record.get("attempts", 0) < max_attempts and not record.get("permanent")


def withdraw(record: dict[str, Any], why: str) -> None:
    """A submitted job that will never run (its dependency failed) is not an attempt."""
    if record.get("status") in IN_FLIGHT:
        record.update(status=str(Status.PLANNED), attempts=max(record.get("attempts", 1) - 1, 0), note=why)


def job_name(config: RunConfig, stage: StagePlan) -> str:
    """``demo.iter_002.generate``: squeue shows which run, iteration and stage a job is."""
    return f"{config.run_name}.{stage.key.replace('/', '.')}"


class Submitter:
    """Submits a run's tasks and tells which of its jobs died: ``submit``, ``mark_lost``, ``cancel``."""

    def __init__(self, config: RunConfig, layout: RunLayout, ledger: Ledger, log: Callable[[str], None]):
        self.config, self.layout, self.ledger, self.log = config, layout, ledger, log
        self.watcher = JobWatcher(config.executor.cluster)
        self.max_array_size = max_array_size(config.executor.cluster)

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
        folder = self.layout.job_logs(stage.key, submission)
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
        """Fail the in-flight tasks whose job is gone without reporting (killed from outside); withdraw
        those whose job never ran because a job it depended on failed. ``records`` is updated."""
        in_flight = {t.key: records[t.key] for t in tasks if records[t.key].get("status") in IN_FLIGHT}
        try:
            infos = self.watcher.poll(r.get("job_id") for r in in_flight.values())
        except SchedulerUnavailable as error:
            # A controller restart or a sacct hiccup says nothing about the jobs: ask again later.
            self.log(f"cannot ask the scheduler about jobs now: {error}")
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

    def alive(self, job_id: str) -> bool:
        """Whether the scheduler says job ``job_id`` may still run."""
        return self.watcher.alive(job_id, self.watcher.poll([job_id])[job_id])

    def cancel(self, job_id: str) -> None:
        self.watcher.cancel(job_id)
