"""submitit executors for each cluster kind, and array submission."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import submitit
from submitit.slurm.slurm import _make_sbatch_string

from pipeline.config import Resources
from state import InputError


def require_scheduler(cluster: str) -> None:
    """Refuse, in one line, a SLURM run on a machine where SLURM's commands are missing."""
    if cluster != "slurm":
        return
    missing = [command for command in ("sbatch", "srun", "sacct") if shutil.which(command) is None]
    if missing:
        raise InputError(
            f"executor.cluster: slurm, but {', '.join(missing)} not found on this machine: run from a login node"
            " of the cluster, or set executor.cluster=local"
        )


def make_executor(
    cluster: str, folder: Path, resources: Resources, job_name: str, dependency: str | None = None
) -> submitit.Executor:
    if cluster == "debug":
        return submitit.DebugExecutor(folder)
    if cluster == "local":
        executor = submitit.LocalExecutor(folder)
        executor.update_parameters(
            timeout_min=resources.timeout_min, tasks_per_node=resources.tasks_per_node,
            gpus_per_node=resources.gpus_per_task * resources.tasks_per_node,
        )
        if resources.cpus_per_task:
            # Local jobs share the machine: cap each one's threads as SLURM would cap its CPUs.
            executor.update_parameters(setup=[f"export OMP_NUM_THREADS={resources.cpus_per_task}"])
        return executor
    executor = submitit.SlurmExecutor(folder)
    options: dict[str, Any] = {
        "time": resources.timeout_min, "job_name": job_name, "nodes": resources.nodes,
        "ntasks_per_node": resources.tasks_per_node,
        "array_parallelism": resources.array_parallelism, "signal_delay_s": resources.signal_delay_s,
    }
    for name in ("cpus_per_task", "partition", "account", "qos", "constraint"):
        value = getattr(resources, name)
        if value is not None:
            options[name] = value
    if resources.gpus_per_task:
        options["gpus_per_task"] = resources.gpus_per_task
    if resources.nodes * resources.tasks_per_node > 1:
        # A task that dies (a rank that could not open the rendezvous, an exception on one rank)
        # leaves the others waiting in a collective until the time limit, and the driver's retry
        # pending behind them: SLURM ends the whole step when one task fails.
        options["srun_args"] = ["--kill-on-bad-exit=1"]
    if resources.mem_gb is not None:
        options["mem"] = f"{int(resources.mem_gb * 1024)}M"
    if resources.cpus_per_task:
        # torch and the BLAS libraries start a thread per core of the node, not of the job: where
        # SLURM does not confine jobs to their CPUs (no cgroups), jobs sharing a node would
        # oversubscribe it several times over.
        options["setup"] = [f"export OMP_NUM_THREADS={resources.cpus_per_task}"]
    extra = dict(resources.extra_sbatch)
    if dependency:
        options["dependency"] = dependency
        # A job whose dependency can never be satisfied (afterok on a failed job) is cancelled,
        # not left pending forever.
        extra["kill-on-invalid-dep"] = "yes"
    if extra:
        options["additional_parameters"] = extra
    executor.update_parameters(**options)
    return executor


def sbatch_script(folder: Path, resources: Resources, job_name: str, num_tasks: int) -> str:
    """The exact script ``submit_array`` hands to sbatch for an array of ``num_tasks`` tasks."""
    executor = make_executor("slurm", folder, resources, job_name)
    # submitit renders the script only while it submits; its renderer is the one source of truth.
    # submitit submits an array of one as a plain job.
    return _make_sbatch_string(
        command=executor._submitit_command_str, folder=folder, map_count=num_tasks if num_tasks > 1 else None,
        **executor.parameters,
    )


def max_array_size(cluster: str) -> int:
    """The largest job array the cluster accepts (SLURM's MaxArraySize); unlimited elsewhere."""
    if cluster != "slurm":
        return sys.maxsize
    result = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=False)
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", result.stdout, re.MULTILINE)
    # Indices run 0 .. MaxArraySize - 1, so that many tasks fit in one array.
    return int(match.group(1)) if match else 1001


def submit_array(
    executor: submitit.Executor, function: Callable[[Any], Any], specs: Sequence[Any], max_size: int = sys.maxsize
) -> list[submitit.Job]:
    """Submit ``specs`` as job arrays of at most ``max_size`` tasks (SLURM refuses larger ones)."""
    jobs: list[submitit.Job] = []
    try:
        for first in range(0, len(specs), max_size):
            jobs += executor.map_array(function, specs[first:first + max_size])
    except Exception:
        # A refused later part must not leave the accepted parts pending without a driver.
        for job in jobs:
            job.cancel(check=False)
        raise
    if isinstance(executor, submitit.DebugExecutor):
        # Debug jobs run in this process when asked for their result; they report to the ledger.
        for job in jobs:
            # A failing job has recorded its failure in the ledger, where the driver looks.
            with contextlib.suppress(Exception):
                job.result()
    return jobs
