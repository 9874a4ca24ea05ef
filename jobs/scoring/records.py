"""generations.jsonl records (the seed's format, and our shards'): reading them, and scoring their
candidates with rewards, the problem's fields as the rewards' columns.

A record is ``{"id", "question", "ground_truth", "candidates": [{"raw_output": ...}, ...], ...}``;
our shards also carry every other field of the problem (task_type, duration, references, media ...).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from jobs.scoring.rewards import RewardSet, Scores
from state import InputError

READ_BUFFER = 1 << 20
# Keys of a record that are not fields of its problem.
RECORD_KEYS = ("ground_truth", "candidates", "num_candidates", "error")


def read_generations(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for every line of a shard, in order."""
    # A large buffer: lines of K candidates are tens of KB, and the default 8 KB buffer makes
    # splitting them cost more than parsing them.
    with open(path, "rb", buffering=READ_BUFFER) as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                raise InputError(f"{path}:{number}: truncated last line (the shard was cut mid-write)")
            if not line.isspace():
                try:
                    yield number, orjson.loads(line)
                except orjson.JSONDecodeError as error:
                    raise InputError(f"{path}:{number}: malformed JSON ({error})") from None


def raw_outputs(record: Any, where: str) -> list[str]:
    """The candidates' texts of a record that has what every reader needs; InputError naming ``where`` otherwise."""
    try:
        record["id"], record["question"], record["ground_truth"]
        return [candidate["raw_output"] for candidate in record["candidates"]]
    except (KeyError, TypeError) as error:
        raise InputError(f"{where}: not a generations.jsonl record (missing {error})") from None


def problem_fields(record: dict[str, Any], joined: dict[str, Any] | None = None) -> dict[str, Any]:
    """The problem's fields: ``joined`` (from a problems file) overlaid with the record's own, the
    ground truth as ``answer`` (as in a problems file)."""
    fields = {**(joined or {}), **{k: v for k, v in record.items() if k not in RECORD_KEYS}}
    fields["answer"] = record["ground_truth"]
    return fields


def score_candidates(rewards: RewardSet, record: dict[str, Any], texts: list[str], joined: dict[str, Any] | None = None) -> Scores:
    """Every reward on one problem's candidates (a group, as GRPO's K samples of a prompt), with
    each field of the problem as a column, one value per candidate."""
    fields = problem_fields(record, joined)
    columns = {key: [value] * len(texts) for key, value in fields.items()}
    return rewards.score([record["question"]] * len(texts), texts, **columns)
