"""Counts of a filter's outcomes, and every statistic the seed's analytics files and log derive from them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from jobs.scoring.learning_zone import (
    ACTIONS,
    CATEGORIES,
    RATE_BUCKETS,
    categorize,
    rate_bucket,
)


class Analytics:
    """Counts of (K, correct) outcomes and kept samples: every statistic derives from these."""

    def __init__(self, bounds: tuple[float, float, float]) -> None:
        self.bounds = bounds
        self.outcomes: Counter[tuple[int, int]] = Counter()
        self.kept_by_category = dict.fromkeys(CATEGORIES, 0)
        # Problems whose generation failed (the record has an ``error``): not judged, not counted above.
        self.failed = 0
        # Problems none of whose candidates got a verdict (a ground truth the verifier cannot read, no
        # candidates): not counted above either; the first one's id, truth and verifier, to show.
        self.unjudged = 0
        self.first_unjudged: str | None = None
        # Candidates without a text (raw_output null): no verdict, left out of their problem's K.
        self.malformed = 0
        # Judged candidates with no answer to extract (e.g. cut inside <think>).
        self.unextracted = 0
        # Problems by the verifier that judged them (filter.verifier: auto chooses per problem); none with filter.reward.
        self.verifiers: Counter[str] = Counter()

    def add(self, k: int, correct: int, category: str, kept: int) -> None:
        self.outcomes[k, correct] += 1
        self.kept_by_category[category] += kept

    def add_unjudged(self, problem_id: Any, truth: str, verifier: str) -> None:
        self.unjudged += 1
        self.first_unjudged = self.first_unjudged or f"{problem_id!r} (ground truth {truth[:80]!r}, verifier {verifier})"

    def merge(self, other: Analytics) -> None:
        self.outcomes.update(other.outcomes)
        for category, kept in other.kept_by_category.items():
            self.kept_by_category[category] += kept
        self.failed += other.failed
        self.unjudged += other.unjudged
        self.first_unjudged = self.first_unjudged or other.first_unjudged
        self.malformed += other.malformed
        self.unextracted += other.unextracted
        self.verifiers.update(other.verifiers)

    @property
    def problems(self) -> int:
        return sum(self.outcomes.values())

    @property
    def candidates(self) -> int:
        return sum(k * n for (k, _), n in self.outcomes.items())

    @property
    def correct(self) -> int:
        return sum(c * n for (_, c), n in self.outcomes.items())

    @property
    def kept(self) -> int:
        return sum(self.kept_by_category.values())

    @property
    def unextracted_fraction(self) -> float:
        return self.unextracted / self.candidates if self.candidates else 0.0

    @property
    def rate_sum(self) -> float:
        return sum(c / k * n for (k, c), n in self.outcomes.items() if k)

    def _count(self, key: Callable[[int, int], Any]) -> Counter[Any]:
        counts: Counter[Any] = Counter()
        for (k, c), n in self.outcomes.items():
            counts[key(k, c)] += n
        return counts

    @property
    def categories(self) -> Counter[str]:
        return self._count(lambda k, c: categorize(c, k, self.bounds))

    @property
    def histogram(self) -> Counter[int]:
        return self._count(lambda k, c: c)

    @property
    def buckets(self) -> Counter[str]:
        return self._count(lambda k, c: rate_bucket(c, k))

    def share(self, n: int) -> float:
        return n / self.problems if self.problems else 0.0

    def stats(self, strategy: str) -> dict[str, Any]:
        return {
            "strategy": strategy,
            "total_problems": self.problems,
            "total_candidates": self.candidates,
            "total_correct": self.correct,
            "overall_accuracy": self.correct / self.candidates if self.candidates else 0.0,
            "mean_correct_rate": self.rate_sum / self.problems if self.problems else 0.0,
            "coverage": self.share(self.problems - self.categories["too_hard"]),
            "filtered_samples": self.kept,
            "samples_per_category": {c: self.kept_by_category[c] for c in CATEGORIES},
            "problems_per_category": {c: self.categories[c] for c in CATEGORIES},
            "problems_per_verifier": dict(sorted(self.verifiers.items())),
            "unjudged_problems": self.unjudged,
            "malformed_candidates": self.malformed,
            "unextracted_fraction": self.unextracted_fraction,
        }

    def distributions(self, max_k: int) -> dict[str, Any]:
        return {
            "correct_count_histogram": {str(i): self.histogram[i] for i in range(max_k + 1)},
            "correct_rate_buckets": {b: self.buckets[b] for b in RATE_BUCKETS},
        }

    def analytics(self, strategy: str, max_k: int) -> dict[str, Any]:
        return {
            **self.stats(strategy),
            "categories": {c: {"count": self.categories[c], "share": self.share(self.categories[c])} for c in CATEGORIES},
            **self.distributions(max_k),
        }

    def log_text(self, bounds_by_category: dict[str, str], max_k: int) -> str:
        rule = "-" * 70
        stats = self.stats("")
        lines = [
            "=" * 70, "GENERATION ANALYTICS".center(70), "=" * 70, "", "SUMMARY", rule,
            f"  Total problems:        {self.problems}",
            f"  Total candidates:      {self.candidates}",
            f"  Total correct:         {self.correct}",
            f"  Overall accuracy:      {stats['overall_accuracy']:.2%}",
            f"  Mean correct rate:     {stats['mean_correct_rate']:.2%}",
            "", "LEARNING ZONE CATEGORIES", rule,
            f"  {'Category':<18} {'Count':>7}   {'Percentage':>10}    Description",
        ]
        for c in CATEGORIES:
            lines.append(
                f"  {c:<18} {self.categories[c]:>7}   {self.share(self.categories[c]):>10.1%}    "
                f"{bounds_by_category[c]} correct - {ACTIONS[c]}"
            )
        lines += ["", "CORRECT COUNT HISTOGRAM (per problem)", rule]
        peak = max(self.histogram.values(), default=1)
        for i in range(max_k + 1):
            lines.append(f"  {i:>2} correct: {self.histogram[i]:>6} {'█' * round(20 * self.histogram[i] / peak)}")
        return "\n".join(lines) + "\n"
