"""Any model folder evaluated on a data set outside a run (tools/evaluate.py): the run's held-out
evaluation job (jobs/generation/evaluate.py) in this process, with a config's prompts, answer
extraction and verifier, then each of the config's rewards on the answers."""

from __future__ import annotations

import dataclasses
import re
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.table import Table

from jobs.generation.config import EvalConfig, GenerateConfig
from jobs.generation.evaluate import evaluate
from jobs.problems.data import Problem, load_problems, write_jsonl
from jobs.problems.prompts import check_backend_takes
from jobs.runtime import quiet_libraries
from jobs.scoring.config import FilterConfig
from jobs.scoring.records import score_candidates
from jobs.scoring.rescore import parse_rewards
from jobs.scoring.rewards import RewardContext, RewardSet, services_used
from jobs.scoring.verifiers import get_verifier
from jobs.specs import EvalSpec, JobTarget
from pipeline.config import RunConfig, load_config
from pipeline.loop.summary import stored_config
from pipeline.rules import check_model_folder
from pipeline.views.samples import prediction_records, run_rewards
from state import InputError


@dataclasses.dataclass
class Settings:
    """What a model is evaluated with: a config's sections, rewards and seed, with the options over them."""

    filter: FilterConfig
    generate: GenerateConfig
    eval: EvalConfig
    rewards: RewardSet
    seed: int


def source_config(source: Path) -> RunConfig:
    """``--config``: a run directory's stored config, or a config file."""
    if source.is_dir():
        try:
            return stored_config(source)
        except InputError as error:
            raise InputError(f"--config: {error}") from None
    if not source.is_file():
        raise InputError(f"--config: {source}: neither a run directory (with config.yaml) nor a config file")
    return load_config(source)


def evaluation_settings(source: Path | None, *, answer_pattern: str | None = None, verifier: str | None = None,
                        backend: str | None = None, max_tokens: int | None = None, batch_size: int | None = None,
                        rewards: str | None = None) -> Settings:
    """The sections of the config in ``source`` (None: the defaults), each given option over them, and
    the config's rewards (``grpo.rewards``, ``filter.reward.rewards``) with ``rewards`` (as ``--rewards``)."""
    filter_config, generate, eval_config, chosen_rewards, seed = FilterConfig(), GenerateConfig(), EvalConfig(), [], 42
    if source is not None:
        config = source_config(source)
        filter_config, generate, eval_config, seed = config.filter, config.generate, config.eval, config.seed
        chosen_rewards = run_rewards(config, config.methods())
    if answer_pattern is not None:
        try:
            filter_config = dataclasses.replace(filter_config, answer_pattern=answer_pattern)
        except ValidationError as error:
            raise InputError(f"--answer-pattern: {error.errors()[0]['ctx']['error']}") from None
    if verifier is not None:
        filter_config = dataclasses.replace(filter_config, verifier=verifier)
    try:
        get_verifier(filter_config.verifier)
    except ValueError as error:
        raise InputError(f"{'--verifier' if verifier else 'filter.verifier'}: {error}") from None
    eval_config = EvalConfig(backend=backend or eval_config.backend, max_tokens=max_tokens or eval_config.max_tokens,
                             batch_size=batch_size or eval_config.batch_size)
    if rewards:
        named = {r.name for r in chosen_rewards}
        chosen_rewards += [r for r in parse_rewards(rewards) if r.name not in named]
    calling = [r.name for r in chosen_rewards if services_used([r])]
    if calling:
        raise InputError(f"reward {calling[0]!r} calls a service of a run: not available outside one")
    try:
        reward_set = RewardSet(chosen_rewards, RewardContext(filter_config.verifier, filter_config.answer_pattern))
    except ValueError as error:  # a user's reward that cannot be imported
        raise InputError(str(error)) from None
    return Settings(filter_config, generate, eval_config, reward_set, seed)


def model_folder(path: Path) -> Path:
    """``path`` as a Hugging Face model folder (config.json and weights, as a run's model.path is checked)."""
    try:
        check_model_folder(path)
    except ValueError as error:
        raise InputError(str(error).replace("model.path", "MODEL_DIR", 1)) from None
    return path.resolve()


def read_problems(data: Path, limit: int | None, chosen: Settings) -> list[Problem]:
    """The first ``limit`` problems of ``data`` (all: None), checked against the backend that answers them."""
    problems = load_problems(data)[:limit]
    check_backend_takes(problems, chosen.eval.backend, chosen.generate.media_dir, str(data), "--backend / eval.backend")
    return problems


@dataclasses.dataclass
class Evaluation:
    results: list[dict[str, Any]]  # per model, in order: accuracy, correct, problems, failed requests, reward means
    reward_errors: dict[str, str]  # a reward's first error, for those that failed on some answers


def evaluate_models(models: list[Path], problems: list[Problem], chosen: Settings, output: Path | None) -> Evaluation:
    """Each model's greedy answers to ``problems``, judged and scored; its predictions under ``output``
    (``<n>_<model>/predictions.jsonl``), else in a temporary folder removed at the end."""
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="evaluate_") as scratch:
        folder = output or Path(scratch)
        problems_path = folder / "problems.jsonl"
        write_jsonl(problems_path, problems)
        results = []
        for index, model in enumerate(models, start=1):
            model_output = folder / f"{index}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', model.name)}"
            results.append(evaluate_model(model, problems_path, model_output, chosen))
            if output is None:
                results[-1]["predictions"] = None
    return Evaluation(results, dict(chosen.rewards.first_error))


def evaluate_model(model: Path, problems_path: Path, output: Path, chosen: Settings) -> dict[str, Any]:
    """One model's accuracy and reward means; its predictions in ``output``."""
    spec = EvalSpec(target=JobTarget(str(output), "evaluate"), problems_path=str(problems_path), model_path=str(model),
                    output_dir=str(output), eval=chosen.eval, filter=chosen.filter, generate=chosen.generate,
                    seed=chosen.seed, api_key_path=str(output / "vllm_api_key"))
    metrics: dict[str, Any] = {}
    evaluate(spec, metrics)
    rewards = chosen.rewards
    scores: dict[str, list[float]] = {name: [] for name in rewards.names}
    for _, record in prediction_records(output / "predictions.jsonl", problems_path):
        if not record["candidates"]:
            continue  # the request failed: counted in failed_requests
        texts = [candidate["raw_output"] for candidate in record["candidates"]]
        for name, values in score_candidates(rewards, record, texts).by_reward.items():
            scores[name] += [v for v in values if v is not None]
    return {
        "model": str(model),
        "accuracy": metrics["heldout_accuracy"],
        "correct": metrics["heldout_correct"],
        "problems": metrics["heldout_problems"],
        "unjudged": metrics.get("heldout_unjudged", 0),
        "failed_requests": metrics["failed_items"],
        "rewards": {name: {"mean": sum(values) / len(values) if values else None, "scored": len(values)}
                    for name, values in scores.items()},
        "predictions": str(output / "predictions.jsonl"),
    }


def results_table(results: list[dict[str, Any]], chosen: Settings, data: Path) -> Table:
    """The models side by side: accuracy, correct answers, failed requests, each reward's mean."""
    table = Table(title=f"{data} with verifier {chosen.filter.verifier}, greedy, max_tokens {chosen.eval.max_tokens}")
    table.add_column("")
    for result in results:
        table.add_column(Path(result["model"]).name, justify="right", overflow="fold")
    table.add_row("accuracy", *("-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f} %" for r in results))
    table.add_row("correct", *(f"{r['correct']} / {r['problems'] - r['unjudged']}" for r in results))
    if any(r["unjudged"] for r in results):
        table.add_row("not judged", *(str(r["unjudged"]) for r in results))
    if any(r["failed_requests"] for r in results):
        table.add_row("failed requests", *(str(r["failed_requests"]) for r in results))
    for name in results[0]["rewards"]:
        table.add_row(f"{name} (mean)", *("-" if (s := r["rewards"][name])["mean"] is None else f"{s['mean']:.3f}"
                                          for r in results))
    return table
