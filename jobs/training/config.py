"""The ``train`` section (supervised fine-tuning, and the model, LoRA and hardware settings every
method trains with) and the ``grpo`` section (GRPO iterations)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal

from annotated_types import Ge, Gt, Len

from jobs.generation.config import GenerateConfig
from jobs.scoring.config import RewardConfig
from jobs.sections import REJECT_UNKNOWN_KEYS, Fraction, PositiveFloat, PositiveInt

DEEPSPEED_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


@dataclass
class TrainConfig:
    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    method: Literal["lora", "full"] = "lora"
    # ReST-EM restarts from the base model every iteration; the seed continues from the previous.
    init_from: Literal["previous", "base"] = "previous"
    # ReST iterations' learning rates: learning_rates[i] is iteration i+1's (GRPO's are grpo.learning_rates).
    learning_rates: list[PositiveFloat] = field(default_factory=lambda: [2e-5, 1e-5, 5e-6])
    lora_r: PositiveInt = 64
    lora_alpha: PositiveInt = 128
    lora_dropout: Fraction = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    num_epochs: Annotated[float, Gt(0)] = 2
    # Overrides num_epochs, unless -1.
    max_steps: int = -1
    batch_size: PositiveInt = 1
    gradient_accumulation_steps: PositiveInt = 8
    warmup_ratio: Fraction = 0.1
    weight_decay: Annotated[float, Ge(0)] = 0.0
    lr_scheduler_type: str = "linear"
    max_length: PositiveInt = 2048
    gradient_checkpointing: bool = True
    # GPU-only choices (paged 8-bit AdamW, bf16, 4-bit loading) are skipped with a log line on CPU.
    optim: str = "paged_adamw_8bit"
    bf16: bool = True
    load_in_4bit: bool = True
    # Extra SFT examples (same format as the problems, answers as full responses) mixed into
    # every iteration's training set, e.g. the warm-start data.
    replay_data: str | None = None
    save_merged: bool = True
    logging_steps: PositiveInt = 10
    save_steps: PositiveInt = 200
    # Checkpoints kept while training (the newest); all of them are deleted once the model is
    # saved, unless keep_checkpoints.
    save_total_limit: PositiveInt | None = 2
    keep_checkpoints: bool = False
    # How the processes of a training job (executor.train: nodes x tasks_per_node) share the work:
    # plain DDP, or DeepSpeed ZeRO stage 2, stage 3, or stage 3 with parameters and optimizer
    # states offloaded to CPU (configs/deepspeed/<strategy>.json, the seeds' settings with "auto"
    # for what the keys above already say). DeepSpeed needs a GPU per process.
    strategy: Literal["ddp", "zero2", "zero3", "zero3_offload"] = "ddp"
    # A DeepSpeed JSON of your own for a zero* strategy, instead of the one under configs/deepspeed/.
    deepspeed_config: str | None = None
    # Also log to these trackers (TRL passes them on); TensorBoard files go to <train>/tensorboard.
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = field(default_factory=list)
    # Models with audio / vision encoders, full fine-tuning: keep the encoders as they are and train
    # the rest, the projector into the language model included (seed 003's fix_vit). LoRA puts its
    # adapters on the language model only and trains nothing else either way.
    freeze_encoders: bool = False

    def __post_init__(self) -> None:
        if self.max_steps < 1 and self.max_steps != -1:
            raise ValueError(f"train.max_steps: is {self.max_steps}; give a positive number of optimizer steps, or -1"
                             " to train train.num_epochs epochs")
        if self.method == "lora" and not self.save_merged:
            raise ValueError("train.save_merged: the transformers backend generates with a merged model; keep it true"
                             " with train.method: lora")
        if self.deepspeed_config is not None and self.strategy == "ddp":
            raise ValueError("train.deepspeed_config: only read with a DeepSpeed strategy (train.strategy: zero2, zero3 or zero3_offload)")
        if self.strategy.startswith("zero3") and self.method == "lora" and self.load_in_4bit:
            raise ValueError(
                f"train.strategy: {self.strategy} shards the weights across processes, and QLoRA's 4-bit weights"
                " (train.method: lora with train.load_in_4bit) cannot be sharded that way; use zero2 or ddp with QLoRA,"
                " or set train.load_in_4bit: false"
            )

    def deepspeed_json(self) -> Path | None:
        """The DeepSpeed config the strategy trains with; None for plain DDP."""
        if self.strategy == "ddp":
            return None
        return Path(self.deepspeed_config) if self.deepspeed_config else DEEPSPEED_CONFIGS / f"{self.strategy}.json"


@dataclass
class GrpoConfig:
    """GRPO iterations (``method: grpo`` or ``grpo`` in ``schedule``): TRL's GRPOTrainer on the
    problems with the reward registry, starting from the last policy. Defaults are seed 001's
    (train_grpo.py: 4 generations, beta 0.1, temperature 0.7, lr 1e-6) where it gives one, TRL's
    otherwise. The model, LoRA / QLoRA, strategy and GPU settings come from ``train``."""

    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    # The rewards and their weights (jobs.scoring.rewards); correctness by the run's verifier by default.
    rewards: Annotated[list[RewardConfig], Len(min_length=1)] = field(default_factory=lambda: [RewardConfig(name="correctness")])
    num_generations: Annotated[int, Ge(2)] = 4
    beta: Annotated[float, Ge(0)] = 0.1
    temperature: PositiveFloat = 0.7
    # One per GRPO iteration, in order; the last is used again for later ones.
    learning_rates: Annotated[list[PositiveFloat], Len(min_length=1)] = field(default_factory=lambda: [1e-6])
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    epsilon: PositiveFloat = 0.2
    max_completion_length: PositiveInt = 256
    # Optimization passes over each generation batch (TRL's num_iterations, mu).
    passes_per_generation: PositiveInt = 1
    # Micro-batches per generation batch (default: gradient_accumulation_steps, as TRL: one optimizer step).
    steps_per_generation: PositiveInt | None = None
    # Completions per process per micro-batch; the generation batch (batch_size x processes x
    # steps_per_generation) must be a multiple of num_generations.
    batch_size: PositiveInt = 8
    gradient_accumulation_steps: PositiveInt = 1
    # Optimizer steps per GRPO iteration (with rollouts: arrays, at most: a round trains once over its samples).
    max_steps: PositiveInt = 100
    logging_steps: PositiveInt = 5
    save_steps: PositiveInt = 25
    # Who samples: trainer (TRL's loop inside the training job), or arrays: each iteration is a round,
    # the generation shards sample num_generations per problem with the last policy and keep their
    # tokens' log-probabilities, and the training job trains once over them with TRL's loss and its
    # importance-sampling correction between the sampler's log-probabilities and its own.
    rollouts: Literal["trainer", "arrays"] = "trainer"
    # Rollouts from the arrays: the problems of each round, slices of an order of the training set
    # (by the run's seed, a new order each epoch), so no problem twice in an epoch; none: every
    # problem in every round.
    problems_per_round: PositiveInt | None = None
    # Rollouts from the arrays, as DAPO's dynamic sampling: each round samples this many times
    # problems_per_round problems, so that the round still has problems_per_round groups to train on
    # after the score job leaves out those whose samples all got the same reward (no signal).
    oversample: Annotated[float, Ge(1)] = 1.0
    # Rollouts from the arrays, rounds that overlap: 0 (on-policy) samples each round with the policy
    # the round before trained; s > 0 with the one s rounds older, and the driver starts the round's
    # generation beside the training s rounds before it (1: the next round samples while this one trains).
    max_staleness: Annotated[int, Ge(0)] = 0
    # Trainer rollouts: none (TRL's transformers generation, the CPU way), or vLLM on GPUs: server (trl
    # vllm-serve on the job's last node, or on GPUs of its own on a one-node job) or colocate.
    vllm_mode: Literal["server", "colocate"] | None = None
    # GPUs of each node that the vLLM server takes on a one-node job (vllm_mode: server).
    vllm_gpus: Annotated[int, Ge(0)] = 1
    # A step (generation, reward, weight sync, update) that takes longer than this fails the job
    # instead of hanging until the time limit; the retry resumes from the last checkpoint.
    stall_timeout_s: PositiveFloat = 1800.0
    # Train only on problems whose pass rate (correct samples of generate.num_samples, measured
    # just before the iteration) lies in [low, high]; groups that would have zero variance are left out.
    pass_rate_band: tuple[Fraction, Fraction] | None = None
    # Reward hacking: flag an iteration in which a reward's mean rose by more than the margin while
    # held-out accuracy fell by more than it; stop_on_hacking stops the run before the next iteration.
    hacking_margin: Annotated[float, Ge(0)] = 0.02
    stop_on_hacking: bool = False

    def __post_init__(self) -> None:
        if self.pass_rate_band is not None and self.pass_rate_band[0] > self.pass_rate_band[1]:
            raise ValueError(f"grpo.pass_rate_band: the low bound is above the high one ({list(self.pass_rate_band)})")
        if self.max_staleness and self.rollouts != "arrays":
            raise ValueError(f"grpo.max_staleness: {self.max_staleness} overlaps the rounds of grpo.rollouts: arrays; the trainer's"
                             " own rollouts (grpo.rollouts: trainer) are on-policy")
        if self.oversample > 1 and (self.rollouts != "arrays" or self.problems_per_round is None):
            raise ValueError(f"grpo.oversample: {self.oversample:g} samples more than grpo.problems_per_round problems per round of"
                             " grpo.rollouts: arrays; set both, or leave grpo.oversample at 1")

    def sampling(self, generate: GenerateConfig) -> GenerateConfig:
        """How the shards of a round sample (rollouts: arrays): the ``generate`` section's backend and
        shards, with GRPO's samples per problem, temperature and length, and no top-p, which the
        trainer's log-probabilities do not apply."""
        return replace(generate, num_samples=self.num_generations, temperature=self.temperature, top_p=1.0,
                       max_tokens=self.max_completion_length)

    def round_problems(self, num_problems: int, grpo_round: int, seed: int) -> list[int]:
        """The training set's indices that round ``grpo_round`` (0-based, GRPO rounds only) samples:
        a slice of the set's order of the epoch, no problem twice in one epoch (the few that do not
        fill a last round of an epoch wait for the next order)."""
        per_round = self.sampled_per_round(num_problems)
        rounds_per_epoch = num_problems // per_round
        epoch, slot = divmod(grpo_round, rounds_per_epoch)
        order = random.Random(seed + epoch).sample(range(num_problems), num_problems)
        return order[slot * per_round:(slot + 1) * per_round]

    def sampled_per_round(self, num_problems: int) -> int:
        """How many problems a round samples: problems_per_round, oversampled; all of them without it."""
        if self.problems_per_round is None:
            return num_problems
        return min(math.ceil(self.problems_per_round * self.oversample), num_problems)

    def learning_rate(self, grpo_iteration: int) -> float:
        """The learning rate of the ``grpo_iteration``-th GRPO iteration of the run (0-based)."""
        return self.learning_rates[min(grpo_iteration, len(self.learning_rates) - 1)]
