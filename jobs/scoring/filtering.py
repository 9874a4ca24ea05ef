"""Filter job: merge the generation shards, judge every candidate, keep an SFT set, and record each
problem's pass rate (``filtered_pass_rates.jsonl``: id, candidates, correct, and the verifier that
judged it; a GRPO iteration's pass-rate band selects its problems by it).

What is kept follows the seed's strategies (jobs.scoring.learning_zone); what is counted, its
analytics (jobs.scoring.analytics). A candidate is correct when the verifier accepts its answer,
or, with ``filter.reward``, when its weighted reward total reaches the threshold (the verifier is
then not asked; kept samples carry their ``reward`` and per-reward ``rewards``, the highest totals
kept first). With ``filter.category_weights`` each kept sample carries its category's ``weight``.
A candidate without a verdict (the verifier cannot read the ground truth, no reward scored it, its
``raw_output`` is null) is left out of its problem's K; a problem with none judged is left out
(``{"id", "unjudged": true}`` in the pass rates) and counted (``unjudged_problems``), as TRL leaves
out samples whose gold answer does not parse. What a user must know (unjudged problems, candidates
without a text, more than ``filter.warn_unextracted`` of the answers not extracted) is printed,
written to analytics.log and kept in the metrics' ``warnings``.

Shards are read as streams, one problem at a time, by one worker process per CPU the job has
(shards are independent; each worker writes its shard's kept samples and ids to files of its
own, which are then joined in shard order, so the output does not depend on the worker count).
A worker's memory holds one problem's candidates, the counters, two bounded caches (answers and
verdicts, a few MB) and 16 bytes per problem for the duplicate-id check (16 MB per million
problems); the per-category id lists go to files. Every output is written into a staging folder
and renamed into place only when all of them are complete, so readers never see a half-written
or mixed set.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import random
import shutil
import signal
import tempfile
import time
from array import array
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from jobs.problems.data import MEDIA_FIELDS
from jobs.runtime import reporting
from jobs.scoring.analytics import Analytics
from jobs.scoring.answers import (
    THINK_CLOSE,
    answer_from,
    answer_part,
    answer_rules,
    split_thinking,
)
from jobs.scoring.config import FilterConfig
from jobs.scoring.learning_zone import (
    CATEGORIES,
    categorize,
    category_ranges,
    keep_count,
)
from jobs.scoring.records import raw_outputs, read_generations, score_candidates
from jobs.scoring.rewards import RewardContext, RewardSet
from jobs.scoring.verifiers import get_verifier, verifier_for
from jobs.specs import FilterSpec, ServiceRef
from state import InputError

WRITE_BUFFER = 1 << 20
_UNSEEN = object()


@dataclass
class Verdicts:
    """One problem's candidates as judged."""

    # (length, candidate index, extracted answer) of the correct ones, in the order they are kept.
    correct: list[tuple[int, int, str]] = field(default_factory=list)
    judged: list[int] = field(default_factory=list)  # the candidates with a verdict: the problem's K
    unextracted: int = 0  # judged candidates with no answer to extract
    malformed: int = 0  # candidates without a text (raw_output null)


def truth_as_text(truth: Any) -> str:
    """A ground truth as the verifiers take it: a data set's numeric truths (72, not "72") as their JSON text."""
    return truth if isinstance(truth, str) else json.dumps(truth)


class Judge:
    """Extraction and verification of candidates: each distinct answer ending is extracted once,
    each distinct (answer, truth) pair verified once (verifiers are pure).

    Answer lines ("ANSWER: (B) Piano", "#### 42") repeat within a problem's K candidates and
    across problems, so the cost per candidate is mostly two dictionary lookups. The memos are
    emptied when full, which bounds their memory to a few MB.
    """

    # Longer texts (a response without </think> is all ending; a truth may be a whole worked
    # solution) rarely repeat: not remembered.
    MAX_REMEMBERED = 512
    MEMO_SIZE = 8192

    def __init__(self, answer_pattern: str | list[str], verifier: str) -> None:
        rules = answer_rules(answer_pattern)
        self.extract = lambda ending: answer_from(answer_part(ending), rules)
        self.verify = get_verifier(verifier)
        self.answers: dict[str, str] = {}
        self.verdicts: dict[tuple[str, str], bool | None] = {}

    def answer(self, raw: str) -> str:
        """The answer extracted from a candidate."""
        # The answer depends only on what follows the reasoning: look it up by that, without
        # copying the reasoning (this runs for every candidate).
        end = raw.rfind(THINK_CLOSE)
        ending = raw[end:] if end >= 0 else raw
        answer = self.answers.get(ending)
        if answer is None:
            answer = self._remember(self.answers, ending, self.extract(ending), len(ending))
        return answer

    def judge(self, raw_outputs: list[Any], truth: str) -> Verdicts:
        """The verifier's verdicts; the correct candidates shortest first."""
        verdicts, result = self.verdicts, Verdicts()
        for index, raw in enumerate(raw_outputs):
            if not isinstance(raw, str):
                result.malformed += 1
                continue
            answer = self.answer(raw)
            pair = (answer, truth)
            ok = verdicts.get(pair, _UNSEEN)
            if ok is _UNSEEN:
                verdict = self.verify(answer, truth)
                ok = self._remember(verdicts, pair, None if verdict is None else bool(verdict), len(answer) + len(truth))
            if ok is None:
                continue
            result.judged.append(index)
            result.unextracted += not answer
            if ok:
                result.correct.append((len(raw), index, answer))
        result.correct.sort()  # by length, then in candidate order
        return result

    def by_rewards(self, raw_outputs: list[Any], totals: list[float | None], threshold: float) -> Verdicts:
        """Correct when the reward total reaches ``threshold``: the highest totals first, among equal
        ones the shortest, then in candidate order; unscored candidates have no verdict."""
        scored = {i: total for i, total in enumerate(totals) if total is not None}
        passed = sorted((i for i, total in scored.items() if total >= threshold), key=lambda i: (-scored[i], len(raw_outputs[i]), i))
        return Verdicts(
            correct=[(len(raw_outputs[i]), i, self.answer(raw_outputs[i])) for i in passed],
            judged=list(scored),
            unextracted=sum(not self.answer(raw_outputs[i]) for i in scored),
            malformed=sum(not isinstance(raw, str) for raw in raw_outputs),
        )

    def _remember(self, memo: dict[Any, Any], key: Any, value: Any, size: int) -> Any:
        if size <= self.MAX_REMEMBERED:
            if len(memo) >= self.MEMO_SIZE:
                memo.clear()
            memo[key] = value
        return value


class ProblemIds:
    """Where each problem id was read, in 16 bytes (id hash, shard, line) instead of the id itself.

    Equal hashes are confirmed by reading both ids back: a hash collision is not a duplicate.
    Workers are forked, so that their str hashes agree with each other's.
    """

    def __init__(self) -> None:
        self.hashes, self.shards, self.lines = array("q"), array("I"), array("I")

    def add(self, problem_id: Any, shard: int, line: int) -> None:
        self.hashes.append(hash(problem_id))
        self.shards.append(shard)
        self.lines.append(line)

    def extend(self, other: ProblemIds) -> None:
        self.hashes.extend(other.hashes)
        self.shards.extend(other.shards)
        self.lines.extend(other.lines)

    def first_duplicate(self, paths: Sequence[Path]) -> str | None:
        import numpy as np  # here, not at the top: a filter job's start-up is ~0.1 s faster

        hashes = np.frombuffer(self.hashes, dtype=np.int64)
        order = np.argsort(hashes, kind="stable")
        ordered = hashes[order]
        positions = np.flatnonzero(ordered[1:] == ordered[:-1])
        # Report the duplicate met first in reading order, as a check while reading would have.
        for position in positions[np.argsort(order[positions + 1], kind="stable")]:
            first, second = int(order[position]), int(order[position + 1])
            where = [(paths[self.shards[i]], self.lines[i]) for i in (first, second)]
            problem_id = _id_at(*where[0])
            if problem_id == _id_at(*where[1]):
                return f"duplicate problem id {problem_id!r}: {where[0][0]}:{where[0][1]} and {where[1][0]}:{where[1][1]}"
        return None


def _id_at(path: Path, line: int) -> Any:
    with open(path, "rb") as f:
        return orjson.loads(next(itertools.islice(f, line - 1, None)))["id"]


class CategoryIds:
    """Problem ids by category, appended to files in ``folder`` a batch at a time, never all held."""

    BATCH = 4096

    def __init__(self, folder: Path) -> None:
        self.paths = {c: folder / f"{c}.ids" for c in CATEGORIES}
        self.pending: dict[str, list[bytes]] = {c: [] for c in CATEGORIES}
        for path in self.paths.values():
            path.touch()

    def add(self, category: str, problem_id: Any) -> None:
        pending = self.pending[category]
        pending.append(orjson.dumps(problem_id) + b"\n")
        if len(pending) >= self.BATCH:
            self.flush(category)

    def flush(self, category: str) -> None:
        with open(self.paths[category], "ab") as f:
            f.writelines(self.pending[category])
        self.pending[category].clear()

    def append(self, other: CategoryIds) -> None:
        """Add ``other``'s ids after these (a later shard's)."""
        for category in CATEGORIES:
            self.flush(category)
            other.flush(category)
            with open(self.paths[category], "ab") as sink, open(other.paths[category], "rb") as source:
                shutil.copyfileobj(source, sink)

    def write_list(self, sink: BinaryIO, category: str) -> None:
        """The category's ids as a JSON list, one id a line."""
        self.flush(category)
        separator = b"\n"
        sink.write(b"[")
        with open(self.paths[category], "rb") as ids:
            for line in ids:
                sink.write(separator + line.rstrip(b"\n"))
                separator = b",\n"
        sink.write(b"\n]")

    def write_by_category(self, sink: BinaryIO) -> None:
        separator = b"{\n"
        for category in CATEGORIES:
            sink.write(separator + orjson.dumps(category) + b": ")
            self.write_list(sink, category)
            separator = b",\n"
        sink.write(b"\n}\n")


def available_cpus() -> int:
    """The CPUs this job may use: SLURM's allocation inside a job, else the process's affinity."""
    return int(os.environ.get("SLURM_CPUS_PER_TASK") or len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class ShardJob:
    """What a worker needs to filter shard ``shard`` of ``paths`` into ``staging``."""

    paths: Sequence[Path]
    shard: int
    staging: Path
    config: FilterConfig
    seed: int
    num_samples: int
    # The run's services, for rewards that call one (filter.reward).
    services: dict[str, ServiceRef]


@dataclass
class ShardFiltered:
    """A worker's result for one shard; its kept samples and ids are in files under ``folder``."""

    folder: Path
    analytics: Analytics
    max_k: int
    seen: ProblemIds
    ids: CategoryIds
    # filter.reward: per reward, the samples it could not score and its first error.
    reward_failures: dict[str, dict[str, Any]]

    @property
    def kept(self) -> Path:
        return self.folder / "kept"

    @property
    def pass_rates(self) -> Path:
        return self.folder / "pass_rates"


def _reward_set(config: FilterConfig, services: dict[str, ServiceRef]) -> RewardSet | None:
    """filter.reward's rewards, bound to the run's verifier, answer pattern and services."""
    if config.reward is None:
        return None
    return RewardSet(config.reward.rewards, RewardContext(config.verifier, config.answer_pattern, services))


def _filter_shard(job: ShardJob) -> ShardFiltered:
    """One shard into ``<staging>/shard_N/``: its kept samples (``a,\nb``, no brackets) and id files."""
    folder = job.staging / f"shard_{job.shard:05d}"
    folder.mkdir()
    ids = CategoryIds(folder)
    # Each worker its own: rewards keep per-process state (counts of failures, a loaded model).
    rewards = _reward_set(job.config, job.services)
    with open(folder / "kept", "wb", buffering=WRITE_BUFFER) as sink, open(folder / "pass_rates", "wb", buffering=WRITE_BUFFER) as rates:
        analytics, max_k, seen = _filter_into(sink, rates, job, ids, rewards)
    for category in CATEGORIES:
        ids.flush(category)
    return ShardFiltered(folder, analytics, max_k, seen, ids, rewards.failure_report() if rewards else {})


def _merge_failures(total: dict[str, dict[str, Any]], shard: dict[str, dict[str, Any]]) -> None:
    """Add a later shard's reward failures to ``total``: counts add up, the first error stays."""
    for name, report in shard.items():
        merged = total.setdefault(name, {"failed": 0, "first_error": None})
        merged["failed"] += report["failed"]
        merged["first_error"] = merged["first_error"] or report["first_error"]


def _worker_signals() -> None:
    """Workers die on SIGTERM (a job's own handler only sets a flag, which would keep them running)
    and leave the pre-timeout USR2 to the job's main process."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


@contextmanager
def _filtered_shards(jobs: list[Any], workers: int) -> Iterator[Iterator[ShardFiltered]]:
    """The shards' results in shard order, from ``workers`` processes."""
    if workers <= 1:
        yield map(_filter_shard, jobs)
        return
    # Forked, not spawned: the workers share this process's imports, and its str hashes (ProblemIds).
    # A pool of processes that notices a dead worker (BrokenProcessPool) rather than waits for it.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_worker_signals)
    try:
        yield pool.map(_filter_shard, jobs)
    finally:
        # After a failure, the shards not started yet are dropped.
        pool.shutdown(wait=True, cancel_futures=True)


def filter_generations(
    paths: Sequence[Path], output: Path, config: FilterConfig, seed: int, num_samples: int,
    expected: int | None = None, workers: int | None = None, services: dict[str, ServiceRef] | None = None,
) -> dict[str, Any]:
    """Stream ``paths`` into ``output`` (filtered.json) and its sibling analytics files."""
    # A bad verifier, pattern or reward fails here, once, not in every worker.
    get_verifier(config.verifier)
    answer_rules(config.answer_pattern)
    services = services or {}
    _reward_set(config, services)
    workers = min(workers or available_cpus(), len(paths))
    started = time.monotonic()
    output.parent.mkdir(parents=True, exist_ok=True)
    stem = output.with_suffix("").name
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as staging_dir:
        staging = Path(staging_dir)
        ids = CategoryIds(staging)
        analytics, max_k, seen = Analytics(tuple(config.zone_bounds)), num_samples, ProblemIds()
        reward_failures: dict[str, dict[str, Any]] = {}
        jobs = [ShardJob(paths, shard, staging, config, seed, num_samples, services) for shard in range(len(paths))]
        rates_name = f"{stem}_pass_rates.jsonl"
        with (open(staging / output.name, "wb", buffering=WRITE_BUFFER) as sink, open(staging / rates_name, "wb") as rates,
              _filtered_shards(jobs, workers) as shards):
            sink.write(b"[")
            separator = b"\n"
            for shard in shards:
                analytics.merge(shard.analytics)
                max_k = max(max_k, shard.max_k)
                seen.extend(shard.seen)
                ids.append(shard.ids)
                _merge_failures(reward_failures, shard.reward_failures)
                if shard.kept.stat().st_size:
                    sink.write(separator)
                    with open(shard.kept, "rb") as kept:
                        shutil.copyfileobj(kept, sink, WRITE_BUFFER)
                    separator = b",\n"
                with open(shard.pass_rates, "rb") as shard_rates:
                    shutil.copyfileobj(shard_rates, rates, WRITE_BUFFER)
                shutil.rmtree(shard.folder)
            sink.write(b"\n]\n")
        duplicate = seen.first_duplicate(paths)
        if duplicate:
            raise InputError(duplicate)
        held = analytics.problems + analytics.failed + analytics.unjudged
        if expected is not None and held != expected:
            raise InputError(f"the shards hold {held} problems, expected {expected}")

        ranges = category_ranges(max_k, config.zone_bounds)
        stats = analytics.stats(config.strategy)
        if config.reward:
            stats["reward_failures"] = reward_failures
        stats["warnings"] = warnings(analytics, config)
        log_text = analytics.log_text(ranges, max_k) + "".join(f"\nWARNING: {w}\n" for w in stats["warnings"])
        sidecars = {
            "stats.json": _json_bytes(stats),
            "analytics.json": _json_bytes({**analytics.analytics(config.strategy, max_k), "category_ranges": ranges}),
            "analytics.log": log_text.encode(),
        }
        for suffix, data in sidecars.items():
            (staging / f"{stem}_{suffix}").write_bytes(data)
        with open(staging / f"{stem}_by_category.json", "wb") as sink:
            ids.write_by_category(sink)
        with open(staging / f"{stem}_no_correct.json", "wb") as sink:
            ids.write_list(sink, "too_hard")
            sink.write(b"\n")
        # filtered.json last: when it is there, its analytics are too.
        for name in [*(f"{stem}_{s}" for s in (*sidecars, "by_category.json", "no_correct.json", "pass_rates.jsonl")), output.name]:
            os.replace(staging / name, output.parent / name)
    print(log_text, flush=True)
    if analytics.failed:
        print(f"{analytics.failed} problem(s) left out: their generation failed (the record's 'error' says why)", flush=True)
    for name, report in reward_failures.items():
        if report["failed"]:
            print(f"reward {name}: no score for {report['failed']} candidate(s), first error: {report['first_error']}", flush=True)
    seconds = time.monotonic() - started
    return {
        **stats,
        "failed_items": analytics.failed,
        "categories": {c: analytics.share(analytics.categories[c]) for c in CATEGORIES},
        **analytics.distributions(max_k),
        "seconds": round(seconds, 3),
        "candidates_per_s": round(analytics.candidates / max(seconds, 1e-9), 1),
    }


def warnings(analytics: Analytics, config: FilterConfig) -> list[str]:
    """What a user must know about a filter's verdicts: problems left unjudged, candidates without a
    text, and most answers not extracted."""
    found = []
    if analytics.unjudged:
        found.append(f"{analytics.unjudged} problem(s) left out: none of their candidates could be judged"
                     f" (a ground truth the verifier cannot read, or no candidates), first {analytics.first_unjudged}")
    if analytics.malformed:
        found.append(f"{analytics.malformed} candidate(s) without a text (raw_output null): left out of their problem's K")
    unextracted = analytics.unextracted_fraction
    if unextracted > config.warn_unextracted:
        found.append(f"no answer could be extracted from {unextracted:.0%} of the candidates (over filter.warn_unextracted:"
                     f" {config.warn_unextracted:g}), so they are judged wrong: were responses cut inside <think> by"
                     " generate.max_tokens, or does filter.answer_pattern miss the answers?")
    return found


def _filter_into(
    sink: BinaryIO, rates: BinaryIO, job: ShardJob, ids: CategoryIds, rewards: RewardSet | None,
) -> tuple[Analytics, int, ProblemIds]:
    """Write the shard's kept samples to ``sink``, separated by ``,\\n``, and each problem's pass
    rate to ``rates``, one JSON line each; return its counts."""
    config, path = job.config, job.paths[job.shard]
    judge = Judge(config.answer_pattern, config.verifier)
    bounds = tuple(config.zone_bounds)
    category_of = cache(lambda correct, k: categorize(correct, k, bounds))
    analytics = Analytics(bounds)
    seen = ProblemIds()
    max_k = job.num_samples
    threshold = config.reward.threshold if config.reward else 0.0
    separator = b""
    for number, record in read_generations(path):
        texts = raw_outputs(record, f"{path}:{number}")
        pid, truth = record["id"], record["ground_truth"]
        seen.add(pid, job.shard, number)
        if "error" in record:
            # Its candidates (if any) are incomplete: counting it would pass a server error off as "too hard".
            analytics.failed += 1
            rates.write(orjson.dumps({"id": pid, "failed": True}) + b"\n")
            continue
        truth_text = truth_as_text(truth)
        verifier = verifier_for(config.verifier, truth_text)
        scores = None
        if rewards is None:
            analytics.verifiers[verifier] += 1
            verdicts = judge.judge(texts, truth_text)
        else:
            scores = score_candidates(rewards, record, texts)
            verdicts = judge.by_rewards(texts, scores.totals, threshold)
        analytics.malformed += verdicts.malformed
        k, correct = len(verdicts.judged), verdicts.correct
        if not k:
            analytics.add_unjudged(pid, truth_text, verifier)
            rates.write(orjson.dumps({"id": pid, "unjudged": True, "verifier": verifier}) + b"\n")
            continue
        analytics.unextracted += verdicts.unextracted
        max_k = max(max_k, k)
        num_correct = len(correct)
        category = category_of(num_correct, k)
        rates.write(orjson.dumps({"id": pid, "candidates": k, "correct": num_correct, "verifier": verifier}) + b"\n")
        if config.dedupe:
            # Repeats count for the correct rate, but are kept once.
            first: dict[str, tuple[int, int, str]] = {}
            for item in correct:
                first.setdefault(texts[item[1]], item)
            correct = list(first.values())
        kept = correct[: keep_count(category, len(correct), config, pid, job.seed)]
        if config.control:
            # As many of this problem's candidates as the verifier's choice keeps, drawn blind to it.
            drawn = random.Random(f"{job.seed}:{pid}:control").sample(verdicts.judged, len(kept))
            kept = [(len(texts[i]), i, judge.answer(texts[i])) for i in drawn]
        analytics.add(k, num_correct, category, len(kept))
        ids.add(category, pid)
        if kept:
            media = {f: record[f] for f in MEDIA_FIELDS if f in record}
        for number_kept, (_, index, prediction) in enumerate(kept):
            raw = texts[index]
            # Key by key in the seed's order: a dict display with **media is several times slower.
            sample = {"id": f"{pid}_sol{number_kept}", "original_id": pid}
            sample.update(media)
            sample["question"], sample["answer"], sample["response"] = record["question"], truth, raw
            sample["thinking_prediction"] = _thinking(record["candidates"][index], raw)
            sample["answer_prediction"], sample["category"] = prediction, category
            if scores is not None:
                sample["reward"] = scores.totals[index]
                sample["rewards"] = {name: values[index] for name, values in scores.by_reward.items()}
            if config.category_weights is not None:
                sample["weight"] = config.category_weights.get(category, 1.0)
            sink.write(separator + orjson.dumps(sample))
            separator = b",\n"
    return analytics, max_k, seen


def _thinking(candidate: dict[str, Any], raw: str) -> str:
    """The generator's own split of the reasoning, as the seed's filter copies it; else ours."""
    thinking = candidate.get("thinking_prediction")
    return thinking if isinstance(thinking, str) else split_thinking(raw)[0]


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def run(spec: FilterSpec) -> dict[str, Any]:
    with reporting(spec.target) as metrics:
        metrics.update(
            filter_generations(
                [Path(p) for p in spec.shard_paths], Path(spec.output_dir) / "filtered.json",
                spec.filter, spec.seed, spec.num_samples, spec.num_problems, services=spec.services,
            )
        )
    return metrics
