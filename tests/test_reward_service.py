"""The reward service (seed 002's listener as a FastAPI service) with real tiny models, and the
``service_score`` reward's client against real servers: keys, 503 + retry, the cache, a server
killed mid-scoring and replaced, and one that never comes back."""

from __future__ import annotations

import json
import math
import queue
import random
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from jobs.scoring.config import RewardConfig
from jobs.scoring.rewards import PartialScores, RewardContext, RewardSet
from jobs.scoring.service_reward import service_score
from jobs.services.config import RewardServiceConfig
from jobs.services.process import DIE_WITH_PARENT
from jobs.services.reward_server import (
    ClassifierRequest,
    RewardServer,
    YesProbabilityRequest,
    load_scorer,
)
from jobs.specs import ServiceRef
from state import atomic_write_json

from .conftest import ROOT, run_cli

API_KEY = "test-key-" + "x" * 20


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("key") / "api_key"
    path.write_text(API_KEY)
    return path


def service_config(reward_models: Path, kind: str, **settings: Any) -> RewardServiceConfig:
    folder = "listener" if kind == "yes_probability" else "classifier"
    return RewardServiceConfig(model=str(reward_models / folder), kind=kind, **settings)  # type: ignore[arg-type]


@contextmanager
def serving(config: RewardServiceConfig) -> Iterator[str]:
    """A real uvicorn server in a thread of this process, on a free port of 127.0.0.1."""
    server = RewardServer(config, API_KEY, "127.0.0.1", 0)
    ready: queue.Queue[str] = queue.Queue()
    thread = threading.Thread(target=server.run, args=(ready.put,), daemon=True)
    thread.start()
    try:
        yield ready.get(timeout=120)
    finally:
        server.stop()
        thread.join(30)
    assert not thread.is_alive(), "stop() did not stop the server"


def server_process(config: RewardServiceConfig, key_file: Path, log: Path) -> tuple[subprocess.Popen[str], str]:
    """The service as its own process (python -m jobs.services.reward_server), and its URL."""
    command = [sys.executable, "-m", "jobs.services.reward_server", "--api-key-file", str(key_file),
               "--model", config.model, "--kind", config.kind, "--concurrency", str(config.concurrency)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log.open("a"), text=True, preexec_fn=DIE_WITH_PARENT)  # noqa: PLW1509 - it only calls prctl
    assert process.stdout is not None
    for line in process.stdout:  # ends when the process exits
        if line.startswith("serving at "):
            return process, line.split()[-1]
    raise AssertionError(f"the server exited ({process.wait()}) before serving:\n{log.read_text()[-2000:]}")


def http(method: str, url: str, body: Any = None, key: str | None = API_KEY) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method), timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def health(url: str) -> dict[str, Any]:
    status, body = http("GET", f"{url}/health", key=None)
    assert status == 200
    return body


def service_ref(folder: Path, config: RewardServiceConfig, url: str, key_file: Path) -> ServiceRef:
    """The service as a job of the run gives it to the rewards: its endpoint file (written here as
    the service job writes it) and the run's API key file. A client per endpoint file."""
    folder.mkdir(parents=True, exist_ok=True)
    write_endpoint(folder / "endpoint.json", url, config.kind)
    return ServiceRef(name="reward", endpoint_file=str(folder / "endpoint.json"), api_key_file=str(key_file), config=config)


def write_endpoint(path: Path, url: str, kind: str) -> None:
    atomic_write_json(path, {"url": url, "kind": kind, "job_id": "test", "node": "localhost"})


def scored(ref: ServiceRef, prompts: list[Any], completions: list[Any], **columns: Any) -> tuple[list[float | None], dict[str, Any]]:
    """service_score as the run calls it: through the reward registry, with the run's services."""
    rewards = RewardSet([RewardConfig(name="service_score", params={"tag": "detailed"})], RewardContext(services={"reward": ref}))
    scores = rewards.score(prompts, completions, **columns)
    return scores.by_reward["service_score"], rewards.failure_report()["service_score"]


def games(count: int, seed: int) -> list[dict[str, Any]]:
    from tools.demo import referential_games

    return referential_games(random.Random(seed), count)


def speaker_samples(count: int, seed: int) -> tuple[list[Any], dict[str, list[Any]]]:
    """Conversational completions describing each game's target in <detailed>, and the columns."""
    played = games(count, seed)
    completions = [[{"role": "assistant", "content": f"<thinking>hm</thinking><detailed>{g['answer']}</detailed>"}] for g in played]
    return completions, {"candidate_texts": [g["candidate_texts"] for g in played], "target_index": [g["target_index"] for g in played]}


def classifier_samples(tag: str, count: int) -> tuple[list[str], list[str]]:
    return [f"{tag}: question {i}?" for i in range(count)], [f"answer {i * 7 % 13}" for i in range(count)]


def in_process_scores(reward_models: Path, prompts: list[str], completions: list[str]) -> list[float]:
    scorer = load_scorer(service_config(reward_models, "classifier"))
    return [r["score"] for r in scorer.score([ClassifierRequest(prompt=p, completion=c) for p, c in zip(prompts, completions, strict=True)])]


def test_the_listener_service_answers_what_the_model_computes_in_process(reward_models: Path) -> None:
    config = service_config(reward_models, "yes_probability")
    played = games(12, seed=7)
    requests = [{"candidates": g["candidate_texts"], "question": f"Is this {g['answer']}?", "topk": 2} for g in played]
    scorer = load_scorer(config)
    expected = scorer.score([YesProbabilityRequest(**r) for r in requests])
    # P(yes) by hand, one unpadded sequence per spelling: the product of the conditional
    # probabilities of the answer's tokens ("y", "e", "s" with this byte-level tokenizer).
    candidate, question = requests[0]["candidates"][1], requests[0]["question"]
    assert expected[0]["yes_probabilities"][1] == pytest.approx(sum(answer_probability(scorer, candidate, question, s) for s in ("yes", "Yes")), rel=1e-5)
    with serving(config) as url:
        assert health(url)["kind"] == "yes_probability"
        status, body = http("POST", f"{url}/batch_score", {"batch": requests})
        assert status == 200 and body["took"] >= 0
        status, single = http("POST", f"{url}/score", requests[0])
        assert status == 200
    assert single == body["results"][0]
    for got, want in zip(body["results"], expected, strict=True):
        assert got["predicted_index"] == want["predicted_index"] and got["topk_indices"] == want["topk_indices"]
        assert got["yes_probabilities"] == pytest.approx(want["yes_probabilities"], rel=1e-4)
        assert all(0 < p < 1 for p in got["yes_probabilities"])
        assert got["topk_indices"][0] == got["predicted_index"] and len(got["topk_indices"]) == 2


def answer_probability(scorer: Any, candidate: str, question: str, answer: str) -> float:
    import torch

    prompt = scorer.tokenizer.apply_chat_template([{"role": "user", "content": f"{candidate}\n{question}"}], add_generation_prompt=True, tokenize=False)
    prompt_length = len(scorer.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    ids = scorer.tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    assert len(ids) - prompt_length == 3
    with torch.no_grad():
        logprobs = scorer.model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return math.exp(sum(logprobs[i - 1, ids[i]].item() for i in range(prompt_length, len(ids))))


def test_keys_bad_requests_and_the_classifier(reward_models: Path, key_file: Path, tmp_path: Path) -> None:
    config = service_config(reward_models, "classifier")
    prompts, completions = classifier_samples("keys", 6)
    request = {"batch": [{"prompt": prompts[0], "completion": completions[0]}]}
    with serving(config) as url:
        assert http("POST", f"{url}/batch_score", request, key="wrong")[0] == 401
        assert http("POST", f"{url}/batch_score", request, key=None)[0] == 401
        assert http("POST", f"{url}/score", request["batch"][0], key="wrong")[0] == 401
        # A listener's request sent to a classifier.
        assert http("POST", f"{url}/score", {"candidates": ["red circle"], "question": "Is this red?"})[0] == 422
        assert health(url)["served"] == 0
        ref = service_ref(tmp_path, config, url, key_file)
        values, failures = scored(ref, prompts, completions)
        assert values == pytest.approx(in_process_scores(reward_models, prompts, completions), rel=1e-4)
        assert failures == {"failed": 0, "first_error": None}
        wrong_key = tmp_path / "wrong_key"
        wrong_key.write_text("not-the-key")
        values, failures = scored(service_ref(tmp_path / "wrong", config, url, wrong_key), *classifier_samples("wrong", 2))
    assert values == [None, None]
    assert failures["failed"] == 2 and "401" in failures["first_error"]


def test_candidate_paths_are_refused_by_a_text_listener(reward_models: Path) -> None:
    with serving(service_config(reward_models, "yes_probability")) as url:
        status, body = http("POST", f"{url}/score", {"candidate_paths": ["/img/a.jpg"], "question": "Is this it?", "topk": 1})
    assert status == 422
    assert "text-only" in json.dumps(body)


def test_three_times_more_concurrent_callers_than_slots_all_get_scores_through_503_and_retry(reward_models: Path, key_file: Path, tmp_path: Path) -> None:
    # One slot; a caller waits a millisecond for it, then is answered 503 and retries with back-off.
    config = service_config(reward_models, "classifier", concurrency=1, acquire_timeout_s=0.001, chunk_size=2, chunk_delay_s=0.0,
                            max_retries=10, backoff_factor=0.02)
    callers = [classifier_samples(f"busy{i}", 12) for i in range(3)]
    results: dict[int, tuple[list[float | None], dict[str, Any]]] = {}
    with serving(config) as url:
        ref = service_ref(tmp_path, config, url, key_file)
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, scored(ref, *callers[i]))) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        counts = health(url)
    assert counts["refused_busy"] > 0, "no call was answered 503: the test did not exercise the semaphore"
    for i, (prompts, completions) in enumerate(callers):
        values, failures = results[i]
        assert failures["failed"] == 0, failures
        assert values == pytest.approx(in_process_scores(reward_models, prompts, completions), rel=1e-4)
    assert counts["served"] == 36


def test_a_repeated_pair_is_sent_once(reward_models: Path, key_file: Path, tmp_path: Path) -> None:
    config = service_config(reward_models, "yes_probability", chunk_delay_s=0.0)
    completions, columns = speaker_samples(4, seed=11)
    # Samples 0 and 4 are the same pair; so are all of the second call's.
    completions, columns = completions + completions[:1], {k: v + v[:1] for k, v in columns.items()}
    with serving(config) as url:
        ref = service_ref(tmp_path, config, url, key_file)
        first, _ = scored(ref, [""] * 5, completions, **columns)
        assert health(url)["served"] == 4
        again, _ = scored(ref, [""] * 5, completions, **columns)
        assert health(url)["served"] == 4
    assert again == first and first[4] == first[0]
    assert set(first) <= {0.0, 1.0}


def test_a_completion_without_the_tag_scores_zero_without_asking(reward_models: Path, key_file: Path, tmp_path: Path) -> None:
    config = service_config(reward_models, "yes_probability")
    _, columns = speaker_samples(2, seed=13)
    with serving(config) as url:
        values, failures = scored(service_ref(tmp_path, config, url, key_file), ["", ""], ["no tag here", "<detailed></detailed>"], **columns)
        assert health(url)["served"] == 0
    assert values == [0.0, 0.0] and failures["failed"] == 0


def test_a_killed_service_replaced_on_another_port_loses_and_invents_nothing(reward_models: Path, key_file: Path, tmp_path: Path) -> None:
    config = service_config(reward_models, "classifier", chunk_size=2, chunk_delay_s=0.1, wait_s=120.0, backoff_factor=0.1)
    prompts, completions = classifier_samples("killed", 40)
    expected = in_process_scores(reward_models, prompts, completions)
    log = tmp_path / "servers.log"
    first, first_url = server_process(config, key_file, log)
    replacement = None
    try:
        ref = service_ref(tmp_path, config, first_url, key_file)
        outcome: list[tuple[list[float | None], dict[str, Any]]] = []
        scoring = threading.Thread(target=lambda: outcome.append(scored(ref, prompts, completions)))
        scoring.start()
        while health(first_url)["served"] < 6:
            time.sleep(0.02)
        first.kill()
        served_before_kill = health_or_none(first_url)
        assert scoring.is_alive(), "scoring ended before the service was killed"
        replacement, second_url = server_process(config, key_file, log)
        assert second_url != first_url
        write_endpoint(Path(ref.endpoint_file), second_url, config.kind)
        scoring.join(180)
        assert not scoring.is_alive()
        served_after = health(second_url)["served"]
    finally:
        for process in (first, replacement):
            if process is not None:
                process.kill()
                process.wait()
    values, failures = outcome[0]
    assert served_before_kill is None
    assert failures == {"failed": 0, "first_error": None}
    assert values == pytest.approx(expected, rel=1e-4)
    assert 0 < served_after < 40


def health_or_none(url: str) -> dict[str, Any] | None:
    try:
        return health(url)
    except (urllib.error.URLError, ConnectionError):
        return None


def test_a_service_that_never_comes_back_gives_none_with_the_error(reward_models: Path, key_file: Path, tmp_path: Path) -> None:
    config = service_config(reward_models, "classifier", wait_s=1.0, max_retries=1, backoff_factor=0.0)
    prompts, completions = classifier_samples("gone", 3)
    with serving(config) as url:
        ref = service_ref(tmp_path, config, url, key_file)
        first = scored(ref, prompts[:1], completions[:1])[0]
    # The server is gone and no other takes its place: the first pair comes from the cache, the
    # others from nowhere.
    start = time.monotonic()
    values, failures = scored(ref, prompts, completions)
    assert time.monotonic() - start >= 1.0  # it waited wait_s for the service
    assert values == [first[0], None, None]
    assert failures["failed"] == 2 and "down for 1 s" in failures["first_error"]
    with pytest.raises(PartialScores) as raised:
        service_score(prompts, completions, context=RewardContext(services={"reward": ref}))
    assert raised.value.values == values


def test_service_score_needs_the_service_and_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="services.reward"):
        service_score(["p"], ["c"], context=RewardContext())
    result = run_cli("-m", "jobs.services.reward_server", "--api-key-file", str(tmp_path / "key"),
                     "--model", str(tmp_path / "nowhere"), "--kind", "classifier")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: services.reward.model: {tmp_path / 'nowhere'} is not a model folder (no config.json there)"]


def reference_p_yes(model_dir: Path, image: Path, question: str) -> float:
    """P(yes) of one image, from a plain forward of the model on it alone: the probability of each
    spelling's tokens after the prompt, summed over "yes" and "Yes"."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                                           add_generation_prompt=True, tokenize=False)
    total = 0.0
    for spelling in ("yes", "Yes"):
        answer = processor.tokenizer(spelling, add_special_tokens=False)["input_ids"]
        inputs = processor(text=[prompt + spelling], images=[Image.open(image).convert("RGB")], return_tensors="pt")
        ids = inputs["input_ids"][0]
        assert ids[-len(answer):].tolist() == answer
        with torch.no_grad():
            logps = model(**inputs).logits[0].double().log_softmax(-1)
        total += math.exp(sum(logps[len(ids) - len(answer) - 1 + j, token].item() for j, token in enumerate(answer)))
    return total


def test_the_listener_that_looks_at_images_answers_p_yes_per_image_as_a_plain_forward_of_each_does(
    vision_model: Path, tmp_path: Path
) -> None:
    """Seed 002's listener over images: candidate_paths under the media folder, the inner batch of 5
    mixing images of different sizes; each P(yes) equals a forward of the model on that image alone
    within 1e-5. Paths outside the folder, missing files and text candidates are refused with 422."""
    from PIL import Image

    media = tmp_path / "media"
    media.mkdir()
    colors = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (20, 40, 230)}
    for index, (name, color) in enumerate(colors.items()):
        Image.new("RGB", (56 + 28 * index, 56), color).save(media / f"{name}.png")
    (tmp_path / "secret.png").write_bytes((media / "red.png").read_bytes())
    config = RewardServiceConfig(model=str(vision_model), kind="yes_probability", batch_size=5)
    server = RewardServer(config, API_KEY, "127.0.0.1", 0, str(media))
    ready: queue.Queue[str] = queue.Queue()
    thread = threading.Thread(target=server.run, args=(ready.put,), daemon=True)
    thread.start()
    try:
        url = ready.get(timeout=120)
        question = "Is this the red square?"
        requests = [{"candidate_paths": ["red.png", "green.png", "blue.png"], "question": question, "topk": 2},
                    {"candidate_paths": [str(media / "blue.png"), "red.png"], "question": question}]
        status, body = http("POST", f"{url}/batch_score", {"batch": requests})
        assert status == 200, body
        for request, result in zip(requests, body["results"], strict=True):
            want = [reference_p_yes(vision_model, media / Path(p).name, question) for p in request["candidate_paths"]]
            # A random model's P(yes) is about 1e-7: equal within 1e-5, and to 1e-4 of its size.
            assert result["yes_probabilities"] == pytest.approx(want, abs=1e-5, rel=1e-4), (result, want)
            assert result["predicted_index"] == max(range(len(want)), key=lambda i: (want[i], -i))
        assert len(body["results"][0]["topk_indices"]) == 2
        assert len(set(body["results"][0]["yes_probabilities"])) == 3, "each image its own probability"
        for paths, words in ((["../secret.png"], "is outside the service's media folder"),
                             ([str(tmp_path / "secret.png")], "is outside the service's media folder"),
                             (["nothing.png"], "nothing.png: no such file under")):
            status, body = http("POST", f"{url}/score", {"candidate_paths": paths, "question": question})
            assert status == 422 and words in json.dumps(body), body
        status, body = http("POST", f"{url}/score", {"candidates": ["a red square"], "question": question})
        assert status == 422 and "looks at images; send candidate_paths" in json.dumps(body), body
        assert health(url)["served"] == 2
    finally:
        server.stop()
        thread.join(30)

