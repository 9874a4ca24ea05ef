"""The run's config, composed from the sections (each declared, with its own rules, next to the code
that reads it), loaded with dotted command-line overrides and keys renamed since a run started.

Every problem is reported as one line naming the file and the key, e.g.
``configs/demo.yaml: generate.temperature: Input should be greater than or equal to 0``.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import TypeAdapter, ValidationError

from jobs.generation.config import EvalConfig, GenerateConfig
from jobs.scoring.config import FilterConfig
from jobs.sections import REJECT_UNKNOWN_KEYS, PositiveInt, load_yaml
from jobs.services.config import RewardServiceConfig
from jobs.training.config import GrpoConfig, TrainConfig
from jobs.vllm.config import VllmServiceConfig
from pipeline.layout import RunLayout
from pipeline.planning.export import ExportConfig
from pipeline.scheduling.executors import (
    PATTERN_RULES,
    ExecutorConfig,
    Resources,
    RunName,
)
from state import InputError, read_user_text

Method = Literal["rest", "grpo"]
# Keys renamed since runs were started with them: old dotted key -> new. A config that uses an old
# name is read as the new one, with one line saying so; a run's stored config is read the same way,
# so that a run started before the rename resumes without being refused as changed.
RENAMED = {
    "learning_rates": "train.learning_rates",
    "grpo.num_iterations": "grpo.passes_per_generation",
}
# Defaults changed since runs were started (dotted key -> the old default), under the top-level key
# that marks a config written after the change: a run's stored config holds every key, so one that
# lacks the marker was written before. Such a run is read with the old defaults for the keys that
# its config does not set (its stored config, and the config it is rerun with), so that it resumes,
# is advanced and exports as it was started.
CHANGED_DEFAULTS: dict[str, dict[str, Any]] = {
    # filter.verifier: auto; export.iteration: best and the collapse guard (issue 27).
    "export": {"filter.verifier": "multiple_choice", "export.iteration": "last", "export.collapse_margin": None},
}


@dataclass
class ServicesConfig:
    """Long-lived servers of the run, each a job that serves while the stages needing it run."""

    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    reward: RewardServiceConfig | None = None
    vllm: VllmServiceConfig | None = None


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
    # Development problems, evaluated with the held-out ones (dev_accuracy): export.iteration: best
    # and the collapse guard judge on them, so that the held-out figure stays unbiased.
    dev: str | None = None

    def __post_init__(self) -> None:
        if self.dev is not None and self.heldout is None:
            raise ValueError("data.dev: evaluated beside the held-out set; give data.heldout too")


@dataclass
class RunConfig:
    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    model: ModelConfig
    data: DataConfig
    run_name: RunName = "run"
    runs_dir: str = "runs"
    # The method each iteration runs (pipeline/planning/recipes/): rest (ReST / expert iteration) or grpo.
    method: Method = "rest"
    # One method per iteration, e.g. [rest, rest, grpo] (the seeds' advice: GRPO once ReST has too
    # many problems mastered); overrides method.
    schedule: list[Method] | None = None
    seed: int = 42
    num_iterations: PositiveInt = 3
    # Where a finished run's final model is exported as the seeds name it: <method>_<model>_<time>/.
    export_dir: str = "models"
    export: ExportConfig = field(default_factory=ExportConfig)
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

    def __post_init__(self) -> None:
        if self.schedule is not None and len(self.schedule) != self.num_iterations:
            raise ValueError(f"schedule: has {len(self.schedule)} entries but num_iterations is {self.num_iterations}")

    def method_of(self, iteration: int) -> str:
        """The method iteration ``iteration`` (from 1) runs."""
        return self.schedule[iteration - 1] if self.schedule else self.method

    def methods(self) -> list[str]:
        """The methods the run's iterations run, each once, in order of first use."""
        return list(dict.fromkeys(self.method_of(i) for i in range(1, self.num_iterations + 1)))


_ADAPTER = TypeAdapter(RunConfig)
# Sections that only say how jobs run; they may change between a run's invocations.
EXECUTION_ONLY = ("executor",)
# What to do about a run's stored config that cannot be read.
STORED_FIX = "; the run's stored config is damaged: restore it, or start a new run with run_name=NEW_NAME"


def _parent(data: dict[str, Any], key: str, create: bool) -> tuple[dict[str, Any] | None, str]:
    """The section of ``data`` that holds the dotted ``key``, and the key's last part. With ``create``
    the sections on the way are made (ValueError where a part is not a section); without, None where
    one is missing."""
    *sections, last = key.split(".")
    node = data
    for part in sections:
        child = node.setdefault(part, {}) if create else node.get(part)
        if not isinstance(child, dict):
            if create:
                raise ValueError(f"{key}: {part!r} is not a section")
            return None, last
        node = child
    return node, last


def apply_override(data: dict[str, Any], assignment: str) -> str:
    """Apply ``a.b.c=value`` (value parsed as YAML) to ``data``; return the dotted key."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise InputError(f"command line: {assignment!r}: an override looks like key.sub_key=value")
    try:
        section, last = _parent(data, key, create=True)
    except ValueError as error:
        raise InputError(f"command line: {error}") from None
    try:
        section[last] = load_yaml(raw) if raw else ""
    except yaml.constructor.ConstructorError as error:
        raise InputError(f"command line: {assignment!r}: {_problem(error)}") from None
    except yaml.YAMLError as error:
        raise InputError(f"command line: {assignment!r}: not a YAML value ({_problem(error)}); quote the whole"
                         " argument when the value holds spaces, as in 'key=[1, 2]'") from None
    return key


def _problem(error: yaml.YAMLError) -> str:
    """What is wrong in a YAML text, in one line."""
    return str(getattr(error, "problem", None) or error).splitlines()[0]


def read_yaml(path: Path, fix: str = "") -> dict[str, Any]:
    """The mapping of keys to values in the YAML file ``path``; InputError naming the file (and the
    line), with ``fix`` (what to do) after it."""
    try:
        text = read_user_text(path, "a YAML config file")
    except InputError as error:
        raise InputError(f"{error}{fix}") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise InputError(f"{where}: invalid YAML ({_problem(error)}){fix}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: the config must be a mapping of keys to values{fix}")
    return data


def _from_command_line(key: str, given: set[str]) -> bool:
    """Whether a problem with ``key`` is one with a value given on the command line: the key itself,
    a section holding it or a key inside it."""
    return any(key == k or key.startswith((f"{k}.", f"{k}[")) or k.startswith(f"{key}.") for k in given)


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
    if error["type"] == "value_error":
        # A section's own rule (its __post_init__): the message names every key involved.
        return str(error["ctx"]["error"])
    value = error.get("input")
    shown = f" (got {value!r})" if not isinstance(value, (dict, list)) else ""
    return f"{key}: {error['msg']}{shown}"


def renamed(data: dict[str, Any]) -> list[tuple[str, str]]:
    """Move the keys of ``data`` that were renamed (``RENAMED``) to their new names, in place; the
    (old, new) pairs moved. Both names given: ValueError naming both."""
    moved = []
    for old, new in RENAMED.items():
        source, old_last = _parent(data, old, create=False)
        if source is None or old_last not in source:
            continue
        target, new_last = _parent(data, new, create=True)
        if new_last in target:
            raise ValueError(f"{old}: renamed to {new}, and both are given; keep {new}")
        target[new_last] = source.pop(old_last)
        moved.append((old, new))
    return moved


def old_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    """The defaults (dotted key -> value) that a run's ``stored`` config was written under, where they
    changed since (``CHANGED_DEFAULTS``)."""
    return {key: value for marker, defaults in CHANGED_DEFAULTS.items() if marker not in stored for key, value in defaults.items()}


def set_unset(data: dict[str, Any], values: dict[str, Any]) -> list[str]:
    """Set the dotted keys of ``values`` that ``data`` does not set, in place; the keys set."""
    done = []
    for key, value in values.items():
        try:
            section, last = _parent(data, key, create=True)
        except ValueError:  # a value where a section belongs: validation names it
            continue
        if last not in section:
            section[last] = value
            done.append(key)
    return done


def load_config(path: Path | str, overrides: list[str] = (), check: Callable[[RunConfig], None] | None = None,
                stored: bool = False) -> RunConfig:
    """The config in ``path`` with ``overrides`` (``a.b=value``), validated by its sections' rules and
    then by ``check`` (the rules spanning sections: pipeline.rules). Every problem is an InputError
    naming the file or the command line, and the key. A key under its old name is read as the new
    one, with a line saying so, except in a run's ``stored`` config (written by an earlier version).
    A run's ``stored`` config, or a config whose run exists and was started before some defaults
    changed, is read with the old defaults for the keys it does not set (``CHANGED_DEFAULTS``)."""
    path = Path(path)
    data = read_yaml(path)
    from_command_line = {apply_override(data, item) for item in overrides}
    try:
        for old, new in renamed(data):
            if old in from_command_line:
                from_command_line.add(new)
                print(f"warning: command line: {old} is now {new}; read as that", file=sys.stderr)
            elif not stored:
                print(f"warning: {path}: {old} is now {new}; read as that (rename it in the config)", file=sys.stderr)
        if stored:
            set_unset(data, old_defaults(data))
        config = _ADAPTER.validate_python(data)
        run_config = RunLayout(config.run_dir).config
        if not stored and run_config.is_file():
            kept = set_unset(data, old_defaults(read_yaml(run_config, STORED_FIX)))
            if kept:
                print(f"note: run {config.run_name!r} was started before the defaults of {', '.join(kept)} changed;"
                      " it keeps the ones it was started with", file=sys.stderr)
                config = _ADAPTER.validate_python(data)
        if check is not None:
            check(config)
    except (ValidationError, ValueError) as error:
        message = _describe(error.errors()[0]) if isinstance(error, ValidationError) else str(error)
        given = _from_command_line(message.split(":", 1)[0], from_command_line)
        raise InputError(f"{'command line' if given else path}: {message}") from None
    return config


def read_run_config(path: Path) -> RunConfig:
    """A run's stored config, for reading its state: validated (old key names read as the new ones),
    but the files it names are not checked again (a run is looked at where its model folder may not
    be reachable)."""
    data = read_yaml(path, STORED_FIX)
    renamed(data)
    set_unset(data, old_defaults(data))
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as error:
        raise InputError(f"{path}: {_describe(error.errors()[0])}{STORED_FIX}") from None


def to_dict(config: RunConfig) -> dict[str, Any]:
    """The config as YAML holds it: stage resources beside the executor's settings, as written."""
    return dataclasses.asdict(config) | {"executor": config.executor.as_written()}


def with_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    """A run's stored config as this version writes it: renamed keys under their new names, and the
    defaults of keys added since it was written (the old ones where they changed since: the run
    keeps them), so that upgrading does not make a run look changed."""
    renamed(stored)
    set_unset(stored, old_defaults(stored))
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
