"""The stages recipes are made of: generation shards, the filter, training, the held-out evaluation.

Each builder returns a StagePlan for one iteration: its tasks with their specs (every path from the
run's layout), its resources (``executor.<stage name>``, else the default here), how it waits in
a detached chain, the services it needs, and how its metrics add up.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.generation import evaluate as eval_job
from jobs.generation import generate as generate_job
from jobs.scoring import filtering as filter_job
from jobs.scoring.rewards import RewardContext, bind, services_used
from jobs.specs import (
    EvalSpec,
    ExportSpec,
    FilterSpec,
    GenerateShardSpec,
    GrpoSpec,
    RewardConfig,
    ServiceRef,
    TrainSpec,
)
from jobs.training import export as export_job
from jobs.training import grpo as grpo_job
from jobs.training import sft as train_job
from pipeline.config import Resources, RunConfig
from pipeline.plan import StagePlan, Task, shard_ranges
from pipeline.resplit import split_parts

if TYPE_CHECKING:
    from pipeline.plan import Planner

# What each stage asks for when the config does not say (executor.<stage>).
DEFAULT_RESOURCES = {
    "generate": Resources(),
    "filter": Resources(timeout_min=60),
    "train": Resources(),
    "eval": Resources(timeout_min=60),
    "export": Resources(timeout_min=30, cpus_per_task=1),
}
EXPORT = "export"
GRPO_REPORTS = ("final_reward", "reward_failures", "selection", "final_loss")
FILTER_REPORTS = ("mean_correct_rate", "categories", "filtered_samples", "total_problems", "total_candidates",
                  "overall_accuracy", "correct_count_histogram", "correct_rate_buckets", "reward_failures")


def check_filter(config: RunConfig) -> None:
    """filter.reward's rewards exist, take the parameters given, and call services the run has."""
    if config.filter.reward is not None:
        check_rewards(config, config.filter.reward.rewards, "filter.reward.rewards")


def check_rewards(config: RunConfig, rewards: list[RewardConfig], key: str) -> None:
    """Rewards exist, take the parameters given, and call services the run has."""
    context = RewardContext(config.filter.verifier, config.filter.answer_pattern)
    for index, reward in enumerate(rewards):
        where = f"{key}[{index}]"
        try:
            bind(reward, context)
            used = services_used([reward])
        except (ValueError, TypeError) as error:
            raise ValueError(f"{where}: {error}") from None
        for name in sorted(used):
            if getattr(config.services, name, None) is None:
                raise ValueError(f"{where}: reward {reward.name!r} calls the service {name!r}, but services.{name} is not configured")


# The modules that make a tracker of train.report_to available, and the package that brings them.
TRACKERS = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"), "wandb": (("wandb",), "wandb"),
            "mlflow": (("mlflow",), "mlflow"), "trackio": (("trackio",), "trackio")}


def check_training(config: RunConfig) -> None:
    """Combinations of training settings that cannot work, refused before anything is submitted."""
    train, resources = config.train, stage_resources(config, "train")
    if train.deepspeed_config is not None:
        if train.strategy == "ddp":
            raise ValueError("train.deepspeed_config: only read with a DeepSpeed strategy (train.strategy: zero2, zero3 or zero3_offload)")
        path = Path(train.deepspeed_config)
        try:
            settings = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"train.deepspeed_config: {path} does not exist") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"train.deepspeed_config: {path}:{error.lineno}: not valid JSON ({error.msg})") from None
        if not isinstance(settings, dict):
            raise ValueError(f"train.deepspeed_config: {path} must hold a JSON object")
    if train.strategy != "ddp":
        if train.strategy.startswith("zero3") and train.method == "lora" and train.load_in_4bit:
            raise ValueError(
                f"train.strategy: {train.strategy} shards the weights across processes, and QLoRA's 4-bit weights"
                " cannot be sharded that way; use zero2 or ddp with QLoRA, or set train.load_in_4bit: false"
            )
        if resources.gpus_per_task < 1:
            raise ValueError(
                f"train.strategy: {train.strategy} (DeepSpeed) needs a GPU per process; set executor.train.gpus_per_task: 1"
            )
        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError(f"train.strategy: {train.strategy} needs DeepSpeed, which is not installed here (pip install -e '.[gpu]')")
    for tracker in train.report_to:
        modules, package = TRACKERS[tracker]
        if not any(importlib.util.find_spec(module) for module in modules):
            raise ValueError(f"train.report_to: {tracker} is not installed here (pip install {package})")



def stage_resources(config: RunConfig, name: str) -> Resources:
    """What stage ``name``'s jobs ask for: ``executor.<name>``, else its default."""
    return config.executor.resources(name, DEFAULT_RESOURCES[name])


def resources(planner: Planner, name: str) -> Resources:
    return stage_resources(planner.config, name)


def service_refs(planner: Planner, names: set[str]) -> dict[str, ServiceRef]:
    """How jobs reach the run's services ``names`` (config ``services.<name>``)."""
    return {
        name: ServiceRef(name, str(planner.layout.service_endpoint(name)), str(planner.layout.api_key),
                         getattr(planner.config.services, name))
        for name in sorted(names)
    }


def shard_totals(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """A generation stage's record: its shards' problems, tokens and failed items added up."""
    return {
        "problems_generated": sum(m.get("problems", 0) for m in metrics),
        "generated_tokens": sum(m.get("generated_tokens", 0) for m in metrics),
        # Problems whose requests still failed after retries: in the shards with their error, left out by filter.
        "failed_items": sum(m.get("failed_items", 0) for m in metrics),
    }


def generate_stage(planner: Planner, iteration: int) -> StagePlan:
    """An array of shards over the training set; a re-split straggler's rest (recorded in the stage's
    ledger record, pipeline/resplit.py) adds tasks of its own."""
    config, layout = planner.config, planner.layout
    key = f"{layout.stage_dir(iteration, 'generate').relative_to(layout.run_dir)}"
    ranges = shard_ranges(planner.num_train, config.generate.num_shards)
    model = planner.model_after(iteration - 1)  # once: thousands of shards, one model
    stage_resources = resources(planner, "generate")
    policy = stage_resources.resplit_policy() if config.executor.cluster != "debug" else None
    # Shard name -> (start, stop, indices): the array's shards, then the parts of re-split stragglers.
    shards: dict[str, tuple[int, int, list[int] | None]] = {
        f"shard_{index:05d}": (start, stop, None) for index, (start, stop) in enumerate(ranges)
    }
    shards.update({name: (parts[0], parts[-1] + 1, parts) for name, parts in split_parts(planner.run_dir, key).items()})
    # Paths once for all shards: every status and poll of a 10,000-shard stage builds this plan.
    outputs = layout.shard_outputs(iteration, "generate", shards)
    problems_path, api_key_path, compile_cache_dir = (str(p) for p in (layout.train_problems, layout.api_key, layout.compile_caches))
    tasks = [
        Task(f"{key}/{name}", generate_job.run, GenerateShardSpec(
            target=planner.target(f"{key}/{name}"),
            problems_path=problems_path,
            start=start,
            stop=stop,
            model_path=model,
            output_path=outputs[name],
            generate=config.generate,
            seed=config.seed + iteration,
            api_key_path=api_key_path,
            compile_cache_dir=compile_cache_dir,
            indices=indices,
            progress_every_s=policy.progress_every_s if policy else 0.0,
        ))
        for name, (start, stop, indices) in shards.items()
    ]
    specs = {t.key: t.spec for t in tasks}
    sizes = [b - a for a, b in ranges]
    return StagePlan(
        key, "generate", iteration, tasks, stage_resources, totals=shard_totals,
        jobs_text=f"array of {len(sizes)} (problems per shard {min(sizes)}-{max(sizes)})",
        writes=str(layout.stage_dir(iteration, "generate")),
        resplit=policy, split=lambda task_key: generate_job.close_early(specs[task_key]),
    )


def filter_stage(planner: Planner, iteration: int, generations: StagePlan) -> StagePlan:
    """Judges and filters the shards of ``generations``; waits for them with afterany (it resubmits
    failed shards itself in a detached chain)."""
    config, layout = planner.config, planner.layout
    output = layout.stage_dir(iteration, "filter")
    key = str(output.relative_to(layout.run_dir))
    services = services_used(config.filter.reward.rewards) if config.filter.reward else set()
    spec = FilterSpec(
        target=planner.target(key),
        shard_paths=[t.spec.output_path for t in generations.tasks],
        num_problems=planner.num_train,
        output_dir=str(output),
        filter=config.filter,
        num_samples=config.generate.num_samples,
        seed=config.seed,
        services=service_refs(planner, services),
    )
    return StagePlan(key, "filter", iteration, [Task(key, filter_job.run, spec)], resources(planner, "filter"),
                     after="afterany", services=tuple(sorted(services)), reports=FILTER_REPORTS, writes=str(output))


def train_stage(planner: Planner, iteration: int, data: StagePlan) -> StagePlan:
    """SFT on what ``data`` (the filter) kept."""
    config, layout = planner.config, planner.layout
    output = layout.stage_dir(iteration, "train")
    key = str(output.relative_to(layout.run_dir))
    spec = TrainSpec(
        target=planner.target(key),
        data_path=str(layout.stage_dir(iteration, data.name) / "filtered.json"),
        init_model=planner.model_after(iteration - 1 if config.train.init_from == "previous" else 0),
        base_model=planner.model_after(0),
        iteration=iteration,
        output_dir=str(output),
        learning_rate=config.learning_rates[iteration - 1],
        train=config.train,
        system_prompt=config.generate.system_prompt,
        seed=config.seed + iteration,
        media_dir=config.generate.media_dir,
    )
    deepspeed = config.train.deepspeed_json()
    detail = f"lr {spec.learning_rate:g}, {config.train.strategy}" + (f" ({deepspeed})" if deepspeed else "")
    return StagePlan(key, "train", iteration, [Task(key, train_job.run, spec)], resources(planner, "train"),
                     reports=("final_loss",), writes=str(output), detail=detail)


def eval_stage(planner: Planner, iteration: int) -> StagePlan:
    """Held-out accuracy of iteration ``iteration``'s model (0: the base model)."""
    config, layout = planner.config, planner.layout
    output = layout.stage_dir(iteration, "eval")
    key = str(output.relative_to(layout.run_dir))
    spec = EvalSpec(
        target=planner.target(key),
        problems_path=str(layout.heldout_problems),
        model_path=planner.model_after(iteration),
        output_dir=str(output),
        eval=config.eval,
        filter=config.filter,
        generate=config.generate,
        seed=config.seed,
        api_key_path=str(layout.api_key),
        compile_cache_dir=str(layout.compile_caches),
    )
    return StagePlan(key, "eval", iteration, [Task(key, eval_job.run, spec)], resources(planner, "eval"),
                     reports=("heldout_accuracy",), writes=str(output))


def grpo_train_stage(planner: Planner, iteration: int, pass_rates: StagePlan | None) -> StagePlan:
    """GRPO with TRL's GRPOTrainer from the last policy; with ``pass_rates`` (the filter of this
    iteration's generations), only on the problems whose pass rate lies in grpo.pass_rate_band."""
    config, layout = planner.config, planner.layout
    output = layout.stage_dir(iteration, "train")
    key = str(output.relative_to(layout.run_dir))
    grpo = config.grpo
    services = services_used(grpo.rewards)
    earlier = sum(1 for i in range(1, iteration) if config.method_of(i) == "grpo")
    spec = GrpoSpec(
        target=planner.target(key),
        problems_path=str(layout.train_problems),
        init_model=planner.model_after(iteration - 1 if config.train.init_from == "previous" else 0),
        base_model=planner.model_after(0),
        iteration=iteration,
        output_dir=str(output),
        learning_rate=grpo.learning_rate(earlier),
        grpo=grpo,
        train=config.train,
        system_prompt=config.generate.system_prompt,
        verifier=config.filter.verifier,
        answer_pattern=config.filter.answer_pattern,
        services=service_refs(planner, services),
        seed=config.seed + iteration,
        pass_rates_path=str(layout.stage_dir(iteration, pass_rates.name) / "filtered_pass_rates.jsonl") if pass_rates else None,
    )
    detail = f"GRPO, lr {spec.learning_rate:g}, {grpo.num_generations} generations, {grpo.max_steps} steps, {config.train.strategy}"
    return StagePlan(key, "train", iteration, [Task(key, grpo_job.run, spec)], resources(planner, "train"),
                     services=tuple(sorted(services)), reports=GRPO_REPORTS, writes=str(output), detail=detail)


def export_stage(planner: Planner) -> StagePlan:
    """The run's final model, also under export_dir as the seeds name their models."""
    config = planner.config
    last = config.num_iterations
    model_name = re.sub(r"[^A-Za-z0-9]+", "_", Path(config.model.path).resolve().name).strip("_") or "model"
    spec = ExportSpec(target=planner.target(EXPORT), model_path=planner.model_after(last),
                      export_dir=str(Path(config.export_dir).resolve()), method=config.method_of(last),
                      model_name=model_name, run_dir=str(planner.run_dir), iteration=last)
    return StagePlan(EXPORT, EXPORT, last, [Task(EXPORT, export_job.run, spec)], resources(planner, EXPORT),
                     writes=f"{spec.export_dir}/{spec.method}_{model_name}_<time>")
