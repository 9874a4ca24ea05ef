"""ReST / expert iteration (the seeds' loop): generate K samples per problem, keep the correct ones the
learning-zone policy picks, fine-tune on them, evaluate on the held-out set.

    generate (array of shards) -> filter -> train -> eval
"""

from __future__ import annotations

from pipeline.config import RunConfig
from pipeline.planning.stage import RunContext, StagePlan
from pipeline.planning.stages import (
    eval_stage,
    filter_stage,
    generate_stage,
    train_stage,
)


class Rest:
    stage_names = ("generate", "filter", "train", "eval")

    @staticmethod
    def sections(config: RunConfig) -> tuple[str, ...]:
        return ("generate", "filter", "train", "eval")

    def __init__(self, run: RunContext):
        self.run = run

    def stages(self, iteration: int) -> list[StagePlan]:
        generate = generate_stage(self.run, iteration)
        filtered = filter_stage(self.run, iteration, generate)
        stages = [generate, filtered, train_stage(self.run, iteration, filtered)]
        if self.run.config.data.heldout:
            stages.append(eval_stage(self.run, iteration))
        return stages
