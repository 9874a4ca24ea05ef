"""Evaluation job: greedy accuracy on the held-out problems (the seed's "base vs tuned")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jobs.answers import extract
from jobs.backends import Sampling, make_backend, messages_for
from jobs.data import read_jsonl
from jobs.runtime import Throughput, reporting
from jobs.specs import EvalSpec, GenerateConfig
from jobs.verifiers import get_verifier
from state import atomic_write_bytes


def evaluate(spec: EvalSpec, metrics: dict[str, Any]) -> None:
    problems = read_jsonl(spec.problems_path)
    verifier = get_verifier(spec.filter.verifier)
    greedy = Sampling(n=1, temperature=0.0, top_p=1.0, max_tokens=spec.eval.max_tokens, seed=spec.seed)
    backend = make_backend(GenerateConfig(), spec.model_path, problems)
    progress = Throughput(len(problems))
    lines, correct = [], 0
    try:
        for first in range(0, len(problems), spec.eval.batch_size):
            batch = problems[first:first + spec.eval.batch_size]
            outputs = backend.generate([messages_for(p, spec.system_prompt) for p in batch], greedy)
            for problem, (completion,) in zip(batch, outputs, strict=True):
                prediction = extract(completion.text, spec.filter.answer_pattern).answer_prediction
                ok = verifier(prediction, problem["answer"])
                correct += ok
                lines.append(json.dumps({"id": problem["id"], "prediction": prediction, "correct": ok, "raw_output": completion.text}))
            progress.add(len(batch), sum(c.num_tokens for (c,) in outputs))
    finally:
        backend.close()
    atomic_write_bytes(Path(spec.output_dir) / "predictions.jsonl", ("\n".join(lines) + "\n").encode())
    metrics.update(heldout_accuracy=correct / len(problems), heldout_correct=correct, heldout_problems=len(problems))
    metrics.update(progress.totals())


def run(spec: EvalSpec) -> dict[str, Any]:
    with reporting(spec.target) as metrics:
        evaluate(spec, metrics)
    return metrics
