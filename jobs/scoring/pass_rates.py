"""Problems by pass rate: a GRPO iteration's ``grpo.pass_rate_band`` keeps the problems whose share of
correct samples (``filtered_pass_rates.jsonl``, written by the filter just before) lies in the band.

A problem every sample solves, or none does, gives GRPO a group whose rewards all agree: zero
variance, zero advantage, nothing learned from it (TRL has no filter for these across rounds,
trl#3708). Leaving them out before training spends the rollouts on problems that teach.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.problems.data import read_jsonl


def select_problems(problems: list[dict[str, Any]], pass_rates: Path, band: tuple[float, float]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The problems whose pass rate lies in ``band`` (bounds included), and what was left out and why."""
    low, high = band
    rates = {r["id"]: r for r in read_jsonl(pass_rates)}
    selected = []
    counts = {"below_band": 0, "above_band": 0, "no_pass_rate": 0, "unjudged": 0}
    for problem in problems:
        rate = rates.get(problem["id"])
        if rate is not None and rate.get("unjudged"):
            counts["unjudged"] += 1  # no candidate could be judged (a ground truth the verifier cannot read)
            continue
        if rate is None or rate.get("failed") or not rate.get("candidates"):
            counts["no_pass_rate"] += 1  # its generation failed: no rate to judge it by
            continue
        share = rate["correct"] / rate["candidates"]
        if share < low:
            counts["below_band"] += 1
        elif share > high:
            counts["above_band"] += 1
        else:
            selected.append(problem)
    return selected, {"band": [low, high], "selected": len(selected), "problems": len(problems), **counts}
