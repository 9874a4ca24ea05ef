"""Scoring generations files with a reward list (``python -m jobs.scoring.score_cli``): per candidate each
reward and the weighted total, per problem the group's mean, std and each candidate's advantage,
and a summary per reward.

The group statistics are TRL 1.16 GRPOTrainer's with ``scale_rewards="group"`` (its
``_generate_and_score_completions``): a candidate's total is the weighted sum of the rewards that
scored it (None when none did: left out of the mean and std, advantage 0); mean and std over the
group's scored totals, the std with Bessel's correction (TRL's ``nanstd``; none with fewer than two
scored, 0 for a group of one sample); advantage = (total - mean) / (std + 1e-4). TRL does this in
float32, here it is float64. The summary's std is the same over every candidate (TRL's
``rewards/<name>/std``), and a group has zero variance when its std is 0 (TRL's
``frac_reward_zero_std``, here per reward too).
"""

from __future__ import annotations

import math
import os
import tempfile
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml
from pydantic import TypeAdapter, ValidationError

from jobs.scoring.config import RewardConfig
from jobs.scoring.records import raw_outputs, read_generations, score_candidates
from jobs.scoring.rewards import RewardSet, known_rewards
from jobs.sections import load_yaml
from state import InputError, atomic_write_json

# TRL's GRPOTrainer: advantages = (rewards - mean) / (std + 1e-4).
EPSILON = 1e-4
TOTAL = "total"


def parse_rewards(text: str) -> list[RewardConfig]:
    """``--rewards``: ``name[:weight],...`` (``correctness:2,format:0.5,tag_count``), or a YAML list
    as in a config (``[{name: tag_count, tags: [reasoning, answer]}]``)."""
    if text.lstrip().startswith("["):
        try:
            items = load_yaml(text)
        except yaml.YAMLError as error:
            raise InputError(f"--rewards: not a YAML list ({str(error).splitlines()[0]})") from None
    else:
        items = []
        for part in text.split(","):
            # A user's reward is package.module:function: only a number after the last colon is a weight.
            name, _, weight = part.strip().rpartition(":")
            try:
                items.append({"name": name, "weight": float(weight)})
            except ValueError:
                if name in known_rewards():
                    raise InputError(f"--rewards: {part.strip()!r}: a weight is a number, as in {name}:2 (got {weight!r})") from None
                items.append({"name": part.strip()})
    try:
        return TypeAdapter(list[RewardConfig]).validate_python(items)
    except ValidationError as error:
        first = error.errors()[0]
        entry, *key = first["loc"] or (0,)
        where = f"entry {int(entry) + 1}" + "".join(f", {part}" for part in key)
        raise InputError(f"--rewards: {where}: {first['msg']} (got {first.get('input')!r})") from None


def nanstd(values: Sequence[float]) -> float | None:
    """TRL's ``nanstd`` of the scored values: Bessel-corrected; NaN there, None here, with fewer than two."""
    if len(values) < 2:
        return None
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def group_std(values: Sequence[float], size: int) -> float | None:
    """The std of a group of ``size`` samples with these scored values: 0 for a group of one, as TRL has it."""
    return 0.0 if size == 1 and values else nanstd(values)


@dataclass
class Group:
    """One problem's candidates as GRPO sees them: mean and std of the totals, each advantage."""

    mean: float | None
    std: float | None
    advantages: list[float]


def group_advantages(totals: Sequence[float | None]) -> Group:
    scored = [t for t in totals if t is not None]
    mean = math.fsum(scored) / len(scored) if scored else None
    std = group_std(scored, len(totals))
    if mean is None or std is None:
        return Group(mean, std, [0.0] * len(totals))
    return Group(mean, std, [0.0 if t is None else (t - mean) / (std + EPSILON) for t in totals])


def _zero(std: float | None) -> bool:
    # torch.isclose(std, 0) as TRL tests it; a NaN std is not zero.
    return std is not None and abs(std) <= 1e-8


@dataclass
class Column:
    """Every candidate's value of one reward (or the total), and how many groups had zero variance
    among the groups with candidates (a problem without any is no group GRPO would see)."""

    values: array = field(default_factory=lambda: array("d"))
    groups: int = 0
    zero_variance_groups: int = 0

    def add_group(self, values: Sequence[float | None]) -> None:
        if not values:
            return
        scored = [v for v in values if v is not None]
        self.values.extend(scored)
        self.groups += 1
        self.zero_variance_groups += _zero(group_std(scored, len(values)))

    def summary(self) -> dict[str, Any]:
        values = list(self.values)
        return {
            "mean": math.fsum(values) / len(values) if values else None,
            "std": nanstd(values),
            "zero_variance_groups": self.zero_variance_groups / self.groups if self.groups else 0.0,
        }


@dataclass
class Scored:
    """The outcome of a scoring run: a few rows for the table, the summary per reward and the total."""

    rows: list[dict[str, Any]]
    summary: dict[str, dict[str, Any]]
    problems: int
    candidates: int
    skipped: int


def score_generations(
    paths: Sequence[Path], rewards: RewardSet, output: Path, problems: dict[str, dict[str, Any]] | None = None,
    max_rows: int = 200,
) -> Scored:
    """Score every problem of ``paths`` (fields of ``problems`` joined by id) into ``output``, one
    JSON line per problem, written whole or not at all."""
    columns = {name: Column() for name in [*rewards.names, TOTAL]}
    rows: list[dict[str, Any]] = []
    count = candidates = skipped = 0
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=output.parent, prefix=f".{output.name}.", delete=False) as sink:
        try:
            for path in paths:
                for number, record in read_generations(path):
                    where = f"{path}:{number}"
                    texts = raw_outputs(record, where)
                    if "error" in record:
                        # Its candidates (if any) are incomplete: scoring them would judge a server error.
                        skipped += 1
                        continue
                    joined = None
                    if problems is not None:
                        joined = problems.get(str(record["id"]))
                        if joined is None:
                            raise InputError(f"{where}: problem {record['id']!r} is not in --problems")
                    scores = score_candidates(rewards, record, texts, joined)
                    group = group_advantages(scores.totals)
                    for name, values in scores.by_reward.items():
                        columns[name].add_group(values)
                    columns[TOTAL].add_group(scores.totals)
                    result = [
                        {"index": i, "rewards": {name: values[i] for name, values in scores.by_reward.items()},
                         "total": scores.totals[i], "advantage": group.advantages[i]}
                        for i in range(len(texts))
                    ]
                    sink.write(orjson.dumps({"id": record["id"], "mean": group.mean, "std": group.std, "candidates": result}) + b"\n")
                    rows += [{"id": record["id"], **r} for r in result[: max(0, max_rows - len(rows))]]
                    count += 1
                    candidates += len(texts)
            sink.close()
            os.replace(sink.name, output)
        except BaseException:
            os.unlink(sink.name)
            raise
    failures = rewards.failure_report()
    summary = {name: {**column.summary(), **failures.get(name, {})} for name, column in columns.items()}
    # The total has no score where no reward scored the candidate (TRL's unscorable completions).
    summary[TOTAL]["failed"] = candidates - len(columns[TOTAL].values)
    scored = Scored(rows, summary, count, candidates, skipped)
    atomic_write_json(summary_path(output), {"problems": count, "candidates": candidates, "skipped": skipped, "rewards": summary})
    return scored


def summary_path(output: Path) -> Path:
    """Where the summary of ``output`` goes: ``scored.jsonl`` -> ``scored_summary.json``."""
    return output.with_name(f"{output.with_suffix('').name}_summary.json")
