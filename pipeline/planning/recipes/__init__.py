"""Methods as recipes: each returns the stages of one iteration (pipeline/planning/stage.py StagePlan)."""

from __future__ import annotations

from typing import Protocol

from pipeline.config import RunConfig
from pipeline.planning.recipes.grpo import Grpo
from pipeline.planning.recipes.rest import Rest
from pipeline.planning.stage import RunContext, StagePlan


class Recipe(Protocol):
    # The kinds of stage an iteration of this method has, in running order.
    stage_names: tuple[str, ...]

    @staticmethod
    def sections(config: RunConfig) -> tuple[str, ...]:
        """The config sections its stages read: the rules about them are checked (pipeline.rules)."""

    def stages(self, iteration: int) -> list[StagePlan]: ...


RECIPES: dict[str, type] = {"rest": Rest, "grpo": Grpo}


def recipe_for(config: RunConfig, iteration: int, run: RunContext) -> Recipe:
    """The recipe that runs iteration ``iteration`` of the run."""
    return RECIPES[config.method_of(iteration)](run)
