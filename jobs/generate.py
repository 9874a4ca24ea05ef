"""Generation shard job: K candidates per problem of one slice, written item by item.

The shard appends finished items to ``<output>.partial`` and renames it to ``<output>`` only when
every item is there, so a complete shard is visible all at once. A restarted shard keeps the items
already written (a torn last line from a kill mid-write is cut off) and generates only the rest. A
file lock per shard makes a second copy of the same shard wait instead of writing alongside.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from filelock import FileLock

from jobs.answers import extract
from jobs.backends import Sampling, make_backend, messages_for
from jobs.data import read_jsonl
from jobs.runtime import Throughput, log, reporting
from jobs.specs import MEDIA_FIELDS, GenerateShardSpec


def partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def resume_partial(partial: Path) -> set[str]:
    """Ids already written to ``partial``; a torn last line (killed mid-write) is cut off."""
    if not partial.exists():
        return set()
    data = partial.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        log.info("cutting a torn last line (%d bytes) off %s", len(data) - len(complete), partial)
        with open(partial, "r+b") as f:
            f.truncate(len(complete))
    return {json.loads(line)["id"] for line in complete.splitlines() if line.strip()}


def generation_record(problem: dict[str, Any], texts: list[tuple[str, int]]) -> dict[str, Any]:
    """One line of the seed's generations.jsonl."""
    candidates = []
    for text, num_tokens in texts:
        extracted = extract(text)
        candidates.append(
            {
                "raw_output": text,
                "thinking_prediction": extracted.thinking_prediction,
                "answer_text": extracted.answer_text,
                "answer_prediction": extracted.answer_prediction,
                "num_tokens": num_tokens,
            }
        )
    record = {"id": problem["id"], **{f: problem[f] for f in MEDIA_FIELDS if f in problem}}
    record.update(question=problem["question"], ground_truth=problem["answer"], candidates=candidates)
    record["num_candidates"] = len(candidates)
    return record


def generate_shard(spec: GenerateShardSpec, metrics: dict[str, Any]) -> None:
    output = Path(spec.output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(output) + ".lock"):
        if output.exists():
            log.info("shard output %s is complete already", output)
            return
        partial = partial_path(output)
        problems = read_jsonl(spec.problems_path)[spec.start:spec.stop]
        written = resume_partial(partial)
        todo = [p for p in problems if p["id"] not in written]
        log.info("shard %s: %d problems, %d already written, %d to go", output.name, len(problems), len(written), len(todo))
        metrics.update(resumed_items=len(written))
        progress = Throughput(len(todo))
        config = spec.generate
        if todo:
            backend = make_backend(config.backend, spec.model_path, todo)
            try:
                with open(partial, "a", encoding="utf-8") as sink:
                    for first in range(0, len(todo), config.batch_size):
                        batch = todo[first:first + config.batch_size]
                        # Seeded by position in the shard, so a resumed shard samples as a fresh one would.
                        sampling = Sampling(
                            config.num_samples, config.temperature, config.top_p, config.max_tokens,
                            seed=spec.seed * 1_000_003 + spec.start + len(written) + first,
                        )
                        outputs = backend.generate([messages_for(p, config.system_prompt) for p in batch], sampling)
                        for problem, completions in zip(batch, outputs, strict=True):
                            record = generation_record(problem, [(c.text, c.num_tokens) for c in completions])
                            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                        sink.flush()
                        progress.add(len(batch), sum(c.num_tokens for cs in outputs for c in cs))
            finally:
                backend.close()
        os.replace(partial, output)
        metrics.update(progress.totals())


def run(spec: GenerateShardSpec) -> dict[str, Any]:
    with reporting(spec.target) as metrics:
        generate_shard(spec, metrics)
    return metrics
