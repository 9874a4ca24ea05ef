"""What a run runs, as data: a stage of one iteration (``StagePlan``), each a list of tasks (ledger
record, job function, spec), and what stage builders read of the run (``RunContext``).

A stage is data: the driver, the detached chain, status, report and requeue read these fields
and never branch on a stage's name.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from jobs.specs import JobTarget
from pipeline.config import RunConfig
from pipeline.layout import BASELINE, RunLayout
from pipeline.scheduling.executors import Resources
from pipeline.scheduling.resplit import Resplit


class StageFailed(Exception):
    """A stage's tasks (or a service it needs) failed ``executor.max_attempts`` times; the message says which and why."""


def shard_ranges(num_problems: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal slices; never an empty shard."""
    num_shards = min(num_shards, num_problems)
    bounds = [round(i * num_problems / num_shards) for i in range(num_shards + 1)]
    return list(itertools.pairwise(bounds))


class Task:
    """One job to run: the ledger record it owns, the function and its spec. The spec may come as
    ``build``, which makes it when it is first read: status and the driver's polls plan a
    10,000-shard stage for its tasks' keys, and only a submission reads their specs."""

    __slots__ = ("_build", "_spec", "function", "key")

    def __init__(self, key: str, function: Callable[[Any], dict[str, Any]], spec: Any = None, build: Callable[[], Any] | None = None):
        self.key, self.function, self._spec, self._build = key, function, spec, build

    @property
    def spec(self) -> Any:
        if self._build is not None:
            self._spec, self._build = self._build(), None
        return self._spec


@dataclass
class StagePlan:
    """One stage of one iteration, as its recipe describes it."""

    key: str  # its ledger record, "iter_001/generate"
    name: str  # its kind, "generate": its column in status tables and its resources section
    iteration: int  # 0: the base model's evaluation
    tasks: list[Task]
    resources: Resources
    # In a detached chain: afterok waits for the stage before it to succeed; afterany starts however
    # it ended, and first resubmits what failed of it (pipeline/loop/detach.py).
    after: Literal["afterok", "afterany"] = "afterok"
    # Services of the run (config ``services``) that must serve while it runs.
    services: tuple[str, ...] = ()
    # An array stage's record sums up its tasks: its metrics from theirs.
    totals: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None
    # Metrics of its record that are the iteration's (status tables, report).
    reports: tuple[str, ...] = ()
    # Stragglers of its tasks may be stopped and the rest of their items split (pipeline/scheduling/resplit.py):
    # ``split(task key)`` closes a stopped task on what it finished: (kept, rest) item indices.
    resplit: Resplit | None = None
    split: Callable[[str], tuple[list[int], list[int]]] | None = None
    # Its tasks depend on how the stages before it ended (the export of the best iteration): the
    # driver plans it again when it is due, and a detached chain ends before it.
    planned_when_due: bool = False
    # The key of an earlier stage beside which the driver starts it, instead of after the stages
    # before it (a GRPO round's generation with grpo.max_staleness, beside an older round's training).
    starts_beside: str | None = None
    # The config key that bounds its completions' length (a generating stage's): what to raise when
    # too many are cut (pipeline/loop/summary.py run_warnings).
    length_key: str = ""
    # For --dry-run: what it submits and where it writes.
    jobs_text: str = "1"
    writes: str = ""
    detail: str = ""

    @property
    def is_array(self) -> bool:
        """A one-job stage's record is its job's record; an array stage's record sums up its tasks."""
        return [t.key for t in self.tasks] != [self.key]

    @property
    def label(self) -> str:
        return f"iteration {self.iteration}: {self.name}" if self.iteration else f"{BASELINE}: {self.name} of the base model"


class RunContext:
    """What stage builders read of a run: its config, its layout, the size of its training set."""

    def __init__(self, config: RunConfig, run_dir: Path, num_train: int | None = None):
        self.config = config
        self.layout = RunLayout(run_dir)
        self.run_dir = self.layout.run_dir
        self._num_train = num_train

    @cached_property
    def num_train(self) -> int:
        """Problems in the run's frozen training set (counted from the file when not given)."""
        if self._num_train is not None:
            return self._num_train
        with open(self.layout.train_problems, "rb") as f:
            return sum(1 for line in f if line.strip())

    def target(self, key: str) -> JobTarget:
        return JobTarget(str(self.run_dir), key)

    def model_after(self, iteration: int) -> str:
        """The model that iteration ``iteration`` produced (0: the base model)."""
        if iteration == 0:
            return str(Path(self.config.model.path).resolve())
        return str(self.layout.trained_model(iteration))
