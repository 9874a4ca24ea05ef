"""Detached runs: an iteration's stages go to SLURM as one dependency chain; nothing waits on the login node.

    generate array --afterany--> filter --afterok--> train --afterok--> eval
          \\____________________ afterany on all of them ____________________> advance

``filter`` waits with afterany, so that it starts even when shards failed: it then resubmits them
(up to ``executor.max_attempts``) with a new chain after them, instead of dying. ``train`` and
``eval`` wait with afterok, and ``--kill-on-invalid-dep=yes`` makes SLURM cancel them when their
dependency fails instead of leaving them pending forever. ``advance`` is a small CPU job that does
what ``pipeline.run --detach`` does on the login node: it reconciles the ledger with sacct, then
submits the chain of what is left of the run, or marks the run done or failed.

Every step is idempotent: a stage in flight is waited for, never submitted twice, so rerunning
``--detach`` (or a stale job running late) cannot fork the run.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.runtime import log, step_aside_if_superseded
from jobs.scoring import filtering as filter_job
from jobs.specs import FilterSpec, JobTarget
from pipeline.driver import IN_FLIGHT, Driver, StageFailed, is_array_stage, withdraw
from pipeline.plan import StagePlan, Task
from pipeline.status import console
from state import Status
from state.ledger import now

ADVANCE = "advance"
DONE = str(Status.DONE)


def _chain(driver: Driver, start: StagePlan) -> list[StagePlan]:
    """``start`` and the stages after it in its iteration."""
    plan = driver.planner.stages()
    iteration = next(i for i, stage in plan if stage.key == start.key)
    keys = [stage.key for i, stage in plan if i == iteration]
    return [stage for i, stage in plan if i == iteration][keys.index(start.key):]


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
    infos = driver.watcher.poll([job_id])
    return job_id if driver.watcher.alive(job_id, infos[job_id]) else None


def submit_chain(driver: Driver, me: str | None = None) -> str:
    """Submit what the current iteration still needs, then an advance job after it; say what was done.

    ``me`` is the advance job calling this (its own record does not count as in flight).
    Raises StageFailed (after recording it) when a stage's tasks have used up their attempts.
    """
    current = driver.current_stage()
    if current is None:
        driver.ledger.update("run", {"status": DONE, "ended_at": now()})
        return "run complete"
    chain = _chain(driver, current)
    # The ledger first learns how every job of the chain ended, so that it is right however this ends.
    all_records = {t.key: driver.ledger.read(t.key) for stage in chain for t in stage.tasks}
    driver.mark_lost([t for stage in chain for t in stage.tasks], all_records)
    waits_for: list[str] = []  # job ids the next stage depends on
    chain_jobs: list[str] = []
    said = []
    for stage in chain:
        records = {t.key: all_records[t.key] for t in stage.tasks}
        live = [records[t.key]["job_id"] for t in stage.tasks if records[t.key].get("status") in IN_FLIGHT]
        todo = [t for t in stage.tasks if records[t.key].get("status") not in (*IN_FLIGHT, DONE)]
        exhausted = [t for t in todo if records[t.key].get("attempts", 0) >= driver.config.executor.max_attempts]
        if exhausted:
            if live:
                # Let the stage's live tasks end first: the advance job after them fails the run.
                chain_jobs += live
                said.append(f"{stage.key}: waiting for {len(live)} job(s) before stopping")
                break
            summary = driver.failure_summary(exhausted, records)
            driver.ledger.update("run", {"status": str(Status.FAILED), "error": summary.splitlines()[0], "ended_at": now()})
            raise StageFailed(summary)
        new: list[str] = []
        if todo and is_array_stage(stage):
            driver.start_array(stage)
        if todo:
            kind = "afterany" if stage.name == "filter" else "afterok"
            if stage.name == "filter":
                # The filter job of a chain first checks the shards (see ``filter_after_generation``).
                todo = [Task(t.key, filter_after_generation, t.spec) for t in todo]
            new = driver.submit(stage, todo, _dependency(kind, waits_for) if waits_for else None)
            said.append(f"{stage.key}: {len(new)} job(s) {', '.join(_jobs(new))}" + (f" ({kind})" if waits_for else ""))
        elif live:
            said.append(f"{stage.key}: in flight")
        waits_for = live + new
        chain_jobs += waits_for
    running_advance = advance_in_flight(driver, me)
    if running_advance:
        said.append(f"advance: job {running_advance} already queued")
    elif chain_jobs:
        advance = StagePlan(ADVANCE, ADVANCE, [Task(ADVANCE, advance_run, AdvanceSpec(JobTarget(str(driver.run_dir), ADVANCE)))],
                            driver.config.executor.advance)
        job_ids = driver.submit(advance, advance.tasks, _dependency("afterany", chain_jobs))
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


def filter_after_generation(spec: FilterSpec) -> dict[str, Any]:
    """A chain's filter job: filter when every shard is done, otherwise resubmit the failed ones first.

    The filter waits with afterany, so it starts however the shards ended. Failed ones go back
    with a new chain behind them; this job and the rest of its chain step aside without counting
    as attempts.
    """
    driver = Driver.open(Path(spec.target.run_dir), console())
    me = _my_job_id()
    generate = driver.current_stage()
    if generate is None or generate.name != "generate":
        return filter_job.run(spec)
    records = {t.key: driver.ledger.read(t.key) for t in generate.tasks}
    driver.mark_lost(generate.tasks, records)
    if all(records[t.key].get("status") == DONE for t in generate.tasks):
        driver.finish_array(generate, records)
        return filter_job.run(spec)
    # Step aside: this job and the later jobs of the chain, which have not run.
    later = [s.key for s in _chain(driver, generate)[1:]] + [ADVANCE]
    pending = [driver.ledger.read(key).get("job_id") for key in later]
    others = [job_id for key, job_id in zip(later, pending, strict=True)
              if job_id and job_id != me and driver.ledger.read(key).get("status") in IN_FLIGHT]
    if others:
        subprocess.run(["scancel", *others], check=False, capture_output=True)
    driver.ledger.update_many({key: {} for key in later}, lambda record: withdraw(
        record, "stepped aside before it ran: the shards it waits for were resubmitted"))
    log.info("shards failed; resubmitted: %s", submit_chain(driver))
    return {}
