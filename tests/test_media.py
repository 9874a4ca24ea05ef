"""Problems with sound, images and video, without a vLLM server: the data checks (one line, exit 2,
before anything is written), where the media go in a prompt, and SFT steps of the tiny multimodal
models (tools.demo) that show the media reach the model. tests/test_media_vllm.py serves the same
models and checks that generation gives them the same prompts."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from jobs.problems.data import load_problems
from jobs.problems.prompts import messages_for, template_messages
from jobs.runtime import quiet_libraries
from jobs.specs import JobTarget, TrainSpec
from jobs.training.config import TrainConfig
from jobs.training.media import (
    PER_TOKEN,
    DecodedImages,
    MediaCollator,
    collator_for,
    encoder_parameters,
    match_vllm_positions,
)
from jobs.training.sft import sft_examples, train_model
from tests.conftest import run_cli, small_config, write_config
from tests.test_bad_input import assert_refused


def write_media(folder: Path) -> Path:
    """Clips, images and videos the models take, and broken ones."""
    import cv2
    import soundfile
    from PIL import Image

    from tools.demo import beeps

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for count in (1, 3):
        soundfile.write(str(folder / f"beeps{count}.wav"), beeps(rng, count), 16000, subtype="PCM_16")
    soundfile.write(str(folder / "cd_quality.wav"), beeps(rng, 2), 44100, subtype="PCM_16")
    Image.new("RGB", (96, 64), (220, 30, 30)).save(folder / "red.png")
    Image.new("RGB", (64, 96), (30, 30, 220)).save(folder / "blue.png")
    # A white dot moving right over 4 s, and over 6 s: 12 frames sampled, 6 temporal patches, more
    # than the 4 merged columns of its 112 x 84 frames.
    for name, frames in (("dot.mp4", 16), ("long_dot.mp4", 24)):
        writer = cv2.VideoWriter(str(folder / name), cv2.VideoWriter_fourcc(*"mp4v"), 4, (112, 84))
        for i in range(frames):
            frame = np.zeros((84, 112, 3), np.uint8)
            cv2.circle(frame, (8 + 96 * i // frames, 42), 6, (255, 255, 255), -1)
            writer.write(frame)
        writer.release()
    (folder / "broken.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEnot a clip")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42not a video")
    return folder


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_media(tmp_path_factory.mktemp("media") / "media")


# -- data checks through the CLI, before anything is submitted --------------------------------------


def _problem(i: int, **fields: Any) -> dict[str, Any]:
    return {"id": f"p{i}", "question": "<sound> How many sounds?", "answer": "(A) 1 sound", **fields}


BAD_MEDIA = [
    # (the second problem's fields, words of the error line)
    ({"sound": "missing.wav"}, ["problem 'p2': sound 'missing.wav'", "not found"]),
    ({"sound": "../outside.wav"}, ["problem 'p2': sound '../outside.wav' is outside generate.media_dir"]),
    ({"sound": "broken.wav"}, ["problem 'p2': sound 'broken.wav': not a readable audio file"]),
    ({"sound": "cd_quality.wav"}, ["problem 'p2': sound 'cd_quality.wav': audio at 44100 Hz", "16000 Hz"]),
    ({"image": "broken.png", "question": "<image> What color?"}, ["problem 'p2': image 'broken.png': not a readable image"]),
    ({"video": "broken.mp4", "question": "<video> Where?"}, ["problem 'p2': video 'broken.mp4': not a readable video"]),
    ({"question": "How many sounds?", "sound": "beeps1.wav"},
     [":2: problem 'p2': field 'sound' ('beeps1.wav') but no <sound> in its question", "put <sound> where"]),
    ({"question": "<sound> How many?"}, [":2: problem 'p2': its question has <sound> but the problem has no 'sound' field"]),
    ({"image": ["red.png", "blue.png"], "question": "<image> Which is red?"},
     [":2: problem 'p2': its question has 1 <image> for 2 files in 'image'"]),
    ({"image": ["red.png", 3], "question": "<image> <image>"}, [":2: field 'image' must be a file name or a list of file names"]),
]


@pytest.mark.parametrize(("fields", "expected"), BAD_MEDIA)
def test_bad_media_are_refused_before_anything_is_submitted(tiny_assets: Path, media: Path, tmp_path: Path,
                                                            fields: dict[str, Any], expected: list[str]) -> None:
    (media.parent / "outside.wav").write_bytes((media / "beeps1.wav").read_bytes())
    data = tmp_path / "audio.jsonl"
    problem = _problem(2, **fields)
    if "sound" not in fields and "sound" in problem:
        del problem["sound"]
    data.write_text(json.dumps(_problem(1, sound="beeps3.wav")) + "\n" + json.dumps(problem) + "\n")
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "c.yaml", small_config(tiny_assets, runs, data={"train": str(data)},
                                                            generate={"backend": "vllm", "media_dir": str(media)}))
    assert_refused(run_cli("-m", "pipeline.run", str(config)), str(data), *expected)
    assert not runs.exists()


def test_good_media_pass_the_checks(tiny_assets: Path, media: Path, tmp_path: Path) -> None:
    data = tmp_path / "media.json"
    data.write_text(json.dumps([
        _problem(1, sound="beeps1.wav"),
        {"id": "p2", "image": ["red.png", "blue.png"], "question": "<image> or <image>: which is red?", "answer": "(A) left"},
        {"id": "p3", "video": "dot.mp4", "question": "Where does the dot go? <video>", "answer": "right"},
        {"sound": "beeps3.wav", "conversations": [{"from": "human", "value": "<sound> How many?"}, {"from": "gpt", "value": "(C) 3 sounds"}]},
    ]))
    config = write_config(tmp_path / "c.yaml", small_config(tiny_assets, tmp_path / "runs", data={"train": str(data)},
                                                            generate={"backend": "vllm", "media_dir": str(media)}))
    result = run_cli("-m", "pipeline.run", str(config), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "4 training problems" in result.stdout


# -- where the media go ------------------------------------------------------------------------------


def test_media_go_where_their_tags_are_for_generation_and_training_alike(media: Path) -> None:
    problem = {"id": "p", "image": ["red.png", "blue.png"], "question": "  Left: <image>, right: <image>. Same color?  ", "answer": "no"}
    red, blue = (media / "red.png").resolve(), (media / "blue.png").resolve()
    (system, user) = messages_for(problem, "Be brief.", str(media))
    assert system == {"role": "system", "content": "Be brief."}
    assert user["content"] == [
        {"type": "text", "text": "Left:"}, {"type": "image_url", "image_url": {"url": red.as_uri()}},
        {"type": "text", "text": ", right:"}, {"type": "image_url", "image_url": {"url": blue.as_uri()}},
        {"type": "text", "text": ". Same color?"},
    ]
    messages, files = template_messages(problem, "Be brief.", str(media))
    assert messages[1]["content"] == [
        {"type": "text", "text": "Left:"}, {"type": "image"}, {"type": "text", "text": ", right:"}, {"type": "image"},
        {"type": "text", "text": ". Same color?"},
    ]
    assert files == [("image", str(red)), ("image", str(blue))]
    assert messages_for({**problem, "image": ["blue.png", "red.png"]}, None, str(media))[0]["content"][1]["image_url"]["url"] == blue.as_uri()


def test_seed_formats_with_media_load(tmp_path: Path) -> None:
    path = tmp_path / "countingqa.json"
    path.write_text(json.dumps([
        {"id": "sample_001", "sound": "a.wav", "question": "<sound> How many sounds?", "answer": "(A) 3 sounds"},
        {"image": ["x.jpg", "y.jpg"], "conversations": [{"from": "human", "value": "<image> <image> Describe the first."},
                                                        {"from": "gpt", "value": "a dog"}]},
    ]))
    flat, conversation = load_problems(path)
    assert flat["sound"] == "a.wav"
    assert conversation == {"id": "countingqa_1", "image": ["x.jpg", "y.jpg"], "question": "<image> <image> Describe the first.",
                            "answer": "a dog"}


# -- SFT on media ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def audio_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tools.demo import build_audio_model

    out = tmp_path_factory.mktemp("audio_model")
    build_audio_model(out)
    return out


AUDIO_PROBLEMS = [_problem(1, sound="beeps1.wav", answer="ANSWER: (A) 1 sound"),
                  _problem(2, sound="beeps3.wav", answer="ANSWER: (C) 3 sounds", question="Listen. <sound> How many?")]
IMAGE_PROBLEMS = [{"id": "i1", "image": ["red.png", "blue.png"], "question": "<image> or <image>: which is red?", "answer": "the first"},
                  {"id": "i2", "image": "blue.png", "question": "What color is it? <image>", "answer": "blue"}]
VIDEO_PROBLEMS = [{"id": "v1", "video": "dot.mp4", "question": "<video> Where does the dot go?", "answer": "right"},
                  {"id": "v2", "image": "red.png", "video": "dot.mp4", "question": "<image> Is this color in <video>?", "answer": "no"}]


def collated(model_dir: Path, problems: list[dict[str, Any]], media: Path, tmp_path: Path) -> tuple[Any, Any, dict[str, Any]]:
    """The training job's examples and batch of ``problems`` (as replay data), with the model."""
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    replay = tmp_path / "replay.json"
    replay.write_text(json.dumps(problems))
    processor = AutoProcessor.from_pretrained(model_dir)
    examples = sft_examples(None, str(replay), None, str(media), multimodal=True)
    collator, examples = collator_for(processor, examples, max_length=2048)
    torch.manual_seed(0)
    model = AutoModelForMultimodalLM.from_pretrained(model_dir, dtype=torch.float32)
    match_vllm_positions(model)  # as the training job prepares it
    return model, collator, collator(examples)


def encoder_gradient(model: Any, batch: dict[str, Any]) -> float:
    model.zero_grad()
    model(**batch).loss.backward()
    return sum(float(p.grad.pow(2).sum()) for p in encoder_parameters(model).values() if p.grad is not None) ** 0.5


def test_audio_reaches_the_model_in_training(audio_model: Path, media: Path, tmp_path: Path) -> None:
    model, collator, batch = collated(audio_model, AUDIO_PROBLEMS, media, tmp_path)
    assert isinstance(collator, MediaCollator)  # TRL has no audio collator
    # Both clips' features, each with its 2 s of frames (100 a second) unmasked.
    assert batch["input_features"].shape[:2] == (2, 128) and batch["input_features"].abs().sum() > 0
    assert batch["feature_attention_mask"].sum(1).tolist() == [200, 200]
    audio_tokens = (batch["input_ids"] == model.config.audio_token_id).sum(1).tolist()
    assert audio_tokens == [50, 50]  # 2 s after the encoder's pooling: 25 tokens a second
    # Loss on the responses only.
    labelled = [model_tokens(collator.processor, row, batch["labels"]) for row in range(2)]
    assert labelled == ["ANSWER: (A) 1 sound<|im_end|>\n", "ANSWER: (C) 3 sounds<|im_end|>\n"]
    assert encoder_gradient(model, batch) > 0
    # Another clip, another loss: the model hears it.
    silent = {**batch, "input_features": torch.zeros_like(batch["input_features"])}
    with torch.no_grad():
        assert abs(float(model(**batch).loss) - float(model(**silent).loss)) > 1e-4


def model_tokens(processor: Any, row: int, labels: torch.Tensor) -> str:
    return processor.tokenizer.decode(labels[row][labels[row] != -100])


def test_images_reach_the_model_in_training_through_trl(vision_model: Path, media: Path, tmp_path: Path) -> None:
    model, collator, batch = collated(vision_model, IMAGE_PROBLEMS, media, tmp_path)
    assert isinstance(collator, DecodedImages)  # TRL's DataCollatorForVisionLanguageModeling, images decoded as vLLM does
    assert batch["image_grid_thw"].shape[0] == 3 and batch["pixel_values"].abs().sum() > 0
    image_tokens = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert image_tokens == [int(batch["image_grid_thw"][:2].prod(1).sum()) // 4, int(batch["image_grid_thw"][2].prod()) // 4]
    assert [model_tokens(collator.collate.processor, row, batch["labels"]) for row in range(2)] == \
        ["the first<|im_end|>\n", "blue<|im_end|>\n"]
    assert encoder_gradient(model, batch) > 0


def test_video_reaches_the_model_in_training(vision_model: Path, media: Path, tmp_path: Path) -> None:
    model, collator, batch = collated(vision_model, VIDEO_PROBLEMS, media, tmp_path)
    assert isinstance(collator, MediaCollator)  # TRL's collator takes images only
    # 16 frames at 4 fps: vLLM samples 2 a second, 8 frames, 4 steps of 2 frames for the encoder.
    assert batch["video_grid_thw"][:, 0].tolist() == [4, 4] and batch["image_grid_thw"].shape[0] == 1
    assert encoder_gradient(model, batch) > 0


@pytest.mark.parametrize(("problem", "differs"), [
    ({"id": "v", "video": "dot.mp4", "question": "<video> Where does the dot go?"}, False),
    ({"id": "v", "video": "long_dot.mp4", "question": "<video> Where does the dot go?"}, True),
    ({"id": "i", "image": ["red.png", "blue.png"], "question": "<image> or <image>: which is red?"}, False),
])
def test_qwen2_vl_trains_with_the_positions_vllm_serves(vision_model: Path, media: Path, problem: dict[str, Any],
                                                        differs: bool) -> None:
    """The text after an image or video goes on from the largest position of its grid, the temporal
    one included (Qwen2-VL's own code, vLLM's get_mrope_input_positions); transformers 5 goes on from
    the largest of height and width, which moves everything after a video of 6 temporal patches."""
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    from jobs.training.media import prompt_features, vllm_rope_index

    processor = AutoProcessor.from_pretrained(vision_model)
    model = AutoModelForMultimodalLM.from_pretrained(vision_model, dtype=torch.float32)
    prompt, files = template_messages({**problem, "answer": "x"}, None, str(media))
    ids, features = prompt_features(processor, prompt, files)
    inputs = {"input_ids": torch.tensor([ids]), "mm_token_type_ids": features["mm_token_type_ids"][None],
              "image_grid_thw": features.get("image_grid_thw"), "video_grid_thw": features.get("video_grid_thw")}
    theirs, _ = model.model.get_rope_index(**inputs)
    ours, _ = vllm_rope_index(model.model, **inputs)
    kinds = inputs["mm_token_type_ids"][0]
    last = int(kinds.nonzero().max())  # the last media token; text follows
    assert int(ours[:, 0, last + 1].unique()) == int(ours[:, 0, : last + 1].max()) + 1
    assert torch.equal(theirs, ours) is not differs
    match_vllm_positions(model)
    assert torch.equal(model.model.get_rope_index(**inputs)[0], ours), "the model trains with them"


def one_step(model_dir: Path, problems: list[dict[str, Any]], media: Path, out: Path, **train: Any) -> Path:
    """One SFT step of the training job on ``problems``; the folder of the model it writes."""
    replay = out / "replay.json"
    out.mkdir()
    replay.write_text(json.dumps(problems))
    quiet_libraries()  # as the job's reporting does: TRL and PEFT still use a deprecated property
    config = TrainConfig(max_steps=1, batch_size=2, gradient_accumulation_steps=1, warmup_ratio=0.0, gradient_checkpointing=False,
                         replay_data=str(replay), logging_steps=1, lora_r=4, lora_alpha=8, **train)
    train_model(TrainSpec(JobTarget(str(out), "train"), None, str(model_dir), str(model_dir), 1, str(out / "train"), 1e-2,
                          config, None, 0, media_dir=str(media)), {})
    return out / "train" / "model"


def changed(before: Path, after: Path) -> set[str]:
    old, new = load_file(str(before / "model.safetensors")), load_file(str(after / "model.safetensors"))
    return {name for name, tensor in old.items() if not torch.equal(tensor, new[name])}


@pytest.mark.parametrize("kind", ["audio", "image"])
def test_a_training_step_trains_the_encoders_unless_frozen(audio_model: Path, vision_model: Path, media: Path, tmp_path: Path,
                                                           kind: str) -> None:
    # Names in the saved checkpoints (each model's original layout).
    model_dir, problems, encoder, projector, language_model = {
        "audio": (audio_model, AUDIO_PROBLEMS, "audio_tower.", "multi_modal_projector.", "language_model.model.layers."),
        "image": (vision_model, IMAGE_PROBLEMS, "visual.blocks.", "visual.merger.", "model.layers."),
    }[kind]
    trained = changed(model_dir, one_step(model_dir, problems, media, tmp_path / "full", method="full"))
    assert any(encoder in name for name in trained) and any(projector in name for name in trained)
    assert any(name.startswith(language_model) for name in trained)
    frozen = changed(model_dir, one_step(model_dir, problems, media, tmp_path / "frozen", method="full", freeze_encoders=True))
    assert not any(encoder in name for name in frozen), "train.freeze_encoders keeps the encoder as it is"
    assert any(projector in name for name in frozen), "the projector into the language model still trains"
    # LoRA: adapters on the language model's q/v projections only, not on the encoder's of the same names.
    lora = tmp_path / "lora"
    merged = changed(model_dir, one_step(model_dir, problems, media, lora, method="lora", target_modules=["q_proj", "v_proj"]))
    assert merged and all(name.startswith(language_model) and name.endswith(("q_proj.weight", "v_proj.weight")) for name in merged)
    targets = json.loads((lora / "train" / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert targets and all(".language_model." in name for name in targets)


def test_build_audio_makes_a_countingqa_like_set(tmp_path: Path) -> None:
    import soundfile

    from jobs.problems.prompts import check_media

    assets = tmp_path / "audio_assets"
    result = run_cli("-m", "tools.demo", "build-audio", str(assets), "--no-warm-start")
    assert result.returncode == 0, result.stderr
    train, heldout = load_problems(assets / "train.json"), load_problems(assets / "heldout.json")
    assert "conversations" in json.loads((assets / "heldout.json").read_text())[0], "the held-out set in seed 001's format"
    media = assets / "counting_audios"
    check_media(train + heldout, str(media), "assets")
    for problem in train[:20]:
        assert problem["question"].startswith("<sound> How many sounds do you hear?\n(A) 1 sound\n(B) 2 sounds")
        assert problem["answer"] in {"(A) 1 sound", "(B) 2 sounds", "(C) 3 sounds", "(D) 4 sounds", "(E) 5 sounds"}
        assert soundfile.info(str(media / problem["sound"])).samplerate == 16000
    assert {p["answer"] for p in train} == {"(A) 1 sound", "(B) 2 sounds", "(C) 3 sounds", "(D) 4 sounds", "(E) 5 sounds"}
    assert (assets / "random_init" / "config.json").is_file() and (assets / "random_init" / "processor_config.json").is_file()


def test_seed_003s_videos_are_what_its_rewards_read(tmp_path: Path) -> None:
    """tools.demo's temporal grounding set (build-vision): the videos decode as vLLM's would, and the
    annotations score the right answers 1 with seed 003's rewards (its Refuse-IoU table), others less."""
    from jobs.problems.media import read_video
    from jobs.problems.prompts import check_media
    from jobs.scoring.reward_functions import refuse_iou
    from tools.demo import VIDEO_FPS, video_grounding

    problems = video_grounding(random.Random(0), 12, tmp_path / "videos")
    check_media(problems, str(tmp_path / "videos"), "assets")
    assert {p["task_type"] for p in problems} == {"answerable", "refusable"}
    for problem in problems:
        video = read_video(tmp_path / "videos" / problem["video"])
        assert video.total_num_frames / VIDEO_FPS == problem["duration"] and 0 <= problem["timestamps"][0] < problem["timestamps"][1]
        lit = [i for i, frame in enumerate(video.frames) if frame.max() > 100]  # the frames the dot is in
        assert [lit[0] / VIDEO_FPS, (lit[-1] + 1) / VIDEO_FPS] == problem["timestamps"]
    columns = {key: [p[key] for p in problems] for key in ("task_type", "timestamps", "duration")}
    right = [[{"role": "assistant", "content": f"<think>x</think><answer>{p['answer']}</answer><correction>NIL</correction>"}]
             for p in problems]
    assert refuse_iou([None] * 12, right, **columns) == [1.0] * 12
    late = [[{"role": "assistant", "content": f"<answer>{p['timestamps'][0] + 0.5:.2f} to {p['timestamps'][1] + 0.5:.2f}</answer>"}]
            for p in problems]
    scores = refuse_iou([None] * 12, late, **columns)
    assert all((0 < score < 1) if p["task_type"] == "answerable" else score == 0 for p, score in zip(problems, scores, strict=True))


# -- GRPO on stored rollouts of media problems -------------------------------------------------------


def sampled(model: Any, batch: dict[str, Any], eos: int) -> list[tuple[list[int], list[float]]]:
    """Per row of an SFT batch: its response's tokens up to the end of turn, and their log-probabilities
    under ``model`` given the whole batch (media included), as a sampler at temperature 1 gives them."""
    with torch.no_grad():
        logps = model(**batch).logits.log_softmax(-1)
    rows = []
    for row in range(batch["input_ids"].shape[0]):
        positions = (batch["labels"][row] != -100).nonzero()[:, 0].tolist()
        ids = batch["input_ids"][row, positions].tolist()
        end = ids.index(eos) + 1
        rows.append((ids[:end], [float(logps[row, p - 1, t]) for p, t in zip(positions[:end], ids[:end], strict=True)]))
    return rows


@pytest.mark.parametrize("kind", ["audio", "image", "video"])
def test_grpo_on_stored_rollouts_gives_the_media_to_the_policy(audio_model: Path, vision_model: Path, media: Path,
                                                                tmp_path: Path, kind: str) -> None:
    """A training step of GRPO over the arrays on media problems (StoredRolloutTrainer): its samples'
    log-probabilities are those of a plain forward of the SFT collator's batch with the media; the
    trainer's own log-probabilities of them (the old policy's, in the importance ratio) equal them
    within 1e-5 only if every forward got each row's media."""
    from datasets import Dataset
    from transformers import AutoProcessor
    from trl import GRPOConfig

    from jobs.scoring.config import RewardConfig
    from jobs.scoring.rewards import RewardContext, RewardSet
    from jobs.training.grpo import grpo_dataset
    from jobs.training.grpo_trainer import StoredRolloutTrainer, TrlReward

    model_dir, problems = {"audio": (audio_model, AUDIO_PROBLEMS), "image": (vision_model, IMAGE_PROBLEMS),
                           "video": (vision_model, VIDEO_PROBLEMS)}[kind]
    model, _, batch = collated(model_dir, problems, media, tmp_path)
    processor = AutoProcessor.from_pretrained(model_dir)
    samples = sampled(model, batch, processor.tokenizer.eos_token_id)
    encoders = [key for key in ("input_features", "pixel_values", "pixel_values_videos") if key in batch]
    with torch.no_grad():  # the counter-check: without the media's values, other log-probabilities
        blind = model(**{**batch, **{key: torch.zeros_like(batch[key]) for key in encoders}}).logits.log_softmax(-1)
        assert not torch.allclose(blind, model(**batch).logits.log_softmax(-1), atol=1e-3)
    # Two samples per problem, the same answer scored 1 and 0: a group with a signal.
    rollouts = {problem["id"]: [{"completion_ids": ids, "logprobs": logps, "rewards": {"correctness": score},
                                 "advantage": advantage, "staleness": 0} for score, advantage in ((1.0, 0.7), (0.0, -0.7))]
                for problem, (ids, logps) in zip(problems, samples, strict=True)}
    problems_path = tmp_path / "problems.jsonl"
    problems_path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    rows = grpo_dataset(str(problems_path), None, str(media), multimodal=True)
    context = RewardContext(verifier="exact")
    reward_set = RewardSet([RewardConfig(name="correctness")], context)
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                      num_generations=2, max_completion_length=32, temperature=1.0, beta=0.0, learning_rate=1e-3, max_steps=1,
                      logging_steps=1, report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False, seed=0)
    trainer = StoredRolloutTrainer(model=model, reward_funcs=[TrlReward(reward_set, r) for r in reward_set.rewards], args=args,
                                   train_dataset=Dataset.from_list(rows), processing_class=processor, reward_set=reward_set,
                                   context=context, rollouts_dir=tmp_path / "rollouts", rollouts=rollouts)
    trainer.train()
    step = next(entry for entry in trainer.state.log_history if "loss" in entry)
    inputs = sum(value.numel() for key, value in batch.items() if key not in ("input_ids", "attention_mask", "labels", *PER_TOKEN))
    assert step["media/encoder_inputs"] == inputs * 2, "each row's media in the loss forward, each problem twice"
    assert step["sampling/sampling_logp_difference/max"] < 1e-5, step
