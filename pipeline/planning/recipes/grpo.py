"""GRPO (seeds 001-004's train_grpo.py): TRL's GRPOTrainer from the last policy with the reward
registry, then the held-out evaluation.

    [generate (array) -> filter ->] train (GRPO) -> eval

With ``grpo.pass_rate_band`` the iteration first measures every problem's pass rate with the policy
it starts from (K samples each, judged as the filter judges them) and trains only on the problems
inside the band: those all samples solve or none does would give groups of zero variance.

With ``grpo.rollouts: arrays`` an iteration is a round whose samples come from the generation array
(``grpo.sampling``), with their log-probabilities; a CPU job scores them and keeps the groups with a
signal, with their advantages; the training job trains once over them:

    generate (array) -> score -> train (GRPO on the stored samples) -> eval
"""

from __future__ import annotations

from pipeline.config import RunConfig
from pipeline.planning.stage import RunContext, StagePlan
from pipeline.planning.stages import (
    eval_stage,
    filter_stage,
    generate_stage,
    grpo_train_stage,
    score_stage,
)


class Grpo:
    stage_names = ("generate", "filter", "score", "train", "eval")

    @staticmethod
    def sections(config: RunConfig) -> tuple[str, ...]:
        """With a pass-rate band it generates and filters first; with rollouts from the arrays it generates."""
        if config.grpo.rollouts == "arrays":
            return ("generate", "grpo", "train", "eval")
        return ("generate", "filter", "grpo", "train", "eval") if config.grpo.pass_rate_band else ("grpo", "train", "eval")

    def __init__(self, run: RunContext):
        self.run = run

    def stages(self, iteration: int) -> list[StagePlan]:
        grpo = self.run.config.grpo
        if grpo.rollouts == "arrays":
            rollouts = generate_stage(self.run, iteration, rollouts=True)
            scored = score_stage(self.run, iteration, rollouts)
            stages = [rollouts, scored, grpo_train_stage(self.run, iteration, scored=scored)]
        elif grpo.pass_rate_band is not None:
            generate = generate_stage(self.run, iteration)
            pass_rates = filter_stage(self.run, iteration, generate)
            stages = [generate, pass_rates, grpo_train_stage(self.run, iteration, pass_rates)]
        else:
            stages = [grpo_train_stage(self.run, iteration)]
        if self.run.config.data.heldout:
            stages.append(eval_stage(self.run, iteration))
        return stages

