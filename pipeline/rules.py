"""The rules that span config sections or check the environment (files, GPUs, installed packages),
refused before anything is written or submitted: ``check_config`` raises ``ValueError('key: why')``
naming every key involved. A rule about one section alone lives on that section (its
``__post_init__``, next to the code that reads it); the rules here run only for the sections some
iteration's method reads (``Recipe.sections``).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
from pathlib import Path

from jobs.scoring.config import RewardConfig
from jobs.scoring.rewards import RewardContext, bind, services_used
from jobs.scoring.verifiers import get_verifier
from pipeline.config import RunConfig
from pipeline.planning.recipes import RECIPES
from pipeline.planning.stages import DEFAULT_RESOURCES, stage_resources

# The modules that make a tracker of train.report_to available, and the package that brings them.
TRACKERS = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"), "wandb": (("wandb",), "wandb"),
            "mlflow": (("mlflow",), "mlflow"), "trackio": (("trackio",), "trackio")}


def check_config(config: RunConfig) -> None:
    """Every rule of this module that the run's methods call for."""
    sections = {section for method in config.methods() for section in RECIPES[method].sections(config)}
    check_iterations(config)
    check_files(config)
    check_executor_keys(config)
    check_services(config)
    check_generation(config)
    if "filter" in sections and config.filter.reward is not None:
        check_rewards(config, config.filter.reward.rewards, "filter.reward.rewards")
    if "train" in sections:
        check_training(config)
    if "grpo" in sections:
        check_rewards(config, config.grpo.rewards, "grpo.rewards")
        check_grpo(config)


def check_iterations(config: RunConfig) -> None:
    """Every ReST iteration has its learning rate (train.learning_rates[i] is iteration i+1's)."""
    rest = [i for i in range(1, config.num_iterations + 1) if config.method_of(i) == "rest"]
    rates = config.train.learning_rates
    if rest and len(rates) < rest[-1]:
        raise ValueError(
            f"train.learning_rates: has {len(rates)} entries but ReST iteration {rest[-1]} needs one"
            + (f" (num_iterations is {config.num_iterations})" if not config.schedule else f" (schedule: {config.schedule})")
        )


def check_files(config: RunConfig) -> None:
    """The files, folders and functions the config names exist (a verifier given as
    ``package.module:function`` is imported)."""
    for key, path in (("model.path", config.model.path), ("data.train", config.data.train), ("data.heldout", config.data.heldout)):
        if path is not None and not Path(path).exists():
            raise ValueError(f"{key}: {path} does not exist")
    if config.train.replay_data is not None and not Path(config.train.replay_data).is_file():
        raise ValueError(f"train.replay_data: {config.train.replay_data} does not exist")
    try:
        get_verifier(config.filter.verifier)
    except ValueError as error:
        raise ValueError(f"filter.verifier: {error}") from None
    if config.generate.media_dir is not None and not Path(config.generate.media_dir).is_dir():
        raise ValueError(f"generate.media_dir: {config.generate.media_dir} is not a folder")


def check_generation(config: RunConfig) -> None:
    """What generation is asked for, against the backend and the training method (the evaluation
    job runs with generate's settings on eval.backend, so these are not rules of the section)."""
    generate = config.generate
    if generate.backend != "vllm":
        for key in ("endpoints", "media_dir"):
            if getattr(generate, key):
                raise ValueError(f"generate.{key}: used by generate.backend: vllm only (the backend is {generate.backend})")
    if config.generate.vllm.lora and config.train.method != "lora":
        raise ValueError(f"generate.vllm.lora: serves each iteration's LoRA adapter, but train.method is {config.train.method}")


def check_executor_keys(config: RunConfig) -> None:
    """Each ``executor.<name>`` is a stage, a service or the detached chain's job."""
    known = {name for recipe in RECIPES.values() for name in recipe.stage_names} | set(DEFAULT_RESOURCES)
    known |= {f.name for f in dataclasses.fields(config.services)}
    for name in config.executor.stages:
        if name not in known:
            hint = difflib.get_close_matches(name, sorted(known), n=1)
            raise ValueError(f"executor.{name}: no stage or service of that name"
                             + (f" (did you mean 'executor.{hint[0]}'?)" if hint else f" (known: {', '.join(sorted(known))})"))


def check_services(config: RunConfig) -> None:
    for field in dataclasses.fields(config.services):
        service = getattr(config.services, field.name)
        if service is None:
            continue
        if service.model is not None and not Path(service.model).is_dir():
            raise ValueError(f"services.{field.name}.model: {service.model} is not a folder (a local Hugging Face model)")
        if config.executor.cluster == "debug":
            raise ValueError(f"services.{field.name}: a service runs as a job of its own; use executor.cluster local or slurm")


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


def check_training(config: RunConfig) -> None:
    """Training settings the files, the GPUs asked for or the installed packages cannot serve."""
    train, resources = config.train, stage_resources(config, "train")
    if train.deepspeed_config is not None:
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


def check_grpo(config: RunConfig) -> None:
    """GRPO settings that the training job's processes and GPUs (executor.train) cannot run."""
    grpo, resources = config.grpo, stage_resources(config, "train")
    processes = resources.nodes * resources.tasks_per_node
    steps = grpo.steps_per_generation or grpo.gradient_accumulation_steps
    batch = grpo.batch_size * processes * steps
    if batch % grpo.num_generations:
        raise ValueError(
            f"grpo.batch_size: the generation batch (grpo.batch_size {grpo.batch_size} x {processes} process(es) of"
            f" executor.train x {steps} step(s) per generation = {batch}) must be a multiple of grpo.num_generations"
            f" ({grpo.num_generations})"
        )
    if grpo.vllm_mode == "server":
        gpus = resources.gpus_per_task * resources.tasks_per_node
        if resources.nodes == 1 and gpus <= grpo.vllm_gpus:
            raise ValueError(
                f"grpo.vllm_mode: server on a one-node job takes grpo.vllm_gpus ({grpo.vllm_gpus}) of its GPUs for the"
                f" vLLM server and trains on the rest, but executor.train gives it {gpus}: none is left to train on"
            )
    if grpo.vllm_mode is not None and resources.gpus_per_task < 1:
        raise ValueError(f"grpo.vllm_mode: {grpo.vllm_mode} runs vLLM on GPUs; set executor.train.gpus_per_task (none here)")
