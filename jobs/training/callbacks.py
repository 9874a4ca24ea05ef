"""Trainer callbacks of the training jobs: stop at a step on a signal, per-step throughput, data order,
and a watchdog for steps that never end; and which checkpoint a restarted job resumes from.

Imported by the training jobs inside their work, not at module level: transformers takes seconds
to import, and the driver imports the jobs' modules only to name what a job runs.
"""

from __future__ import annotations

import copy
import json
import math
import resource
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from jobs.runtime import log, report_progress, stop_requested
from jobs.specs import JobTarget
from state import atomic_write_bytes


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest ``checkpoint-<step>`` the Trainer finished writing, or None.

    transformers' get_last_checkpoint takes the newest folder, and a job killed while saving
    (SIGKILL, a node lost) leaves one holding only part of its files: resuming from it fails on
    every retry. The Trainer writes trainer_state.json after the weights, optimizer, scheduler and
    RNG states, so a checkpoint whose trainer_state.json parses is complete.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not folder.is_dir():
        return None
    steps = sorted(
        (int(p.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")), p)
        for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-").isdigit()
    )
    for step, path in reversed(steps):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            log.warning("checkpoint %s is incomplete (killed while saving?): not resuming from it", path)
            continue
        return str(path)
    return None


def peak_memory_mib(on_gpu: bool) -> float:
    """The most memory this process held since the last call: GPU memory on a GPU, else resident memory."""
    if on_gpu:
        peak = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        return round(peak, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux; never resets


class CheckpointOnPreemption(TrainerCallback):
    """After a stop signal (pre-timeout USR2 or TERM), save a checkpoint at the end of the current step and stop."""

    stopped_by = 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        signum = stop_requested()
        if torch.distributed.is_initialized():
            # Ranks get the signal at slightly different times; all must stop after the same step.
            flag = torch.tensor([signum], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag.item())
        if signum:
            self.stopped_by = signum
            control.should_save = True
            control.should_training_stop = True
        return control

class StepMetrics(TrainerCallback):
    """Adds tokens/s, samples/s and peak memory since the previous logged step to each one.

    They go into the trainer's log history, which checkpoints carry across a requeue. The progress
    line shows the loss, these, and the logged values named in ``shown`` (e.g. GRPO's reward).
    """

    def __init__(self, effective_batch: int, on_gpu: bool, shown: Sequence[str] = ()):
        self.effective_batch, self.on_gpu, self.shown = effective_batch, on_gpu, shown

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.last = (time.monotonic(), state.global_step, state.num_input_tokens_seen)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if "loss" not in (logs or {}):
            return
        then, step, tokens = self.last
        now = time.monotonic()
        seconds = max(now - then, 1e-9)
        entry = state.log_history[-1]
        entry.update(
            # Counted over all processes; padding left out.
            tokens_per_s=round((state.num_input_tokens_seen - tokens) / seconds, 1),
            samples_per_s=round((state.global_step - step) * self.effective_batch / seconds, 2),
            peak_memory_mib=peak_memory_mib(self.on_gpu),
        )
        self.last = (now, state.global_step, state.num_input_tokens_seen)
        extra = "".join(f", {key} {entry[key]:.4g}" for key in self.shown if isinstance(entry.get(key), (int, float)))
        log.info("step %d: loss %.4f%s, learning rate %.3g, %.0f tokens/s, %.2f samples/s, peak memory %.0f MiB",
                 state.global_step, entry["loss"], extra, entry.get("learning_rate", 0.0), entry["tokens_per_s"],
                 entry["samples_per_s"], entry["peak_memory_mib"])


class LedgerProgress(TrainerCallback):
    """Reports the step, max steps and steps/s to the job's ledger record (``progress``: tools/status.py
    shows step / max steps and an ETA), every ``every_s`` seconds and at the last step, from rank 0."""

    def __init__(self, target: JobTarget, every_s: float = 30.0):
        self.target, self.every_s = target, every_s

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Steps before a resume are not this job's: its rate counts its own.
        self.start, self.first_step, self.last = time.monotonic(), state.global_step, -math.inf

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.monotonic()
        if state.is_world_process_zero and (now - self.last >= self.every_s or state.global_step >= state.max_steps):
            self.last = now
            report_progress(self.target, state.global_step, state.max_steps, (state.global_step - self.first_step) / max(now - self.start, 1e-9))


class Watchdog(TrainerCallback):
    """Calls ``on_stall(seconds, step)`` from a thread of its own when a training step (for GRPO:
    generation, rewards, weight sync and the update) or a checkpoint save has run longer than
    ``timeout_s``. The main thread may be stuck where no signal or exception reaches it (a
    collective, a socket, a reward that never returns), so ``on_stall`` must end the process itself.
    """

    def __init__(self, timeout_s: float, on_stall: Callable[[float, int], None]):
        self.timeout_s, self.on_stall = timeout_s, on_stall
        self.last_progress = time.monotonic()
        self.step = 0
        self.done = threading.Event()

    def _progress(self, state: Any) -> None:
        self.last_progress, self.step = time.monotonic(), state.global_step

    def _watch(self) -> None:
        # Checks often enough that a stall is caught within a tenth of the timeout (and a second).
        while not self.done.wait(min(self.timeout_s / 10, 1.0)):
            idle = time.monotonic() - self.last_progress
            if idle > self.timeout_s:
                self.on_stall(idle, self.step)
                return

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._progress(state)
        threading.Thread(target=self._watch, name="stall-watchdog", daemon=True).start()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._progress(state)

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._progress(state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._progress(state)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._progress(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stop()

    def stop(self) -> None:
        """No more watching: training ended, or raised (then no on_train_end comes)."""
        self.done.set()

class DataOrder(TrainerCallback):
    """Writes ``data_order/rank_<r>.json``: the training-set positions of each micro-batch this
    process trains on, epoch by epoch, as its sampler deals them (every epoch the run enters, in
    full: a max_steps run stops partway through its last).

    Every rank derives one shuffled order from the shared seed and takes its own batches of it,
    so the files of one job cover each epoch without overlap, except that the last batches may
    repeat a few examples from its start so that every rank gets whole batches; a requeued job
    deals the same order again.
    """

    def __init__(self, output: Path):
        self.output = output

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        loader = kwargs["train_dataloader"]
        # A copy, so the trainer's own sampler is left as it was; the dataset is shared, not copied.
        dealer = copy.deepcopy(loader.batch_sampler, {id(loader.dataset): loader.dataset})
        # Several processes: accelerate's BatchSamplerShard wraps the batch sampler.
        sampler = getattr(dealer, "batch_sampler", dealer).sampler
        epochs = []
        for epoch in range(math.ceil(state.num_train_epochs)):
            sampler.set_epoch(epoch)  # as the trainer does before each epoch
            epochs.append([list(batch) for batch in dealer])
        order = {"rank": args.process_index, "world_size": args.world_size, "seed": args.seed,
                 "gradient_accumulation_steps": args.gradient_accumulation_steps, "epochs": epochs}
        # Compact: one number per line would make a long run's file needlessly large.
        atomic_write_bytes(self.output / "data_order" / f"rank_{args.process_index}.json", json.dumps(order).encode())
