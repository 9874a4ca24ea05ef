"""``python tools/samples.py RUN_DIR [--iteration N] [--problems 3] [--id ID ...] [--eval]``: a few
problems of an iteration with their K samples, the answer extracted from each, the verifier's
verdict and each reward's score (seed 003's console output while training).

The samples are the iteration's generation shards (``iter_NNN/generate/``); with ``--eval``, or in
an iteration without shards (GRPO without a pass-rate band), its held-out predictions
(``iter_NNN/eval/predictions.jsonl``, one greedy sample per problem; iteration 0 is the base
model's). Answers are extracted and judged with the run's ``filter.answer_pattern`` and
``filter.verifier``; the rewards are the iteration's (``grpo.rewards`` for a GRPO iteration,
``filter.reward.rewards`` when the run filters on rewards), those calling a service of the run left
out. Problems are drawn at random (``--seed``), the same ones at every call.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from jobs.problems.data import read_jsonl
from jobs.scoring.answers import extract
from jobs.scoring.config import RewardConfig
from jobs.scoring.records import raw_outputs, read_generations, score_candidates
from jobs.scoring.rewards import RewardContext, RewardSet, services_used
from jobs.scoring.verifiers import Verifier, get_verifier
from pipeline.config import RunConfig, read_run_config
from pipeline.console import console as make_console
from pipeline.layout import RunLayout, iteration_name
from state import InputError

VERDICTS = {True: "right", False: "wrong", None: "unknown"}


def run_rewards(config: RunConfig, methods: list[str]) -> list[RewardConfig]:
    """The rewards the run scores with in iterations of these methods: ``grpo.rewards`` for GRPO,
    ``filter.reward.rewards`` when it filters on rewards."""
    rewards = list(config.grpo.rewards) if "grpo" in methods else []
    if config.filter.reward is not None:
        rewards += [r for r in config.filter.reward.rewards if r.name not in {k.name for k in rewards}]
    return rewards


class Scorer:
    """The run's answer extraction, verifier and rewards, on one problem's candidates at a time.
    Rewards that call a service of the run are left out (``skipped``): it may no longer be up."""

    def __init__(self, config: RunConfig, rewards: list[RewardConfig]):
        self.pattern = config.filter.answer_pattern
        try:
            self.verifier: Verifier = get_verifier(config.filter.verifier)
            self.skipped = [r.name for r in rewards if services_used([r])]
            self.rewards = RewardSet([r for r in rewards if r.name not in self.skipped],
                                     RewardContext(config.filter.verifier, config.filter.answer_pattern))
        except ValueError as error:
            raise InputError(f"the run's config: {error}") from None
        self.verifier_name = config.filter.verifier

    def score(self, record: dict[str, Any], where: str) -> list[dict[str, Any]]:
        """Per candidate: its text, extracted answer, verdict, tokens and each reward's score."""
        texts = raw_outputs(record, where)
        scores = score_candidates(self.rewards, record, texts) if texts and self.rewards.rewards else None
        rows = []
        for index, (text, candidate) in enumerate(zip(texts, record["candidates"], strict=True)):
            answer = extract(text or "", self.pattern).answer_prediction
            verdict = self.verifier(answer, str(record["ground_truth"]))
            rows.append({
                "text": text, "answer": answer, "verdict": None if verdict is None else bool(verdict),
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
    """The iteration's held-out predictions as generation records (one candidate each), joined by id
    with the run's held-out problems."""
    path = layout.stage_dir(iteration, "eval") / "predictions.jsonl"

    def records() -> Iterator[tuple[str, dict[str, Any]]]:
        problems = {p["id"]: p for p in read_jsonl(layout.heldout_problems)}
        for number, line in enumerate(read_jsonl(path), start=1):
            problem = problems.get(line["id"], {"id": line["id"], "question": "?", "answer": "?"})
            record = {k: v for k, v in problem.items() if k != "answer"} | {"ground_truth": problem["answer"]}
            record["candidates"] = [] if line.get("raw_output") is None else [{"raw_output": line["raw_output"]}]
            if line.get("error"):
                record["error"] = line["error"]
            yield f"{path.relative_to(layout.run_dir)}:{number}", record

    return records


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
    """One problem: its question and truth, then a row per sample."""
    record = picked.record
    head = Text.assemble(("problem ", "bold"), (str(record.get("id")), "bold cyan"), f"  ({picked.where})\n",
                         ("question: ", "bold"), _tail(str(record.get("question")), 4 * chars), "\n",
                         ("truth: ", "bold"), str(record.get("ground_truth")), ("  verifier: ", "bold"), scorer.verifier_name)
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
        style = {True: "green", False: "red", None: "yellow"}[row["verdict"]]
        cells = [str(index), row["answer"], Text(VERDICTS[row["verdict"]], style=style)]
        if tokens:
            cells.append("-" if row["tokens"] is None else str(row["tokens"]))
        cells += [_score(row["rewards"][name]) for name in names]
        if len(names) > 1:
            cells.append(_score(row["total"]))
        table.add_row(*cells, "(null)" if row["text"] is None else _tail(row["text"], chars))
    right = sum(row["verdict"] is True for row in rows)
    footer = Text(f"{right} of {len(rows)} samples right", style="bold")
    return Group(head, table, footer, Text())


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
    layout = RunLayout(run_dir)
    if not layout.config.is_file() or not (layout.run_dir / "ledger").is_dir():
        raise InputError(f"{run_dir}: not a run directory (no ledger/ and config.yaml in it)")
    config = read_run_config(layout.config)
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
    method = config.method_of(iteration) if iteration else config.method_of(1)
    scorer = Scorer(config, run_rewards(config, [method]))
    parts: list[RenderableType] = [Text(f"{what} in {layout.run_dir}", style="bold"), Text()]
    parts += [problem_view(p, scorer, chars) for p in pick(sources, count, ids, seed)]
    if scorer.skipped:
        parts.append(Text(f"not scored here: {', '.join(scorer.skipped)} (they call a service of the run)", style="yellow"))
    for name, error in scorer.rewards.first_error.items():
        parts.append(Text(f"reward {name} failed: {error}", style="yellow"))
    return Group(*parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/samples.py", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--iteration", type=int, help="default: the last one with samples; 0: the base model (held-out)")
    parser.add_argument("--problems", type=int, default=3, help="how many problems to show (default 3)")
    parser.add_argument("--id", action="append", default=[], help="show this problem (repeatable)")
    parser.add_argument("--eval", action="store_true", help="the held-out predictions instead of the generation samples")
    parser.add_argument("--seed", type=int, default=0, help="which problems are drawn (default 0)")
    parser.add_argument("--chars", type=int, default=160, help="characters of each sample shown, from its end")
    args = parser.parse_args(argv)
    try:
        if args.problems < 1 or args.chars < 1:
            raise InputError("--problems and --chars: must be at least 1")
        view = samples_view(args.run_dir, args.iteration, args.problems, args.id, args.eval, args.seed, args.chars)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return InputError.exit_code
    make_console().print(view)
    return 0


if __name__ == "__main__":
    sys.exit(main())
