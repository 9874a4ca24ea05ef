"""The rules that span config sections or check the environment (files, GPUs, installed packages),
refused before anything is written or submitted: ``check_config`` raises ``ValueError('key: why')``
naming every key involved. A rule about one section alone lives on that section (its
``__post_init__``, next to the code that reads it); the rules here run only for the sections some
iteration's method reads (``Recipe.sections``). ``check_run`` adds what only a run started or
rerun from the command line needs checked (rules added since runs were started, the model folder's
files, this machine's vLLM and GPUs), ``check_problems`` the rules of the training problems, and
``gpu_warning`` says which SLURM jobs ask for no GPU.
"""

from __future__ import annotations

import dataclasses
import difflib
import filecmp
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from jobs.problems.data import MEDIA_FIELDS
from jobs.scoring.config import RewardConfig
from jobs.scoring.rewards import RewardContext, bind, services_used
from jobs.scoring.verifiers import get_verifier
from jobs.sections import check_writable
from jobs.training.config import TrainConfig
from jobs.vllm.args import vllm_python
from jobs.vllm.server import visible_gpus
from pipeline.config import RunConfig
from pipeline.planning.recipes import RECIPES
from pipeline.planning.stages import DEFAULT_RESOURCES, stage_resources
from pipeline.scheduling.executors import Resources, missing_scheduler
from state import InputError

# The modules that make a tracker of train.report_to available, and the package that brings them.
TRACKERS = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"), "wandb": (("wandb",), "wandb"),
            "mlflow": (("mlflow",), "mlflow"), "trackio": (("trackio",), "trackio")}


def check_config(config: RunConfig) -> None:
    """The rules that the run's methods call for, on every config: a new run's, and a run's stored
    config read again to requeue or advance it (``Driver.open``). Rules that runs started earlier
    need not meet are ``check_run``'s."""
    sections = used_sections(config)
    check_iterations(config)
    check_files(config)
    check_writable(config.run_dir, "runs_dir", folder=True)
    check_writable(Path(config.export_dir), "export_dir", folder=True)
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


def used_sections(config: RunConfig) -> set[str]:
    """The config sections that the stages of the run's methods read."""
    return {section for method in config.methods() for section in RECIPES[method].sections(config)}


def check_iterations(config: RunConfig) -> None:
    """Every ReST iteration has its learning rate (train.learning_rates[i] is iteration i+1's)."""
    rest = [i for i in range(1, config.num_iterations + 1) if config.method_of(i) == "rest"]
    rates = config.train.learning_rates
    if rest and len(rates) < rest[-1]:
        raise ValueError(
            f"train.learning_rates: has {len(rates)} entries but ReST iteration {rest[-1]} needs one"
            + (f" (num_iterations is {config.num_iterations})" if not config.schedule else f" (schedule: {config.schedule})")
        )


def check_unused_rates(config: RunConfig) -> None:
    """No ReST learning rate is left unused (the defaults' three serve runs of fewer iterations too)."""
    rates = config.train.learning_rates
    if "rest" in config.methods() and len(rates) > config.num_iterations and rates != TrainConfig().learning_rates:
        raise ValueError(f"train.learning_rates: has {len(rates)} entries but num_iterations is {config.num_iterations};"
                         " give one per iteration (or raise num_iterations)")


def check_data(config: RunConfig) -> None:
    """The problem sets are files, and none evaluated is the training set (its accuracy would then
    measure the problems trained on)."""
    files = {f"data.{f.name}": Path(getattr(config.data, f.name))
             for f in dataclasses.fields(config.data) if getattr(config.data, f.name) is not None}
    for key, path in files.items():
        if path.is_dir():
            raise ValueError(f"{key}: {path} is a folder; give a file of problems (.jsonl or .json)")
    train = files.pop("data.train")
    for key, path in files.items():
        if filecmp.cmp(path, train, shallow=False):
            raise ValueError(f"{key}: {path} holds the same problems as data.train ({train}); give problems kept out of"
                             " training, or its accuracy measures the problems trained on")


def check_files(config: RunConfig) -> None:
    """The files, folders and functions the config names exist (a verifier given as
    ``package.module:function`` is imported)."""
    for key, path in (("model.path", config.model.path), ("data.train", config.data.train), ("data.heldout", config.data.heldout),
                      ("data.dev", config.data.dev)):
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
    if grpo.rollouts == "arrays":
        # What the round's shards cannot give yet, or what has no meaning when they sample.
        clash = ("generate.endpoints (servers the run does not start may not give the log-probabilities sampled from;"
                 " let the shards start theirs)" if config.generate.endpoints else
                 f"grpo.vllm_mode: {grpo.vllm_mode} (the trainer's own rollouts)" if grpo.vllm_mode else
                 "grpo.pass_rate_band (the trainer's own rollouts)" if grpo.pass_rate_band else
                 "train.init_from: base (a round samples with the last policy, so it must train from it)"
                 if config.train.init_from == "base" else None)
        if clash:
            raise ValueError(f"grpo.rollouts: arrays samples in the generation shards, and cannot go with {clash}")
        if grpo.problems_per_round and grpo.problems_per_round * grpo.num_generations < batch:
            raise ValueError(
                f"grpo.problems_per_round: a round of {grpo.problems_per_round} problems x {grpo.num_generations} samples"
                f" (grpo.num_generations) is smaller than one generation batch ({batch}: grpo.batch_size x processes x"
                " steps per generation), so it would train on nothing; raise grpo.problems_per_round or lower grpo.batch_size"
            )


# --- Before a run is created or resumed (pipeline.run): the model's files and this machine -----------

# The weights of a Hugging Face model folder, sharded or not.
WEIGHT_FILES = ("*.safetensors", "*.bin")
# The jobs (by their executor.<name>) that may start vLLM servers, and the key that makes them do so.
VLLM_KEYS = {"generate": "generate.backend", "eval": "eval.backend", "vllm": "services.vllm"}
# What each job that starts vLLM or trains is, for the line about those that ask SLURM for no GPU.
GPU_JOBS = {"generate": "vLLM generation", "eval": "vLLM evaluation", "vllm": "the vLLM service", "train": "training"}
# Whether a python has vLLM: looked up, not imported (an import takes seconds).
HAS_VLLM = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
# Seconds that python may take to say so (a cold start on a network file system takes some).
VLLM_LOOKUP_S = 120


def check_run(config: RunConfig) -> None:
    """``check_config``, then what only a run started or rerun from the command line needs checked,
    once, before anything is written: the rules added since runs were started (a run's stored config,
    read again to requeue or advance it, is not refused for them), the model folder's files (a
    config.json and weights; LoRA's target modules among its layers), and what this machine has for
    the jobs (vLLM, local GPUs; not where SLURM's commands are missing: the jobs do not run here,
    and a dry run previews them)."""
    check_config(config)
    sections = used_sections(config)
    check_unused_rates(config)
    check_data(config)
    if "train" in sections:
        check_quantized_on_gpu(config)
    folder = Path(config.model.path)
    check_model_folder(folder)
    if config.train.method == "lora" and "train" in sections:
        check_target_modules(folder, config.train.target_modules)
    if missing_scheduler(config.executor.cluster):
        return
    check_vllm_installed(config, sections)
    if config.executor.cluster == "local":
        check_local_gpus(config)


def check_quantized_on_gpu(config: RunConfig) -> None:
    """QLoRA on SLURM has a GPU: without one the job loads the model unquantized and trains on the
    nodes' CPUs until its time limit."""
    train = config.train
    if (config.executor.cluster == "slurm" and train.method == "lora" and train.load_in_4bit
            and stage_resources(config, "train").gpus_per_task < 1):
        raise ValueError(
            "train.load_in_4bit: QLoRA (train.method: lora with 4-bit loading) needs a GPU per process, but executor.train"
            " asks SLURM for none; set executor.train.gpus_per_task: 1 (or train.load_in_4bit: false to train unquantized)"
        )


def check_model_folder(folder: Path) -> None:
    """``model.path`` is a Hugging Face model folder: config.json and weights."""
    advice = "give the folder of a Hugging Face model (its config.json and weights, as save_pretrained writes them)"
    if not folder.is_dir():
        raise ValueError(f"model.path: {folder} is a file; {advice}")
    if not any(folder.iterdir()):
        raise ValueError(f"model.path: {folder} is an empty folder; {advice}")
    if not (folder / "config.json").is_file():
        raise ValueError(f"model.path: {folder} has no config.json; {advice}")
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise ValueError(f"model.path: {folder} has no weights ({' or '.join(WEIGHT_FILES)}); {advice}")


def check_target_modules(folder: Path, targets: list[str]) -> None:
    """Each of LoRA's ``train.target_modules`` names modules of the model, as PEFT matches them (the
    module's name, or its end after a dot). The module names come from the safetensors files'
    headers, no weight read; a model in PyTorch's .bin format alone is left to PEFT."""
    # Imported here for import cost: only a LoRA run's check reads the headers.
    from safetensors import safe_open

    modules: set[str] = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="numpy") as weights:
            modules.update(name.rpartition(".")[0] for name in weights.keys())  # noqa: SIM118 (safe_open is no dict)
    if not modules:
        return
    modules.add("lm_head")  # a tied output layer is not saved, and is a module all the same
    names = sorted({module.rpartition(".")[2] for module in modules})
    for target in targets:
        if not any(module == target or module.endswith(f".{target}") for module in modules):
            hint = difflib.get_close_matches(target, names, n=1)
            raise ValueError(
                f"train.target_modules: {target!r} is not a module of the model in {folder}"
                + (f" (did you mean {hint[0]!r}?)" if hint else f" (its modules: {', '.join(names)})")
            )


def vllm_jobs(config: RunConfig, sections: set[str]) -> list[str]:
    """The run's jobs (by their executor.<name>) that start vLLM servers: generation and evaluation on
    the vllm backend (not on generate.endpoints: those serve already), and the vLLM service."""
    return [name for name, starts in (
        ("generate", "generate" in sections and config.generate.backend == "vllm" and not config.generate.endpoints),
        ("eval", config.eval.backend == "vllm"),
        ("vllm", config.services.vllm is not None),
    ) if starts]


def check_vllm_installed(config: RunConfig, sections: set[str]) -> None:
    """Where the run's jobs start vLLM servers, the python they start them with has vLLM."""
    starts = vllm_jobs(config, sections)
    if not starts:
        return
    vllm = config.generate.vllm
    if vllm.command:
        if shutil.which(vllm.command[0]) is None:
            raise ValueError(f"generate.vllm.command: {vllm.command[0]} not found on this machine")
        return
    python = vllm_python(vllm)
    found = shutil.which(python) is not None
    try:
        has_vllm = found and not subprocess.run([python, "-c", HAS_VLLM], capture_output=True, check=False,
                                                timeout=VLLM_LOOKUP_S).returncode
    except subprocess.TimeoutExpired:
        raise ValueError(f"generate.vllm.python: {python} did not say within {VLLM_LOOKUP_S} s whether it has vLLM (a"
                         " slow or hung file system?); try again, or set generate.vllm.python to another python") from None
    if not has_vllm:
        raise ValueError(
            f"{VLLM_KEYS[starts[0]]}: vllm starts vLLM servers with {python} (generate.vllm.python), which "
            + ("does not exist" if not found else "has no vLLM")
            + "; install vLLM with bash tools/setup_vllm.sh (GPU clusters: bash tools/setup_vllm.sh gpu),"
            " or set generate.vllm.python to the python of an environment that has it"
        )


def check_local_gpus(config: RunConfig) -> None:
    """The local executor runs jobs on this machine: the GPUs they ask for are here."""
    asked = {name: r.gpus_per_task * r.tasks_per_node for name, r in config.executor.stages.items() if r.gpus_per_task}
    if not asked:
        return
    name, most = max(asked.items(), key=lambda item: item[1])
    have = len(visible_gpus())
    if most > have:
        raise ValueError(
            f"executor.{name}.gpus_per_task: a job of executor.{name} asks the local executor for {most} GPU(s), and this"
            f" machine has {have or 'none'}; set executor.{name}.gpus_per_task: 0 to run on CPU, or run on a cluster"
            " (executor.cluster: slurm)"
        )


def check_problems(config: RunConfig, train: list[dict[str, Any]]) -> None:
    """The training problems suit the methods (InputError naming data.train: a rule of the data)."""
    if "grpo" not in used_sections(config) or config.grpo.rollouts == "arrays":
        return
    media = next(((problem["id"], field) for problem in train for field in MEDIA_FIELDS if field in problem), None)
    if media:
        raise InputError(f"{config.data.train}: problem {media[0]!r} has a {media[1]}, and grpo.rollouts: trainer (TRL's"
                         " own loop) samples text only; set grpo.rollouts: arrays (the generation shards sample, with the media)")


def gpu_warning(config: RunConfig) -> str | None:
    """On SLURM, one line naming the jobs that run vLLM or train but ask for no GPU: they run on the
    nodes' CPUs (meant in a test, a mistake on a GPU cluster). None when there is none."""
    if config.executor.cluster != "slurm":
        return None
    sections = used_sections(config)
    jobs = [*vllm_jobs(config, sections), *(["train"] if "train" in sections else [])]
    on_cpu = [name for name in jobs if config.executor.resources(name, DEFAULT_RESOURCES.get(name, Resources())).gpus_per_task < 1]
    if not on_cpu:
        return None
    named = " and ".join(f"executor.{name} ({GPU_JOBS[name]})" for name in on_cpu)
    return (f"executor.cluster: slurm, and {named} ask{'s' if len(on_cpu) == 1 else ''} for no GPU: those jobs run on the"
            f" nodes' CPUs; set executor.{on_cpu[0]}.gpus_per_task: 1 (and a partition with GPUs) to run them on GPUs")
