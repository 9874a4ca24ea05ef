"""Trainer callbacks every training job uses: stop at a step on a signal, per-step throughput, data order.

Imported by the training jobs inside their work, not at module level: transformers takes seconds
to import, and the driver imports the jobs' modules only to name what a job runs.
"""

from __future__ import annotations

import copy
import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from jobs.runtime import log, stop_requested
from state import atomic_write_bytes


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

    They go into the trainer's log history, which checkpoints carry across a requeue.
    """

    def __init__(self, effective_batch: int, on_gpu: bool):
        self.effective_batch, self.on_gpu = effective_batch, on_gpu

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
        log.info("step %d: loss %.4f, learning rate %.3g, %.0f tokens/s, %.2f samples/s, peak memory %.0f MiB",
                 state.global_step, entry["loss"], entry.get("learning_rate", 0.0), entry["tokens_per_s"],
                 entry["samples_per_s"], entry["peak_memory_mib"])

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
