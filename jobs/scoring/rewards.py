"""Reward functions by name, with weights and parameters: one registry for our scoring and for TRL.

A reward has TRL's reward-function shape (open-r1's ``rewards.py`` too)::

    f(prompts, completions, **columns) -> list[float | None]

``completions`` are strings or TRL's conversational ``[{"role": "assistant", "content": ...}]``;
every field of the problem arrives as a column, one value per completion (``answer``, ``id``,
``task_type``, ``duration``, ``references``, media ...). None means "no score" (TRL leaves it out
of the sample's sum). The same function serves the filter and ``jobs.scoring.score_cli`` (one problem's K
samples per call) and TRL's GRPOTrainer (a slice of a batch per process per call).

Built-in rewards (jobs.scoring.reward_functions: the seeds' formulas; jobs.scoring.service_reward:
``service_score``) register themselves with ``@reward("name")``; a user's is named
``package.module:function``. A reward's parameters are its keyword-only arguments; values from
YAML are checked against their annotations when the run's config is loaded. A parameter
annotated ``RewardContext`` is not the user's to set: it carries the run's verifier, answer
pattern and services; one annotated ``ServiceName`` names the service a reward calls.

A reward that raises gives None for the samples of that call, counted per reward with its first
error (``RewardSet.failures``): a failure is not a zero. One that could score only some samples
raises ``PartialScores`` with the values it has. A reward returning a list of the wrong
length is a bug and raises RewardError naming it.
"""

from __future__ import annotations

import importlib
import inspect
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from jobs.scoring.answers import DEFAULT_PATTERN
from jobs.scoring.config import RewardConfig
from jobs.scoring.verifiers import named_function
from jobs.specs import ServiceRef

RewardFunction = Callable[..., list[float | None]]
# The annotation of a reward's parameter that names a service of the run it calls (``services.<name>``):
# the planner starts that service for the stages using the reward.
ServiceName = typing.NewType("ServiceName", str)

_REGISTRY: dict[str, RewardFunction] = {}
# Modules whose @reward functions are the built-ins; imported on first lookup.
BUILTIN_MODULES = ("jobs.scoring.reward_functions", "jobs.scoring.service_reward")


class RewardError(RuntimeError):
    """A reward broke its contract (e.g. returned a list of the wrong length)."""


class PartialScores(Exception):
    """Raised by a reward that scored some samples and not others (a service that failed for some):
    ``values`` holds None where it failed, the message says why."""

    def __init__(self, values: list[float | None], message: str):
        super().__init__(message)
        self.values = values


@dataclass(frozen=True)
class RewardContext:
    """What the run gives the rewards that need it: how answers are judged, and its services."""

    verifier: str = "multiple_choice"
    answer_pattern: str | list[str] = DEFAULT_PATTERN
    services: dict[str, ServiceRef] = field(default_factory=dict)


def reward(name: str) -> Callable[[RewardFunction], RewardFunction]:
    """Register a built-in reward under ``name``."""

    def register(function: RewardFunction) -> RewardFunction:
        _REGISTRY[name] = function
        return function

    return register


def known_rewards() -> list[str]:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    return sorted(_REGISTRY)


def reward_function(name: str) -> RewardFunction:
    """A built-in by name, or a user's function given as ``package.module:function``."""
    known_rewards()
    return named_function(name, "reward", _REGISTRY)


def _parameters(function: RewardFunction) -> dict[str, inspect.Parameter]:
    """A reward's parameters: its keyword-only arguments."""
    return {p.name: p for p in inspect.signature(function).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


@dataclass(frozen=True)
class NamedReward:
    """A reward bound to its parameters, with the name TRL logs it under (``rewards/<name>/mean``)."""

    name: str
    weight: float
    function: RewardFunction
    params: dict[str, Any]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        # A problem field named like one of the reward's parameters (a data set's "tags") must not set it.
        accepted = _parameters(self.function)
        columns = {k: v for k, v in columns.items() if k not in accepted}
        return self.function(prompts, completions, **self.params, **columns)

    @property
    def __name__(self) -> str:  # TRL names a reward function's metrics by its __name__
        return self.name


def bind(config: RewardConfig, context: RewardContext) -> NamedReward:
    """``config``'s reward with its parameters checked; ValueError naming the reward and parameter."""
    function = reward_function(config.name)
    accepted = _parameters(function)
    # With their Annotated constraints (a minimum length, a range), which the values must meet too.
    hints = typing.get_type_hints(function, include_extras=True)
    params: dict[str, Any] = {}
    for key, value in config.params.items():
        if key not in accepted or hints.get(key) is RewardContext:
            takes = ", ".join(k for k in accepted if hints.get(k) is not RewardContext) or "no parameters"
            raise ValueError(f"reward {config.name!r} has no parameter {key!r} (it takes: {takes})")
        try:
            params[key] = TypeAdapter(hints.get(key, Any)).validate_python(value)
        except ValidationError as error:
            raise ValueError(f"parameter {key!r} of reward {config.name!r}: {error.errors()[0]['msg']} (got {value!r})") from None
    for key in accepted:
        if hints.get(key) is RewardContext:
            params[key] = context
        elif accepted[key].default is inspect.Parameter.empty and key not in params:
            raise ValueError(f"reward {config.name!r} needs parameter {key!r}")
    return NamedReward(config.name.rsplit(":", 1)[-1], config.weight, function, params)


def services_used(configs: Sequence[RewardConfig]) -> set[str]:
    """The services of the run that these rewards call (their ``ServiceName`` parameters)."""
    used = set()
    for config in configs:
        function = reward_function(config.name)
        hints = typing.get_type_hints(function)
        for key, parameter in _parameters(function).items():
            if hints.get(key) is ServiceName:
                used.add(config.params.get(key, parameter.default))
    return used


@dataclass
class Scores:
    """One call's scores: per reward, one value (or None) per completion; and the weighted totals."""

    by_reward: dict[str, list[float | None]]
    totals: list[float | None]


class RewardSet:
    """Several weighted rewards, scored together; failures counted per reward, never turned into zeros."""

    def __init__(self, configs: Sequence[RewardConfig], context: RewardContext):
        self.rewards = [bind(config, context) for config in configs]
        names = [r.name for r in self.rewards]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise ValueError(f"reward {duplicate!r} is listed twice: give it once, with its weight")
        # Per reward: samples that got no score, and the first error seen.
        self.failures = dict.fromkeys(names, 0)
        self.first_error: dict[str, str] = {}

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    @property
    def weights(self) -> list[float]:
        return [r.weight for r in self.rewards]

    def score(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> Scores:
        """Every reward on these completions; a sample's total is the weighted sum of the scores it
        got (None when it got none)."""
        by_reward = {r.name: self._call(r, prompts, completions, columns) for r in self.rewards}
        totals: list[float | None] = []
        for i in range(len(completions)):
            got = [(r.weight, by_reward[r.name][i]) for r in self.rewards if by_reward[r.name][i] is not None]
            totals.append(math.fsum(w * v for w, v in got) if got else None)
        return Scores(by_reward, totals)

    def _call(self, named: NamedReward, prompts: Sequence[Any], completions: Sequence[Any], columns: dict[str, Any]) -> list[float | None]:
        try:
            values = named(prompts, completions, **columns)
        except PartialScores as partial:
            values = partial.values
            self.first_error.setdefault(named.name, str(partial))
        except Exception as error:  # noqa: BLE001 - any failure of a reward means no score for this call's samples, not a zero
            values = [None] * len(completions)
            self.first_error.setdefault(named.name, f"{type(error).__name__}: {error}")
        values = list(values)
        if len(values) != len(completions):
            raise RewardError(f"reward {named.name!r} returned {len(values)} values for {len(completions)} completions")
        missing = sum(v is None for v in values)
        self.failures[named.name] += missing
        return [None if v is None else float(v) for v in values]

    def failure_report(self) -> dict[str, Any]:
        """For the ledger and the scoring summary: samples without a score per reward, and why."""
        return {name: {"failed": count, "first_error": self.first_error.get(name)} for name, count in self.failures.items()}
