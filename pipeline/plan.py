"""Where everything of a run lives, and what each stage of each iteration will run.

    runs/<run_name>/
      config.yaml                    resolved config of the run
      ledger/ ledger.lock            the state ledger (state.Ledger)
      data/train.jsonl heldout.jsonl the problems, validated and frozen for the run
      baseline/eval/                 held-out accuracy of the base model ("iteration 0")
      iter_001/generate/shard_00000.jsonl ...
      iter_001/filter/filtered.json (+ _stats, _analytics, _by_category, _no_correct, _analytics.log)
      iter_001/train/model  (adapter, model_card.json)
      iter_001/eval/predictions.jsonl
      submitit/<stage>/<submission>/ job logs
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.generation import evaluate as eval_job
from jobs.generation import generate as generate_job
from jobs.scoring import filtering as filter_job
from jobs.specs import EvalSpec, FilterSpec, GenerateShardSpec, JobTarget, TrainSpec
from jobs.training import sft as train_job
from pipeline.config import Resources, RunConfig

STAGES = ("generate", "filter", "train", "eval")
BASELINE = "baseline"


def iteration_name(iteration: int) -> str:
    return f"iter_{iteration:03d}"


def stage_key(iteration: int, stage: str) -> str:
    return f"{iteration_name(iteration)}/{stage}"


def shard_key(iteration: int, shard: int) -> str:
    return f"{stage_key(iteration, 'generate')}/shard_{shard:05d}"


def shard_ranges(num_problems: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal slices; never an empty shard."""
    num_shards = min(num_shards, num_problems)
    bounds = [round(i * num_problems / num_shards) for i in range(num_shards + 1)]
    return list(itertools.pairwise(bounds))


@dataclass
class Task:
    """One job to run: the ledger record it owns, the function and its spec."""

    key: str
    function: Callable[[Any], dict[str, Any]]
    spec: Any


@dataclass
class StagePlan:
    key: str
    name: str
    tasks: list[Task]
    resources: Resources


class Planner:
    def __init__(self, config: RunConfig, run_dir: Path, num_train: int):
        self.config = config
        self.run_dir = run_dir.resolve()
        self.num_train = num_train

    @property
    def train_problems(self) -> Path:
        return self.run_dir / "data" / "train.jsonl"

    @property
    def heldout_problems(self) -> Path:
        return self.run_dir / "data" / "heldout.jsonl"

    def _target(self, key: str) -> JobTarget:
        return JobTarget(str(self.run_dir), key)

    def model_after(self, iteration: int) -> str:
        """The model that iteration ``iteration`` produced (0: the base model)."""
        if iteration == 0:
            return str(Path(self.config.model.path).resolve())
        return str(self.run_dir / iteration_name(iteration) / "train" / "model")

    def generate(self, iteration: int) -> StagePlan:
        key = stage_key(iteration, "generate")
        tasks = [
            Task(
                shard_key(iteration, index),
                generate_job.run,
                GenerateShardSpec(
                    target=self._target(shard_key(iteration, index)),
                    problems_path=str(self.train_problems),
                    start=start,
                    stop=stop,
                    model_path=self.model_after(iteration - 1),
                    output_path=str(self.shard_output(iteration, index)),
                    generate=self.config.generate,
                    seed=self.config.seed + iteration,
                ),
            )
            for index, (start, stop) in enumerate(shard_ranges(self.num_train, self.config.generate.num_shards))
        ]
        return StagePlan(key, "generate", tasks, self.config.executor.generate)

    def shard_output(self, iteration: int, index: int) -> Path:
        return self.run_dir / iteration_name(iteration) / "generate" / f"shard_{index:05d}.jsonl"

    def filter(self, iteration: int) -> StagePlan:
        key = stage_key(iteration, "filter")
        shards = len(shard_ranges(self.num_train, self.config.generate.num_shards))
        spec = FilterSpec(
            target=self._target(key),
            shard_paths=[str(self.shard_output(iteration, i)) for i in range(shards)],
            num_problems=self.num_train,
            output_dir=str(self.run_dir / iteration_name(iteration) / "filter"),
            filter=self.config.filter,
            num_samples=self.config.generate.num_samples,
            seed=self.config.seed,
        )
        return StagePlan(key, "filter", [Task(key, filter_job.run, spec)], self.config.executor.filter)

    def train(self, iteration: int) -> StagePlan:
        key = stage_key(iteration, "train")
        init = self.model_after(iteration - 1 if self.config.train.init_from == "previous" else 0)
        spec = TrainSpec(
            target=self._target(key),
            data_path=str(self.run_dir / iteration_name(iteration) / "filter" / "filtered.json"),
            init_model=init,
            base_model=self.model_after(0),
            iteration=iteration,
            output_dir=str(self.run_dir / iteration_name(iteration) / "train"),
            learning_rate=self.config.learning_rates[iteration - 1],
            train=self.config.train,
            system_prompt=self.config.generate.system_prompt,
            seed=self.config.seed + iteration,
        )
        return StagePlan(key, "train", [Task(key, train_job.run, spec)], self.config.executor.train)

    def eval(self, iteration: int) -> StagePlan:
        """Held-out accuracy of iteration ``iteration``'s model (0: the base model)."""
        folder = BASELINE if iteration == 0 else iteration_name(iteration)
        key = f"{folder}/eval"
        spec = EvalSpec(
            target=self._target(key),
            problems_path=str(self.heldout_problems),
            model_path=self.model_after(iteration),
            output_dir=str(self.run_dir / folder / "eval"),
            eval=self.config.eval,
            filter=self.config.filter,
            generate=self.config.generate,
            seed=self.config.seed,
        )
        return StagePlan(key, "eval", [Task(key, eval_job.run, spec)], self.config.executor.eval)

    def iteration(self, iteration: int) -> list[StagePlan]:
        stages = [self.generate(iteration), self.filter(iteration), self.train(iteration)]
        if self.config.data.heldout:
            stages.append(self.eval(iteration))
        return stages

    def stages(self) -> list[tuple[int, StagePlan]]:
        """Every stage of the run with its iteration (0: the base model's eval), in running order."""
        stages = [(0, self.eval(0))] if self.config.data.heldout else []
        for iteration in range(1, self.config.num_iterations + 1):
            stages += [(iteration, stage) for stage in self.iteration(iteration)]
        return stages
