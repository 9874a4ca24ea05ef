"""The run's stages, in running order: the base model's evaluation, each iteration's stages from the
recipe of its method (pipeline/planning/recipes/), and the export of the final model."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from pipeline.planning.recipes import Recipe, recipe_for
from pipeline.planning.stage import RunContext, StagePlan
from pipeline.planning.stages import eval_stage, export_stage


class Planner(RunContext):
    """The run's stages, planned afresh from the config and the ledger (a re-split adds tasks)."""

    def recipe_for(self, iteration: int) -> Recipe:
        return recipe_for(self.config, iteration, self)

    def baseline(self) -> list[StagePlan]:
        return [eval_stage(self, 0)] if self.config.data.heldout else []

    def iteration(self, iteration: int) -> list[StagePlan]:
        return self.recipe_for(iteration).stages(iteration)

    def stages(self) -> list[StagePlan]:
        """Every stage of the run, in running order: the base model's eval, each iteration's, and the
        export of the final model."""
        stages = self.baseline()
        for iteration in range(1, self.config.num_iterations + 1):
            stages += self.iteration(iteration)
        return [*stages, export_stage(self)]

    def stage(self, key: str) -> StagePlan:
        """One stage, planned afresh (its tasks may have changed: a re-split straggler)."""
        return next(stage for stage in self.stages() if stage.key == key)

    def stage_names(self, planned: Mapping[int, Collection[str]]) -> list[str]:
        """The kinds of stage the run's iterations have, in running order (status columns), from the
        names of the stages planned for each iteration (``planned``)."""
        names: list[str] = []
        for iteration, here in sorted(planned.items()):
            names += [n for n in self.recipe_for(iteration).stage_names if n in here and n not in names]
        return names
