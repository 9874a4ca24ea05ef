"""Audio, image and video requests to real vLLM CPU servers of the tiny multimodal models (tools.demo).

One server per model, started by the jobs' own code (generate.media_dir its only media folder) and
kept for its class of tests; float32, as training computes on CPU. Each request is a problem's
messages as generation builds them; the server's prompt tokens must equal those training gives
the same model (jobs.training.media) and its first-token log-probabilities those of transformers
on that training input: the media reach the model in training as in generation. Skipped where
vLLM is not installed, except under CI (tests/test_vllm.py's vllm_installed).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from jobs.generation import generate
from jobs.generation.config import GenerateConfig
from jobs.problems.data import read_jsonl
from jobs.problems.prompts import messages_for
from jobs.specs import GenerateShardSpec, JobTarget
from jobs.vllm.server import Endpoint, ServerFiles, start_servers
from state import Ledger
from tests.conftest import run_cli, small_config, write_config
from tests.test_media import (
    AUDIO_PROBLEMS,
    IMAGE_PROBLEMS,
    VIDEO_PROBLEMS,
    collated,
    write_media,
)
from tests.test_vllm import vllm_generate, vllm_installed  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_media(tmp_path_factory.mktemp("media") / "media")


def serving(media: Path) -> GenerateConfig:
    config = vllm_generate(media_dir=str(media), num_samples=2, max_tokens=8)
    config.vllm.dtype = "float32"
    config.vllm.max_model_len = 2048
    return config


def serve(build: Any, folder: Path, media: Path) -> Iterator[tuple[Path, Endpoint]]:
    build(folder / "model")
    fleet = start_servers(str(folder / "model"), serving(media), ServerFiles(folder / "server", folder / "api_key"))
    try:
        yield folder / "model", fleet.endpoints[0]
    finally:
        fleet.stop()


def ask(endpoint: Endpoint, messages: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """One greedy chat request, with the prompt's token ids and the first token's log-probabilities."""
    body = {"model": endpoint.model, "messages": messages, "max_tokens": 8, "temperature": 0, "logprobs": True,
            "top_logprobs": 5, "return_token_ids": True, "return_tokens_as_token_ids": True}
    request = urllib.request.Request(f"{endpoint.base_url}/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json", "Authorization": f"Bearer {endpoint.api_key}"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def assert_same_prompt_as_training(model_dir: Path, endpoint: Endpoint, problems: list[dict[str, Any]], media: Path,
                                   tmp_path: Path) -> None:
    for problem in problems:
        status, reply = ask(endpoint, messages_for(problem, None, str(media)))
        assert status == 200, reply
        assert reply["choices"][0]["message"]["content"], "an answer"
        model, _, batch = collated(model_dir, [problem], media, tmp_path)
        prompt_length = int((batch["labels"][0] == -100).sum())
        assert reply["prompt_token_ids"] == batch["input_ids"][0][:prompt_length].tolist(), \
            f"{problem['id']}: the server and training see different prompts"
        # The same model on the same input: transformers on the training batch, vLLM on the request.
        inputs = {k: v[:, :prompt_length] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
                  for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            log_probs = model(**inputs).logits[0, -1].log_softmax(-1)
        for candidate in reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]:
            token = int(candidate["token"].removeprefix("token_id:"))
            assert abs(candidate["logprob"] - float(log_probs[token])) < 0.01, (problem["id"], candidate)
        # Every token of the server's answer, as training computes it after that prompt (the positions
        # after a video among them: jobs.training.media.vllm_rope_index).
        answer = reply["choices"][0]["token_ids"]
        full = {**inputs, "input_ids": torch.cat([inputs["input_ids"], torch.tensor([answer])], dim=1)}
        full["attention_mask"] = torch.ones_like(full["input_ids"])
        if "mm_token_type_ids" in inputs:
            full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, len(answer), dtype=torch.long)], dim=1)
        with torch.no_grad():
            answer_logps = model(**full).logits[0, prompt_length - 1:-1].log_softmax(-1)
        served = [entry["logprob"] for entry in reply["choices"][0]["logprobs"]["content"]]
        trained = [float(answer_logps[i, token]) for i, token in enumerate(answer)]
        assert max(abs(a - b) for a, b in zip(served, trained, strict=True)) < 0.01, (problem["id"], served, trained)


@pytest.mark.usefixtures("vllm_installed")
class TestAudio:
    @pytest.fixture(scope="class")
    @classmethod
    def server(cls, tmp_path_factory: pytest.TempPathFactory, media: Path) -> Iterator[tuple[Path, Endpoint]]:
        from tools.demo import build_audio_model

        yield from serve(build_audio_model, tmp_path_factory.mktemp("audio"), media)

    def test_audio_requests_get_answers_from_the_prompt_training_sees(self, server: tuple[Path, Endpoint], media: Path,
                                                                      tmp_path: Path) -> None:
        two_clips = {"id": "a3", "sound": ["beeps1.wav", "beeps3.wav"], "question": "<sound> or <sound>: which has more?", "answer": "2"}
        assert_same_prompt_as_training(*server, [*AUDIO_PROBLEMS, two_clips], media, tmp_path)

    def test_a_file_outside_the_media_folder_is_refused_by_the_server_itself(self, server: tuple[Path, Endpoint], media: Path) -> None:
        outside = media.parent / "outside.wav"
        outside.write_bytes((media / "beeps1.wav").read_bytes())
        # Past our own check (jobs.problems.prompts refuses such a path before anything is sent).
        messages = [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": outside.as_uri()}},
                                                 {"type": "text", "text": "How many?"}]}]
        status, reply = ask(server[1], messages)
        assert status == 400, reply
        assert "must be a subpath of `--allowed-local-media-path" in reply["error"]["message"]
        # vLLM hides the paths in its answer; the server's command line says which folder it allows.
        log = (server[0].parent / "server" / "server_0.log").read_text()
        assert f"--allowed-local-media-path {media.resolve()} " in log

    def test_a_generation_shard_of_audio_problems(self, server: tuple[Path, Endpoint], media: Path, tmp_path: Path) -> None:
        """The generation job's own client, against the running server (generate.endpoints)."""
        model_dir, endpoint = server
        problems = tmp_path / "problems.jsonl"
        problems.write_text("".join(json.dumps(p) + "\n" for p in AUDIO_PROBLEMS))
        os.environ["MEDIA_TEST_KEY"] = endpoint.api_key
        config = serving(media)
        config.endpoints, config.endpoint_api_key_env = [endpoint.base_url.removesuffix("/v1")], "MEDIA_TEST_KEY"
        output = tmp_path / "run" / "shard_00000.jsonl"
        generate.run(GenerateShardSpec(JobTarget(str(tmp_path / "run"), "iter_001/generate/shard_00000"), str(problems), 0, 2,
                                       str(model_dir), str(output), config, 7, str(tmp_path / "run" / "key")))
        records = read_jsonl(output)
        assert [r["id"] for r in records] == ["p1", "p2"] and [r["sound"] for r in records] == ["beeps1.wav", "beeps3.wav"]
        assert all("error" not in r and r["num_candidates"] == 2 and all(c["num_tokens"] > 0 for c in r["candidates"])
                   for r in records)


@pytest.mark.usefixtures("vllm_installed")
def test_grpo_rounds_on_audio_sample_on_vllm_and_train_with_the_clips(media: Path, tiny_assets: Path, tmp_path: Path) -> None:
    """grpo.rollouts: arrays on seed 000's counting task (tools.demo's clips) with the tiny Qwen2-Audio:
    the generation shard's vLLM server samples with each clip and keeps the processed log-probabilities;
    the training step gets the clips (encoder inputs in its forward) and finds its own log-probabilities
    of the samples close to the server's, which it could not without the audio."""
    import random

    from tools.demo import build_audio_model, counting_problems

    build_audio_model(tmp_path / "model")
    clips = media / "counting"
    clips.mkdir(exist_ok=True)
    problems = counting_problems(random.Random(0), 8, "c", clips)
    train = tmp_path / "train.json"
    train.write_text(json.dumps([{**p, "sound": f"counting/{p['sound']}"} for p in problems]))
    server = serving(media)
    runs = tmp_path / "runs"
    config = small_config(
        tiny_assets, runs, method="grpo", num_iterations=1, model={"path": str(tmp_path / "model")},
        data={"train": str(train), "heldout": None},
        generate={"backend": "vllm", "media_dir": str(media), "batch_size": 8, "num_shards": 1,
                  "vllm": {"dtype": "float32", "max_model_len": 2048, "extra_args": server.vllm.extra_args, "env": server.vllm.env}},
        filter={"verifier": "multiple_choice"},
        # Kimi's length reward: a random model's samples differ in length, so groups have variance.
        grpo={"rollouts": "arrays", "rewards": [{"name": "correctness"}, {"name": "length"}], "num_generations": 4,
              "temperature": 1.0, "max_completion_length": 12, "batch_size": 16, "learning_rates": [1e-3], "logging_steps": 1,
              "save_steps": 1000},
    )
    result = run_cli("-m", "pipeline.run", str(write_config(tmp_path / "audio_grpo.yaml", config)))
    assert result.returncode == 0, result.stdout + result.stderr
    ledger = Ledger(runs / "small")
    scored = ledger.read("iter_001/score")["metrics"]["round"]
    assert scored["groups"] == 8 and scored["kept_groups"] >= 4, scored
    train_metrics = ledger.read("iter_001/train")["metrics"]
    assert train_metrics["rollouts"] == "arrays" and train_metrics["steps"] >= 1
    # Each of the 16 samples of a step: one 2 s clip, 128 mel bins x 3000 frames and their mask.
    assert all(step["media/encoder_inputs"] == 16 * (128 * 3000 + 3000) for step in train_metrics["step_log"])
    # The first step, on-policy: vLLM's float32 CPU kernels and transformers' differ a little; without the clip, by far more.
    first = train_metrics["step_log"][0]
    assert first["sampling/sampling_logp_difference/max"] < 0.05, first
    # No sample holds the audio placeholder, which the training forward could not match to a clip (the servers ban it).
    audio_token = json.loads((tmp_path / "model" / "config.json").read_text())["audio_token_index"]
    samples = [c for r in read_jsonl(next((runs / "small" / "iter_001" / "generate").glob("shard_*.jsonl"))) for c in r["candidates"]]
    assert len(samples) == 32 and not any(audio_token in c["completion_ids"] for c in samples)


@pytest.mark.usefixtures("vllm_installed")
class TestVision:
    @pytest.fixture(scope="class")
    @classmethod
    def server(cls, tmp_path_factory: pytest.TempPathFactory, media: Path) -> Iterator[tuple[Path, Endpoint]]:
        from tools.demo import build_vision_model

        yield from serve(build_vision_model, tmp_path_factory.mktemp("vision"), media)

    def test_image_and_video_requests_get_answers_from_the_prompt_training_sees(self, server: tuple[Path, Endpoint],
                                                                                media: Path, tmp_path: Path) -> None:
        # One image, two images in one question (seed 002's candidates), a video, an image and a video,
        # a video of more temporal patches than merged rows and columns.
        long_video = {"id": "v3", "video": "long_dot.mp4", "question": "<video> Where does the dot go?", "answer": "right"}
        assert_same_prompt_as_training(*server, [*IMAGE_PROBLEMS, *VIDEO_PROBLEMS, long_video], media, tmp_path)

    def test_rest_on_seed_002s_game_with_images_the_speaker_and_the_listener_look_at_the_candidates(
        self, server: tuple[Path, Endpoint], media: Path, tiny_assets: Path, tmp_path: Path
    ) -> None:
        """Seed 002's game with image objects (tools.demo's image_games): the speaker (the tiny Qwen2-VL,
        served) sees the candidates' images and describes the target; the listener service (the same
        model, a job of the run) looks at the same files (candidate_paths, under generate.media_dir);
        the filter keeps the descriptions it picks the target from, and the speaker trains on them
        with their images."""
        import random

        from tools.demo import image_games

        played = image_games(random.Random(0), 12, media / "games")
        for game in played:
            game["image"] = game["candidate_paths"] = [f"games/{path}" for path in game["candidate_paths"]]
        games = tmp_path / "image_games.jsonl"
        games.write_text("".join(json.dumps(game) + "\n" for game in played))
        model_dir, endpoint = server
        os.environ["MEDIA_TEST_KEY"] = endpoint.api_key
        generate_config = {"backend": "vllm", "endpoints": [endpoint.base_url.removesuffix("/v1")], "endpoint_api_key_env": "MEDIA_TEST_KEY",
                           "media_dir": str(media), "num_samples": 2, "max_tokens": 16, "batch_size": 4, "num_shards": 1}
        runs = tmp_path / "runs"
        config = small_config(
            tiny_assets, runs, num_iterations=1, learning_rates=[1e-3], model={"path": str(model_dir)},
            data={"train": str(games), "heldout": None}, generate=generate_config,
            filter={"strategy": "all", "reward": {"rewards": [{"name": "service_score"}], "threshold": 1.0}},
            services={"reward": {"model": str(model_dir), "kind": "yes_probability", "wait_s": 600}},
        )
        result = run_cli("-m", "pipeline.run", str(write_config(tmp_path / "images.yaml", config)))
        assert result.returncode == 0, result.stdout + result.stderr
        ledger = Ledger(runs / "small")
        filtered = ledger.read("iter_001/filter")["metrics"]
        assert filtered["reward_failures"]["service_score"]["failed"] == 0, "every candidate scored by the listener"
        assert filtered["total_candidates"] == 24 and 0 < filtered["filtered_samples"] < 24, "it picked some targets, not all"
        kept = json.loads((runs / "small" / "iter_001" / "filter" / "filtered.json").read_text())
        assert all(sample["image"][0].startswith("games/") for sample in kept), "the kept samples keep their images for training"
        assert ledger.read("iter_001/train")["status"] == "done"
        assert ledger.read("services/reward")["status"] == "done"

    def test_a_broken_image_is_refused_by_the_server(self, server: tuple[Path, Endpoint], media: Path) -> None:
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": (media / "broken.png").as_uri()}},
                                                 {"type": "text", "text": "What color?"}]}]
        status, reply = ask(server[1], messages)
        assert status == 400, reply
