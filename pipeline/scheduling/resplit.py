"""Straggler re-split: when most tasks of an array are done and one is far behind, the driver stops it
at an item boundary and splits the rest of its items into new tasks of the stage.

The stage's ledger record remembers each step, so that a driver killed anywhere resumes it:
1. Decide (``stragglers``): once ``min_done_fraction`` of the tasks are done, a running task whose
   ETA (from the progress it reports to its record) is ``eta_ratio`` times the median time of the
   finished ones, with ``min_remaining_items`` left, is recorded as ``splits[<task>] = {state:
   stopping}`` and its job cancelled: SIGTERM stops it after the item it is writing (jobs.runtime).
2. Settle (``Splitter.settle``), on later polls: done anyway -> ``finished``, nothing to split; still
   in flight -> wait; ended -> the stage's ``split`` closes the task on the items it finished (its
   output keeps exactly those, its record is done) and the rest is cut into up to ``max_parts``
   parts, recorded as ``splits[<task>] = {state: split, parts: [[indices], ...]}``. The planner adds
   a task per part (``<task>_split_00`` ...), which the driver submits like any task not yet run.
   Parts are not split again: their items are the slow ones, so they would all look like stragglers.
Every problem is in exactly one output: the stopped task's, for what it finished, or one part's.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from annotated_types import Ge, Gt, Le

from jobs.sections import REJECT_UNKNOWN_KEYS, PositiveInt
from state import Ledger, Status
from state.ledger import now


@dataclass
class Resplit:
    """When the driver stops a straggling task of an array and splits the rest of its items into new
    tasks (pipeline/scheduling/resplit.py): once ``min_done_fraction`` of the tasks are done, a running task whose
    ETA is at least ``eta_ratio`` times the median time of the finished ones, with at least
    ``min_remaining_items`` left, is split into up to ``max_parts`` tasks."""

    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    min_done_fraction: Annotated[float, Gt(0), Le(1)] = 0.5
    eta_ratio: Annotated[float, Gt(1)] = 4.0
    min_remaining_items: PositiveInt = 8
    max_parts: Annotated[int, Ge(2)] = 4
    # How often running tasks report their progress (their ETA) to the ledger.
    progress_every_s: Annotated[float, Gt(0)] = 30.0


SPLITS = "splits"
PART = "_split_"


def split_parts(run_dir: Path | str, stage_key: str) -> dict[str, list[int]]:
    """The tasks that re-splits added to a stage, ``{name: problem indices}``."""
    splits = Ledger(run_dir).read(stage_key).get(SPLITS) or {}
    return {
        f"{task}{PART}{number:02d}": part
        for task, entry in sorted(splits.items()) if entry["state"] == "split"
        for number, part in enumerate(entry["parts"])
    }


def task_seconds(record: dict[str, Any]) -> float | None:
    metrics = record.get("metrics") or {}
    if metrics.get("seconds") is None:
        return None
    return metrics["seconds"] + (metrics.get("server_start_s") or 0.0)


def stragglers(records: dict[str, dict[str, Any]], policy: Resplit) -> dict[str, float]:
    """Running tasks far behind the finished ones: ``{key: ETA in seconds}``."""
    done = [r for r in records.values() if r.get("status") == str(Status.DONE)]
    typical = [s for s in map(task_seconds, done) if s is not None]
    if len(done) < policy.min_done_fraction * len(records) or not typical:
        return {}
    median = statistics.median(typical)
    found = {}
    for key, record in records.items():
        progress = record.get("progress")
        if record.get("status") != str(Status.RUNNING) or not progress:
            continue
        left = progress["total"] - progress["done"]
        eta = left / progress["problems_per_s"] if progress["problems_per_s"] > 0 else float("inf")
        if left >= policy.min_remaining_items and eta >= policy.eta_ratio * median:
            found[key] = eta
    return found


def cut(indices: list[int], parts: int) -> list[list[int]]:
    """``indices`` in up to ``parts`` contiguous runs of near-equal size."""
    parts = max(1, min(parts, len(indices)))
    size, extra = divmod(len(indices), parts)
    runs, start = [], 0
    for number in range(parts):
        end = start + size + (number < extra)
        runs.append(indices[start:end])
        start = end
    return [run for run in runs if run]


class Splitter:
    """The driver's side of re-splitting one stage: ``cancel`` stops a job, ``log`` tells the user.

    The stage record's ``splits`` is read once: the driver running the stage is its only writer."""

    def __init__(self, ledger: Ledger, stage_key: str, policy: Resplit, cancel: Callable[[str], None],
                 log: Callable[[str], None]):
        self.ledger, self.stage_key, self.policy, self.cancel, self.log = ledger, stage_key, policy, cancel, log
        self.splits: dict[str, Any] = ledger.read(stage_key).get(SPLITS) or {}

    def step(self, split: Callable[[str], tuple[list[int], list[int]]], records: dict[str, dict[str, Any]]) -> bool:
        """Settle the stopped stragglers, then stop new ones; True when the stage gained tasks.

        ``split(task_key)`` closes an ended task on what it finished: ``(kept, rest)`` indices."""
        if self.settle(split, records):
            return True
        for key, eta in stragglers(records, self.policy).items():
            name = key.rsplit("/", 1)[1]
            # A part of a straggler's rest is slow by nature (its items are the slow ones): split once.
            if name in self.splits or PART in name:
                continue
            job_id = records[key].get("job_id")
            self._record(name, {"state": "stopping", "job_id": job_id, "eta_s": round(eta), "at": now()})
            self.log(f"{key}: straggler (ETA {eta:.0f} s): stopping job {job_id} to split the rest of its items")
            if job_id:
                self.cancel(job_id)
        return False

    def settle(self, split: Callable[[str], tuple[list[int], list[int]]], records: dict[str, dict[str, Any]]) -> bool:
        changed = False
        for name, entry in list(self.splits.items()):
            key = f"{self.stage_key}/{name}"
            if entry["state"] != "stopping" or key not in records:
                continue
            status = records[key].get("status")
            if status == str(Status.DONE):
                self._record(name, {**entry, "state": "finished"})
            elif status in (str(Status.FAILED), str(Status.PLANNED), None):  # its job has ended
                kept, rest = split(key)
                parts = cut(rest, self.policy.max_parts)
                note = f"stopped as a straggler after {len(kept)} items; {len(rest)} left to {len(parts)} new tasks"
                self.ledger.update(key, {"status": str(Status.DONE), "error": None, "note": note, "ended_at": now(),
                                         "metrics": {"problems": len(kept), "resplit_items": len(rest)}})
                self._record(name, {**entry, "state": "split", "kept": len(kept), "parts": parts})
                self.log(f"{key}: {note}")
                changed = True
        return changed

    def _record(self, name: str, entry: dict[str, Any]) -> None:
        self.splits[name] = entry

        def put(record: dict[str, Any]) -> None:
            record[SPLITS] = {**(record.get(SPLITS) or {}), name: entry}

        self.ledger.update(self.stage_key, mutate=put)
