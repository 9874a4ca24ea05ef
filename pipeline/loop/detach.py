"""Detached runs: an iteration's stages go to SLURM as one dependency chain; nothing waits on the login node.

    ReST:   generate array --afterany--> filter --afterok--> train --afterok--> eval
                  \\____________________ afterany on all of them ____________________> advance

Each stage waits as its recipe says (``StagePlan.after``). One that waits with afterany (the
filter) starts even when tasks of the stage before it failed: it then resubmits them (up to
``executor.max_attempts``) with a new chain after them, instead of dying. afterok stages are
cancelled by SLURM (``--kill-on-invalid-dep=yes``) when their dependency fails, instead of pending
forever. A stage that needs a service has the service's job submitted with the chain, without a
dependency; its clients wait for the endpoint, and while the stage runs its job resubmits the
service if it dies. ``advance`` is a small CPU job that does what ``pipeline.run --detach`` does
on the login node: it reconciles the ledger with sacct, then submits the chain of what is left of
the run (stopping services the chain does not need), or marks the run done or failed.

Every step is idempotent: a stage in flight is waited for, never submitted twice, so rerunning
``--detach`` (or a stale job running late) cannot fork the run.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from jobs.runtime import log, step_aside_if_superseded
from jobs.specs import JobTarget
from pipeline.console import console
from pipeline.loop.driver import Driver
from pipeline.loop.submitter import IN_FLIGHT, may_retry, withdraw
from pipeline.loop.summary import summarize
from pipeline.planning.stage import StageFailed, StagePlan, Task
from pipeline.planning.stages import ADVANCE, stage_resources
from state import Status
from state.ledger import now

DONE = str(Status.DONE)


def _chain(driver: Driver, start: StagePlan) -> list[StagePlan]:
    """``start`` and the stages after it in its iteration, up to one planned when it is due (the next
    chain submits it, planned then)."""
    iteration = [stage for stage in driver.planner.stages() if stage.iteration == start.iteration]
    chain = iteration[[stage.key for stage in iteration].index(start.key):]
    return chain[:next((i for i, stage in enumerate(chain) if i and stage.planned_when_due), len(chain))]


def _jobs(job_ids: list[str]) -> list[str]:
    """The jobs behind these ids: an array's id stands for all of its tasks."""
    return sorted({job_id.split("_")[0] for job_id in job_ids})


def _dependency(kind: str, job_ids: list[str]) -> str:
    return f"{kind}:" + ":".join(_jobs(job_ids))


def advance_in_flight(driver: Driver, me: str | None = None) -> str | None:
    """The job id of a live advance job other than ``me``, if there is one."""
    record = driver.ledger.read(ADVANCE)
    job_id = record.get("job_id")
    if record.get("status") not in IN_FLIGHT or not job_id or job_id == me:
        return None
    return job_id if driver.submitter.alive(job_id) else None


def submit_chain(driver: Driver, me: str | None = None) -> str:
    """Submit what the current iteration still needs, then an advance job after it; say what was done.

    ``me`` is the advance job calling this (its own record does not count as in flight).
    Raises StageFailed (after recording it) when a stage's tasks have used up their attempts.
    """
    current = driver.current_stage()
    if current is None:
        driver.services.release()
        driver.ledger.update("run", {"status": DONE, "ended_at": now()})
        return "run complete"
    chain = _chain(driver, current)
    if current.iteration > 1 and chain[0].key == driver.planner.iteration(current.iteration)[0].key:
        # A new iteration: first what the reward-hacking check and the collapse guard saw in the one
        # before (RunStopped, recorded; the export of the best iteration so far submitted).
        driver.check_iteration(summarize(driver.run_dir), current.iteration - 1, wait=False)
    needed = {name for stage in chain for name in stage.services}
    driver.services.release(keep=tuple(needed))
    # The ledger first learns how every job of the chain ended, so that it is right however this ends.
    all_records = driver.ledger.read_many(t.key for stage in chain for t in stage.tasks)
    driver.submitter.mark_lost([t for stage in chain for t in stage.tasks], all_records)
    waits_for: list[str] = []  # job ids the next stage depends on
    chain_jobs: list[str] = []
    said = []
    for stage in chain:
        records = {t.key: all_records[t.key] for t in stage.tasks}
        live = [records[t.key]["job_id"] for t in stage.tasks if records[t.key].get("status") in IN_FLIGHT]
        todo = [t for t in stage.tasks if records[t.key].get("status") not in (*IN_FLIGHT, DONE)]
        exhausted = [t for t in todo if not may_retry(records[t.key], driver.config.executor.max_attempts)]
        if exhausted:
            if live:
                # Let the stage's live tasks end first: the advance job after them fails the run.
                chain_jobs += live
                said.append(f"{stage.key}: waiting for {len(live)} job(s) before stopping")
                break
            summary = driver.failure_summary(exhausted, records)
            driver.services.release()
            driver.ledger.update("run", {"status": str(Status.FAILED), "error": summary.splitlines()[0], "ended_at": now()})
            raise StageFailed(summary)
        new: list[str] = []
        if todo and stage.is_array:
            driver.start_array(stage)
        if todo:
            for name in stage.services:
                started = driver.services.start(name, stage)
                said += [f"service {name}: job {started[0]}"] if started else []
            if stage.after == "afterany" or stage.services:
                todo = [Task(t.key, run_in_chain, ChainStep(t.spec.target, t.function, t.spec, stage.after == "afterany"))
                        for t in todo]
            kind = stage.after
            new = driver.submitter.submit(stage, todo, _dependency(kind, waits_for) if waits_for else None)
            said.append(f"{stage.key}: {len(new)} job(s) {', '.join(_jobs(new))}" + (f" ({kind})" if waits_for else ""))
        elif live:
            said.append(f"{stage.key}: in flight")
        waits_for = live + new
        chain_jobs += waits_for
    running_advance = advance_in_flight(driver, me)
    if running_advance:
        said.append(f"advance: job {running_advance} already queued")
    elif chain_jobs:
        advance = StagePlan(ADVANCE, ADVANCE, 0, [Task(ADVANCE, advance_run, AdvanceSpec(JobTarget(str(driver.run_dir), ADVANCE)))],
                            stage_resources(driver.config, ADVANCE))
        job_ids = driver.submitter.submit(advance, advance.tasks, _dependency("afterany", chain_jobs))
        said.append(f"advance: job {job_ids[0]} (afterany)")
    return "; ".join(said)


def _my_job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID")


@dataclass
class AdvanceSpec:
    target: JobTarget


def advance_run(spec: AdvanceSpec) -> dict[str, Any]:
    """The advance job: submit the next chain, or record that the run is done or failed."""
    driver = Driver.open(Path(spec.target.run_dir), console())
    me = _my_job_id()
    # Another advance job may have taken over (a --detach rerun submitted one).
    step_aside_if_superseded(spec.target, driver.ledger.read(ADVANCE))
    driver.ledger.update(ADVANCE, {"status": DONE, "ended_at": now()})
    # A StageFailed raised here has been recorded in the ledger; it fails this job, visibly.
    log.info("advance job %s: %s", me, submit_chain(driver, me))
    return {}


@dataclass
class ChainStep:
    """A task of a detached chain that first looks around: ``target`` is the task's (the driver puts its
    submission here), ``function(spec)`` its work."""

    target: JobTarget
    function: Callable[[Any], dict[str, Any]]
    spec: Any
    # afterany: check how the stage before ended, and resubmit what failed of it instead of running.
    check_previous: bool


def run_in_chain(step: ChainStep) -> dict[str, Any]:
    """Run a chained task once the stage before it is done (resubmitting what failed of it otherwise),
    keeping its services up while it runs."""
    driver = Driver.open(Path(step.target.run_dir), console())
    stage = next(s for s in driver.planner.stages() if any(t.key == step.target.ledger_key for t in s.tasks))
    if step.check_previous and not _previous_done(driver, stage):
        return {}
    guard = _ServiceGuard(driver, stage) if stage.services else None
    try:
        return step.function(replace(step.spec, target=step.target))
    finally:
        if guard:
            guard.stop()


class _ServiceGuard:
    """While a chained stage runs, its services' jobs are resubmitted if they die (a detached run has no
    driver to do it); their clients wait for the new endpoint."""

    def __init__(self, driver: Driver, stage: StagePlan):
        self.driver, self.stage, self.done = driver, stage, threading.Event()
        threading.Thread(target=self._guard, name="service-guard", daemon=True).start()

    def _guard(self) -> None:
        while not self.done.wait(self.driver.config.executor.poll_interval_s):
            try:
                self.driver.services.revive(self.stage)
            except StageFailed as error:  # out of attempts: the clients' waits run out, their scores count as failed
                log.info("%s", error)
                return

    def stop(self) -> None:
        self.done.set()


def _previous_done(driver: Driver, stage: StagePlan) -> bool:
    """True when the stage before ``stage`` is done; otherwise resubmit what failed of it with a new
    chain behind it, withdraw this job and the rest of its chain (they do not count as attempts), and
    return False.
    """
    me = _my_job_id()
    previous = driver.current_stage()
    if previous is None or previous.key == stage.key:
        return True
    records = driver.ledger.read_many(t.key for t in previous.tasks)
    driver.submitter.mark_lost(previous.tasks, records)
    if all(records[t.key].get("status") == DONE for t in previous.tasks):
        if previous.is_array:
            driver.finish_array(previous, records)
        return True
    # Step aside: this job and the later jobs of the chain, which have not run.
    later = [s.key for s in _chain(driver, previous)[1:]] + [ADVANCE]
    pending = [driver.ledger.read(key).get("job_id") for key in later]
    others = [job_id for key, job_id in zip(later, pending, strict=True)
              if job_id and job_id != me and driver.ledger.read(key).get("status") in IN_FLIGHT]
    if others:
        subprocess.run(["scancel", *others], check=False, capture_output=True)
    driver.ledger.update_many({key: {} for key in later}, lambda record: withdraw(
        record, "stepped aside before it ran: the tasks it waits for were resubmitted"))
    log.info("%s: tasks of %s failed; resubmitted: %s", stage.key, previous.key, submit_chain(driver))
    return False
