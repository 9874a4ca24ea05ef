"""The ``export`` section: which iteration's model a run exports, and the collapse guard's margin.

With ``export.iteration: best`` the export stage (pipeline/planning/stages.py) is planned when it is
due, from the evaluations in the ledger: the iteration with the highest accuracy on ``data.dev``,
else on ``data.heldout`` (the line then says the held-out figure made the choice, so it flatters
the exported model). The base model counts: an iteration must beat it, or nothing is exported (the
base model is ``model.path`` already) and the line says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jobs.sections import REJECT_UNKNOWN_KEYS, Fraction

# The accuracies a run records per iteration (the eval stage), as lines name them.
ACCURACY = {"dev_accuracy": "dev accuracy", "heldout_accuracy": "held-out accuracy"}


@dataclass
class ExportConfig:
    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    # best: the iteration with the highest accuracy on data.dev (else data.heldout) that beats the
    # base model; last: the last iteration run. A stopped run exports the same way from what it ran.
    iteration: Literal["best", "last"] = "best"
    # The collapse guard (pipeline/loop/hacking.py): an iteration whose accuracy (data.dev, else
    # data.heldout) is below the base model's by more than this (absolute: 0.05 is 5 points) stops
    # the run before the next iteration, and the best iteration so far is exported; null: no guard.
    collapse_margin: Fraction | None = 0.05


@dataclass
class Choice:
    iteration: int  # 0: no iteration beat the base model; nothing is exported
    line: str  # why, for the run's last line, the ledger and status


def choose(how: str, scores: dict[int, float], last: int, metric: str | None) -> Choice:
    """The iteration to export: ``scores`` are the accuracies (``metric``) of the evaluated
    iterations, 0 the base model's; ``last`` is the last iteration trained."""
    base = scores.get(0)
    trained = {i: score for i, score in scores.items() if i}
    best = max(trained, key=lambda i: (trained[i], -i)) if trained else None  # the earliest of a tie
    name = ACCURACY.get(metric or "", "")
    beaten = best is not None and (base is None or trained[best] > base)
    versus = f" (base model {base:.1%})" if base is not None else ""
    nothing_beat = (f"no iteration beat the base model ({name} {base:.1%}; best: iteration {best}, {trained[best]:.1%})"
                    if best is not None and base is not None and not beaten else "")
    if how == "last":
        return Choice(last, f"iteration {last}, the last (export.iteration: last)" + (f"; {nothing_beat}" if nothing_beat else ""))
    if best is None:
        return Choice(last, f"iteration {last}, the last: no evaluation to choose the best on (data.dev or data.heldout)")
    if not beaten:
        return Choice(0, f"{nothing_beat}: nothing exported; the base model (model.path) stays the best")
    held_out = "; chosen on the held-out set (no data.dev), so its figure flatters it" if metric == "heldout_accuracy" else ""
    return Choice(best, f"iteration {best}, the best: {name} {trained[best]:.1%}{versus}{held_out}")
