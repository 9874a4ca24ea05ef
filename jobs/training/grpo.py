"""Training job: TRL's GRPOTrainer on the problems, rewarded by the reward registry (``grpo.rewards``).

Each problem is a conversational prompt (its question, with the run's system prompt); every other
field of it (answer, id, ...) is a column that the rewards get, one value per completion. The
rewards are a RewardSet: a reward that fails gives None for its samples (TRL leaves it out of the
sample's sum, and a sample no reward could score out of its group's baseline), counted per reward
with its first error. Writes, as the SFT job does, ``<output>/model`` (merged for LoRA),
``<output>/adapter`` for LoRA and ``<output>/model_card.json`` with the step log; checkpoints go to
``<output>/checkpoints`` and a restarted job continues from the last one (jobs.training.grpo_trainer
says what it guards in TRL's resume). ``<output>/rollouts/rank_<r>.jsonl`` lists the problems each
generation dealt.

Rollouts: TRL's transformers generation (``grpo.vllm_mode`` unset, the CPU way), or vLLM on GPUs:
``colocate`` (in the training processes) or ``server`` (``trl vllm-serve``, jobs.training.rollout_server);
or, with ``grpo.rollouts: arrays``, the groups of this round that its score job kept (``scored_path``:
the samples of the generation shards with their rewards and advantages, jobs.scoring.rounds), trained
on once with the importance-sampling correction (jobs.training.grpo_trainer.StoredRolloutTrainer).

A step (generation, rewards, weight sync, update) that runs longer than ``grpo.stall_timeout_s``
fails the job: a watchdog thread records ``error: stalled: ...`` in the ledger and ends the process,
however the main thread is stuck; the driver's retry resumes from the last checkpoint.

Distributed as the SFT job (jobs.training.sft): one process per task, rank 0 reports and writes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from jobs.problems.data import MEDIA_FIELDS, read_jsonl
from jobs.problems.prompts import has_media, messages_for, template_messages
from jobs.runtime import (
    loading,
    log,
    pick_device,
    report_status,
    reporting,
    stop_if_preempted,
)
from jobs.scoring.pass_rates import select_problems
from jobs.scoring.rewards import RewardContext, RewardSet
from jobs.specs import GrpoSpec, JobTarget
from jobs.training.config import GrpoConfig
from jobs.training.sft import (
    distributed_rank,
    lora_config,
    quantization,
    save_trained,
    trainer_options,
    write_card,
)
from state import Ledger, PermanentJobError, Status

# What the ledger keeps of each logged step (TRL's names), besides each reward's mean, std and failures.
STEP_LOG_KEYS = (
    "step", "policy_step", "loss", "learning_rate", "reward", "reward_std", "frac_reward_zero_std", "kl", "entropy",
    "completions/mean_length", "completions/clipped_ratio", "tokens_per_s", "samples_per_s", "peak_memory_mib",
    "groups/none_pass", "groups/some_pass", "groups/all_pass",  # the rollouts' pass-rate distribution (grpo_trainer)
    # Stored rollouts: how far the sampler's log-probabilities are from the trainer's, and the importance weights.
    "sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
    "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean", "sampling/importance_sampling_ratio/max",
    "rollouts/staleness",  # rounds the samples' policy is older than the last (grpo.max_staleness)
    "media/encoder_inputs",  # values the audio / vision encoders got in a step's forward (media problems)
)
# The exit status of a job the watchdog ended.
STALLED_EXIT = 3


def grpo_dataset(problems_path: str, system_prompt: str | None, media_dir: str | None = None,
                 multimodal: bool = False) -> list[dict[str, Any]]:
    """One row per problem: ``prompt``, its chat messages, and the problem's fields as columns. For a
    ``multimodal`` model (one with a processor), the chat template's parts and the media files of
    each (``media``, jobs.training.media), as SFT has them."""
    # Imported here for import cost: TRL and the trainer stack load only in the job, not in the driver that plans it.
    from jobs.training.media import MEDIA

    rows = []
    for problem in read_jsonl(problems_path):
        if "prompt" in problem:
            raise PermanentJobError(f"{problems_path}: problem {problem['id']!r} has a field 'prompt', which GRPO uses for the"
                                    " chat messages: rename it")
        if has_media(problem) and not (multimodal and media_dir):
            why = "no media folder (generate.media_dir)" if multimodal else "a text-only model (no processor)"
            raise PermanentJobError(f"{problems_path}: problem {problem['id']!r} has media, and training has {why}")
        if multimodal:
            # The media fields become the files of ``media`` (a data set column has one type: a problem's
            # image may be one file, another's a list).
            prompt, media = template_messages(problem, system_prompt, media_dir)
            columns = {key: value for key, value in problem.items() if key not in MEDIA_FIELDS}
            rows.append({**columns, "prompt": prompt, MEDIA: media})
        else:
            rows.append({**problem, "prompt": messages_for(problem, system_prompt)})
    if not rows:
        raise PermanentJobError(f"{problems_path}: no problems to train on")
    return rows


def rollout_options(grpo: GrpoConfig, on_gpu: bool, server: tuple[str, int] | None) -> dict[str, Any]:
    """GRPOConfig's generation options: transformers, or vLLM colocated or as a server at ``server``
    (given to rank 0 alone: only TRL's main process talks to the server)."""
    if grpo.vllm_mode is None:
        return {"use_vllm": False}
    if not on_gpu:
        # pipeline.rules refuses vllm_mode without executor.train.gpus_per_task: this job asked for GPUs and
        # got a node whose CUDA did not come up, a fault of the node that a retry may not meet (transient).
        raise RuntimeError(f"grpo.vllm_mode: {grpo.vllm_mode} needs GPUs, and torch sees none on this node (its GPUs"
                           " did not come up, or torch was built without CUDA)")
    # ZeRO-3 shards the weights: vLLM needs them gathered to generate (and to receive them).
    options: dict[str, Any] = {"use_vllm": True, "vllm_mode": grpo.vllm_mode, "ds3_gather_for_generation": True}
    if server:
        # Imported here for import cost: TRL and the trainer stack load only in the job, not in the driver that plans it.
        from jobs.training.rollout_server import weight_sync_port

        host, port = server
        options.update(vllm_server_host=host, vllm_server_port=port, vllm_group_port=weight_sync_port(),
                       vllm_server_timeout=grpo.stall_timeout_s)
    return options


def rollout_source(grpo: GrpoConfig) -> str:
    """Who sampled the rollouts: the generation arrays, or the trainer with vLLM or transformers."""
    return "arrays" if grpo.rollouts == "arrays" else f"vllm_{grpo.vllm_mode}" if grpo.vllm_mode else "transformers"


def stall_handler(target: JobTarget, primary: bool, timeout_s: float) -> Callable[[float, int], None]:
    """What the watchdog does on a stall: the ledger says why (rank 0), then the process ends at once."""

    def on_stall(idle: float, step: int) -> None:
        message = (f"stalled: no training progress for {idle:.0f} s (grpo.stall_timeout_s: {timeout_s:g}) after step"
                   f" {step}; the retry resumes from the last checkpoint")
        log.error("%s", message)
        try:
            if primary:
                report_status(Ledger(target.run_dir), target, Status.FAILED, error=message)
        finally:
            sys.stderr.flush()
            # Not SystemExit: the main thread is the one stuck, and it would never see an exception.
            os._exit(STALLED_EXIT)

    return on_stall


def train_grpo(spec: GrpoSpec, metrics: dict[str, Any], primary: bool = True, multi_node: bool = False) -> None:
    """Trains; ``primary``: rank 0, which reports and writes; ``multi_node``: a server-mode job whose
    last node serves the rollouts (jobs.training.rollout_server)."""
    with ExitStack() as stack:
        server = None
        if spec.grpo.vllm_mode == "server" and primary:
            # Imported here for import cost: TRL and the trainer stack load only in the job, not in the driver that plans it.
            from jobs.training.rollout_server import local_server, remote_server

            local_tasks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            server = remote_server(spec) if multi_node else stack.enter_context(local_server(spec, local_tasks))
        _train(spec, metrics, primary, server)


def stored_rollouts(path: str, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """The rows of the groups the round's score job kept (``path``, jobs.scoring.rounds), in its
    order, and each one's samples: completion token ids, the sampler's log-probabilities, rewards
    and advantage."""
    groups = {record["id"]: record["samples"] for record in read_jsonl(path)}
    by_id = {row["id"]: row for row in rows}
    return [by_id[pid] for pid in groups], groups


def round_steps(samples: int, args: Any) -> int:
    """The optimizer steps that train once over ``samples`` stored samples (TRL's GRPOConfig ``args``):
    every whole generation batch is dealt steps_per_generation x num_iterations micro-batches, and
    gradient_accumulation_steps micro-batches make an optimizer step."""
    micro_batches = samples // args.generation_batch_size * args.steps_per_generation * args.num_iterations
    return -(-micro_batches // args.gradient_accumulation_steps)


def _train(spec: GrpoSpec, metrics: dict[str, Any], primary: bool, server: tuple[str, int] | None) -> None:
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForMultimodalLM,
        AutoProcessor,
        ProcessorMixin,
    )
    from trl import GRPOConfig

    # Imported here for import cost: TRL and the trainer stack load only in the job, not in the driver that plans it.
    from jobs.training.callbacks import (
        CheckpointOnPreemption,
        LedgerProgress,
        StepMetrics,
        Watchdog,
        last_complete_checkpoint,
    )

    # (as above)
    from jobs.training.grpo_trainer import (
        PolicyTrainer,
        StoredRolloutTrainer,
        TrlReward,
    )

    # (as above)
    from jobs.training.media import MEDIA

    config, grpo = spec.train, spec.grpo
    output = Path(spec.output_dir)
    if "tensorboard" in config.report_to:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(output / "tensorboard"))
    # A text-only model's folder gives its tokenizer here; a multimodal one its processor.
    with loading(spec.init_model):
        processing = AutoProcessor.from_pretrained(spec.init_model)
    multimodal = isinstance(processing, ProcessorMixin)
    rows = grpo_dataset(spec.problems_path, spec.system_prompt, spec.media_dir, multimodal)
    if spec.pass_rates_path and grpo.pass_rate_band:
        rows, selection = select_problems(rows, Path(spec.pass_rates_path), grpo.pass_rate_band)
        metrics["selection"] = selection
        log.info("pass-rate band %s: %d of %d problems selected (%d below, %d above, %d without a pass rate)",
                 grpo.pass_rate_band, selection["selected"], selection["problems"], selection["below_band"],
                 selection["above_band"], selection["no_pass_rate"])
        if not rows:
            raise PermanentJobError(f"grpo.pass_rate_band: no problem's pass rate lies in {list(grpo.pass_rate_band)} ({selection});"
                                    " widen the band")
    rollouts = None
    if spec.scored_path is not None:
        rows, rollouts = stored_rollouts(spec.scored_path, rows)
    elif any(row.get(MEDIA) for row in rows):
        # pipeline.rules refuses it first: TRL's own loop samples text, and its loss forwards images alone.
        raise PermanentJobError("grpo.rollouts: trainer trains on text only; problems with media train with"
                                " grpo.rollouts: arrays")
    context = RewardContext(spec.verifier, spec.answer_pattern, spec.services)
    reward_set = RewardSet(grpo.rewards, context)
    device, dtype = pick_device()
    on_gpu = device == "cuda"
    model_class = AutoModelForMultimodalLM if multimodal else AutoModelForCausalLM
    with loading(spec.init_model):
        model = model_class.from_pretrained(spec.init_model, dtype=dtype, quantization_config=quantization(config, on_gpu, dtype))
    target_modules = config.target_modules
    if multimodal:
        # Imported here for import cost: TRL and the trainer stack load only in the job, not in the driver that plans it.
        from jobs.training import media

        target_modules = media.prepare_model(model, config)
    peft_config = lora_config(config, target_modules)
    checkpoints = output / "checkpoints"
    args = GRPOConfig(
        output_dir=str(checkpoints),
        learning_rate=spec.learning_rate,
        max_steps=grpo.max_steps,
        per_device_train_batch_size=grpo.batch_size,
        gradient_accumulation_steps=grpo.gradient_accumulation_steps,
        steps_per_generation=grpo.steps_per_generation,
        num_generations=grpo.num_generations,
        num_iterations=grpo.passes_per_generation,
        beta=grpo.beta,
        temperature=grpo.temperature,
        loss_type=grpo.loss_type,
        scale_rewards=grpo.scale_rewards,
        epsilon=grpo.epsilon,
        max_completion_length=grpo.max_completion_length,
        reward_weights=reward_set.weights,
        logging_steps=grpo.logging_steps,
        save_steps=grpo.save_steps,
        # A multimodal model's encoders get nothing from a batch without their media (as in SFT).
        ddp_find_unused_parameters=multimodal,
        seed=spec.seed,
        **rollout_options(grpo, on_gpu, server),
        **trainer_options(config, on_gpu),
    )
    world_size = args.world_size
    completions_per_step = grpo.batch_size * grpo.gradient_accumulation_steps * world_size
    extra: dict[str, Any] = {}
    if rollouts is not None:
        steps = round_steps(len(rows) * grpo.num_generations, args)
        if not steps:
            raise PermanentJobError(f"grpo.batch_size: the round kept {len(rows)} problems x {grpo.num_generations} samples, fewer"
                                    f" than one generation batch ({args.generation_batch_size}); raise grpo.oversample or"
                                    " grpo.problems_per_round for more groups with a signal, or lower grpo.batch_size")
        args.max_steps = min(grpo.max_steps, steps)
        extra["rollouts"] = rollouts
    on_preemption = CheckpointOnPreemption()
    watchdog = Watchdog(grpo.stall_timeout_s, stall_handler(spec.target, primary, grpo.stall_timeout_s))
    trainer = (StoredRolloutTrainer if rollouts is not None else PolicyTrainer)(
        model=model, reward_funcs=[TrlReward(reward_set, named) for named in reward_set.rewards], args=args,
        train_dataset=Dataset.from_list(rows), processing_class=processing, peft_config=peft_config,
        callbacks=[on_preemption, StepMetrics(completions_per_step, on_gpu, shown=("reward",)), watchdog, LedgerProgress(spec.target)],
        reward_set=reward_set, context=context, rollouts_dir=output / "rollouts", **extra,
    )
    log.info("GRPO: %d problems, %d completions per step (%d prompts x %d generations per generation batch of %d steps),"
             " %d processes, rollouts by %s", len(rows), completions_per_step, args.generation_batch_size // grpo.num_generations,
             grpo.num_generations, args.steps_per_generation, world_size, rollout_source(grpo))
    resume = last_complete_checkpoint(checkpoints)
    if resume:
        log.info("resuming training from %s", resume)
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        watchdog.stop()
    stop_if_preempted(on_preemption.stopped_by)  # a checkpoint is saved: the requeued job resumes from it
    trainer.sync_failures()
    if not save_trained(trainer, config, spec.init_model, model_class, dtype, processing, output):
        return
    keys = STEP_LOG_KEYS + tuple(f"rewards/{name}/{what}" for name in reward_set.names for what in ("mean", "std", "failed"))
    # Includes the steps before a resume: the trainer state comes back with the checkpoint.
    step_log = [{key: entry.get(key) for key in keys} for entry in trainer.state.log_history if "loss" in entry]
    rewards = [entry["reward"] for entry in step_log if entry["reward"] is not None]
    metrics.update(
        train_problems=len(rows),
        steps=trainer.state.global_step,
        final_reward=rewards[-1] if rewards else None,
        reward_failures=trainer.failure_report(),
        train_loss=result.training_loss,
        learning_rate=spec.learning_rate,
        seconds=round(result.metrics.get("train_runtime", 0.0), 2),
        resumed_from=resume,
        world_size=world_size,
        completions_per_step=completions_per_step,
        num_generations=grpo.num_generations,
        rollouts=rollout_source(grpo),
        strategy=config.strategy,
        step_log=step_log,
    )
    card = {"base_model": spec.base_model, "iteration": spec.iteration, "init_model": spec.init_model, "method": "grpo",
            "fine_tuning": config.method, "rewards": [{"name": r.name, "weight": r.weight} for r in reward_set.rewards]}
    write_card(output, {**card, **metrics}, config)


def run(spec: GrpoSpec) -> dict[str, Any]:
    place = None
    if spec.grpo.vllm_mode == "server":
        # Imported here for import cost: TRL and the trainer stack load only in the job, not in the driver that plans it.
        from jobs.training.rollout_server import job_layout, serve_for_job

        place = job_layout()
        if place.serves:
            with reporting(spec.target, primary=False):
                serve_for_job(spec, first_task_of_node=int(os.environ.get("SLURM_LOCALID", "0")) == 0)
            return {}
    rank = distributed_rank()
    if place and place.multi_node:
        # The last node serves: the training world is the tasks of the other nodes, the first ranks.
        if rank >= place.training_tasks:
            # Permanent for this layout (srun's SLURM_DISTRIBUTION or the cluster's default deals tasks to nodes
            # cyclically): every retry gets it. A rank that reports nothing raises it, before reporting(): the
            # ledger records no permanence, and the driver sees only that the job failed.
            raise PermanentJobError(f"grpo.vllm_mode: server needs the job's tasks dealt to nodes in blocks; rank {rank} trains"
                                    f" but is not among the first {place.training_tasks}")
        os.environ["WORLD_SIZE"] = str(place.training_tasks)
    with reporting(spec.target, primary=rank == 0) as metrics:
        train_grpo(spec, metrics, rank == 0, multi_node=bool(place and place.multi_node))
    return metrics
