"""Score job of a GRPO round over the arrays (``grpo.rollouts: arrays``), on CPU: every sample of
the round's generation shards scored by the reward registry with its weights (``grpo.rewards``), as
TRL's GRPOTrainer would score it (the same prompt messages, conversational completion, the
problem's fields as columns, the completion's token ids); groups of zero variance (every sample of
a problem got the same total: no learning signal) and groups no reward could score are left out and
counted; at most ``grpo.problems_per_round`` groups are kept (``grpo.oversample`` sampled extra so
that the round is still full), in the round's order; their advantages are computed as TRL computes
them for ``grpo.scale_rewards`` (its default aggregation, sum then normalize), over the kept batch.

Writes ``scored.jsonl``: per kept group, ``id`` and its ``samples``, each with its completion token
ids, the sampler's log-probabilities, the policy that sampled it and its staleness (rounds older
than the last, grpo.max_staleness), its score per reward, its total and its advantage. A round short of groups trains on what it has and records the ``shortfall``; a
round with none stops the run with what to change.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from jobs.problems.data import read_jsonl
from jobs.problems.prompts import messages_for
from jobs.runtime import log, reporting
from jobs.scoring.rewards import RewardContext, RewardSet
from jobs.specs import RoundScoreSpec
from state import PermanentJobError, atomic_write_bytes

SCORED_FILE = "scored.jsonl"


def read_groups(paths: list[str], group_size: int) -> tuple[list[dict[str, Any]], int]:
    """The shards' records with a whole group of samples, in shard order, and how many have none
    (their requests failed)."""
    groups, failed = [], 0
    for path in paths:
        for record in read_jsonl(path):
            if len(record.get("candidates") or []) == group_size:
                groups.append(record)
            else:
                failed += 1
    return groups, failed


def score_round(spec: RoundScoreSpec) -> dict[str, Any]:
    """Scores, selects and writes the round's groups; returns what the ledger records: the groups
    (``round``) and the rewards of all the round's samples."""
    # Imported here for import cost: torch and TRL load in the job, not in the driver that plans it.
    import torch
    from trl.trainer.utils import nanstd

    from jobs.scoring.advantages import advantages, totals  # (as above)

    grpo = spec.grpo
    group_size = grpo.num_generations
    problems = {p["id"]: p for p in read_jsonl(spec.problems_path)}
    records, failed = read_groups(spec.shard_paths, group_size)
    reward_set = RewardSet(grpo.rewards, RewardContext(spec.verifier, spec.answer_pattern, spec.services))
    names = reward_set.names
    scored = []
    for record in records:
        problem = problems[record["id"]]
        candidates = record["candidates"]
        columns = {key: [value] * group_size for key, value in problem.items()}
        scores = reward_set.score(
            [messages_for(problem, spec.system_prompt)] * group_size,
            [[{"role": "assistant", "content": c["raw_output"]}] for c in candidates],
            completion_ids=[c["completion_ids"] for c in candidates], **columns,
        )
        values = [[math.nan if scores.by_reward[n][i] is None else scores.by_reward[n][i] for n in names] for i in range(group_size)]
        scored.append((record, torch.tensor(values, dtype=torch.float32)))
    every = torch.cat([values for _, values in scored]) if scored else torch.empty(0, len(names))
    stds = [nanstd(totals(values, reward_set.weights)).item() for _, values in scored]
    zero = sum(1 for s in stds if math.isclose(s, 0.0, abs_tol=1e-8))
    unscored = sum(1 for s in stds if math.isnan(s))
    # A round of grpo.problems_per_round trains on that many groups, and says how many it lacks; without, on all with a signal.
    target = grpo.problems_per_round or len(scored)
    kept = [pair for pair, s in zip(scored, stds, strict=True) if s > 1e-8][:target]
    # How many rounds older than the last the policy that sampled each kept group is (grpo.max_staleness).
    staleness = [spec.iteration - 1 - record["candidates"][0]["policy"] for record, _ in kept]
    figures = {
        "groups": len(scored), "zero_std_groups": zero, "unscored_groups": unscored, "failed_problems": failed,
        "kept_groups": len(kept), "target_groups": target,
        "shortfall": max(target - len(kept), 0) if grpo.problems_per_round else 0,
        "staleness": max(staleness, default=0),
    }
    log.info("round %d: %s", spec.iteration, figures)
    if not kept:
        raise PermanentJobError(
            f"round {spec.iteration}: nothing to train on: of {len(scored)} groups, {zero} got one reward for all their"
            f" samples and {unscored} none; raise grpo.temperature ({grpo.temperature:g}) for more varied samples, grpo.oversample"
            f" ({grpo.oversample:g}) or grpo.problems_per_round ({grpo.problems_per_round}) for more groups, or change grpo.rewards"
        )
    kept_values = torch.cat([values for _, values in kept])
    weighted = advantages(kept_values, reward_set.weights, group_size, grpo.scale_rewards)
    sample_totals = totals(kept_values, reward_set.weights)
    lines = []
    for g, (record, values) in enumerate(kept):
        samples = []
        for k, candidate in enumerate(record["candidates"]):
            i = g * group_size + k
            samples.append({
                "completion_ids": candidate["completion_ids"], "logprobs": candidate["logprobs"], "policy": candidate["policy"],
                "staleness": spec.iteration - 1 - candidate["policy"],
                "rewards": {n: None if math.isnan(v) else v for n, v in zip(names, values[k].tolist(), strict=True)},
                "reward": None if math.isnan(sample_totals[i]) else sample_totals[i].item(), "advantage": weighted[i].item(),
            })
        lines.append(json.dumps({"id": record["id"], "samples": samples}) + "\n")
    atomic_write_bytes(Path(spec.output_dir) / SCORED_FILE, "".join(lines).encode())
    # Over every sample of the round, those left out too.
    return {
        "round": figures,
        "reward_mean": torch.nanmean(totals(every, reward_set.weights)).item(),
        "rewards": {n: {"mean": torch.nanmean(every[:, j]).item(), "std": nanstd(every[:, j]).item()} for j, n in enumerate(names)},
        "reward_failures": reward_set.failure_report(),
    }


def run(spec: RoundScoreSpec) -> dict[str, Any]:
    with reporting(spec.target) as metrics:
        metrics.update(score_round(spec))
    return metrics
