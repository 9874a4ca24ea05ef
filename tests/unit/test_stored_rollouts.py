"""Training on stored rollouts (jobs.training.grpo_trainer.StoredRolloutTrainer) against the GRPO
objective written out here: the loss and every gradient of two micro-batches of unequal lengths, for
each of TRL's loss types and importance-sampling modes, beta > 0, on samples drawn by an older policy
(the demo's shipped model, perturbed) and trained by a newer one."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from jobs.scoring.advantages import advantages
from jobs.scoring.config import RewardConfig
from jobs.scoring.rewards import RewardContext, RewardSet
from jobs.training.grpo import round_steps
from jobs.training.grpo_trainer import PolicyTrainer, StoredRolloutTrainer, TrlReward
from tests.conftest import ROOT

pytestmark = pytest.mark.unit

MODEL = ROOT / "tools" / "demo_model"
K = 4  # samples per group
TEMPERATURE = 1.0
MAX_LENGTH = 64
BETA = 0.05
EPSILON = 0.2
QUESTIONS = {"a": "17+25=?", "b": "3+48=?"}


def length_reward(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
    """Distinct scores within a group, so every group has variance."""
    return [float(len(c[0]["content"]) % 7) for c in completions]


def parity_reward(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
    """A second reward, which cannot score every sample."""
    return [None if len(c[0]["content"]) % 3 == 0 else float(len(c[0]["content"]) % 2) for c in completions]


def perturbed(model: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale * p.std().clamp(min=1e-3))
    return other


def token_logps(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """The model's log-probabilities of ``completion``'s tokens after ``prompt``, at the sampling temperature."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1] / TEMPERATURE
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


@pytest.fixture(scope="module")
def setup() -> Iterator[dict[str, Any]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    sampler = perturbed(model, seed=1, scale=0.02).eval()  # the policy one version old, which sampled
    rows, rollouts, prompts, lengths = [], {}, {}, set()
    torch.manual_seed(0)
    for pid, question in QUESTIONS.items():
        messages = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        with torch.no_grad():
            out = sampler.generate(torch.tensor([prompt]), do_sample=True, temperature=TEMPERATURE, top_k=None, top_p=None,
                                   max_new_tokens=MAX_LENGTH, num_return_sequences=8 * K, pad_token_id=tokenizer.pad_token_id)
        group = []
        for seq in out[:, len(prompt):].tolist():
            end = next((i + 1 for i, t in enumerate(seq) if t == tokenizer.eos_token_id), len(seq))
            # Samples of lengths no other has: each is told apart by its length, and the micro-batches'
            # longest samples differ.
            if end in lengths or len(group) == K:
                continue
            lengths.add(end)
            with torch.no_grad():
                group.append({"completion_ids": seq[:end], "logprobs": token_logps(sampler, prompt, seq[:end]).tolist()})
        assert len(group) == K
        # Scored as the round's score job scores (jobs.scoring.rounds): per reward, and the advantage.
        texts = [[{"role": "assistant", "content": tokenizer.decode(s["completion_ids"], skip_special_tokens=True)}] for s in group]
        scores = torch.tensor([[v] for v in length_reward([], texts)])
        for sample, score, advantage in zip(group, scores[:, 0].tolist(), advantages(scores, [1.0], K, "group").tolist(), strict=True):
            sample.update(rewards={"length_reward": score}, advantage=advantage, staleness=1)
        rows.append({"id": pid, "prompt": messages, "answer": "0"})
        rollouts[pid] = group
        prompts[pid] = prompt
    yield {"tokenizer": tokenizer, "model": model, "rows": rows, "rollouts": rollouts, "prompts": prompts}
    torch.set_num_threads(threads)


def make_trainer(setup: dict[str, Any], tmp_path: Path, loss_type: str, mode: str, scale_rewards: str = "group",
                 rewards: Sequence[RewardConfig] = (RewardConfig(name="tests.unit.test_stored_rollouts:length_reward"),),
                 rollouts: dict[str, list[dict[str, Any]]] | None = None) -> StoredRolloutTrainer:
    from datasets import Dataset
    from trl import GRPOConfig

    context = RewardContext(verifier="numeric")
    reward_set = RewardSet(rewards, context)
    args = GRPOConfig(scale_rewards=scale_rewards, reward_weights=reward_set.weights,
        output_dir=str(tmp_path), per_device_train_batch_size=K, gradient_accumulation_steps=2, num_generations=K,
        max_completion_length=MAX_LENGTH, temperature=TEMPERATURE, beta=BETA, epsilon=EPSILON, loss_type=loss_type,
        vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=0.9, vllm_importance_sampling_clip_max=1.1,
        learning_rate=1e-5, max_steps=1, report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False, seed=0, shuffle_dataset=False,
    )
    trainer = StoredRolloutTrainer(
        model=copy.deepcopy(setup["model"]), reward_funcs=[TrlReward(reward_set, named) for named in reward_set.rewards],
        args=args, train_dataset=Dataset.from_list(setup["rows"]), processing_class=setup["tokenizer"],
        reward_set=reward_set, context=context, rollouts_dir=tmp_path / "rollouts", rollouts=rollouts or setup["rollouts"],
    )
    # The policy trains from the reference (the initial model) onward: one update away from it, a newer
    # one than the sampler's.
    trainer.model.load_state_dict(perturbed(setup["model"], seed=2, scale=0.01).state_dict())
    return trainer


def expected(setup: dict[str, Any], batches: list[list[tuple[str, int]]], model: torch.nn.Module, ref: torch.nn.Module,
             loss_type: str, mode: str) -> tuple[list[torch.Tensor], dict[str, float]]:
    """The objective per micro-batch (its samples: (problem id, sample index)), and the largest raw
    importance ratio and sampler/trainer log-prob gap, written from the GRPO and TRL papers' formulas."""
    tokenizer = setup["tokenizer"]
    advantages = {}
    for pid, group in setup["rollouts"].items():
        scores = torch.tensor([len(tokenizer.decode(s["completion_ids"], skip_special_tokens=True)) % 7 for s in group], dtype=torch.float64)
        advantages[pid] = ((scores - scores.mean()) / (scores.std() + 1e-4)).float()
    total_tokens = sum(len(s["completion_ids"]) for group in setup["rollouts"].values() for s in group)
    losses, widest = [], {"ratio": 0.0, "gap": 0.0}
    for batch in batches:
        per_sample = []
        for pid, k in batch:
            sample = setup["rollouts"][pid][k]
            logps = token_logps(model, setup["prompts"][pid], sample["completion_ids"])
            with torch.no_grad():
                ref_logps = token_logps(ref, setup["prompts"][pid], sample["completion_ids"])
            gap = logps.detach() - torch.tensor(sample["logprobs"])
            widest["gap"] = max(widest["gap"], gap.abs().max().item())
            raw = torch.exp(gap.sum()) if mode.startswith("sequence") else torch.exp(gap)
            widest["ratio"] = max(widest["ratio"], raw.max().item())
            if mode.endswith("truncate"):
                weight = raw.clamp(0.9, 1.1)
            else:
                weight = torch.where((raw < 0.9) | (raw > 1.1), torch.zeros_like(raw), raw)
            coef = torch.exp(logps - logps.detach())
            advantage = advantages[pid][k]
            clipped = -torch.min(coef * advantage, coef.clamp(1 - EPSILON, 1 + EPSILON) * advantage)
            # Times the ratio (1, with its gradient): the unbiased reverse-KL gradient (TRL's use_bias_correction_kl).
            kl = (torch.exp(ref_logps - logps) - (ref_logps - logps) - 1) * coef
            per_sample.append(clipped * weight + BETA * kl)
        tokens = sum(len(t) for t in per_sample)
        if loss_type == "grpo":
            loss = torch.stack([t.mean() for t in per_sample]).mean() / 2
        elif loss_type == "bnpo":
            loss = sum(t.sum() for t in per_sample) / tokens / 2
        elif loss_type == "dr_grpo":
            loss = sum(t.sum() for t in per_sample) / (len(per_sample) * MAX_LENGTH) / 2
        else:  # dapo: over the tokens of the whole generation batch
            loss = sum(t.sum() for t in per_sample) / total_tokens
        losses.append(loss)
    return losses, widest


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
def test_stored_rollouts_train_with_the_grpo_objective_and_the_importance_correction(
    setup: dict[str, Any], tmp_path: Path, loss_type: str, mode: str
) -> None:
    trainer = make_trainer(setup, tmp_path, loss_type, mode)
    model = trainer.model
    model.train()
    generation_batch = next(iter(trainer.get_train_dataloader()))
    model.zero_grad()
    trainer.current_gradient_accumulation_steps = 2  # set by the Trainer's loop, which this test steps by hand
    losses = [trainer.training_step(model, generation_batch, None).item() for _ in range(2)]
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    # Each micro-batch's samples, found by their token ids.
    index = {tuple(s["completion_ids"]): (pid, k) for pid, group in setup["rollouts"].items() for k, s in enumerate(group)}
    batches = []
    for micro in trainer._buffered_inputs:
        ids, mask = micro["completion_ids"].tolist(), micro["completion_mask"].tolist()
        batches.append([index[tuple(t for t, m in zip(row, row_mask, strict=True) if m)] for row, row_mask in zip(ids, mask, strict=True)])
    assert sorted(sample for batch in batches for sample in batch) == sorted(index.values()), "every stored sample is trained on once"
    lengths = [max(len(setup["rollouts"][pid][k]["completion_ids"]) for pid, k in batch) for batch in batches]
    assert lengths[0] != lengths[1], "the micro-batches have unequal lengths"

    # A model of its own (TRL patched the trainer's forward, bound to the trainer's model).
    reference = type(model).from_pretrained(MODEL, dtype=torch.float32)
    reference.load_state_dict(model.state_dict())
    want, widest = expected(setup, batches, reference, setup["model"], loss_type, mode)
    for loss in want:
        loss.backward()
    assert losses == pytest.approx([w.item() for w in want], abs=1e-5)
    worst = max((grads[n] - p.grad).abs().max().item() for n, p in reference.named_parameters() if n in grads)
    assert worst < 1e-5
    assert sum(g.abs().sum().item() for g in grads.values()) > 0

    # Samples one policy old: ratios away from 1, some past the bounds, and the trainer says so.
    assert widest["ratio"] > 1.1
    metrics = trainer._metrics["train"]
    assert metrics["sampling/sampling_logp_difference/mean"][-1] > 0
    assert metrics["sampling/importance_sampling_ratio/max"][-1] <= 1.1 + 1e-6
    assert metrics["rollouts/staleness"] == [1.0], "the samples' staleness, in the step's metrics"



def test_a_round_deals_each_stored_sample_once_with_gradient_accumulation(setup: dict[str, Any], tmp_path: Path) -> None:
    """round_steps' optimizer steps, with 2 micro-batches each, train over the 8 samples once: one
    generation batch dealt, no second epoch of the same samples."""
    trainer = make_trainer(setup, tmp_path, "dapo", "token_truncate")
    trainer.args.max_steps = round_steps(sum(len(group) for group in setup["rollouts"].values()), trainer.args)
    trainer.train()
    dealt = [json.loads(line) for line in (tmp_path / "rollouts" / "rank_0.jsonl").read_text().splitlines()]
    assert trainer.state.global_step == 1
    assert [sorted(d["ids"]) for d in dealt] == [["a"] * K + ["b"] * K]


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_the_score_jobs_advantages_are_trls_for_the_same_rewards(setup: dict[str, Any], tmp_path: Path, scale_rewards: str) -> None:
    """Two weighted rewards, one of which cannot score some samples and neither the last: TRL's own
    advantages (its GRPOTrainer on the stored scores, the generation batch being the round) equal
    jobs.scoring.advantages' for each scale_rewards."""
    rewards = [RewardConfig(name="tests.unit.test_stored_rollouts:length_reward"),
               RewardConfig(name="tests.unit.test_stored_rollouts:parity_reward", weight=0.5)]
    rollouts = {}
    for pid, group in setup["rollouts"].items():
        texts = [[{"role": "assistant", "content": setup["tokenizer"].decode(s["completion_ids"], skip_special_tokens=True)}] for s in group]
        scored = [{"length_reward": a, "parity_reward": b} for a, b in zip(length_reward([], texts), parity_reward([], texts), strict=True)]
        rollouts[pid] = [{**s, "rewards": r} for s, r in zip(group, scored, strict=True)]
    rollouts["b"][K - 1]["rewards"] = {"length_reward": None, "parity_reward": None}
    assert any(r["parity_reward"] is None for group in rollouts.values() for r in (s["rewards"] for s in group[:-1]))
    trainer = make_trainer(setup, tmp_path, "dapo", "token_truncate", scale_rewards, rewards, rollouts)
    batch = next(iter(trainer.get_train_dataloader()))
    # The samples the stored trainer deals, with TRL's advantages rather than the stored ones.
    trainer._samples = [rollouts[row["id"]][i % K] for i, row in enumerate(batch)]
    trl = PolicyTrainer._generate_and_score_completions(trainer, batch)["advantages"]

    order = list(dict.fromkeys(row["id"] for row in batch))
    scores = torch.tensor([[float("nan") if v is None else v for v in s["rewards"].values()] for pid in order for s in rollouts[pid]])
    ours = advantages(scores, [1.0, 0.5], K, scale_rewards)
    assert ours.tolist() == pytest.approx(trl.tolist(), abs=1e-6)
    assert ours[-1].item() == 0.0 and ours.abs().sum() > 0
