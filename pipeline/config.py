"""The run's YAML schema, loaded with dotted command-line overrides and validated in one place.

Every problem is reported as one line naming the file and the key, e.g.
``configs/demo.yaml: generate.temperature: Input should be greater than or equal to 0``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from annotated_types import Ge, Gt, Le
from pydantic import StringConstraints, TypeAdapter, ValidationError, model_validator

from jobs.scoring.answers import answer_rules
from jobs.scoring.verifiers import get_verifier
from jobs.specs import (
    REJECT_UNKNOWN_KEYS,
    EvalConfig,
    FilterConfig,
    GenerateConfig,
    GrpoConfig,
    PositiveInt,
    ServicesConfig,
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
Method = Literal["rest", "grpo"]


@dataclass
class Resplit:
    """When the driver stops a straggling task of an array and splits the rest of its items into new
    tasks (pipeline/resplit.py): once ``min_done_fraction`` of the tasks are done, a running task whose
    ETA is at least ``eta_ratio`` times the median time of the finished ones, with at least
    ``min_remaining_items`` left, is split into up to ``max_parts`` tasks."""

    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    min_done_fraction: Annotated[float, Gt(0), Le(1)] = 0.5
    eta_ratio: Annotated[float, Gt(1)] = 4.0
    min_remaining_items: PositiveInt = 8
    max_parts: Annotated[int, Ge(2)] = 4
    # How often running tasks report their progress (their ETA) to the ledger.
    progress_every_s: Annotated[float, Gt(0)] = 30.0


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
    # Straggler re-split, for stages whose tasks can be split (generation): true (the defaults), false
    # (off), or the thresholds.
    resplit: Resplit | bool = True

    def resplit_policy(self) -> Resplit | None:
        return Resplit() if self.resplit is True else (self.resplit or None)


# Keys of the executor section that are not a stage's or service's resources.
EXECUTOR_SETTINGS = ("cluster", "max_attempts", "poll_interval_s", "max_poll_interval_s")


@dataclass
class ExecutorConfig:
    """How jobs run. Changing it does not change results, so a resumed run may change it.

    Besides the settings, every key is a stage's or a service's resources, by name:
    ``executor.generate``, ``executor.train``, ``executor.reward`` (the reward service), and
    ``executor.advance`` (the detached chain's CPU job). Each stage has defaults of its own.
    """

    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    cluster: Literal["local", "slurm", "debug"] = "local"
    max_attempts: PositiveInt = 3
    poll_interval_s: Annotated[float, Gt(0)] = 2.0
    # Polls back off up to this while nothing changes.
    max_poll_interval_s: Annotated[float, Gt(0)] = 30.0
    stages: dict[str, Resources] = field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _resources_by_name(cls, data: Any) -> Any:
        """``executor.generate: {...}`` is written beside the settings; it lands in ``stages``."""
        if isinstance(data, dict):
            stages = dict(data.get("stages") or {})
            stages.update({k: v for k, v in data.items() if k not in (*EXECUTOR_SETTINGS, "stages")})
            data = {k: v for k, v in data.items() if k in EXECUTOR_SETTINGS} | {"stages": stages}
        return data

    def resources(self, name: str, default: Resources) -> Resources:
        """What a stage or service asks the scheduler for: ``executor.<name>``, else ``default``."""
        return self.stages.get(name, default)


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
    # The method each iteration runs (pipeline/recipes/): rest (ReST / expert iteration) or grpo.
    method: Method = "rest"
    # One method per iteration, e.g. [rest, rest, grpo] (the seeds' advice: GRPO once ReST has too
    # many problems mastered); overrides method.
    schedule: list[Method] | None = None
    seed: int = 42
    num_iterations: PositiveInt = 3
    # learning_rates[i] is iteration i+1's, for ReST iterations (GRPO's are grpo.learning_rates).
    learning_rates: list[Annotated[float, Gt(0)]] = field(default_factory=lambda: [2e-5, 1e-5, 5e-6])
    # Where a finished run's final model is exported as the seeds name it: <method>_<model>_<time>/.
    export_dir: str = "models"
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    services: ServicesConfig = field(default_factory=ServicesConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run_name

    def method_of(self, iteration: int) -> str:
        """The method iteration ``iteration`` (from 1) runs."""
        return self.schedule[iteration - 1] if self.schedule else self.method


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
        hints = typing.get_type_hints(schema) if dataclasses.is_dataclass(schema) else {}
        # executor.<stage> is a stage's resources.
        schema = hints.get(part, Resources if schema is ExecutorConfig else None)
    schema = typing.get_args(schema)[0] if typing.get_origin(schema) in (typing.Union, types.UnionType) else schema
    return [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else []


def user_key(loc: tuple[Any, ...]) -> list[str]:
    """A validation error's location as the user wrote the key: ``executor.generate``, not
    ``executor.stages.generate``; quoted where a line break would split the message."""
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int) and parts:
            parts[-1] += f"[{part}]"  # rewards[0], as in the messages of our own checks
        else:
            parts.append(str(part) if str(part).isprintable() else repr(part))
    if parts[:2] == ["executor", "stages"]:
        del parts[1]
    return parts


def _describe(error: dict[str, Any]) -> str:
    loc = user_key(error["loc"])
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
    if config.schedule is not None and len(config.schedule) != config.num_iterations:
        raise ValueError(f"schedule: has {len(config.schedule)} entries but num_iterations is {config.num_iterations}")
    rest = [i for i in range(1, config.num_iterations + 1) if config.method_of(i) == "rest"]
    if rest and len(config.learning_rates) < rest[-1]:
        raise ValueError(
            f"learning_rates: has {len(config.learning_rates)} entries but ReST iteration {rest[-1]} needs one"
            + (f" (num_iterations is {config.num_iterations})" if not config.schedule else "")
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
        from pipeline.recipes import (
            check_config,  # the recipes' rules (they import this module)
        )

        check_config(config)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(user_key(first["loc"]))
        source = "command line" if key in from_command_line else str(path)
        raise InputError(f"{source}: {_describe(first)}") from None
    except ValueError as error:
        key = str(error).split(":", 1)[0]
        given = any(k == key or k.startswith(f"{key}.") for k in from_command_line)
        raise InputError(f"{'command line' if given else path}: {error}") from None
    return config


def read_run_config(path: Path) -> RunConfig:
    """A run's stored config, for reading its state: validated, but the files it names are not checked
    again (a run is looked at where its model folder may not be reachable)."""
    return _ADAPTER.validate_python(yaml.safe_load(path.read_text(encoding="utf-8")))


def to_dict(config: RunConfig) -> dict[str, Any]:
    """The config as YAML holds it: stage resources beside the executor's settings, as written."""
    data = dataclasses.asdict(config)
    data["executor"] |= data["executor"].pop("stages")
    return data


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
