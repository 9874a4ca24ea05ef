"""Filter job: merge the generation shards, verify every candidate, keep an SFT set.

Strategies are the seed's: ``learning_zone`` (recommended), ``all``, ``best`` and ``top_k``. The
learning-zone categories are fractions of K (``filter.zone_bounds``), which for K = 16 give the
seed's table exactly: 0 too_hard (skip), 1-3 challenging (keep all), 4-11 learning_zone (keep
top_k), 12-14 almost_mastered (keep best 1), 15-16 mastered (skip, or sample best 1).

Shards are read as streams, one problem at a time; outputs are written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jobs.answers import Verifier, extract, get_verifier
from jobs.runtime import reporting
from jobs.specs import MEDIA_FIELDS, FilterConfig, FilterSpec
from state import InputError, atomic_write_bytes, atomic_write_json

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


def read_generations(paths: list[Path]) -> Iterator[dict[str, Any]]:
    for path in paths:
        with open(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if not line.endswith(b"\n"):
                    raise InputError(f"{path}:{number}: truncated last line (the shard was cut mid-write)")
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as error:
                        raise InputError(f"{path}:{number}: malformed JSON ({error.msg})") from None


class Analytics:
    def __init__(self) -> None:
        self.problems = self.candidates = self.correct = self.kept = 0
        self.rate_sum = 0.0
        self.categories: Counter[str] = Counter()
        self.kept_by_category: Counter[str] = Counter()
        self.histogram: Counter[int] = Counter()
        self.buckets: Counter[str] = Counter()
        self.by_category: dict[str, list[str]] = {c: [] for c in CATEGORIES}

    def add(self, problem_id: str, k: int, correct: int, category: str, kept: int) -> None:
        self.problems += 1
        self.candidates += k
        self.correct += correct
        self.kept += kept
        self.rate_sum += correct / k if k else 0.0
        self.categories[category] += 1
        self.kept_by_category[category] += kept
        self.histogram[correct] += 1
        self.buckets[rate_bucket(correct, k)] += 1
        self.by_category[category].append(problem_id)

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
        }

    def analytics(self, strategy: str, max_k: int) -> dict[str, Any]:
        return {
            **self.stats(strategy),
            "categories": {c: {"count": self.categories[c], "share": self.share(self.categories[c])} for c in CATEGORIES},
            "correct_count_histogram": {str(i): self.histogram[i] for i in range(max_k + 1)},
            "correct_rate_buckets": {b: self.buckets[b] for b in RATE_BUCKETS},
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


def category_ranges(k: int, bounds: tuple[float, float, float]) -> dict[str, str]:
    """The correct counts each category covers at this K, e.g. ``{"learning_zone": "4-11"}``."""
    members: dict[str, list[int]] = {c: [] for c in CATEGORIES}
    for correct in range(k + 1):
        members[categorize(correct, k, bounds)].append(correct)
    return {c: (f"{m[0]}-{m[-1]}" if len(m) > 1 else str(m[0])) if m else "none" for c, m in members.items()}


def filter_generations(
    paths: list[Path], output: Path, config: FilterConfig, seed: int, num_samples: int, expected: int | None = None
) -> dict[str, Any]:
    """Stream ``paths`` into ``output`` (filtered.json) and its sibling analytics files."""
    verifier: Verifier = get_verifier(config.verifier)
    analytics = Analytics()
    seen: dict[str, Path] = {}
    no_correct: list[str] = []
    max_k = num_samples
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    first = True
    with open(tmp, "w", encoding="utf-8") as sink:
        sink.write("[")
        for record in _with_source(paths, seen):
            pid = record["id"]
            candidates = record["candidates"]
            k = len(candidates)
            max_k = max(max_k, k)
            truth = record["ground_truth"]
            correct = []
            for candidate in candidates:
                extracted = extract(candidate["raw_output"], config.answer_pattern)
                if verifier(extracted.answer_prediction, truth):
                    correct.append((candidate["raw_output"], extracted))
            if config.dedupe:
                correct = list({raw: (raw, e) for raw, e in correct}.values())
            correct.sort(key=lambda item: len(item[0]))
            category = categorize(len(correct), k, config.zone_bounds) if k else "too_hard"
            kept = correct[: keep_count(category, len(correct), config, pid, seed)]
            analytics.add(pid, k, len(correct), category, len(kept))
            if not correct:
                no_correct.append(pid)
            for index, (raw, extracted) in enumerate(kept):
                sample = {"id": f"{pid}_sol{index}", "original_id": pid}
                sample.update({f: record[f] for f in MEDIA_FIELDS if f in record})
                sample.update(
                    question=record["question"], answer=truth, response=raw,
                    thinking_prediction=extracted.thinking_prediction,
                    answer_prediction=extracted.answer_prediction, category=category,
                )
                sink.write(("\n" if first else ",\n") + json.dumps(sample, ensure_ascii=False))
                first = False
        sink.write("\n]\n")
    if expected is not None and analytics.problems != expected:
        tmp.unlink()
        raise InputError(f"the shards hold {analytics.problems} problems, expected {expected}")
    os.replace(tmp, output)

    stem = output.with_suffix("")
    ranges = category_ranges(max_k, config.zone_bounds)
    atomic_write_json(Path(f"{stem}_stats.json"), analytics.stats(config.strategy))
    atomic_write_json(Path(f"{stem}_analytics.json"), {**analytics.analytics(config.strategy, max_k), "category_ranges": ranges})
    atomic_write_json(Path(f"{stem}_by_category.json"), analytics.by_category)
    atomic_write_json(Path(f"{stem}_no_correct.json"), no_correct)
    log_text = analytics.log_text(ranges, max_k)
    atomic_write_bytes(Path(f"{stem}_analytics.log"), log_text.encode())
    print(log_text, flush=True)
    stats = analytics.stats(config.strategy)
    stats["categories"] = {c: analytics.share(analytics.categories[c]) for c in CATEGORIES}
    return stats


def _with_source(paths: list[Path], seen: dict[str, Path]) -> Iterator[dict[str, Any]]:
    """Records of every shard, refusing an id that two shards (or one twice) hold."""
    for path in paths:
        for record in read_generations([path]):
            if record["id"] in seen:
                raise InputError(f"{path}: duplicate problem id {record['id']!r} (also in {seen[record['id']]})")
            seen[record["id"]] = path
            yield record


def run(spec: FilterSpec) -> dict[str, Any]:
    with reporting(spec.target) as metrics:
        metrics.update(
            filter_generations(
                [Path(p) for p in spec.shard_paths], Path(spec.output_dir) / "filtered.json",
                spec.filter, spec.seed, spec.num_samples, spec.num_problems,
            )
        )
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Re-filter generations without regenerating (also the seed's own generations.jsonl)."""
    parser = argparse.ArgumentParser(prog="python -m jobs.filter", description=main.__doc__)
    parser.add_argument("--generations", nargs="+", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path, help="filtered.json to write")
    parser.add_argument("--strategy", default=FilterConfig.strategy, choices=["learning_zone", "all", "best", "top_k"])
    parser.add_argument("--verifier", default=FilterConfig.verifier)
    parser.add_argument("--top-k", type=int, default=FilterConfig.top_k)
    parser.add_argument("--include-mastered", action="store_true")
    parser.add_argument("--mastered-sample-rate", type=float, default=FilterConfig.mastered_sample_rate)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num-samples", type=int, default=16, help="K, for the histogram's range")
    args = parser.parse_args(argv)
    config = FilterConfig(
        strategy=args.strategy, top_k=args.top_k, verifier=args.verifier,
        include_mastered=args.include_mastered, mastered_sample_rate=args.mastered_sample_rate,
    )
    try:
        get_verifier(config.verifier)
        for path in args.generations:
            if not path.is_file():
                raise InputError(f"{path}: file not found")
        filter_generations(args.generations, args.output, config, args.seed, args.num_samples)
    except (InputError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
