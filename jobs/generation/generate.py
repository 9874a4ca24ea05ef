"""Generation shard job: K candidates per problem of one slice, written item by item.

The shard appends finished items to ``<output>.partial`` as they come (in any order) and renames it
to ``<output>``, one line per problem in shard order, only when every item is there, so a complete
shard is visible all at once. An item whose request failed is written with its ``error`` and no
candidates. A restarted shard keeps the items already generated (a torn last line from a kill
mid-write is cut off), tries failed ones again and generates the rest. A file lock per shard makes
a second copy of the same shard wait instead of writing alongside. The vllm backend's servers keep
their logs and caches in ``servers/<shard>/`` beside the shard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from filelock import FileLock

from jobs.generation.backends import make_backend, truncation
from jobs.generation.protocol import Completion, Outcome, Request, Sampling
from jobs.problems.data import MEDIA_FIELDS, read_jsonl
from jobs.problems.prompts import messages_for
from jobs.runtime import Throughput, log, reporting, stop_if_preempted
from jobs.scoring.answers import extract
from jobs.specs import GenerateShardSpec
from jobs.vllm.server import ServerFiles
from state import atomic_write_bytes


def partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def resume_partial(partial: Path) -> set[str]:
    """Ids already generated in ``partial`` (failed items not); a torn last line (killed mid-write) is cut off."""
    if not partial.exists():
        return set()
    data = partial.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        log.info("cutting a torn last line (%d bytes) off %s", len(data) - len(complete), partial)
        with open(partial, "r+b") as f:
            f.truncate(len(complete))
    records = [json.loads(line) for line in complete.splitlines() if line.strip()]
    return {r["id"] for r in records if "error" not in r}


def generation_record(problem: dict[str, Any], completions: list[Completion], policy: int | None = None) -> dict[str, Any]:
    """One line of the seed's generations.jsonl, with the problem's other fields too (task_type,
    duration ...: what the filter's and jobs.scoring.score_cli's rewards read as columns); GRPO's
    rollouts (``policy``: the iteration whose model sampled) with each candidate's tokens."""
    candidates = []
    for completion in completions:
        extracted = extract(completion.text)
        candidate = {
            "raw_output": completion.text,
            "thinking_prediction": extracted.thinking_prediction,
            "answer_text": extracted.answer_text,
            "answer_prediction": extracted.answer_prediction,
            "num_tokens": completion.num_tokens,
        }
        if policy is not None:
            candidate.update(completion_ids=completion.token_ids, logprobs=completion.logprobs, policy=policy)
        candidates.append(candidate)
    record = {"id": problem["id"], **{f: problem[f] for f in MEDIA_FIELDS if f in problem}}
    record.update(question=problem["question"], ground_truth=problem["answer"])
    record.update({k: v for k, v in problem.items() if k not in record and k != "answer"})
    record["candidates"] = candidates
    record["num_candidates"] = len(candidates)
    return record


def finish(partial: Path, output: Path, problems: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """Rename ``partial`` to ``output`` with each problem's latest line, in shard order; the failed count
    and the completions that hit max_tokens (a problem may ask for its own), resumed items included."""
    data = partial.read_bytes()
    lines = [(json.loads(line), line) for line in data.splitlines(keepends=True) if line.strip()]
    latest = {record["id"]: (record, line) for record, line in lines}
    missing = [p["id"] for p in problems if p["id"] not in latest]
    if missing:
        raise RuntimeError(f"{partial}: no record of problem {missing[0]!r} (and {len(missing) - 1} more)")
    failed = [latest[p["id"]][0] for p in problems if "error" in latest[p["id"]][0]]
    if len(failed) == len(problems):
        raise RuntimeError(f"every item of the shard failed, e.g. {failed[0]['id']!r}: {failed[0]['error']}")
    ordered = b"".join(latest[p["id"]][1] for p in problems)
    if ordered != data:
        atomic_write_bytes(partial, ordered)
    os.replace(partial, output)
    candidates = [(c["num_tokens"], p.get("max_tokens", max_tokens)) for p in problems for c in latest[p["id"]][0]["candidates"]]
    return {"failed_items": len(failed), **truncation(len(candidates), sum(n >= limit for n, limit in candidates))}


def shard_problems(spec: GenerateShardSpec) -> tuple[list[int], list[dict[str, Any]]]:
    """The shard's problems, with their indices in problems_path."""
    everything = read_jsonl(spec.problems_path)
    indices = list(spec.indices if spec.indices is not None else range(spec.start, spec.stop))
    return indices, [everything[i] for i in indices]


def close_early(spec: GenerateShardSpec) -> tuple[list[int], list[int]]:
    """Close a stopped shard on what it wrote (its job has ended): its output keeps the items it
    finished, in order; the others are left to other tasks. Returns (kept, rest) as indices."""
    output = Path(spec.output_path)
    with FileLock(str(output) + ".lock"):
        partial = partial_path(output)
        done = resume_partial(partial)
        indices, problems = shard_problems(spec)
        kept = [i for i, p in zip(indices, problems, strict=True) if p["id"] in done]
        rest = [i for i, p in zip(indices, problems, strict=True) if p["id"] not in done]
        if kept:
            finish(partial, output, [p for p in problems if p["id"] in done], spec.generate.max_tokens)
        else:
            atomic_write_bytes(output, b"")
            partial.unlink(missing_ok=True)
    return kept, rest


def generate_shard(spec: GenerateShardSpec, metrics: dict[str, Any]) -> None:
    output = Path(spec.output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(output) + ".lock"):
        if output.exists():
            log.info("shard output %s is complete already", output)
            return
        partial = partial_path(output)
        indices, problems = shard_problems(spec)
        written = resume_partial(partial)
        todo = [p for p in problems if p["id"] not in written]
        log.info("shard %s: %d problems, %d already written, %d to go", output.name, len(problems), len(written), len(todo))
        metrics.update(resumed_items=len(written))
        config = spec.generate
        if todo:
            index_of = {p["id"]: i for p, i in zip(problems, indices, strict=True)}
            requests = [
                # Seeded by the problem's place in the training set, so a resumed or re-split shard
                # samples as a fresh one would. A problem may ask for its own max_tokens.
                Request(
                    messages_for(p, config.system_prompt, config.media_dir),
                    Sampling(
                        config.num_samples, config.temperature, config.top_p, p.get("max_tokens", config.max_tokens),
                        seed=spec.seed * 1_000_003 + index_of[p["id"]], logprobs=spec.rollouts_of is not None,
                    ),
                )
                for p in todo
            ]
            files = ServerFiles.of_job(output.parent / "servers" / output.stem, spec.api_key_path, spec.compile_cache_dir)
            backend = make_backend(config, spec.model_path, todo, files)
            # From here: server start-up is not generation.
            progress = Throughput(len(todo), spec.progress_every_s or 10.0, spec.target if spec.progress_every_s else None, len(written))
            try:
                with open(partial, "a", encoding="utf-8") as sink:

                    def write(outcome: Outcome) -> None:
                        record = generation_record(todo[outcome.index], outcome.completions, spec.rollouts_of)
                        if outcome.error:
                            record["error"] = outcome.error
                        sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                        sink.flush()
                        progress.add(1, sum(c.num_tokens for c in outcome.completions))
                        stop_if_preempted()  # the item is on disk: a safe point to leave the rest to a requeue

                    backend.run(requests, write)
            finally:
                metrics.update(backend.metrics())
                backend.close()
            metrics.update(progress.totals())
        metrics.update(finish(partial, output, problems, config.max_tokens))


def run(spec: GenerateShardSpec) -> dict[str, Any]:
    with reporting(spec.target) as metrics:
        generate_shard(spec, metrics)
    return metrics
