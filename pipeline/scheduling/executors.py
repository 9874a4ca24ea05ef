"""The ``executor`` section (how jobs run: the cluster kind, retries, polling, and each stage's and
service's resources), submitit executors made from it, and array submission."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import submitit
from annotated_types import Ge, Gt
from pydantic import StringConstraints, model_validator
from submitit.slurm.slurm import _make_sbatch_string

from jobs.sections import REJECT_UNKNOWN_KEYS, PositiveInt
from pipeline.scheduling.resplit import Resplit
from state import InputError

# Values end up in #SBATCH lines: a line break would start a shell command of its own.
PATTERN_RULES = {
    r"^[^\x00-\x1f\x7f]*$": "must not contain line breaks or other control characters",
    r"^[a-z][a-z0-9-]*$": "must be an sbatch option name such as mail-type",
    # Names a folder and every job of the run.
    r"^[A-Za-z0-9][A-Za-z0-9._-]*$": "may hold only letters, digits, '.', '_' and '-'",
}
SbatchValue, SbatchOption, RunName = (Annotated[str, StringConstraints(pattern=p)] for p in PATTERN_RULES)


@dataclass
class Resources:
    """What one stage's jobs ask the scheduler for."""

    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    timeout_min: PositiveInt = 240
    nodes: PositiveInt = 1
    # Processes per node (distributed training: one per GPU); each gets cpus_per_task and gpus_per_task.
    tasks_per_node: PositiveInt = 1
    cpus_per_task: PositiveInt | None = None
    gpus_per_task: Annotated[int, Ge(0)] = 0
    mem_gb: Annotated[float, Gt(0)] | None = None
    partition: SbatchValue | None = None
    account: SbatchValue | None = None
    qos: SbatchValue | None = None
    constraint: SbatchValue | None = None
    # The pre-timeout signal (USR2) comes this long before the time limit: time to checkpoint.
    signal_delay_s: Annotated[int, Ge(0)] = 90
    # How many tasks of one array may run at once (sbatch --array=...%N).
    array_parallelism: PositiveInt = 256
    # Any other sbatch option, without the dashes: {"mail-type": "END", "exclude": "node7"}.
    extra_sbatch: dict[SbatchOption, SbatchValue] = field(default_factory=dict)
    # Straggler re-split, for stages whose tasks can be split (generation): true (the defaults), false
    # (off), or the thresholds.
    resplit: Resplit | bool = True

    def resplit_policy(self) -> Resplit | None:
        return Resplit() if self.resplit is True else (self.resplit or None)


# Keys of the executor section that are not a stage's or service's resources.
EXECUTOR_SETTINGS = ("cluster", "max_attempts", "poll_interval_s", "max_poll_interval_s")


@dataclass
class ExecutorConfig:
    """How jobs run. Changing it does not change results, so a resumed run may change it.

    Besides the settings, every key is a stage's or a service's resources, by name:
    ``executor.generate``, ``executor.train``, ``executor.reward`` (the reward service), and
    ``executor.advance`` (the detached chain's CPU job). Each stage has defaults of its own, and the
    keys given replace only those: ``executor.filter.partition: cpu`` keeps the filter's 60 minutes.
    """

    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    cluster: Literal["local", "slurm", "debug"] = "local"
    max_attempts: PositiveInt = 3
    poll_interval_s: Annotated[float, Gt(0)] = 2.0
    # Polls back off up to this while nothing changes.
    max_poll_interval_s: Annotated[float, Gt(0)] = 30.0
    stages: dict[str, Resources] = field(default_factory=dict)
    # The keys the config gives for each of them (all, for one missing here).
    given: dict[str, list[str]] = field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _resources_by_name(cls, data: Any) -> Any:
        """``executor.generate: {...}`` is written beside the settings; it lands in ``stages``, and the
        keys it gives in ``given``."""
        if isinstance(data, dict):
            stages = dict(data.get("stages") or {})
            stages.update({k: v for k, v in data.items() if k not in (*EXECUTOR_SETTINGS, "stages")})
            given = {name: sorted(value) for name, value in stages.items() if isinstance(value, dict)}
            data = {k: v for k, v in data.items() if k in EXECUTOR_SETTINGS} | {"stages": stages, "given": given}
        return data

    def resources(self, name: str, default: Resources) -> Resources:
        """What a stage or service asks the scheduler for: ``default`` with the keys ``executor.<name>`` gives."""
        if name not in self.stages:
            return default
        keys = self.given.get(name, [f.name for f in dataclasses.fields(Resources)])
        return dataclasses.replace(default, **{key: getattr(self.stages[name], key) for key in keys})

    def as_written(self) -> dict[str, Any]:
        """The section as YAML holds it: the settings, and beside them each stage's keys as given."""
        written: dict[str, Any] = {name: getattr(self, name) for name in EXECUTOR_SETTINGS}
        for name, resources in self.stages.items():
            values = dataclasses.asdict(resources)
            written[name] = {key: values[key] for key in self.given.get(name, list(values))}
        return written


def missing_scheduler(cluster: str) -> list[str]:
    """SLURM's commands that a run on ``cluster`` needs and this machine lacks (none for other clusters)."""
    if cluster != "slurm":
        return []
    return [command for command in ("sbatch", "srun", "sacct") if shutil.which(command) is None]


def require_scheduler(cluster: str) -> None:
    """Refuse, in one line, a SLURM run on a machine where SLURM's commands are missing."""
    missing = missing_scheduler(cluster)
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
    executor.update_parameters(**slurm_parameters(resources, job_name, dependency))
    return executor


class ScriptWriter(submitit.SlurmExecutor):
    """A SLURM executor that only renders scripts, so that it can be made where SLURM's commands are
    missing (a dry run on a laptop); submitit's own refuses to be made without srun."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def slurm_parameters(resources: Resources, job_name: str, dependency: str | None = None) -> dict[str, Any]:
    """submitit's SLURM parameters for a stage's ``resources``."""
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
    return options


def sbatch_script(folder: Path, resources: Resources, job_name: str, num_tasks: int) -> str:
    """The exact script ``submit_array`` hands to sbatch for an array of ``num_tasks`` tasks."""
    executor = ScriptWriter(folder)
    executor.update_parameters(**slurm_parameters(resources, job_name))
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
