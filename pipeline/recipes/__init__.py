"""Methods as recipes: each returns the stages of one iteration (pipeline/plan.py StagePlan)."""

from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING, Protocol

from pipeline.recipes.grpo import Grpo
from pipeline.recipes.rest import Rest

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.plan import Planner, StagePlan


class Recipe(Protocol):
    # The kinds of stage an iteration of this method has, in running order.
    stage_names: tuple[str, ...]

    def stages(self, iteration: int) -> list[StagePlan]: ...

    @staticmethod
    def check(config: RunConfig) -> None:
        """Refuse settings this method cannot run with: ValueError('key: why')."""


RECIPES: dict[str, type] = {"rest": Rest, "grpo": Grpo}


def recipe_for(config: RunConfig, iteration: int, planner: Planner) -> Recipe:
    """The recipe that runs iteration ``iteration`` of the run."""
    return RECIPES[config.method_of(iteration)](planner)


def stage_names() -> set[str]:
    """Every kind of stage some method has."""
    return {name for recipe in RECIPES.values() for name in recipe.stage_names}


def check_config(config: RunConfig) -> None:
    """The rules that depend on the method's stages and the run's services; ValueError('key: why')."""
    from pipeline.detach import ADVANCE
    from pipeline.services import check_services

    known = stage_names() | {ADVANCE} | {f.name for f in dataclasses.fields(config.services)}
    for name in config.executor.stages:
        if name not in known:
            hint = difflib.get_close_matches(name, sorted(known), n=1)
            raise ValueError(f"executor.{name}: no stage or service of that name"
                             + (f" (did you mean 'executor.{hint[0]}'?)" if hint else f" (known: {', '.join(sorted(known))})"))
    check_services(config)
    for method in dict.fromkeys(config.method_of(i) for i in range(1, config.num_iterations + 1)):
        RECIPES[method].check(config)
