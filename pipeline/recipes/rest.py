"""ReST / expert iteration (the seeds' loop): generate K samples per problem, keep the correct ones the
learning-zone policy picks, fine-tune on them, evaluate on the held-out set.

    generate (array of shards) -> filter -> train -> eval
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.stages import (
    check_filter,
    check_training,
    eval_stage,
    filter_stage,
    generate_stage,
    train_stage,
)

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.plan import Planner, StagePlan


class Rest:
    stage_names = ("generate", "filter", "train", "eval")

    @staticmethod
    def check(config: RunConfig) -> None:
        check_filter(config)
        check_training(config)

    def __init__(self, planner: Planner):
        self.planner = planner

    def stages(self, iteration: int) -> list[StagePlan]:
        generate = generate_stage(self.planner, iteration)
        filtered = filter_stage(self.planner, iteration, generate)
        stages = [generate, filtered, train_stage(self.planner, iteration, filtered)]
        if self.planner.config.data.heldout:
            stages.append(eval_stage(self.planner, iteration))
        return stages
