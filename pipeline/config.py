"""The run's YAML schema, loaded with dotted command-line overrides and validated in one place.

Every problem is reported as one line naming the file and the key, e.g.
``configs/demo.yaml: generate.temperature: Input should be greater than or equal to 0``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from annotated_types import Ge, Gt
from pydantic import StringConstraints, TypeAdapter, ValidationError

from jobs.scoring.answers import answer_rules
from jobs.scoring.verifiers import get_verifier
from jobs.specs import (
    REJECT_UNKNOWN_KEYS,
    EvalConfig,
    FilterConfig,
    GenerateConfig,
    PositiveInt,
    TrainConfig,
)
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


@dataclass
class ExecutorConfig:
    """How jobs run. Changing it does not change results, so a resumed run may change it."""

    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    cluster: Literal["local", "slurm", "debug"] = "local"
    max_attempts: PositiveInt = 3
    poll_interval_s: Annotated[float, Gt(0)] = 2.0
    # Polls back off up to this while nothing changes.
    max_poll_interval_s: Annotated[float, Gt(0)] = 30.0
    generate: Resources = field(default_factory=Resources)
    filter: Resources = field(default_factory=lambda: Resources(timeout_min=60))
    train: Resources = field(default_factory=Resources)
    eval: Resources = field(default_factory=lambda: Resources(timeout_min=60))
    # The small CPU job of a detached run that submits the next iteration (pipeline/detach.py).
    advance: Resources = field(default_factory=lambda: Resources(timeout_min=10, cpus_per_task=1))


@dataclass
class ModelConfig:
    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    path: str


@dataclass
class DataConfig:
    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    train: str
    # Held-out problems for greedy accuracy after every iteration (and of the base model).
    heldout: str | None = None


@dataclass
class RunConfig:
    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    model: ModelConfig
    data: DataConfig
    run_name: RunName = "run"
    runs_dir: str = "runs"
    seed: int = 42
    num_iterations: PositiveInt = 3
    # learning_rates[i] is iteration i+1's.
    learning_rates: list[Annotated[float, Gt(0)]] = field(default_factory=lambda: [2e-5, 1e-5, 5e-6])
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run_name


_ADAPTER = TypeAdapter(RunConfig)
# Sections that only say how jobs run; they may change between a run's invocations.
EXECUTION_ONLY = ("executor",)


def apply_override(data: dict[str, Any], assignment: str) -> str:
    """Apply ``a.b.c=value`` (value parsed as YAML) to ``data``; return the dotted key."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise InputError(f"command line: {assignment!r}: an override looks like key.sub_key=value")
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise InputError(f"command line: {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw else ""
    return key


def _known_keys(path: list[str]) -> list[str]:
    """The keys the schema allows in the section at ``path`` (for "did you mean")."""
    schema: Any = RunConfig
    for part in path:
        schema = typing.get_type_hints(schema).get(part) if dataclasses.is_dataclass(schema) else None
    return [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else []


def _describe(error: dict[str, Any]) -> str:
    # A key with a line break in it is shown quoted, so that the message stays one line.
    loc = [str(part) if str(part).isprintable() else repr(part) for part in error["loc"]]
    key = ".".join(loc)
    if error["type"] == "unexpected_keyword_argument":
        hint = difflib.get_close_matches(loc[-1], _known_keys(loc[:-1]), n=1)
        return f"{key}: unknown key" + (f" (did you mean {'.'.join([*loc[:-1], hint[0]])!r}?)" if hint else "")
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    if error["type"] == "string_pattern_mismatch":
        return f"{key.removesuffix('.[key]')}: {PATTERN_RULES[error['ctx']['pattern']]} (got {error['input']!r})"
    value = error.get("input")
    shown = f" (got {value!r})" if not isinstance(value, (dict, list)) else ""
    return f"{key}: {error['msg']}{shown}"


def _check(config: RunConfig) -> None:
    """Rules that span keys or touch the filesystem; raise ``ValueError('key: why')``."""
    if len(config.learning_rates) < config.num_iterations:
        raise ValueError(
            f"learning_rates: has {len(config.learning_rates)} entries but num_iterations is {config.num_iterations}"
        )
    for key, path in (("model.path", config.model.path), ("data.train", config.data.train), ("data.heldout", config.data.heldout)):
        if path is not None and not Path(path).exists():
            raise ValueError(f"{key}: {path} does not exist")
    if config.train.replay_data is not None and not Path(config.train.replay_data).is_file():
        raise ValueError(f"train.replay_data: {config.train.replay_data} does not exist")
    try:
        get_verifier(config.filter.verifier)
    except ValueError as error:
        raise ValueError(f"filter.verifier: {error}") from None
    try:
        answer_rules(config.filter.answer_pattern)
    except ValueError as error:
        raise ValueError(f"filter.answer_pattern: {error}") from None
    low, mid, high = config.filter.zone_bounds
    if not 0 < low <= mid <= high <= 1:
        raise ValueError(f"filter.zone_bounds: must rise within (0, 1], got {list(config.filter.zone_bounds)}")
    if config.train.method == "lora" and not config.train.save_merged:
        raise ValueError("train.save_merged: the transformers backend generates with a merged model; keep it true")
    _check_generation(config)
    _check_training(config.train, config.executor.train)


def _check_generation(config: RunConfig) -> None:
    generate = config.generate
    if generate.media_dir is not None and not Path(generate.media_dir).is_dir():
        raise ValueError(f"generate.media_dir: {generate.media_dir} is not a folder")
    if generate.backend != "vllm":
        for key in ("endpoints", "media_dir"):
            if getattr(generate, key):
                raise ValueError(f"generate.{key}: used by generate.backend: vllm only (the backend is {generate.backend})")
    if generate.vllm.lora and config.train.method != "lora":
        raise ValueError(f"generate.vllm.lora: serves each iteration's LoRA adapter, but train.method is {config.train.method}")


# The modules that make a tracker of train.report_to available, and the package that brings them.
TRACKERS = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"), "wandb": (("wandb",), "wandb"),
            "mlflow": (("mlflow",), "mlflow"), "trackio": (("trackio",), "trackio")}


def _check_training(train: TrainConfig, resources: Resources) -> None:
    """Combinations of training settings that cannot work, refused before anything is submitted."""
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


def load_config(path: Path | str, overrides: list[str] = ()) -> RunConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise InputError(f"{path}: config file not found") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise InputError(f"{where}: invalid YAML ({getattr(error, 'problem', None) or error})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: the config must be a mapping of keys to values")
    from_command_line = {apply_override(data, item) for item in overrides}
    try:
        config = _ADAPTER.validate_python(data)
        _check(config)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        source = "command line" if key in from_command_line else str(path)
        raise InputError(f"{source}: {_describe(first)}") from None
    except ValueError as error:
        raise InputError(f"{path}: {error}") from None
    return config


def to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def with_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    """A run's stored config with the defaults of keys added to selftrain since it was written, so
    that upgrading does not make a run look changed."""
    try:
        return yaml.safe_load(dump_yaml(_ADAPTER.validate_python(stored)))
    except ValidationError:  # keys this version no longer knows: compared as written
        return stored


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``["generate.num_samples: 8 -> 16", ...]`` for the keys whose values differ."""
    out = []
    for key in sorted(set(old) | set(new)):
        if not prefix and key in EXECUTION_ONLY:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def dump_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
