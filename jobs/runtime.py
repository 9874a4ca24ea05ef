"""What every job does around its work: report to its ledger record, handle preemption, log progress.

Preemption and time limits: SLURM sends the pre-timeout signal (submitit asks for USR2, because
NCCL may catch USR1) some seconds before it kills a job. The handler here only sets a flag; the
stage stops at its next safe point (after an item is flushed, after a training step is
checkpointed) by calling ``stop_if_preempted()``, and ``reporting`` then requeues the job, which
resumes from what it wrote. Doing the work inside the signal handler would cut a write in half.

SIGTERM (scancel, preemption, a node going down) stops the job at its next safe point too, but
does not requeue it: the scheduler decides what happens next (a cancelled job stays cancelled, a
preempted one is requeued by SLURM itself). submitit ignores SIGTERM, which would let a cancelled
job keep writing until SIGKILL.

A job starts by claiming its ledger record. A job of a submission the ledger no longer expects
(the driver lost track of it and resubmitted the task, or the record is no longer in flight)
steps aside at once, so that nothing runs twice however the driver was interrupted.
"""

from __future__ import annotations

import datetime
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from jobs.specs import JobTarget
from state import InputError, Ledger, PermanentJobError, Status
from state.ledger import now

log = logging.getLogger("selftrain")


def job_identity() -> dict[str, Any]:
    """Job id / restart count from SLURM's or submitit's local environment, when there is one."""
    job_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    if job_id:
        job_id = f"{job_id}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    else:
        job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")
    return {
        "job_id": job_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
    }


# The signal that asked this job to stop (USR2: requeue yourself; TERM: just stop), if any.
_stop_signal: list[signal.Signals] = []


class Preempted(Exception):
    """A stop signal arrived and the stage stopped at a safe point."""

    def __init__(self, signum: signal.Signals):
        super().__init__(f"stopped at a safe point after {signum.name}")
        self.signum = signum
        self.requeue = signum == signal.SIGUSR2


def stop_requested() -> int:
    """The number of the signal that asked this job to stop; 0 if none did."""
    return int(_stop_signal[0]) if _stop_signal else 0


def stop_if_preempted(signum: int = 0) -> None:
    """Called by stages at safe points: leave the rest of the work to a later run of this job.

    ``signum``: a stop signal another rank of a distributed job received.
    """
    signum = signum or stop_requested()
    if signum:
        raise Preempted(signal.Signals(signum))


def _request_stop(signum: int, frame: object) -> None:
    if not _stop_signal:
        _stop_signal.append(signal.Signals(signum))


def _requeue() -> None:
    """Put this job back in the queue with the same id (SLURM_RESTART_COUNT goes up)."""
    job_id = job_identity()["job_id"]
    if os.environ.get("SLURM_JOB_ID"):
        subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True)
    else:
        raise RuntimeError("the pre-timeout signal arrived outside SLURM: nothing to requeue with")


def step_aside_if_superseded(target: JobTarget, record: dict[str, Any]) -> None:
    """Exit, doing nothing, when the ledger no longer expects this job to run its task."""
    if target.submission is None:
        return  # run by hand: run whatever the record says
    if record.get("submission") != target.submission:
        why = f"the task was resubmitted (submission {record.get('submission')})"
    elif record.get("status") not in (str(Status.SUBMITTED), str(Status.RUNNING)):
        # Done; failed: the driver found no job of this submission alive (it was killed before it
        # could record the job ids) and resubmits the task; planned: withdrawn from a chain.
        why = f"the ledger has the task {record.get('status')}"
    else:
        return
    log.info("job %s of submission %s steps aside: %s", job_identity()["job_id"], target.submission, why)
    raise SystemExit(0)


def add_usage(record: dict[str, Any]) -> None:
    """Add this execution's seconds to the record's ``usage``: wall (since its claim, ``started_at``) and
    CPU, of this process and the children it waited for (vLLM servers, filter workers). What
    tools/cost.py counts where there is no SLURM accounting (the local executor)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    started = record.get("started_at")
    wall = (datetime.datetime.fromisoformat(now()) - datetime.datetime.fromisoformat(started)).total_seconds() if started else 0.0
    usage = record.get("usage") or {}
    record["usage"] = {"executions": usage.get("executions", 0) + 1, "wall_s": round(usage.get("wall_s", 0.0) + wall, 1),
                       "cpu_s": round(usage.get("cpu_s", 0.0) + own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime, 1)}


def report_status(ledger: Ledger, target: JobTarget, status: Status, **fields: Any) -> None:
    """How this job ended, unless its task was handed to a newer submission meanwhile (the driver
    took this job for lost): then the record is the new job's, and this one's word comes too late."""
    stamp = {Status.DONE: "ended_at", Status.FAILED: "ended_at"}

    def end(record: dict[str, Any]) -> None:
        if target.submission is not None and record.get("submission") != target.submission:
            log.info("%s was resubmitted (submission %s): this job's end (%s) is not recorded",
                     target.ledger_key, record.get("submission"), status)
            return
        record.update(status=str(status), **fields)
        if status in stamp:
            record[stamp[status]] = now()
        add_usage(record)

    ledger.update(target.ledger_key, mutate=end)


def quiet_libraries() -> None:
    """Keep job logs to what a user reads: no progress bar per weight load or checkpoint save (a
    log file keeps every redraw), and no warnings about library internals the user cannot act on."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by huggingface_hub at import, here and in child processes
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    if "transformers" in sys.modules:  # transformers reads the setting once, when imported
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    # TRL 1.16 and PEFT 0.21 still read the old property name inside their own code.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # The CPU torchvision used for media is installed without its image extension: PIL decodes images.
    warnings.filterwarnings("ignore", message="Failed to load image Python extension", category=UserWarning)


@contextmanager
def reporting(target: JobTarget, primary: bool = True) -> Iterator[dict[str, Any]]:
    """Mark the record running, then done with the metrics the body filled in, failed (``permanent``
    for a PermanentJobError or an InputError: not retried), or requeued.

    In a distributed job only the first rank (``primary``) reports and requeues, for all ranks.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    quiet_libraries()
    # Replace submitit's handlers: its USR2 handler would checkpoint and exit wherever the signal
    # lands, and it ignores TERM.
    signal.signal(signal.SIGUSR2, _request_stop)
    signal.signal(signal.SIGTERM, _request_stop)
    ledger = Ledger(target.run_dir)
    if not primary:
        step_aside_if_superseded(target, ledger.read(target.ledger_key))
        with suppress(Preempted):
            yield {}
        return

    def claim(record: dict[str, Any]) -> None:
        step_aside_if_superseded(target, record)
        record.update(status=str(Status.RUNNING), note=None, started_at=now(), **job_identity())
        # Counts executions, so that a resumed run can prove no finished work was redone.
        record["executions"] = record.get("executions", 0) + 1

    ledger.update(target.ledger_key, mutate=claim)
    metrics: dict[str, Any] = {}
    try:
        yield metrics
    except Preempted as stop:
        if not stop.requeue:
            # In flight until the driver hears the scheduler's word: CANCELLED fails the record,
            # a requeue by SLURM (preemption) runs the job again.
            report_status(ledger, target, Status.SUBMITTED, note=str(stop))
            log.info("%s", stop)
            raise SystemExit(128 + stop.signum) from None  # the exit status of a process the signal killed
        # Still in flight for the driver: the requeued job reports as it runs again.
        report_status(ledger, target, Status.SUBMITTED, note="requeued after the pre-timeout signal")
        _requeue()
        log.info("requeued job %s after the pre-timeout signal", job_identity()["job_id"])
        return
    except BaseException as error:
        # A retry of a permanent failure would fail the same way: the driver does not resubmit it.
        permanent = {"permanent": True} if isinstance(error, (PermanentJobError, InputError)) else {}
        report_status(ledger, target, Status.FAILED, error=f"{type(error).__name__}: {error}", **permanent)
        raise
    report_status(ledger, target, Status.DONE, metrics=metrics, error=None)


# transformers' OSErrors (5.x) for a folder that is no model: a path that does not exist, a file missing
# (config, weights), a config.json that is not JSON. Other OSErrors (EIO, ESTALE, EMFILE) are the
# file system's, and transient.
NOT_A_MODEL = ("does not appear to have a file named", "Error no file named", "is not a valid JSON file",
               "is not a local folder", "Repo id must be in the form")


@contextmanager
def loading(model_path: str) -> Iterator[None]:
    """Around a model's load: a folder that is wrong (missing, files missing, a config that does not
    parse or names an unknown model) fails the job for good, as a retry would read it again; every
    other error stays transient (an NFS hiccup, too many open files, the network)."""
    try:
        yield
    except Exception as error:
        if not (isinstance(error, (FileNotFoundError, ValueError, KeyError))
                or isinstance(error, OSError) and any(words in str(error) for words in NOT_A_MODEL)):
            raise
        first_line = str(error).partition("\n")[0]  # transformers' go on with advice about the Hub
        raise PermanentJobError(f"model {model_path} does not load: {first_line}") from error


def report_progress(target: JobTarget, done: int, total: int, rate: float) -> None:
    """The job's progress in its own record, from which the driver tells a straggler (ETA)."""

    def update(record: dict[str, Any]) -> None:
        if record.get("submission") == target.submission:  # not a record a newer submission owns
            record["progress"] = {"done": done, "total": total, "problems_per_s": round(rate, 4), "at": now()}

    Ledger(target.run_dir).update(target.ledger_key, mutate=update)


class Throughput:
    """Periodic progress lines (problems/s, tokens/s, ETA) and the totals for the ledger.

    With a ``target``, the progress goes to the job's ledger record too (items already written by an
    earlier execution count as done: ``resumed``)."""

    def __init__(self, total: int, every_s: float = 10.0, target: JobTarget | None = None, resumed: int = 0):
        self.total, self.every_s, self.target, self.resumed = total, every_s, target, resumed
        self.done = self.tokens = 0
        self.start = self.last_log = time.monotonic()

    def add(self, problems: int, tokens: int) -> None:
        self.done += problems
        self.tokens += tokens
        now = time.monotonic()
        if now - self.last_log >= self.every_s or self.done == self.total:
            self.last_log = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            log.info(
                "%d/%d problems, %.2f problems/s, %.0f tokens/s, ETA %.0f s",
                self.done, self.total, rate, self.tokens / max(now - self.start, 1e-9), eta,
            )
            if self.target:
                report_progress(self.target, self.resumed + self.done, self.resumed + self.total, rate)

    def totals(self) -> dict[str, float]:
        seconds = max(time.monotonic() - self.start, 1e-9)
        return {
            "problems": self.done,
            "generated_tokens": self.tokens,
            "seconds": round(seconds, 3),
            "problems_per_s": round(self.done / seconds, 3),
            "tokens_per_s": round(self.tokens / seconds, 1),
        }


def pick_device() -> tuple[str, Any]:
    """The device and dtype to run on: bf16 on a GPU that has it, float32 on CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", torch.float32
