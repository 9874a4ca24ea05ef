"""Evaluation job: greedy accuracy on the held-out problems (the seed's "base vs tuned"), and on the
development problems when the run has them (``dev_accuracy``, ``dev_predictions.jsonl``).

With ``eval.backend: vllm`` the job starts vLLM servers of the model it evaluates, as a generation
shard does (``generate.vllm``'s settings, logs under ``<eval>/servers``), and stops them at the end.
A request the servers still refuse after the retries counts as a wrong answer, with its error. A
problem whose ground truth the verifier cannot read (no verdict) is neither: it is left out of the
accuracy and counted (``heldout_unjudged``, ``dev_unjudged``); each prediction line names the
verifier that judged it (``filter.verifier: auto`` chooses per problem).

Where problems carry a ``category`` (or seed 003's ``task_type``: answerable / refusable), the
accuracy of each (``heldout_categories``). With ``rewards`` (a GRPO run's ``grpo.rewards``), each
reward's mean over the greedy answers (``heldout_rewards``), scored as the training scores them:
where a verifier's accuracy is not the figure that matters (a listener's pick, an IoU), that is.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jobs.generation.backends import make_backend, truncation
from jobs.generation.protocol import Outcome, Request, Sampling
from jobs.problems.data import read_jsonl
from jobs.problems.prompts import messages_for
from jobs.runtime import Throughput, reporting
from jobs.scoring.answers import extract
from jobs.scoring.rewards import RewardContext, RewardSet
from jobs.scoring.verifiers import get_verifier, verifier_for
from jobs.specs import EvalSpec
from jobs.vllm.server import ServerFiles
from state import atomic_write_bytes


def evaluate(spec: EvalSpec, metrics: dict[str, Any]) -> None:
    sets = {"heldout": read_jsonl(spec.problems_path)}
    if spec.dev_problems_path:
        sets["dev"] = read_jsonl(spec.dev_problems_path)
    problems = [problem for subset in sets.values() for problem in subset]
    verifier = get_verifier(spec.filter.verifier)
    config = dataclasses.replace(spec.generate, backend=spec.eval.backend, batch_size=spec.eval.batch_size, endpoints=[])
    greedy = Sampling(n=1, temperature=0.0, top_p=1.0, max_tokens=spec.eval.max_tokens, seed=spec.seed)
    requests = [Request(messages_for(p, config.system_prompt, config.media_dir), greedy) for p in problems]
    output = Path(spec.output_dir)
    backend = make_backend(config, spec.model_path, problems, ServerFiles.of_job(output / "servers", spec.api_key_path, spec.compile_cache_dir))
    progress = Throughput(len(problems))  # from here: server start-up is not evaluation
    outcomes: list[Outcome] = []

    def collect(outcome: Outcome) -> None:
        outcomes.append(outcome)
        progress.add(1, sum(c.num_tokens for c in outcome.completions))

    try:
        backend.run(requests, collect)
    finally:
        metrics.update(backend.metrics())
        backend.close()
    failed = [o for o in outcomes if o.error]
    if failed and len(failed) == len(problems):
        raise RuntimeError(f"every held-out request failed, e.g. {problems[failed[0].index]['id']!r}: {failed[0].error}")
    lines, verdicts, truncated = [], [], 0
    for outcome in sorted(outcomes, key=lambda o: o.index):
        problem = problems[outcome.index]
        line: dict[str, Any] = {"id": problem["id"], "prediction": None, "correct": False, "raw_output": None,
                                "verifier": verifier_for(spec.filter.verifier, problem["answer"])}
        if outcome.error:
            line["error"] = outcome.error  # counted as wrong: the model was asked and gave no answer
        else:
            (completion,) = outcome.completions
            truncated += completion.num_tokens >= spec.eval.max_tokens
            prediction = extract(completion.text, spec.filter.answer_pattern).answer_prediction
            verdict = verifier(prediction, problem["answer"])
            line.update(prediction=prediction, correct=None if verdict is None else bool(verdict), raw_output=completion.text)
        verdicts.append(line["correct"])
        lines.append(json.dumps(line))
    texts = {o.index: o.completions[0].text for o in outcomes if not o.error}
    start = 0
    for name, subset in sets.items():
        part = slice(start, start + len(subset))
        start = part.stop
        file = "predictions.jsonl" if name == "heldout" else f"{name}_predictions.jsonl"
        atomic_write_bytes(output / file, ("\n".join(lines[part]) + "\n").encode())
        judged = [verdict for verdict in verdicts[part] if verdict is not None]
        hits = sum(judged)
        metrics.update({f"{name}_accuracy": hits / len(judged) if judged else None, f"{name}_correct": hits,
                        f"{name}_problems": len(subset), f"{name}_unjudged": len(subset) - len(judged)})
        categories = by_category(subset, verdicts[part])
        if categories:
            metrics[f"{name}_categories"] = categories
        if spec.rewards:
            answered = [(problem, texts[i]) for i, problem in enumerate(subset, part.start) if i in texts]
            metrics[f"{name}_rewards"] = reward_means(spec, answered)
    metrics.update(failed_items=len(failed), **truncation(len(outcomes) - len(failed), truncated))
    metrics.update(progress.totals())


# The fields a problem's category may be in: ours, and seed 003's answerable / refusable.
CATEGORY_FIELDS = ("category", "task_type")


def by_category(problems: list[dict[str, Any]], verdicts: list[bool | None]) -> dict[str, dict[str, Any]]:
    """Accuracy per category of the problems that carry one (judged answers only); empty when none do."""
    counts: dict[str, list[int]] = {}
    for problem, verdict in zip(problems, verdicts, strict=True):
        category = next((str(problem[f]) for f in CATEGORY_FIELDS if problem.get(f) is not None), None)
        if category is not None and verdict is not None:
            counts.setdefault(category, [0, 0])
            counts[category][0] += verdict
            counts[category][1] += 1
    return {c: {"accuracy": hits / total, "problems": total} for c, (hits, total) in sorted(counts.items())}


def reward_means(spec: EvalSpec, answered: list[tuple[dict[str, Any], str]]) -> dict[str, Any]:
    """Each reward's mean over the greedy answers, scored as GRPO's training scores a sample, and
    the answers it could not score."""
    rewards = RewardSet(spec.rewards, RewardContext(spec.filter.verifier, spec.filter.answer_pattern, spec.services))
    problems = [problem for problem, _ in answered]
    scores = rewards.score(
        [messages_for(p, spec.generate.system_prompt) for p in problems],
        [[{"role": "assistant", "content": text}] for _, text in answered],
        **{key: [p.get(key) for p in problems] for key in dict.fromkeys(k for p in problems for k in p)},
    )
    means = {}
    for name, values in scores.by_reward.items():
        scored = [v for v in values if v is not None]
        means[name] = {"mean": sum(scored) / len(scored) if scored else None, "failed": len(values) - len(scored)}
    return means


def run(spec: EvalSpec) -> dict[str, Any]:
    with reporting(spec.target) as metrics:
        evaluate(spec, metrics)
    return metrics
