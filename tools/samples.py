"""``python tools/samples.py RUN_DIR [--iteration N] [--problems 3] [--id ID ...] [--eval]``: a few
problems of an iteration with their K samples, the answer extracted from each, the verifier's
verdict and each reward's score (seed 003's console output while training).

The samples are the iteration's generation shards (``iter_NNN/generate/``); with ``--eval``, or in
an iteration without shards (GRPO without a pass-rate band), its held-out predictions
(``iter_NNN/eval/predictions.jsonl``, one greedy sample per problem; iteration 0 is the base
model's). Answers are extracted and judged with the run's ``filter.answer_pattern`` and
``filter.verifier`` as the filter job judges them (under ``auto``, the verifier each problem got is
shown); a sample without a text shows ``no output`` and, as in the filter, is not judged. The
rewards are the iteration's (``grpo.rewards`` for a GRPO iteration, ``filter.reward.rewards`` when
the run filters on rewards), those calling a service of the run left out. Problems are drawn at
random (``--seed``), the same ones at every call. The view is pipeline/views/samples.py's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.console import console as make_console
from pipeline.views.samples import samples_view
from state import InputError


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
