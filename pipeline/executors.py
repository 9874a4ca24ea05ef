"""submitit executors for each cluster kind, and a watcher that tells which jobs still live.

The driver never waits on ``job.result()``: jobs report to the ledger themselves, and the watcher
only answers "is this job still alive?" so that a job killed from outside (SIGKILL, scancel, node
failure) is noticed instead of waited on forever. It also answers for jobs that an earlier driver
process submitted, which is what lets a rerun reattach to work still in flight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import submitit
from submitit.slurm.slurm import SlurmInfoWatcher

from pipeline.config import Resources

ALIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "RESIZING", "SUSPENDED", "UNKNOWN"}


def make_executor(cluster: str, folder: Path, resources: Resources, job_name: str) -> submitit.Executor:
    if cluster == "debug":
        return submitit.DebugExecutor(folder)
    if cluster == "local":
        executor = submitit.LocalExecutor(folder)
        executor.update_parameters(timeout_min=resources.timeout_min, gpus_per_node=resources.gpus_per_task)
        if resources.cpus_per_task:
            # Local jobs share the machine: cap each one's threads as SLURM would cap its CPUs.
            executor.update_parameters(setup=[f"export OMP_NUM_THREADS={resources.cpus_per_task}"])
        return executor
    executor = submitit.SlurmExecutor(folder)
    options: dict[str, Any] = {"time": resources.timeout_min, "job_name": job_name}
    for name in ("cpus_per_task", "partition", "account", "qos", "constraint"):
        value = getattr(resources, name)
        if value is not None:
            options[name] = value
    if resources.gpus_per_task:
        options["gpus_per_task"] = resources.gpus_per_task
    if resources.mem_gb is not None:
        options["mem"] = f"{int(resources.mem_gb * 1024)}M"
    executor.update_parameters(**options)
    return executor


def submit_array(
    executor: submitit.Executor, function: Callable[[Any], Any], specs: Sequence[Any]
) -> list[submitit.Job]:
    jobs = executor.map_array(function, specs)
    if isinstance(executor, submitit.DebugExecutor):
        # Debug jobs run in this process when asked for their result; they report to the ledger.
        for job in jobs:
            # A failing job has recorded its failure in the ledger, where the driver looks.
            with contextlib.suppress(Exception):
                job.result()
    return jobs


def _local_pid_alive(pid: int) -> bool:
    """A local job's controller (pid = job id) still runs: alive, not a zombie, and submitit's."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and b"submitit" in cmdline


class JobWatcher:
    def __init__(self, cluster: str):
        self.cluster = cluster
        self.jobs: dict[str, submitit.Job] = {}
        self._slurm = SlurmInfoWatcher(delay_s=0) if cluster == "slurm" else None

    def track(self, jobs: Sequence[submitit.Job]) -> None:
        for job in jobs:
            self.jobs[job.job_id] = job
            if self._slurm is not None:
                self._slurm.register_job(job.job_id)

    def state(self, job_id: str | None) -> str:
        """The scheduler's word for the job: RUNNING, PENDING, ... or a terminal state."""
        if not job_id:
            return "UNKNOWN"
        if self.cluster == "debug":
            return "FINISHED"
        if self.cluster == "local":
            job = self.jobs.get(job_id)
            if job is not None:
                return job.state
            return "RUNNING" if _local_pid_alive(int(job_id)) else "FINISHED"
        assert self._slurm is not None
        self._slurm.register_job(job_id)
        return self._slurm.get_state(job_id, mode="force")

    def alive(self, job_id: str | None) -> bool:
        state = self.state(job_id)
        if self.cluster == "slurm":
            return state in ALIVE_SLURM_STATES
        return state == "RUNNING"
