"""Services of a run (``services.<name>``: a reward model server) as jobs the driver keeps alive while
the stages that need them run.

Before a stage that needs a service runs, the driver submits the service's job (unless one serves
already) and waits until its ledger record says ``serving`` and its endpoint answers /health.
While the stage runs, every poll checks the service's job: one that died or was cancelled is
resubmitted (up to ``executor.max_attempts`` starts; none after a permanent error: a retry would
fail alike), and its clients wait for the new endpoint instead of failing. When the next
stage does not need it, the driver cancels it (the job also stops by itself once the stages it
serves are done, which covers detached runs).
"""

from __future__ import annotations

import dataclasses
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs.services import runner
from jobs.specs import ServiceSpec, VllmServing
from jobs.vllm.config import VllmServiceConfig
from pipeline.config import RunConfig
from pipeline.loop.submitter import IN_FLIGHT, Submitter, may_retry
from pipeline.planning.planner import Planner
from pipeline.planning.stage import RunContext, StageFailed, StagePlan, Task
from pipeline.scheduling.executors import Resources
from state import Status

SERVICES = "services"
# executor.<service name>: what a service's job asks for by default.
DEFAULT_RESOURCES = Resources()
HEALTH_TIMEOUT_S = 5.0


def service_key(name: str) -> str:
    return f"{SERVICES}/{name}"


def configured(config: RunConfig) -> dict[str, Any]:
    """The run's services that are configured, by name."""
    return {f.name: getattr(config.services, f.name) for f in dataclasses.fields(config.services)
            if getattr(config.services, f.name) is not None}


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=HEALTH_TIMEOUT_S) as response:
            return response.status == 200
    except OSError:  # refused, reset, timed out (urllib's errors are OSErrors)
        return False


def service_plan(run: RunContext, name: str, consumers: list[str]) -> StagePlan:
    """The job of service ``name``, serving ``consumers`` (ledger keys of stages)."""
    config = run.config
    key = service_key(name)
    endpoint = run.layout.service_endpoint(name)
    settings = getattr(config.services, name)
    if isinstance(settings, VllmServiceConfig):
        settings = VllmServing(str(Path(settings.model or config.model.path).resolve()), config.generate)
    spec = ServiceSpec(
        target=run.target(key), name=name, config=settings, endpoint_file=str(endpoint),
        api_key_file=str(run.layout.api_key), folder=str(endpoint.parent),
        loopback=config.executor.cluster != "slurm", consumers=consumers,
        compile_cache_dir=str(run.layout.compile_caches), media_dir=config.generate.media_dir,
    )
    return StagePlan(key, name, 0, [Task(key, runner.run, spec)], config.executor.resources(name, DEFAULT_RESOURCES),
                     jobs_text="1, serving while the stages that need it run", writes=str(endpoint))


class ServiceKeeper:
    """Starts the services a stage needs, resubmits those whose job died, stops those no stage needs."""

    def __init__(self, planner: Planner, submitter: Submitter, log: Callable[[str], None]):
        self.planner, self.submitter, self.log = planner, submitter, log
        self.ledger = submitter.ledger
        self.executor = planner.config.executor

    def consumers(self, stage: StagePlan, name: str) -> list[str]:
        """``stage`` and the stages right after it that need ``name`` too: one start of the service serves them."""
        plan = self.planner.stages()
        keys = [s.key for s in plan]
        out = []
        for later in plan[keys.index(stage.key):]:
            if name not in later.services:
                break
            out.append(later.key)
        return out

    def _record(self, name: str) -> dict[str, Any]:
        """The service's record, after asking the scheduler whether its job still lives."""
        task = Task(service_key(name), runner.run, None)
        records = {task.key: self.ledger.read(task.key)}
        self.submitter.mark_lost([task], records)
        return records[task.key]

    def start(self, name: str, stage: StagePlan, dependency: str | None = None) -> list[str]:
        """Submit the service's job unless one is in flight; the new job ids (none if one serves)."""
        record = self._record(name)
        if record.get("status") in IN_FLIGHT:
            return []
        if record.get("status") == str(Status.DONE):
            # It served the stages before and was stopped: a new start, with attempts of its own.
            self.ledger.update(service_key(name), {"attempts": 0, "error": None})
            record["attempts"] = 0
        attempts = record.get("attempts", 0)
        if not may_retry(record, self.executor.max_attempts):
            why = " (not started again: the error is permanent)" if record.get("permanent") else ""
            raise StageFailed(f"service {name} failed after {attempts} start(s){why}: {record.get('error')}")
        if attempts:
            self.log(f"service {name}: {record.get('error')}; starting it again")
        plan = service_plan(self.planner, name, self.consumers(stage, name))
        return self.submitter.submit(plan, plan.tasks, dependency)

    def ensure(self, stage: StagePlan) -> None:
        """Every service ``stage`` needs serves, and answers."""
        for name in stage.services:
            self.start(name, stage)
            started = time.monotonic()
            timeout = service_plan(self.planner, name, []).tasks[0].spec.config.startup_timeout_s
            while True:
                record = self._record(name)
                if record.get("status") == str(Status.SERVING) and healthy(record["endpoint"]):
                    break
                if time.monotonic() - started > timeout:
                    raise StageFailed(f"service {name} did not serve within {timeout:.0f} s (services.{name}.startup_timeout_s)")
                self.start(name, stage)  # its job died while starting: again, within max_attempts
                time.sleep(self.executor.poll_interval_s)
            self.log(f"service {name}: serving at {record['endpoint']} (job {record.get('job_id')})")

    def revive(self, stage: StagePlan) -> None:
        """A poll while ``stage`` runs: resubmit its services whose job is gone (clients wait for them)."""
        for name in stage.services:
            self.start(name, stage)

    def release(self, keep: tuple[str, ...] = ()) -> None:
        """Cancel the services the run's stages use that are in flight and not in ``keep`` (the next
        stage's). A service no stage uses (vLLM started with pipeline.serve) is the user's to stop."""
        for name in sorted({n for stage in self.planner.stages() for n in stage.services}):
            key = service_key(name)
            record = self.ledger.read(key)
            if name in keep or record.get("status") not in IN_FLIGHT:
                continue
            # Done first: the job then knows that its end is expected, not a failure to answer.
            self.ledger.set_status([key], Status.DONE, stopped="no stage needs it now")
            if record.get("job_id"):
                self.submitter.cancel(record["job_id"])
            self.log(f"service {name}: stopped (job {record.get('job_id')}); no stage needs it now")


def service_fields(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "status": record.get("status", str(Status.PLANNED)), "job_ids": record.get("job_ids", []),
        "attempts": record.get("attempts", 0), "restarts": max(record.get("attempts", 0) - 1, 0),
        "node": record.get("node"), "endpoint": record.get("endpoint"), "error": record.get("error"),
    }
