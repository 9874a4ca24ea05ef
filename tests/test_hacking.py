"""The reward-hacking check on the numbers seed 004 reports: format up, correct answers down."""

from __future__ import annotations

import pytest

from pipeline.loop.hacking import (
    collapse_flags,
    describe,
    describe_collapse,
    hacking_flags,
    reward_rise,
)

pytestmark = pytest.mark.unit


def iteration(number: int, heldout: float | None, format_means: list[float], correctness_means: list[float]) -> dict:
    step_log = [{"step": 5 * (i + 1), "rewards/format/mean": f, "rewards/correctness/mean": c}
                for i, (f, c) in enumerate(zip(format_means, correctness_means, strict=True))]
    return {"iteration": number, "metrics": {"heldout_accuracy": heldout}, "stages": {"train": {"metrics": {"step_log": step_log}}}}


def test_a_reward_that_rose_while_heldout_accuracy_fell_is_flagged_with_its_numbers() -> None:
    # Seed 004's Qwen Colab run: format 4/1319 -> 1319/1319 while correct answers fell 301 -> 81 of 1319.
    iterations = [iteration(1, 81 / 1319, [0.0, 0.1, 0.6, 1.0], [0.2, 0.2, 0.1, 0.06])]
    (flag,) = hacking_flags(iterations, 301 / 1319, margin=0.02)
    assert (flag["iteration"], flag["reward"]) == (1, "format")
    assert (flag["reward_from"], flag["reward_to"]) == (0.0, 1.0)
    assert describe(flag) == "iteration 1: reward format rose 0.000 -> 1.000 while held-out accuracy fell 22.8% -> 6.1%"


def test_rewards_that_rose_with_heldout_accuracy_or_within_the_margin_are_not_flagged() -> None:
    learning = iteration(1, 0.30, [0.0, 0.5, 0.9, 1.0], [0.1, 0.2, 0.3, 0.4])
    assert hacking_flags([learning], 0.11, margin=0.02) == [], "held-out accuracy rose: learning, not hacking"
    wobble = iteration(2, 0.29, [0.50, 0.50, 0.51, 0.51], [0.4, 0.4, 0.4, 0.4])
    assert hacking_flags([learning, wobble], 0.11, margin=0.02) == [], "a 1-point dip and a 0.01 rise are noise"
    fell = iteration(2, 0.20, [0.50, 0.60, 0.90, 0.95], [0.4, 0.4, 0.4, 0.4])
    assert [f["iteration"] for f in hacking_flags([learning, fell], 0.11, margin=0.02)] == [2], "compared with iteration 1"


def test_iterations_without_reward_logs_or_heldout_accuracy_are_not_judged() -> None:
    rest = {"iteration": 1, "metrics": {"heldout_accuracy": 0.05}, "stages": {"train": {"metrics": {"step_log": [{"step": 10, "loss": 1.0}]}}}}
    assert reward_rise(rest["stages"]["train"]["metrics"]["step_log"]) == {}
    assert hacking_flags([rest], 0.3, margin=0.02) == []
    no_eval = iteration(1, None, [0.0, 1.0], [0.0, 0.0])
    assert hacking_flags([no_eval], 0.3, margin=0.02) == []


def test_collapse_is_a_fall_below_the_base_model_by_more_than_the_margin() -> None:
    iterations = [{"iteration": i, "metrics": {"heldout_accuracy": a}} for i, a in ((1, 0.15), (2, 0.149), (3, None))]
    flags = collapse_flags(iterations, 0.20, 0.05, "heldout_accuracy")
    assert [f["iteration"] for f in flags] == [2], "5 points down is within the margin; 5.1 is not"
    assert describe_collapse(flags[0]) == ("iteration 2: held-out accuracy 14.9%, below the base model's 20.0% by more than"
                                           " export.collapse_margin (0.05)")
    assert collapse_flags(iterations, 0.20, None, "heldout_accuracy") == [], "null: no guard"
