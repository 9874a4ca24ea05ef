"""The reward-hacking check: a training reward that rose while held-out correctness fell.

Seed 004's lesson: its format reward reached 1319/1319 while correct answers fell from 301 to 81,
and nobody noticed until the end. After every iteration whose training logged per-reward means
(GRPO's ``rewards/<name>/mean``), each reward's rise over the iteration (the mean of its last
logged quarter against its first) is set beside the change of held-out accuracy (this iteration's
against the previous one's, the base model's for the first): a reward that rose by more than
``grpo.hacking_margin`` while held-out accuracy fell by more than it is flagged, with the numbers.
status.py and report.py show the flags; ``grpo.stop_on_hacking`` stops the run before the next
iteration.

The collapse guard, for every method: an iteration whose accuracy (dev, else held-out) fell below
the base model's by more than ``export.collapse_margin`` stops the run before the next iteration.
A run that stays flat (a control whose samples are kept at random) is within the margin and goes on.
When both stop an iteration, the reason names the hacking check first, then the guard. A stopped run
exports the best iteration so far (``export.iteration``). status.py and report.py show both checks' flags,
those of the last iteration (which stops nothing) too.
"""

from __future__ import annotations

from statistics import fmean
from typing import Any

from pipeline.planning.export import ACCURACY

PREFIX, SUFFIX = "rewards/", "/mean"


class RunStopped(Exception):
    """The reward-hacking check (grpo.stop_on_hacking) or the collapse guard stopped the run; the message
    says why (and is in the run's ledger record)."""

    exit_code = 3


def reward_rise(step_log: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per reward: its mean over the first and over the last quarter of the logged steps."""
    names = [key[len(PREFIX):-len(SUFFIX)] for key in (step_log[0] if step_log else {}) if key.startswith(PREFIX) and key.endswith(SUFFIX)]
    quarter = max(1, len(step_log) // 4)
    out = {}
    for name in names:
        values = [entry[f"{PREFIX}{name}{SUFFIX}"] for entry in step_log if entry.get(f"{PREFIX}{name}{SUFFIX}") is not None]
        if len(values) >= 2:
            out[name] = (fmean(values[:quarter]), fmean(values[-quarter:]))
    return out


def hacking_flags(iterations: list[dict[str, Any]], base_accuracy: float | None, margin: float) -> list[dict[str, Any]]:
    """The iterations in which a reward rose beyond ``margin`` while held-out accuracy fell beyond it."""
    flags = []
    before = base_accuracy
    for entry in iterations:
        after = entry["metrics"].get("heldout_accuracy")
        step_log = (entry["stages"].get("train", {}).get("metrics") or {}).get("step_log") or []
        if before is not None and after is not None and after - before < -margin:
            for name, (first, last) in reward_rise(step_log).items():
                if last - first > margin:
                    flags.append({"iteration": entry["iteration"], "reward": name, "reward_from": first, "reward_to": last,
                                  "heldout_from": before, "heldout_to": after})
        before = after if after is not None else before
    return flags


def describe(flag: dict[str, Any]) -> str:
    return (f"iteration {flag['iteration']}: reward {flag['reward']} rose {flag['reward_from']:.3f} -> {flag['reward_to']:.3f}"
            f" while held-out accuracy fell {flag['heldout_from']:.1%} -> {flag['heldout_to']:.1%}")


def collapse_flags(iterations: list[dict[str, Any]], base_accuracy: float | None, margin: float | None,
                   metric: str | None) -> list[dict[str, Any]]:
    """The iterations whose accuracy (``metric``) is below the base model's by more than ``margin``."""
    if base_accuracy is None or margin is None or metric is None:
        return []
    return [{"iteration": entry["iteration"], "metric": metric, "base": base_accuracy, "accuracy": accuracy, "margin": margin}
            for entry in iterations
            if (accuracy := entry["metrics"].get(metric)) is not None and round(base_accuracy - accuracy, 9) > margin]


def describe_collapse(flag: dict[str, Any]) -> str:
    return (f"iteration {flag['iteration']}: {ACCURACY[flag['metric']]} {flag['accuracy']:.1%}, below the base model's"
            f" {flag['base']:.1%} by more than export.collapse_margin ({flag['margin']:g})")
