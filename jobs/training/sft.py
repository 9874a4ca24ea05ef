"""Training job: TRL SFT on the filtered set, LoRA (PEFT) or full fine-tuning.

A model with a processor (audio, images, video) trains on its problems' media, read from the
media folder and placed as generation places them (jobs.training.media); a text-only model on
text, through TRL's own tokenization as before.

Writes ``<output>/model`` (the merged model the next iteration generates with), ``<output>/adapter``
for LoRA, ``<output>/model_card.json``, and per rank the order of the examples it trains on
(``<output>/data_order/rank_<r>.json``). Checkpoints go to ``<output>/checkpoints``; a restarted
job continues from the last one. GPU-only settings are skipped with one log line on CPU. When
filtered.json carries a ``weight`` per sample (filter.category_weights), each sample's loss is
scaled by it (jobs.training.weighted; replay examples weigh 1.0).

Distributed: a job of several tasks (``executor.train.tasks_per_node``, ``nodes``) runs one process
per task; rank, world size and the rendezvous (first node, a port derived from the job id so that
two jobs on one node do not collide, below the ports Linux gives outgoing connections) come from
the SLURM environment through submitit, or from torchrun when that launched the processes. On CPU
the ranks talk over gloo. Rank 0 alone reports to the ledger and writes the model.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
from pathlib import Path
from typing import Any

from jobs.problems.data import load_problems
from jobs.problems.prompts import has_media, messages_for, template_messages
from jobs.runtime import loading, log, pick_device, reporting, stop_if_preempted
from jobs.specs import TrainSpec
from jobs.training.config import TrainConfig
from state import PermanentJobError, atomic_write_json

# What the ledger keeps of each logged step.
STEP_LOG_KEYS = ("step", "loss", "learning_rate", "tokens_per_s", "samples_per_s", "peak_memory_mib")


def sft_examples(data_path: str | None, replay_path: str | None, system_prompt: str | None,
                 media_dir: str | None = None, multimodal: bool = False) -> list[dict[str, Any]]:
    """Prompt / completion conversations from filtered.json and the replay problems; with a ``weight``
    each when filtered.json has them (filter.category_weights; replay examples weigh 1.0). For a
    ``multimodal`` model, the chat template's parts and the media files of each (jobs.training.media)."""
    # Imported here for import cost: TRL and the trainer stack load only in the job, not in the driver that plans it.
    from jobs.training.media import MEDIA

    samples = json.loads(Path(data_path).read_text(encoding="utf-8")) if data_path else []
    weighted = any("weight" in s for s in samples)
    triples = [(s, s["response"], s.get("weight", 1.0)) for s in samples]
    if replay_path:
        triples += [(p, p["answer"], 1.0) for p in load_problems(replay_path)]
    examples = []
    for problem, response, weight in triples:
        if has_media(problem) and not (multimodal and media_dir):
            why = "no media folder (generate.media_dir)" if multimodal else "a text-only model (no processor)"
            raise PermanentJobError(f"problem {problem.get('original_id', problem['id'])!r} has media, and training has {why}")
        if multimodal:
            prompt, media = template_messages(problem, system_prompt, media_dir)
            example = {"prompt": prompt, "completion": [{"role": "assistant", "content": [{"type": "text", "text": response}]}],
                       MEDIA: media}
        else:
            example = {"prompt": messages_for(problem, system_prompt), "completion": [{"role": "assistant", "content": response}]}
        if weighted:
            example["weight"] = weight
        examples.append(example)
    return examples


def trainer_options(config: TrainConfig, on_gpu: bool) -> dict[str, Any]:
    """The Trainer options that SFT and GRPO take alike from ``train``, for this machine: GPU-only
    choices fall back on CPU, with one line each."""
    deepspeed = config.deepspeed_json()
    options: dict[str, Any] = {
        "optim": config.optim, "bf16": config.bf16, "use_cpu": not on_gpu, "deepspeed": str(deepspeed) if deepspeed else None,
        "warmup_steps": config.warmup_ratio,  # transformers 5: a float below 1 is a ratio
        "weight_decay": config.weight_decay,
        "lr_scheduler_type": config.lr_scheduler_type,
        # transformers 5 renamed these; TRL's own default still sets the old name, which the new one overrides.
        "activation_checkpointing": config.gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False},
        "save_total_limit": config.save_total_limit,
        "report_to": config.report_to or "none",
        "disable_tqdm": True,
    }
    if on_gpu:
        return options
    if deepspeed:
        raise ValueError(f"train.strategy: {config.strategy} (DeepSpeed) needs a GPU, and this node has none")
    if "8bit" in config.optim or config.optim.startswith("paged"):
        log.info("no GPU: optimizer %s needs bitsandbytes on a GPU, using adamw_torch", config.optim)
        options["optim"] = "adamw_torch"
    if config.bf16:
        log.info("no GPU: training in float32 instead of bf16")
        options["bf16"] = False
    if config.load_in_4bit:
        log.info("no GPU: loading the model unquantized (4-bit loading needs a GPU)")
    return options


def train_model(spec: TrainSpec, metrics: dict[str, Any]) -> None:
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForMultimodalLM,
        AutoProcessor,
        ProcessorMixin,
    )
    from trl import SFTConfig, SFTTrainer

    # Imported here for import cost: TRL and the trainer stack load only in the job, not in the driver that plans it.
    from jobs.training.callbacks import (
        CheckpointOnPreemption,
        DataOrder,
        LedgerProgress,
        StepMetrics,
        last_complete_checkpoint,
    )

    # (as above)
    from jobs.training.weighted import WEIGHT, WeightedSFTTrainer

    config = spec.train
    output = Path(spec.output_dir)
    if "tensorboard" in config.report_to:
        # Beside the model: the trainer's default is under the checkpoints, which are deleted at the end.
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(output / "tensorboard"))
    # A text-only model's folder gives its tokenizer here; a multimodal one its processor (TRL's test too).
    with loading(spec.init_model):
        processing = AutoProcessor.from_pretrained(spec.init_model)
    multimodal = isinstance(processing, ProcessorMixin)
    examples = sft_examples(spec.data_path, config.replay_data, spec.system_prompt, spec.media_dir, multimodal)
    if not examples:
        raise PermanentJobError(
            "nothing to train on: no problem had a correct candidate and there is no replay_data"
            " (raise generate.num_samples or generate.temperature, or warm-start the model first)"
        )
    device, dtype = pick_device()
    on_gpu = device == "cuda"
    model_class = AutoModelForMultimodalLM if multimodal else AutoModelForCausalLM
    with loading(spec.init_model):
        model = model_class.from_pretrained(spec.init_model, dtype=dtype, quantization_config=quantization(config, on_gpu, dtype))
    collator, target_modules = None, config.target_modules
    if multimodal:
        # Imported here for import cost: TRL and the trainer stack load only in the job, not in the driver that plans it.
        from jobs.training import media

        collator, examples = media.collator_for(processing, examples, config.max_length)
        log.info("multimodal SFT with %s", type(collator).__name__)
        target_modules = media.prepare_model(model, config)
    peft_config = lora_config(config, target_modules)
    checkpoints = output / "checkpoints"
    args = SFTConfig(
        output_dir=str(checkpoints),
        learning_rate=spec.learning_rate,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_length=config.max_length,
        completion_only_loss=True,
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        include_num_input_tokens_seen="non_padding",
        # LoRA and gradient checkpointing leave no parameter unused; looking for some costs a graph walk per
        # step. A multimodal model's encoders get nothing from a batch without their media.
        ddp_find_unused_parameters=multimodal,
        # Media examples reach the collator as they are (their files are read there), not tokenized ahead.
        remove_unused_columns=not multimodal,
        dataset_kwargs={"skip_prepare_dataset": True} if multimodal else None,
        seed=spec.seed,
        **trainer_options(config, on_gpu),
    )
    world_size = args.world_size
    if world_size > 1:
        log.info("rank %d of %d on %s; rendezvous %s", args.process_index, world_size, socket.gethostname(), rendezvous())
    effective_batch = config.batch_size * config.gradient_accumulation_steps * world_size
    on_preemption = CheckpointOnPreemption()
    weighted = WEIGHT in examples[0]
    trainer = (WeightedSFTTrainer if weighted else SFTTrainer)(
        model=model, args=args, train_dataset=Dataset.from_list(examples), processing_class=processing,
        data_collator=collator, peft_config=peft_config,
        callbacks=[on_preemption, StepMetrics(effective_batch, on_gpu), DataOrder(output), LedgerProgress(spec.target)],
    )
    log.info("effective batch size %d = %d per process x %d accumulation steps x %d processes",
             effective_batch, config.batch_size, config.gradient_accumulation_steps, world_size)
    resume = last_complete_checkpoint(checkpoints)
    if resume:
        log.info("resuming training from %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)
    stop_if_preempted(on_preemption.stopped_by)  # a checkpoint is saved: the requeued job resumes from it
    if not save_trained(trainer, config, spec.init_model, model_class, dtype, processing, output):
        return
    # Includes the steps before a resume: the trainer state comes back with the checkpoint.
    step_log = [{key: entry.get(key) for key in STEP_LOG_KEYS} for entry in trainer.state.log_history if "loss" in entry]
    losses = [entry["loss"] for entry in step_log]
    metrics.update(
        train_samples=len(examples),
        steps=trainer.state.global_step,
        final_loss=losses[-1] if losses else result.training_loss,
        train_loss=result.training_loss,
        learning_rate=spec.learning_rate,
        seconds=round(result.metrics.get("train_runtime", 0.0), 2),
        samples_per_s=result.metrics.get("train_samples_per_second"),
        resumed_from=resume,
        world_size=world_size,
        effective_batch_size=effective_batch,
        strategy=config.strategy,
        loss_weighted=weighted,
        step_log=step_log,
    )
    card = {"base_model": spec.base_model, "iteration": spec.iteration, "init_model": spec.init_model, "method": config.method}
    write_card(output, {**card, **metrics}, config)


def quantization(config: TrainConfig, on_gpu: bool, dtype: Any) -> Any:
    """QLoRA's 4-bit NF4 loading (double quantization), on a GPU only; None otherwise."""
    if not (on_gpu and config.load_in_4bit and config.method == "lora"):
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def lora_config(config: TrainConfig, target_modules: list[str]) -> Any:
    """PEFT's LoRA settings from ``train`` (None for full fine-tuning)."""
    if config.method != "lora":
        return None
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=target_modules, task_type="CAUSAL_LM")


def save_trained(trainer: Any, config: TrainConfig, init_model: str, model_class: Any, dtype: Any, processing: Any,
                 output: Path) -> bool:
    """Writes ``<output>/adapter`` (LoRA) and ``<output>/model`` (merged for LoRA with save_merged)
    with its tokenizer or processor. Every process takes part: under ZeRO-3 each holds a slice of
    the weights, which the trainer gathers before rank 0 writes them. True on rank 0, which reports."""
    from peft import PeftModel

    model_dir, adapter_dir = output / "model", output / "adapter"
    trainer.save_model(str(adapter_dir if config.method == "lora" else model_dir))
    if not trainer.is_world_process_zero():
        return False
    if config.method == "lora" and config.save_merged:
        # Merge into an unquantized copy of the starting model: a 4-bit base cannot be merged.
        base = model_class.from_pretrained(init_model, dtype=dtype)
        PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().save_pretrained(str(model_dir))
    processing.save_pretrained(str(model_dir))
    return True


def write_card(output: Path, card: dict[str, Any], config: TrainConfig) -> None:
    """``model_card.json``; then the checkpoints go, once the model is saved, unless keep_checkpoints."""
    atomic_write_json(output / "model_card.json", card)
    if (output / "model").is_dir() and not config.keep_checkpoints:
        shutil.rmtree(output / "checkpoints", ignore_errors=True)


def rendezvous_port(job_id: str) -> int:
    """The port a job's ranks meet on: the same on every node of the job, derived from its id.

    submitit derives one in 20000-60000, which overlaps Linux's ephemeral ports (32768-60999): any
    outgoing connection on the node may hold it, and rank 0 then cannot listen (EADDRINUSE). Below
    that range only listeners collide.
    """
    return random.Random(job_id).randint(20000, 32767)


def rendezvous() -> str:
    """Where the ranks meet (MASTER_ADDR:MASTER_PORT), with the address that name has on this node."""
    address, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
    try:
        resolved = socket.gethostbyname(address)
    except OSError as error:
        resolved = f"not resolved: {error}"
    return f"{address}:{port} ({resolved})"


def distributed_rank() -> int:
    """This process's rank (0 when it is the only one), with torch's environment set up for the others.

    torchrun exports RANK and the rest itself; a submitit job of several tasks gets them here.
    """
    if "RANK" not in os.environ:
        import submitit

        try:
            job = submitit.JobEnvironment()
        except RuntimeError:  # not in a job: a direct call
            return 0
        if job.num_tasks > 1:
            os.environ.setdefault("MASTER_PORT", str(rendezvous_port(job.job_id)))
            # Each process picks its device from LOCAL_RANK; hiding the others would break that.
            # (overwrite: submitit reads MASTER_PORT, then refuses to export what is already set.)
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return int(os.environ.get("RANK", "0"))


def run(spec: TrainSpec) -> dict[str, Any]:
    with reporting(spec.target, primary=distributed_rank() == 0) as metrics:
        train_model(spec, metrics)
    return metrics
