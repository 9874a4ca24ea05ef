"""The generation shard: the seed's record format, item-level resume, atomic visibility."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.generation import generate
from jobs.generation.config import GenerateConfig
from jobs.generation.generate import generate_shard, partial_path
from jobs.problems.data import read_jsonl
from jobs.specs import GenerateShardSpec, JobTarget
from state import Ledger


def spec_for(assets: Path, output: Path, stop: int = 6) -> GenerateShardSpec:
    return GenerateShardSpec(
        target=JobTarget(str(output.parent), "unused"),
        problems_path=str(assets / "train.jsonl"),
        start=0,
        stop=stop,
        model_path=str(assets / "random_init"),
        output_path=str(output),
        generate=GenerateConfig(num_samples=3, max_tokens=8, batch_size=2),
        seed=1,
        api_key_path=str(output.parent / "api_key"),
    )


def test_shard_writes_seed_records_and_resumes_per_item(tiny_assets: Path, tmp_path: Path) -> None:
    output = tmp_path / "shard_00000.jsonl"
    spec = spec_for(tiny_assets, output)
    problems = [json.loads(line) for line in (tiny_assets / "train.jsonl").read_text().splitlines()[:6]]

    # A shard killed mid-write left two whole items and a torn third line behind.
    partial = partial_path(output)
    first_two = [{"id": p["id"], "question": p["question"], "ground_truth": p["answer"], "candidates": [], "num_candidates": 0}
                 for p in problems[:2]]
    partial.write_text("".join(json.dumps(r) + "\n" for r in first_two) + '{"id": "train_00002", "quest')
    metrics: dict = {}
    generate_shard(spec, metrics)

    assert not partial.exists() and output.exists(), "the shard becomes visible whole, by rename"
    records = read_jsonl(output)
    assert [r["id"] for r in records] == [p["id"] for p in problems], "each problem exactly once, in order"
    assert records[:2] == first_two, "items written before the restart are kept, not regenerated"
    assert metrics["resumed_items"] == 2 and metrics["problems"] == 4
    fresh = records[2]
    assert set(fresh) == {"id", "question", "ground_truth", "candidates", "num_candidates"}
    assert fresh["num_candidates"] == 3 and len(fresh["candidates"]) == 3
    assert set(fresh["candidates"][0]) == {"raw_output", "thinking_prediction", "answer_text", "answer_prediction", "num_tokens"}
    assert metrics["tokens_per_s"] > 0 and metrics["problems_per_s"] > 0

    # Running a complete shard again changes nothing.
    before = output.read_bytes()
    generate_shard(spec, {})
    assert output.read_bytes() == before


def test_a_job_the_ledger_no_longer_expects_steps_aside(tiny_assets: Path, tmp_path: Path) -> None:
    output = tmp_path / "shard_00000.jsonl"
    ledger = Ledger(tmp_path)
    key = "iter_001/generate/shard_00000"
    lost = spec_for(tiny_assets, output)
    lost.target = JobTarget(str(tmp_path), key, submission="lost")
    for record in ({"status": "submitted", "submission": "newer", "attempts": 2}, {"status": "done", "submission": "lost"},
                   {"status": "failed", "submission": "lost"}, {"status": "planned", "submission": "lost"}):
        ledger.update(key, record)
        before = ledger.read(key)
        with pytest.raises(SystemExit) as stop:
            generate.run(lost)
        assert stop.value.code == 0
        assert not output.exists() and not partial_path(output).exists(), "the task was not run"
        assert ledger.read(key) == before, "the record is left to the job it belongs to"

    # The job of the submission on record runs; so does a job run by hand (no submission).
    ledger.update(key, {"status": "submitted", "submission": "lost"})
    generate.run(lost)
    assert ledger.read(key)["status"] == "done" and ledger.read(key)["executions"] == 1
    output.unlink()
    generate.run(spec_for(tiny_assets, output))
    assert output.exists()


@pytest.mark.unit
def test_samples_may_not_hold_a_media_models_placeholder_tokens(tmp_path: Path) -> None:
    """The tokens a multimodal model's prompts stand media with (Qwen2-Audio's audio_token_index,
    Qwen2-VL's image and video ids, a Qwen3-Omni thinker's), which the vLLM client bans from samples."""
    from jobs.generation.backends import placeholder_tokens

    configs = {
        "audio": {"model_type": "qwen2_audio", "audio_token_index": 259},
        "vision": {"model_type": "qwen2_vl", "image_token_id": 261, "video_token_id": 262, "vision_start_token_id": 258},
        "omni": {"model_type": "qwen3_omni_moe", "thinker_config": {"audio_token_id": 7, "image_token_id": 8, "video_token_id": 9}},
        "text": {"model_type": "qwen2", "eos_token_id": 2},
    }
    for name, config in configs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    assert [placeholder_tokens(str(tmp_path / name)) for name in configs] == [[259], [261, 262], [7, 8, 9], []]
    assert placeholder_tokens("Qwen/Qwen2-Audio-7B-Instruct") == [], "a served model's name, not a folder: nothing to read"
