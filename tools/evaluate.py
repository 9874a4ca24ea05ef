"""``python tools/evaluate.py MODEL_DIR [MODEL_DIR ...] DATA [--config RUN_DIR_OR_CONFIG]``: greedy
accuracy of any model folders on a data set, with a run's verifier and rewards, outside a run
(seed 004's base-vs-tuned comparison).

Each model answers every problem of DATA (any data format a run takes) greedily, as a run's held-out
evaluation does (``jobs/generation/evaluate.py``: the same prompts, answer extraction and verifier);
then each reward of the config (``grpo.rewards``, ``filter.reward.rewards``, and ``--rewards``) scores
the answers, and the figures of every model are printed side by side. ``--config`` takes a run
directory (its stored config) or a YAML config; without it, the sections' defaults. Predictions are
kept under ``--output`` (one folder per model), else in a temporary folder removed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.table import Table

from jobs.generation.config import EvalConfig, GenerateConfig
from jobs.generation.evaluate import evaluate
from jobs.problems.data import load_problems, read_jsonl, write_jsonl
from jobs.problems.prompts import check_backend_takes
from jobs.runtime import quiet_libraries
from jobs.scoring.config import FilterConfig, RewardConfig
from jobs.scoring.records import score_candidates
from jobs.scoring.rescore import parse_rewards
from jobs.scoring.rewards import RewardContext, RewardSet, services_used
from jobs.scoring.verifiers import get_verifier
from jobs.specs import EvalSpec, JobTarget
from pipeline.config import load_config, read_run_config
from pipeline.console import console as make_console
from pipeline.layout import RunLayout
from state import InputError
from tools.samples import run_rewards


@dataclasses.dataclass
class Settings:
    """What a model is evaluated with: the config's sections, rewards and seed, after the options."""

    filter: FilterConfig
    generate: GenerateConfig
    eval: EvalConfig
    rewards: list[RewardConfig]
    seed: int


def settings(args: argparse.Namespace) -> Settings:
    """The config's sections (``--config``: a run directory or a YAML file) with the options over them."""
    filter_config, generate, eval_config, rewards, seed = FilterConfig(), GenerateConfig(), EvalConfig(), [], 42
    if args.config is not None:
        if (args.config / "config.yaml").is_file():
            config = read_run_config(RunLayout(args.config).config)
        elif args.config.is_file():
            config = load_config(args.config)
        else:
            raise InputError(f"--config: {args.config}: neither a run directory (with config.yaml) nor a config file")
        filter_config, generate, eval_config, seed = config.filter, config.generate, config.eval, config.seed
        rewards = run_rewards(config, config.methods())
    if args.answer_pattern is not None:
        try:
            filter_config = dataclasses.replace(filter_config, answer_pattern=args.answer_pattern)
        except ValidationError as error:
            raise InputError(f"--answer-pattern: {error.errors()[0]['ctx']['error']}") from None
    if args.verifier is not None:
        filter_config = dataclasses.replace(filter_config, verifier=args.verifier)
    try:
        get_verifier(filter_config.verifier)
    except ValueError as error:
        raise InputError(f"{'--verifier' if args.verifier else 'filter.verifier'}: {error}") from None
    eval_config = EvalConfig(backend=args.backend or eval_config.backend, max_tokens=args.max_tokens or eval_config.max_tokens,
                             batch_size=args.batch_size or eval_config.batch_size)
    if args.rewards:
        named = {r.name for r in rewards}
        rewards += [r for r in parse_rewards(args.rewards) if r.name not in named]
    calling = [r.name for r in rewards if services_used([r])]
    if calling:
        raise InputError(f"reward {calling[0]!r} calls a service of a run: not available outside one")
    return Settings(filter_config, generate, eval_config, rewards, seed)


def model_folder(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: not a model folder (no config.json in it): give a Hugging Face model folder")
    return path.resolve()


def evaluate_model(model: Path, problems_path: Path, output: Path, chosen: Settings, rewards: RewardSet) -> dict[str, Any]:
    """One model's accuracy and reward means; its predictions in ``output``."""
    spec = EvalSpec(target=JobTarget(str(output), "evaluate"), problems_path=str(problems_path), model_path=str(model),
                    output_dir=str(output), eval=chosen.eval, filter=chosen.filter, generate=chosen.generate,
                    seed=chosen.seed, api_key_path=str(output / "vllm_api_key"))
    metrics: dict[str, Any] = {}
    evaluate(spec, metrics)
    problems = {p["id"]: p for p in read_jsonl(problems_path)}
    scores: dict[str, list[float]] = {name: [] for name in rewards.names}
    for line in read_jsonl(output / "predictions.jsonl"):
        if line.get("raw_output") is None:
            continue  # the request failed: counted in failed_requests
        problem = problems[line["id"]]
        record = {k: v for k, v in problem.items() if k != "answer"} | {"ground_truth": problem["answer"]}
        for name, values in score_candidates(rewards, record, [line["raw_output"]]).by_reward.items():
            scores[name] += [v for v in values if v is not None]
    return {
        "model": str(model),
        "accuracy": metrics["heldout_accuracy"],
        "correct": metrics["heldout_correct"],
        "problems": metrics["heldout_problems"],
        "failed_requests": metrics["failed_items"],
        "rewards": {name: {"mean": sum(values) / len(values) if values else None, "scored": len(values)}
                    for name, values in scores.items()},
        "predictions": str(output / "predictions.jsonl"),
    }


def results_table(results: list[dict[str, Any]], chosen: Settings, data: Path) -> Table:
    table = Table(title=f"{data} with verifier {chosen.filter.verifier}, greedy, max_tokens {chosen.eval.max_tokens}")
    table.add_column("")
    for result in results:
        table.add_column(Path(result["model"]).name, justify="right", overflow="fold")
    table.add_row("accuracy", *(f"{100 * r['accuracy']:.1f} %" for r in results))
    table.add_row("correct", *(f"{r['correct']} / {r['problems']}" for r in results))
    if any(r["failed_requests"] for r in results):
        table.add_row("failed requests", *(str(r["failed_requests"]) for r in results))
    for name in results[0]["rewards"]:
        table.add_row(f"{name} (mean)", *("-" if (s := r["rewards"][name])["mean"] is None else f"{s['mean']:.3f}"
                                          for r in results))
    return table


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
        if args.output is not None and args.output.exists() and not args.output.is_dir():
            raise InputError(f"--output: {args.output} is a file, not a folder")
        models = [model_folder(path) for path in args.models]
        chosen = settings(args)
        rewards = RewardSet(chosen.rewards, RewardContext(chosen.filter.verifier, chosen.filter.answer_pattern))
        problems = load_problems(args.data)[: args.limit]
        check_backend_takes(problems, chosen.eval.backend, chosen.generate.media_dir, str(args.data), "--backend / eval.backend")
    except (InputError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return InputError.exit_code
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="evaluate_") as scratch:
        output = args.output or Path(scratch)
        problems_path = output / "problems.jsonl"
        write_jsonl(problems_path, problems)
        results = []
        for index, model in enumerate(models, start=1):
            folder = output / f"{index}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', model.name)}"
            results.append(evaluate_model(model, problems_path, folder, chosen, rewards))
            if args.output is None:
                results[-1]["predictions"] = None
    if args.json:
        print(json.dumps({"data": str(args.data), "verifier": chosen.filter.verifier, "models": results}, indent=1))
    else:
        make_console().print(results_table(results, chosen, args.data))
        if args.output is not None:
            print(f"predictions in {args.output}/<n>_<model>/predictions.jsonl")
    for name, error in rewards.first_error.items():
        print(f"warning: reward {name} failed on some answers: {error}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
