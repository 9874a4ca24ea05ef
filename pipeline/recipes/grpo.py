"""GRPO (seeds 001-004's train_grpo.py): TRL's GRPOTrainer from the last policy with the reward
registry, then the held-out evaluation.

    [generate (array) -> filter ->] train (GRPO) -> eval

With ``grpo.pass_rate_band`` the iteration first measures every problem's pass rate with the policy
it starts from (K samples each, judged as the filter judges them) and trains only on the problems
inside the band: those all samples solve or none does would give groups of zero variance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.stages import (
    check_rewards,
    check_training,
    eval_stage,
    filter_stage,
    generate_stage,
    grpo_train_stage,
    stage_resources,
)

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.plan import Planner, StagePlan


class Grpo:
    stage_names = ("generate", "filter", "train", "eval")

    @staticmethod
    def check(config: RunConfig) -> None:
        check_rewards(config, config.grpo.rewards, "grpo.rewards")
        check_training(config)
        check_grpo(config)

    def __init__(self, planner: Planner):
        self.planner = planner

    def stages(self, iteration: int) -> list[StagePlan]:
        stages = []
        pass_rates = None
        if self.planner.config.grpo.pass_rate_band is not None:
            generate = generate_stage(self.planner, iteration)
            pass_rates = filter_stage(self.planner, iteration, generate)
            stages += [generate, pass_rates]
        stages.append(grpo_train_stage(self.planner, iteration, pass_rates))
        if self.planner.config.data.heldout:
            stages.append(eval_stage(self.planner, iteration))
        return stages


def check_grpo(config: RunConfig) -> None:
    """GRPO settings that cannot work, refused before anything is submitted."""
    grpo, resources = config.grpo, stage_resources(config, "train")
    processes = resources.nodes * resources.tasks_per_node
    steps = grpo.steps_per_generation or grpo.gradient_accumulation_steps
    batch = grpo.batch_size * processes * steps
    if batch % grpo.num_generations:
        raise ValueError(
            f"grpo.batch_size: the generation batch (batch_size {grpo.batch_size} x {processes} process(es) x {steps}"
            f" step(s) per generation = {batch}) must be a multiple of grpo.num_generations ({grpo.num_generations})"
        )
    if grpo.pass_rate_band is not None and grpo.pass_rate_band[0] > grpo.pass_rate_band[1]:
        raise ValueError(f"grpo.pass_rate_band: the low bound is above the high one ({list(grpo.pass_rate_band)})")
    if grpo.vllm_mode == "server":
        gpus = resources.gpus_per_task * resources.tasks_per_node
        if resources.nodes == 1 and gpus <= grpo.vllm_gpus:
            raise ValueError(
                f"grpo.vllm_mode: server on a one-node job takes grpo.vllm_gpus ({grpo.vllm_gpus}) of its GPUs for the"
                f" vLLM server and trains on the rest, but executor.train gives it {gpus}: none is left to train on"
            )
    if grpo.vllm_mode is not None and resources.gpus_per_task < 1:
        raise ValueError(f"grpo.vllm_mode: {grpo.vllm_mode} runs vLLM on GPUs; set executor.train.gpus_per_task (none here)")
