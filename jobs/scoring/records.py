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


def raw_outputs(record: Any, where: str) -> list[Any]:
    """The candidates' texts of a record that has what every reader needs (a malformed candidate's
    ``raw_output`` as it is: null fails only that candidate); InputError naming ``where`` otherwise."""
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


def score_candidates(rewards: RewardSet, record: dict[str, Any], texts: list[Any], joined: dict[str, Any] | None = None) -> Scores:
    """Every reward on one problem's candidates (a group, as GRPO's K samples of a prompt), with
    each field of the problem as a column, one value per candidate. A candidate without a text
    (``raw_output`` null) gets no score from any reward, counted as each reward's failure; the
    others are scored as if it were not there."""
    fields = problem_fields(record, joined)
    valid = [i for i, text in enumerate(texts) if isinstance(text, str)]
    columns = {key: [value] * len(valid) for key, value in fields.items()}
    scores = rewards.score([record["question"]] * len(valid), [texts[i] for i in valid], **columns)
    if len(valid) == len(texts):
        return scores
    for name in rewards.names:
        rewards.failures[name] += len(texts) - len(valid)
        rewards.first_error.setdefault(name, f"problem {record['id']!r}: a candidate's raw_output is not text")

    def spread(values: list[float | None]) -> list[float | None]:
        full: list[float | None] = [None] * len(texts)
        for i, value in zip(valid, values, strict=True):
            full[i] = value
        return full

    return Scores({name: spread(values) for name, values in scores.by_reward.items()}, spread(scores.totals))
