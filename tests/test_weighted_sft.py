"""Per-sample loss weights in SFT (filter.category_weights): real steps of the demo's tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from jobs.specs import JobTarget, TrainSpec
from jobs.training.config import TrainConfig
from jobs.training.sft import sft_examples, train_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tools.demo import build_model

    folder = tmp_path_factory.mktemp("tiny")
    build_model(folder)
    return folder


def example(question: str, answer: str, weight: float | None = None) -> dict[str, Any]:
    item = {"prompt": [{"role": "user", "content": question}], "completion": [{"role": "assistant", "content": answer}]}
    return item if weight is None else {**item, "weight": weight}


def trainer_for(model_dir: Path, examples: list[dict[str, Any]], tmp_path: Path) -> Any:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from jobs.training.weighted import WeightedSFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "checkpoints"), per_device_train_batch_size=2, use_cpu=True,
                     completion_only_loss=True, report_to="none", max_length=64, disable_tqdm=True,
                     activation_checkpointing=False)  # transformers 5's name: TRL's default sets the deprecated one
    trainer_class = WeightedSFTTrainer if "weight" in examples[0] else SFTTrainer
    return trainer_class(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=Dataset.from_list(examples),
                         processing_class=AutoTokenizer.from_pretrained(model_dir))


def loss_and_gradient(trainer: Any, rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of the trainer's prepared examples through its collator and its loss."""
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(trainer.data_collator(rows)))
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])


def test_weights_scale_each_samples_share_of_loss_and_gradient(tiny_model: Path, tmp_path: Path) -> None:
    pairs = [("12+30=?", "42"), ("5+6=?", "11"), ("5+6=?", "99")]
    weighted = trainer_for(tiny_model, [example(q, a, 1.0) for q, a in pairs], tmp_path)
    assert next(iter(weighted.get_train_dataloader()))["weight"].tolist() == [1.0, 1.0], "the weights reach the batches"
    first, second, other = weighted.train_dataset

    def run(*rows_and_weights: tuple[dict[str, Any], float]) -> tuple[torch.Tensor, torch.Tensor]:
        return loss_and_gradient(weighted, [{**row, "weight": w} for row, w in rows_and_weights])

    plain = trainer_for(tiny_model, [example(q, a) for q, a in pairs[:2]], tmp_path)
    ones = run((first, 1.0), (second, 1.0))
    for a, b in zip(loss_and_gradient(plain, list(plain.train_dataset)), ones, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg="weights of 1 are the unweighted loss")
    first_doubled = run((first, 2.0), (second, 0.0))
    for a, b in zip(first_doubled, run((first, 2.0), (other, 0.0)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg="a sample of weight 0 adds nothing")
    for half_first, only_second, both in zip(first_doubled, run((first, 0.0), (second, 1.0)), ones, strict=True):
        torch.testing.assert_close(half_first / 2 + only_second, both, rtol=1e-5, atol=1e-7,
                                   msg="each sample's part scales with its weight, over the same token count")
    assert not torch.allclose(first_doubled[1], ones[1]), "the weights change the gradient"


def test_sft_examples_carry_weights_only_when_filtered_json_has_them(tmp_path: Path) -> None:
    replay = tmp_path / "replay.jsonl"
    replay.write_text(json.dumps({"id": "r", "question": "1+1=?", "answer": "2"}) + "\n")
    weighted = tmp_path / "filtered.json"
    weighted.write_text(json.dumps([{"question": "2+2=?", "response": "4", "weight": 1.5}]))
    assert [e["weight"] for e in sft_examples(str(weighted), str(replay), None)] == [1.5, 1.0], "replay data weighs 1.0"
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"question": "2+2=?", "response": "4"}]))
    assert all("weight" not in e for e in sft_examples(str(plain), str(replay), None))


def test_training_job_trains_on_weighted_filtered_json(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "filtered.json"
    data.write_text(json.dumps([
        {"question": "12+30=?", "response": "42", "category": "learning_zone", "weight": 1.5},
        {"question": "5+6=?", "response": "11", "category": "mastered", "weight": 0.1},
    ]))
    config = TrainConfig(method="full", max_steps=1, batch_size=2, gradient_accumulation_steps=1, gradient_checkpointing=False,
                         logging_steps=1, save_steps=10)
    metrics: dict[str, Any] = {}
    spec = TrainSpec(JobTarget(str(tmp_path), "train"), str(data), str(tiny_model), str(tiny_model), 1, str(tmp_path / "out"),
                     1e-3, config, None, 0)
    train_model(spec, metrics)
    assert metrics["loss_weighted"] is True and metrics["steps"] == 1 and metrics["final_loss"] > 0
    assert (tmp_path / "out" / "model" / "config.json").exists()
