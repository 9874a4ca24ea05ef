"""``python -m jobs.scoring.score_cli --generations FILE.jsonl ... --rewards correctness:2,format:0.5,tag_count --output scored.jsonl``

Score generations with rewards, without regenerating: this project's shards or the seed's own
``generations.jsonl`` (``--problems FILE`` adds the fields its records lack, by id). Writes one line
per problem (each candidate's rewards, total and GRPO advantage; the group's mean and std) and
``<output>_summary.json``; prints a table of the candidates and a summary per reward. The run's
``--verifier`` and ``--answer-pattern`` (as in the config's filter section) judge ``correctness``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from jobs.problems.data import load_problems
from jobs.scoring.config import FilterConfig
from jobs.scoring.rescore import (
    TOTAL,
    Scored,
    parse_rewards,
    score_generations,
    summary_path,
)
from jobs.scoring.rewards import RewardContext, RewardSet
from jobs.scoring.verifiers import get_verifier
from jobs.sections import add_options, check_writable, section_from_options
from state import InputError

# The run's settings the rewards' context takes; the filter section's other keys are not scoring's.
CONTEXT = ("verifier", "answer_pattern")
NOT_CONTEXT = tuple(f.name for f in dataclasses.fields(FilterConfig) if f.name not in CONTEXT)


def number(value: float | None, missing: str = "failed") -> str:
    return missing if value is None else f"{value:.6g}"


def candidate_table(scored: Scored, names: list[str]) -> Table:
    table = Table("id", "candidate", *names, TOTAL, "advantage", box=box.SIMPLE, title="candidates")
    for row in scored.rows:
        table.add_row(str(row["id"]), str(row["index"]), *(number(row["rewards"][n]) for n in names),
                      number(row["total"]), number(row["advantage"]))
    return table


def summary_table(scored: Scored, rewards: RewardSet) -> Table:
    table = Table("reward", "weight", "mean", "std", "failed", "zero-std groups", "first error", box=box.SIMPLE,
                  title=f"{scored.problems} problems, {scored.candidates} candidates")
    weights: dict[str, Any] = dict(zip(rewards.names, rewards.weights, strict=True))
    for name, summary in scored.summary.items():
        table.add_row(name, number(weights.get(name), "-"), number(summary["mean"], "-"), number(summary["std"], "-"),
                      str(summary["failed"]), number(summary["zero_variance_groups"]),
                      summary.get("first_error") or "")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.scoring.score_cli", description=__doc__.splitlines()[2])
    parser.add_argument("--generations", nargs="+", required=True, type=Path, help="generations.jsonl file(s)")
    parser.add_argument("--rewards", required=True,
                        help="name[:weight],... or a YAML list: '[{name: tag_count, tags: [reasoning, answer]}]'")
    parser.add_argument("--output", required=True, type=Path, help="scored.jsonl to write")
    parser.add_argument("--problems", type=Path, help="problems file whose fields the records lack (joined by id)")
    parser.add_argument("--rows", type=int, default=200, help="candidates to print (all are written)")
    add_options(parser, FilterConfig, skip=NOT_CONTEXT)
    args = parser.parse_args(argv)
    try:
        config = section_from_options(FilterConfig, args, skip=NOT_CONTEXT)
        get_verifier(config.verifier)
        rewards = RewardSet(parse_rewards(args.rewards), RewardContext(config.verifier, config.answer_pattern))
        check_writable(args.output, "--output")
        for path in args.generations:
            if not path.is_file():
                raise InputError(f"{path}: file not found")
        problems = {p["id"]: p for p in load_problems(args.problems)} if args.problems else None
        scored = score_generations(args.generations, rewards, args.output, problems, args.rows)
    except (InputError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return InputError.exit_code
    # Piped to a file, rich would fit the tables into 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=240)
    console.print(candidate_table(scored, rewards.names))
    if scored.candidates > len(scored.rows):
        console.print(f"... {scored.candidates - len(scored.rows)} more candidates in {args.output}", highlight=False)
    console.print(summary_table(scored, rewards))
    if scored.skipped:
        console.print(f"{scored.skipped} problem(s) skipped: their generation failed (the record's 'error' says why)", highlight=False)
    console.print(f"wrote {args.output} and {summary_path(args.output)}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
