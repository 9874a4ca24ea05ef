"""Which jobs still live, and how the dead ones ended: one scheduler query per poll for all jobs.

The driver never waits on ``job.result()``: jobs report to the ledger themselves, and the watcher
only answers "is it still alive, and if not, how did it end?" so that a job killed from outside
(SIGKILL, scancel, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL) is noticed instead of waited on forever. It
also answers for jobs an earlier driver process submitted, which lets a rerun reattach to them.

On SLURM that is a single ``sacct`` call per poll for every job of the run (per-job polling is
what overloads controllers' RPC limits on shared clusters), and one ``squeue`` call for those of
them sacct shows cancelled without a reason yet.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from state import Status

if TYPE_CHECKING:  # only a type here, and an import that costs status (which imports this module) a tenth of its time
    import submitit

# Ledger statuses of a record whose job may still run: submitted, running, or a service serving.
IN_FLIGHT = (str(Status.SUBMITTED), str(Status.RUNNING), str(Status.SERVING))
# States in which a SLURM job may still run (or run again).
SLURM_ALIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "COMPLETING", "CONFIGURING",
               "RESIZING", "SUSPENDED", "PREEMPTED", "SIGNALING", "STAGE_OUT", "STOPPED"}
# sacct may not know a job for a moment after submission; after this long, an unknown job is gone.
UNKNOWN_GRACE_S = 120.0
SACCT_FIELDS = ("JobID", "State", "ExitCode", "Reason", "NodeList", "Elapsed")


class SchedulerUnavailable(RuntimeError):
    """The scheduler could not be asked (sacct missing, controller down): state unknown, not dead."""


@dataclass(frozen=True)
class JobInfo:
    state: str
    exit_code: str | None = None
    reason: str | None = None
    node: str | None = None
    elapsed: str | None = None

    def describe(self) -> str:
        return self.state + (f", exit code {self.exit_code}" if self.exit_code and self.exit_code != "0:0" else "")


UNKNOWN = JobInfo("UNKNOWN")
# A local job's states: one instance each, a run's jobs share them (status asks about tens of thousands).
RUNNING, FINISHED = JobInfo("RUNNING"), JobInfo("FINISHED")


def expand_job_ids(job_id: str) -> list[str]:
    """``"7_[0-2,5%2]"`` (a pending array as sacct prints it) -> ``["7_0", "7_1", "7_2", "7_5"]``."""
    match = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_id)
    if not match:
        return [job_id]
    base, spec = match.group(1), match.group(2).split("%")[0]
    ids = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        ids += [f"{base}_{i}" for i in range(int(first), int(last or first) + 1)]
    return ids


def parse_sacct(text: str) -> dict[str, JobInfo]:
    infos = {}
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) < len(SACCT_FIELDS):
            continue
        job_id, state, exit_code, reason, node, elapsed = fields[: len(SACCT_FIELDS)]
        # "CANCELLED by 0" -> "CANCELLED"
        info = JobInfo(state.split()[0] if state else "UNKNOWN", exit_code or None, reason or None, node or None, elapsed or None)
        for one in expand_job_ids(job_id):
            infos[one] = info
    return infos


def sacct_text(job_ids: Iterable[str], fields: Sequence[str], *options: str) -> str:
    """``sacct``'s rows (one per allocation, ``|``-separated ``fields``) for these jobs, array tasks
    included, in one call."""
    # Asking for whole arrays keeps the command short for thousands of tasks.
    arrays = sorted({job_id.split("_")[0] for job_id in job_ids})
    if not arrays:
        return ""
    command = ["sacct", "-X", "--parsable2", "--noheader", *options, "-j", ",".join(arrays), f"--format={','.join(fields)}"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SchedulerUnavailable(f"sacct: {error}") from None
    if result.returncode != 0:
        lines = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()
        raise SchedulerUnavailable(lines[-1])
    return result.stdout


def sacct(job_ids: Iterable[str]) -> dict[str, JobInfo]:
    """SLURM's accounting for these jobs (array tasks included), in one call."""
    infos = parse_sacct(sacct_text(job_ids, SACCT_FIELDS))
    # The accounting database learns why a job was cancelled a moment after it learns that it was
    # (seen here: CANCELLED with reason None for ~1 s, then Dependency): a job cancelled because a
    # job it depended on failed would then look cancelled by hand. slurmctld knows at once.
    unexplained = [job_id for job_id, info in infos.items() if info.state == "CANCELLED" and info.reason in (None, "None")]
    for job_id, reason in controller_reasons(unexplained).items():
        infos[job_id] = replace(infos[job_id], reason=reason)
    return infos


def controller_reasons(job_ids: list[str]) -> dict[str, str]:
    """slurmctld's reason for each of these jobs it still holds (MinJobAge after they end), in one call."""
    if not job_ids:
        return {}
    command = ["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%r"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}  # sacct's word stands
    asked = set(job_ids)
    rows = (line.split("|", 1) for line in result.stdout.splitlines() if "|" in line)
    return {job_id: reason for job_id, reason in rows if job_id in asked and reason != "None"}


def process_identity(pid: int) -> str | None:
    """``<boot id>:<start time>`` of process ``pid`` (Linux), which a pid used again or a reboot does not
    repeat; None when there is no such process, it is a zombie, or the machine has no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command's name, which may hold spaces
    return None if fields[0] == "Z" else f"{boot}:{fields[19]}"


def _local_info(pid: int) -> JobInfo:
    """A local job's controller (pid = job id) still runs: alive, not a zombie, and submitit's."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return FINISHED
    alive = b"submitit" in cmdline and process_identity(pid) is not None
    return RUNNING if alive else FINISHED


class JobWatcher:
    def __init__(self, cluster: str):
        self.cluster = cluster
        self.jobs: dict[str, submitit.Job] = {}
        self._first_unknown: dict[str, float] = {}

    def track(self, jobs: Sequence[submitit.Job]) -> None:
        for job in jobs:
            self.jobs[job.job_id] = job

    def poll(self, job_ids: Iterable[str]) -> dict[str, JobInfo]:
        """The state of each job, with one scheduler query for all of them."""
        job_ids = [j for j in job_ids if j]
        if self.cluster == "debug":
            return dict.fromkeys(job_ids, FINISHED)
        if self.cluster == "local":
            # One listing of the processes: most jobs of a big run ended long ago (status.py asks about all).
            pids = set(os.listdir("/proc")) if os.path.isdir("/proc") else set()
            return {j: JobInfo(self.jobs[j].state) if j in self.jobs else _local_info(int(j)) if j in pids else FINISHED
                    for j in job_ids}
        infos = sacct(job_ids)
        # Right after an array ends, sacct may show one bare row for the whole array: then every
        # task has ended (whether it succeeded is the ledger's word, not sacct's).
        return {j: infos.get(j) or infos.get(j.split("_")[0], UNKNOWN) for j in job_ids}

    def cancel(self, job_id: str) -> None:
        """Stop a job (SIGTERM to its tasks first, so they can stop cleanly)."""
        if self.cluster == "slurm":
            subprocess.run(["scancel", job_id], capture_output=True, check=False)
        elif self.cluster == "local" and _local_info(int(job_id)).state == "RUNNING":
            # A local job's id is its submitit controller's pid, which passes SIGTERM on to the tasks.
            os.kill(int(job_id), signal.SIGTERM)

    def alive(self, job_id: str, info: JobInfo) -> bool:
        if self.cluster != "slurm":
            return info.state == "RUNNING"
        if info.state == "UNKNOWN":
            # Freshly submitted (or an array sacct still reports as one row): alive for a grace period.
            first = self._first_unknown.setdefault(job_id, time.monotonic())
            return time.monotonic() - first < UNKNOWN_GRACE_S
        self._first_unknown.pop(job_id, None)
        return info.state in SLURM_ALIVE


def job_rows(summary: dict, cluster: str) -> list[dict]:
    """Every job of the run's records with the scheduler's live word beside the ledger's.

    One scheduler query for all of them; used by tools/status.py.
    """
    jobs = []  # (iteration, task, its record) of each record that has a job
    for iteration in summary["iterations"]:
        for stage, info in iteration["stages"].items():
            if info.get("shards"):
                jobs += [(iteration["iteration"], f"{stage} {s['name']}", s) for s in info["shards"] if s["job_ids"]]
            elif info["job_ids"]:
                jobs.append((iteration["iteration"], stage, info))
    jobs += [(None, f"service {name}", service) for name, service in summary["services"].items() if service["job_ids"]]
    if summary["advance"]["job_ids"]:
        jobs.append((None, "advance", summary["advance"]))
    try:
        infos = JobWatcher(cluster).poll(record["job_ids"][-1] for _, _, record in jobs)
    except SchedulerUnavailable as error:
        infos = dict.fromkeys((record["job_ids"][-1] for _, _, record in jobs), JobInfo("UNAVAILABLE", reason=str(error)))
    rows = []
    for iteration, task, record in jobs:
        job_id = record["job_ids"][-1]
        live = infos.get(job_id, UNKNOWN)
        rows.append({"iteration": iteration, "task": task, "status": record["status"], "attempts": record["attempts"], "job_id": job_id,
                     "scheduler_state": live.state, "reason": live.reason, "node": live.node, "elapsed": live.elapsed,
                     "exit_code": live.exit_code})
    return rows
