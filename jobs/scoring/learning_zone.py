"""The seed's learning-zone policy: a problem's category from its correct count, and how many of its
correct candidates each strategy keeps.

Categories are fractions of K (``filter.zone_bounds``), which for K = 16 give the seed's table
exactly: 0 too_hard (skip), 1-3 challenging (keep all), 4-11 learning_zone (keep top_k), 12-14
almost_mastered (keep best 1), 15-16 mastered (skip, or sample best 1).
"""

from __future__ import annotations

import random

from jobs.scoring.config import FilterConfig

CATEGORIES = ("too_hard", "challenging", "learning_zone", "almost_mastered", "mastered")
ACTIONS = {
    "too_hard": "SKIP",
    "challenging": "Keep all",
    "learning_zone": "PRIORITIZE!",
    "almost_mastered": "Downsample",
    "mastered": "Skip/10%",
}
RATE_BUCKETS = ("0%", "1-25%", "26-50%", "51-75%", "76-99%", "100%")

def categorize(correct: int, k: int, bounds: tuple[float, float, float]) -> str:
    if correct == 0:
        return "too_hard"
    rate = correct / k
    for category, bound in zip(CATEGORIES[1:4], bounds, strict=True):
        if rate < bound:
            return category
    return "mastered"


def rate_bucket(correct: int, k: int) -> str:
    if correct == 0:
        return RATE_BUCKETS[0]
    if correct == k:
        return RATE_BUCKETS[5]
    rate = correct / k
    return RATE_BUCKETS[1] if rate <= 0.25 else RATE_BUCKETS[2] if rate <= 0.5 else RATE_BUCKETS[3] if rate <= 0.75 else RATE_BUCKETS[4]


def keep_count(category: str, num_correct: int, config: FilterConfig, problem_id: str, seed: int) -> int:
    """How many of a problem's correct candidates (shortest first) the strategy keeps."""
    strategy = config.strategy
    if strategy == "all":
        return num_correct
    if strategy == "best":
        return 1
    if strategy == "top_k":
        return config.top_k
    if category == "challenging":
        return num_correct
    if category == "learning_zone":
        return config.top_k
    if category == "almost_mastered":
        return 1
    if category == "mastered" and config.include_mastered:
        # Seeded per problem, so the sample does not depend on shard order.
        return int(random.Random(f"{seed}:{problem_id}").random() < config.mastered_sample_rate)
    return 0


def category_ranges(k: int, bounds: tuple[float, float, float]) -> dict[str, str]:
    """The correct counts each category covers at this K, e.g. ``{"learning_zone": "4-11"}``."""
    members: dict[str, list[int]] = {c: [] for c in CATEGORIES}
    for correct in range(k + 1):
        members[categorize(correct, k, bounds)].append(correct)
    return {c: (f"{m[0]}-{m[-1]}" if len(m) > 1 else str(m[0])) if m else "none" for c, m in members.items()}
