"""``python tools/evaluate.py MODEL_DIR [MODEL_DIR ...] DATA [--config RUN_DIR_OR_CONFIG]``: greedy
accuracy of any model folders on a data set, with a run's verifier and rewards, outside a run
(seed 004's base-vs-tuned comparison).

Each model answers every problem of DATA (any data format a run takes) greedily, as a run's held-out
evaluation does (``jobs/generation/evaluate.py``: the same prompts, answer extraction and verifier);
then each reward of the config (``grpo.rewards``, ``filter.reward.rewards``, and ``--rewards``) scores
the answers, and the figures of every model are printed side by side. ``--config`` takes a run
directory (its stored config) or a YAML config; without it, the sections' defaults. Predictions are
kept under ``--output`` (one folder per model), else in a temporary folder removed at the end.
The evaluation is pipeline/views/evaluation.py's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jobs.sections import check_writable
from pipeline.console import console as make_console
from pipeline.views.evaluation import (
    evaluate_models,
    evaluation_settings,
    model_folder,
    read_problems,
    results_table,
)
from state import InputError, PermanentJobError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/evaluate.py", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, metavar="MODEL_DIR", help="Hugging Face model folder(s)")
    parser.add_argument("data", type=Path, metavar="DATA", help="the problems (JSONL or JSON, as data.train)")
    parser.add_argument("--config", type=Path, help="a run directory or a config file: its verifier, rewards, prompts")
    parser.add_argument("--rewards", help="more rewards, name[:weight],... (as jobs.scoring.score_cli's)")
    parser.add_argument("--verifier", help="instead of the config's filter.verifier")
    parser.add_argument("--answer-pattern", help="instead of the config's filter.answer_pattern")
    parser.add_argument("--max-tokens", type=int, help="instead of the config's eval.max_tokens")
    parser.add_argument("--batch-size", type=int, help="instead of the config's eval.batch_size")
    parser.add_argument("--backend", choices=("transformers", "vllm"), help="instead of the config's eval.backend")
    parser.add_argument("--limit", type=int, help="the first N problems only")
    parser.add_argument("--output", type=Path, help="keep the predictions here (one folder per model)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    try:
        for key in ("max_tokens", "batch_size", "limit"):
            if getattr(args, key) is not None and getattr(args, key) < 1:
                raise InputError(f"--{key.replace('_', '-')}: must be at least 1 (got {getattr(args, key)})")
        if args.output is not None:
            check_writable(args.output, "--output", folder=True)
        models = [model_folder(path) for path in args.models]
        chosen = evaluation_settings(args.config, answer_pattern=args.answer_pattern, verifier=args.verifier, backend=args.backend,
                                     max_tokens=args.max_tokens, batch_size=args.batch_size, rewards=args.rewards)
        problems = read_problems(args.data, args.limit, chosen)
    except (InputError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return InputError.exit_code
    try:
        evaluation = evaluate_models(models, problems, chosen, args.output)
    except PermanentJobError as error:  # a folder that passed the check and still does not load
        print(f"error: {error}", file=sys.stderr)
        return InputError.exit_code
    results = evaluation.results
    if args.json:
        print(json.dumps({"data": str(args.data), "verifier": chosen.filter.verifier, "models": results}, indent=1))
    else:
        make_console().print(results_table(results, chosen, args.data))
        if args.output is not None:
            print(f"predictions in {args.output}/<n>_<model>/predictions.jsonl")
    for name, error in evaluation.reward_errors.items():
        print(f"warning: reward {name} failed on some answers: {error}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
