"""What a model wrote and how it was judged: a run's rewards, its candidates judged as the filter job
judges them (tools/samples.py) and held-out predictions read back as generation records (also
tools/evaluate.py's)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from jobs.problems.data import read_jsonl
from jobs.scoring.config import FilterConfig, RewardConfig
from jobs.scoring.filtering import Judge, truth_as_text
from jobs.scoring.records import raw_outputs, read_generations, score_candidates
from jobs.scoring.rewards import RewardContext, RewardSet, services_used
from jobs.scoring.verifiers import verifier_for
from pipeline.config import RunConfig
from pipeline.layout import RunLayout, iteration_name
from pipeline.loop.summary import stored_config
from state import InputError

# A candidate's verdict: "no output" is a candidate without a text (raw_output null), which the
# filter leaves out of its problem's K as it does those the verifier cannot judge ("unknown").
STYLES = {"right": "green", "wrong": "red", "unknown": "yellow", "no output": "yellow"}


def run_rewards(config: RunConfig, methods: list[str]) -> list[RewardConfig]:
    """The rewards the run scores with in iterations of these methods: ``grpo.rewards`` for GRPO,
    ``filter.reward.rewards`` when it filters on rewards."""
    rewards = list(config.grpo.rewards) if "grpo" in methods else []
    if config.filter.reward is not None:
        rewards += [r for r in config.filter.reward.rewards if r.name not in {k.name for k in rewards}]
    return rewards


def prediction_records(predictions: Path, problems: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for each line of an evaluation's ``predictions.jsonl``: a generation
    record of one candidate (none when the request failed, with its ``error``), joined by id with the
    problems it answered."""
    by_id = {p["id"]: p for p in read_jsonl(problems)}
    for number, line in enumerate(read_jsonl(predictions), start=1):
        problem = by_id.get(line["id"], {"id": line["id"], "question": "?", "answer": "?"})
        record = {k: v for k, v in problem.items() if k != "answer"} | {"ground_truth": problem["answer"]}
        record["candidates"] = [] if line.get("raw_output") is None else [{"raw_output": line["raw_output"]}]
        if line.get("error"):
            record["error"] = line["error"]
        yield number, record


class Scorer:
    """The run's answer extraction, verifier and rewards, on one problem's candidates at a time: the
    verdicts are the filter job's (jobs.scoring.filtering.Judge). Rewards that call a service of the
    run are left out (``skipped``): it may no longer be up."""

    def __init__(self, filter_config: FilterConfig, rewards: list[RewardConfig]):
        self.verifier_name = filter_config.verifier
        try:
            self.judge = Judge(filter_config.answer_pattern, filter_config.verifier)
            self.skipped = [r.name for r in rewards if services_used([r])]
            self.rewards = RewardSet([r for r in rewards if r.name not in self.skipped],
                                     RewardContext(filter_config.verifier, filter_config.answer_pattern))
        except ValueError as error:
            raise InputError(f"the run's config: {error}") from None

    def verifier(self, record: dict[str, Any]) -> str:
        """The verifier that judges this problem (under ``auto``, the one its answer's shape chose)."""
        chosen = verifier_for(self.verifier_name, truth_as_text(record["ground_truth"]))
        return chosen if chosen == self.verifier_name else f"{chosen} ({self.verifier_name})"

    def score(self, record: dict[str, Any], where: str) -> list[dict[str, Any]]:
        """Per candidate: its text, extracted answer, verdict, tokens and each reward's score."""
        texts = raw_outputs(record, where)
        verdicts = self.judge.judge(texts, truth_as_text(record["ground_truth"]))
        right, judged = {index for _, index, _ in verdicts.correct}, set(verdicts.judged)
        scores = score_candidates(self.rewards, record, texts) if texts and self.rewards.rewards else None
        rows = []
        for index, (text, candidate) in enumerate(zip(texts, record["candidates"], strict=True)):
            verdict = ("no output" if not isinstance(text, str) else "right" if index in right
                       else "wrong" if index in judged else "unknown")
            rows.append({
                "text": text, "answer": self.judge.answer(text) if isinstance(text, str) else "", "verdict": verdict,
                "tokens": candidate.get("num_tokens"),
                "rewards": {name: values[index] for name, values in scores.by_reward.items()} if scores else {},
                "total": scores.totals[index] if scores else None,
            })
        return rows


@dataclass
class Picked:
    where: str  # file:line, the file relative to the run directory
    record: dict[str, Any]


# A file of records: (where, record) for each of its lines.
Source = Callable[[], Iterator[tuple[str, dict[str, Any]]]]


def shard_files(layout: RunLayout, iteration: int) -> list[Path]:
    """The iteration's complete generation shards, in shard order."""
    return sorted(layout.stage_dir(iteration, "generate").glob("shard_*.jsonl"))


def shard_source(layout: RunLayout, path: Path) -> Source:
    return lambda: ((f"{path.relative_to(layout.run_dir)}:{n}", record) for n, record in read_generations(path))


def eval_source(layout: RunLayout, iteration: int) -> Source:
    """The iteration's held-out predictions as generation records (one candidate each)."""
    path = layout.stage_dir(iteration, "eval") / "predictions.jsonl"
    where = path.relative_to(layout.run_dir)
    return lambda: ((f"{where}:{n}", record) for n, record in prediction_records(path, layout.heldout_problems))


def pick(sources: list[Source], count: int, ids: list[str], seed: int) -> list[Picked]:
    """``count`` records drawn at random (the same for the same seed), or those with ``ids``; only
    the files needed are read: a stage may have thousands of shards."""
    if ids:
        wanted = set(ids)
        found = [Picked(where, record) for source in sources for where, record in source() if str(record.get("id")) in wanted]
        missing = wanted - {str(p.record["id"]) for p in found}
        if missing:
            raise InputError(f"--id: no problem {min(missing)!r} among these samples")
        return found
    rng = random.Random(seed)
    per_file = math.ceil(count / len(sources))
    picked: list[Picked] = []
    for source in rng.sample(sources, len(sources)):
        records = [Picked(where, record) for where, record in source()]
        picked += rng.sample(records, min(per_file, len(records), count - len(picked)))
        if len(picked) == count:
            break
    return picked


def _score(value: float | None) -> str:
    return "failed" if value is None else f"{value:.3g}"


def _tail(text: str, chars: int) -> str:
    """The end of a sample, where its answer is, on one line."""
    flat = " ".join(text.split())
    return flat if len(flat) <= chars else "…" + flat[-chars:]


def problem_view(picked: Picked, scorer: Scorer, chars: int) -> RenderableType:
    """One problem: its question, truth and verifier, then a row per sample."""
    record = picked.record
    head = Text.assemble(("problem ", "bold"), (str(record.get("id")), "bold cyan"), f"  ({picked.where})\n",
                         ("question: ", "bold"), _tail(str(record.get("question")), 4 * chars), "\n",
                         ("truth: ", "bold"), str(record.get("ground_truth")), ("  verifier: ", "bold"), scorer.verifier(record))
    if record.get("error"):
        return Group(head, Text(f"generation failed: {record['error']}", style="red"), Text())
    rows = scorer.score(record, picked.where)
    names = scorer.rewards.names
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, expand=True)
    table.add_column("#", justify="right")
    table.add_column("answer", max_width=24, overflow="fold")
    table.add_column("verdict")
    tokens = any(row["tokens"] is not None for row in rows)
    if tokens:
        table.add_column("tokens", justify="right")
    for name in names:
        table.add_column(name, justify="right", overflow="fold")
    if len(names) > 1:
        table.add_column("total", justify="right")
    table.add_column("sample (its end)", ratio=1, overflow="fold")
    for index, row in enumerate(rows, start=1):
        cells = [str(index), row["answer"], Text(row["verdict"], style=STYLES[row["verdict"]])]
        if tokens:
            cells.append("-" if row["tokens"] is None else str(row["tokens"]))
        cells += [_score(row["rewards"][name]) for name in names]
        if len(names) > 1:
            cells.append(_score(row["total"]))
        table.add_row(*cells, "(null)" if row["text"] is None else _tail(row["text"], chars))
    judged = [row for row in rows if row["verdict"] in ("right", "wrong")]
    footer = f"{sum(row['verdict'] == 'right' for row in judged)} of {len(judged)} samples right"
    if len(judged) < len(rows):
        footer += f"; {len(rows) - len(judged)} not judged (left out of the filter's pass rate)"
    return Group(head, table, Text(footer, style="bold"), Text())


def iterations_with_samples(layout: RunLayout, config: RunConfig, from_eval: bool) -> list[int]:
    """Iterations (0: the base model) that have something to show, oldest first."""
    found = []
    for iteration in range(config.num_iterations + 1):
        has_eval = (layout.stage_dir(iteration, "eval") / "predictions.jsonl").is_file()
        if has_eval or (not from_eval and iteration and shard_files(layout, iteration)):
            found.append(iteration)
    return found


def samples_view(run_dir: Path, iteration: int | None, count: int, ids: list[str], from_eval: bool, seed: int,
                 chars: int) -> RenderableType:
    """``count`` problems (or those with ``ids``) of an iteration's samples (default: the last one with
    some), each sample judged and scored; InputError (one line) for what cannot be shown."""
    layout = RunLayout(run_dir)
    config = stored_config(run_dir)
    available = iterations_with_samples(layout, config, from_eval)
    if iteration is None:
        if not available:
            raise InputError(f"{run_dir}: no samples yet (no generation shards nor held-out predictions)")
        iteration = available[-1]
    if not 0 <= iteration <= config.num_iterations:
        raise InputError(f"--iteration: {iteration} is not an iteration of the run (0 to {config.num_iterations}; 0: the base model)")
    shards = [] if from_eval or iteration == 0 else shard_files(layout, iteration)
    if shards:
        sources = [shard_source(layout, path) for path in shards]
        what = f"generation samples of {iteration_name(iteration)} ({len(shards)} shards)"
    elif iteration in available:
        sources = [eval_source(layout, iteration)]
        what = f"held-out predictions (greedy) of {'the base model' if iteration == 0 else iteration_name(iteration)}"
    else:
        raise InputError(f"--iteration {iteration}: nothing to show yet (iterations with samples: {available or 'none'})")
    scorer = Scorer(config.filter, run_rewards(config, [config.method_of(max(iteration, 1))]))
    parts: list[RenderableType] = [Text(f"{what} in {layout.run_dir}", style="bold"), Text()]
    parts += [problem_view(p, scorer, chars) for p in pick(sources, count, ids, seed)]
    if scorer.skipped:
        parts.append(Text(f"not scored here: {', '.join(scorer.skipped)} (they call a service of the run)", style="yellow"))
    for name, error in scorer.rewards.first_error.items():
        parts.append(Text(f"reward {name} failed: {error}", style="yellow"))
    return Group(*parts)
