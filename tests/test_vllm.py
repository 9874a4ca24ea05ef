"""The vllm backend against real vLLM CPU servers serving the tiny model (tools/setup_vllm.sh).

Where the backend's default python (.venv-vllm's, else this one) has no vLLM these tests are
skipped with the reason, except under CI (CI=true), where that is a failure. A vLLM CPU server starts in about 30-60 s here and keeps a core for itself, so the
tests start few: one per shard job, as a user's run does, and one shared "external" server.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import multiprocessing
import os
import re
import signal
import socket
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from jobs.generation import evaluate as eval_job
from jobs.generation import generate
from jobs.generation.config import EvalConfig, GenerateConfig
from jobs.generation.generate import partial_path
from jobs.problems.data import read_jsonl
from jobs.problems.prompts import messages_for
from jobs.scoring.config import FilterConfig
from jobs.services.process import group_members, run_api_key
from jobs.specs import EvalSpec, GenerateShardSpec, JobTarget
from jobs.vllm import server as vllm_server
from jobs.vllm.args import vllm_python
from jobs.vllm.config import VllmConfig
from jobs.vllm.server import ServerFiles, start_servers
from state import InputError, Ledger
from tests.conftest import ROOT, run_cli, small_config, wait_for_lines, write_config
from tests.test_pipeline import all_records


@pytest.fixture(scope="module")
def vllm_installed() -> None:
    python = vllm_python(VllmConfig())
    found = subprocess.run([python, "-c", "import importlib.util as u; assert u.find_spec('vllm')"], capture_output=True, check=False)
    if found.returncode != 0:
        reason = f"{python} has no vLLM (install it with: bash tools/setup_vllm.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must run the vLLM tests")
        print(reason)
        pytest.skip(reason)


def vllm_generate(one_process: bool = True, **changes) -> GenerateConfig:
    """Small and quick to start on 2 cores: eager mode, a 1 GiB KV cache, and with ``one_process``
    the engine inside the API server's process (one import of vLLM instead of three)."""
    server = VllmConfig(max_model_len=512, extra_args=["--enforce-eager"], env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    if one_process:
        server.extra_args += ["--distributed-executor-backend", "uni"]
        server.env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return GenerateConfig(**{"backend": "vllm", "num_samples": 3, "max_tokens": 12, "batch_size": 4, "vllm": server, **changes})


def shard_spec(assets: Path, run_dir: Path, index: int, start: int, stop: int, config: GenerateConfig) -> GenerateShardSpec:
    return GenerateShardSpec(
        target=JobTarget(str(run_dir), f"iter_001/generate/shard_{index:05d}"),
        problems_path=str(assets / "train.jsonl"),
        start=start,
        stop=stop,
        model_path=str(assets / "random_init"),
        output_path=str(run_dir / "iter_001" / "generate" / f"shard_{index:05d}.jsonl"),
        generate=config,
        seed=7,
        api_key_path=str(run_dir / "vllm_api_key"),
        compile_cache_dir=str(run_dir / "compile_cache"),
    )


def start_job(spec: GenerateShardSpec) -> multiprocessing.Process:
    """The shard as its own process, as a scheduler runs it."""
    process = multiprocessing.get_context("spawn").Process(target=generate.run, args=(spec,))
    process.start()
    return process


def records_of(path: Path) -> list[dict]:
    return read_jsonl(path)


def problems_asking(assets: Path, folder: Path, count: int, questions: dict[int, str]) -> tuple[list[dict], Path]:
    """The first ``count`` problems of the tiny set, some asking other ``questions``, and their file."""
    problems = records_of(assets / "train.jsonl")[:count]
    for index, question in questions.items():
        problems[index]["question"] = question
    path = folder / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    return problems, path


def started_pids(log: Path) -> list[int]:
    return [int(pid) for pid in re.findall(r"===== selftrain: server \d+ started .*?, pid (\d+),", log.read_text())]


def assert_all_candidates(output: Path, assets: Path, start: int, stop: int, k: int) -> list[dict]:
    records = records_of(output)
    expected = [json.loads(line)["id"] for line in (assets / "train.jsonl").read_text().splitlines()[start:stop]]
    assert [r["id"] for r in records] == expected, "every problem of the slice once, in order"
    for record in records:
        assert "error" not in record and record["num_candidates"] == k and len(record["candidates"]) == k
        assert all(c["num_tokens"] > 0 for c in record["candidates"])
    return records


# -- without a server ------------------------------------------------------------------------


def test_media_become_file_urls_inside_the_media_folder_only(tmp_path: Path) -> None:
    media = tmp_path / "audio"
    media.mkdir()
    (media / "clip.wav").write_bytes(b"RIFF")
    problem = {"id": "a1", "sound": "clip.wav", "question": "<sound> How many sounds?", "answer": "3"}
    (user,) = messages_for(problem, None, str(media))
    assert user["content"] == [
        {"type": "audio_url", "audio_url": {"url": (media / "clip.wav").resolve().as_uri()}},
        {"type": "text", "text": "How many sounds?"},
    ]
    (tmp_path / "secret.wav").write_bytes(b"RIFF")
    with pytest.raises(InputError, match="outside generate.media_dir"):
        messages_for({**problem, "sound": "../secret.wav"}, None, str(media))
    with pytest.raises(InputError, match="not found"):
        messages_for({**problem, "sound": "missing.wav"}, None, str(media))


def test_run_api_key_is_made_once_and_readable_by_its_owner_only(tmp_path: Path) -> None:
    key_file = tmp_path / "run" / "vllm_api_key"
    key = run_api_key(key_file)
    assert len(key) >= 32 and run_api_key(key_file) == key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


@pytest.mark.slow
def test_eval_on_vllm_starts_a_server_of_the_model_and_leaves_none(vllm_installed: None, tiny_assets: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    problems, problems_path = problems_asking(tiny_assets, tmp_path, 12, {})
    spec = EvalSpec(
        target=JobTarget(str(run_dir), "iter_001/eval"), problems_path=str(problems_path),
        model_path=str(tiny_assets / "random_init"), output_dir=str(run_dir / "iter_001" / "eval"),
        eval=EvalConfig(backend="vllm", max_tokens=12, batch_size=4), filter=FilterConfig(verifier="numeric"),
        generate=vllm_generate(), seed=7, api_key_path=str(run_dir / "vllm_api_key"),
    )

    metrics = eval_job.run(spec)

    predictions = records_of(run_dir / "iter_001" / "eval" / "predictions.jsonl")
    assert [p["id"] for p in predictions] == [p["id"] for p in problems]
    # A random model's greedy answer may be empty (an end token first), but none failed.
    assert not any("error" in p for p in predictions) and any(p["raw_output"] for p in predictions)
    assert metrics["heldout_correct"] == sum(p["correct"] for p in predictions) and metrics["heldout_problems"] == 12
    assert metrics["failed_items"] == 0 and metrics["generated_tokens"] > 0
    (server,) = metrics["servers"]
    assert Path(server["log"]).is_relative_to(run_dir / "iter_001" / "eval" / "servers")
    assert group_members(server["pid"]) == [], "no process of the server is left"

    # Held-out prompts the servers refuse, every one (longer than max_model_len): the stage fails
    # with the reason rather than scoring 0 %.
    (tmp_path / "long").mkdir()
    _, too_long = problems_asking(tiny_assets, tmp_path / "long", 2, {0: "1+" * 400 + "1=?", 1: "2+" * 400 + "2=?"})
    refused = dataclasses.replace(spec, target=JobTarget(str(run_dir), "iter_002/eval"), problems_path=str(too_long),
                                  output_dir=str(run_dir / "iter_002" / "eval"))
    with pytest.raises(RuntimeError, match="every held-out request failed, e.g. 'train_00000': BadRequestError"):
        eval_job.run(refused)
    assert Ledger(run_dir).read("iter_002/eval")["status"] == "failed"


# -- shards that start their own servers -------------------------------------------------------


@pytest.mark.slow
def test_two_shards_at_once_each_start_a_server_and_leave_none(
    vllm_installed: None, tiny_assets: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    # 16 requests x 8 samples in flight: more prompt tokens than a step takes, so prompts are
    # prefilled in chunks (which the CPU build cannot do for seeded requests).
    k = 8
    specs = [shard_spec(tiny_assets, run_dir, i, i * 20, (i + 1) * 20, vllm_generate(num_samples=k, batch_size=16)) for i in range(2)]
    jobs = [start_job(spec) for spec in specs]
    for job in jobs:
        job.join(timeout=400)
    assert [job.exitcode for job in jobs] == [0, 0]

    ledger = Ledger(run_dir)
    servers = [ledger.read(spec.target.ledger_key)["metrics"]["servers"] for spec in specs]
    assert len({urlparse(s[0]["url"]).port for s in servers}) == 2, "each shard's server on a port of its own"
    for spec, (server,) in zip(specs, servers, strict=True):
        assert_all_candidates(Path(spec.output_path), tiny_assets, spec.start, spec.stop, k)
        log = Path(server["log"])
        assert log.is_relative_to(run_dir) and "Application startup complete" in log.read_text()
        assert group_members(server["pid"]) == [], "no process of the server is left"

    # Both started cold, at once; one of them published its compile cache whole, the other dropped its copy.
    records = [ledger.read(spec.target.ledger_key) for spec in specs]
    assert [r["metrics"]["compile_cache"] for r in records] == ["cold", "cold"]
    (published,) = (run_dir / "compile_cache").iterdir()
    assert not published.name.startswith(".") and (published / "vllm").is_dir()
    # A later server of the model starts from a copy of it, in a folder of its own.
    later = shard_spec(tiny_assets, run_dir, 2, 40, 44, vllm_generate(num_samples=k, batch_size=16))
    generate.run(later)
    assert ledger.read(later.target.ledger_key)["metrics"]["compile_cache"] == "warm"
    copied = Path(later.output_path).parent / "servers" / "shard_00002" / "server_0" / "vllm"
    cached = {p.relative_to(published / "vllm") for p in (published / "vllm").rglob("*")}
    assert cached and cached <= {p.relative_to(copied) for p in copied.rglob("*")}

    key_file = run_dir / "vllm_api_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    printed = capfd.readouterr()
    logs_and_records = [p.read_text(errors="replace") for p in run_dir.rglob("*") if p.is_file() and p != key_file and p.suffix != ".lock"]
    assert key not in printed.out + printed.err and not any(key in text for text in logs_and_records), "the key is never printed"


@pytest.mark.slow
def test_a_server_killed_mid_shard_fails_it_and_a_rerun_completes_it(
    vllm_installed: None, tiny_assets: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    k, stop = 4, 120
    # One request at a time, so the shard is still busy when the server dies; vLLM's usual processes
    # (API server, engine, worker), so that killing the API server leaves orphans to clean up.
    config = vllm_generate(one_process=False, num_samples=k, max_tokens=32, batch_size=1)
    spec = shard_spec(tiny_assets, run_dir, 0, 0, stop, config)
    output = Path(spec.output_path)
    partial = partial_path(output)
    log = output.parent / "servers" / output.stem / "server_0.log"

    job = start_job(spec)
    wait_for_lines(partial, 3, job.is_alive)
    (server_pid,) = started_pids(log)
    os.kill(server_pid, signal.SIGKILL)
    job.join(timeout=120)

    assert job.exitcode not in (0, None)
    error = Ledger(run_dir).read(spec.target.ledger_key)["error"]
    assert f"pid {server_pid}" in error and "exited with signal SIGKILL during generation" in error
    last_log_line = log.read_text().rstrip().splitlines()[-1].strip()
    assert str(log) in error and last_log_line in error, "the message carries the tail of the server's log"
    assert group_members(server_pid) == [], "the rest of the killed server's processes were stopped"
    kept = {record["id"]: record for record in read_jsonl(partial)}
    assert 3 <= len(kept) < stop

    generate.run(spec)  # the rerun, as the driver's retry would run it

    records = assert_all_candidates(output, tiny_assets, 0, stop, k)
    assert all(r == kept[r["id"]] for r in records if r["id"] in kept), "items written before the kill are kept"
    record = Ledger(run_dir).read(spec.target.ledger_key)
    assert record["metrics"]["resumed_items"] == len(kept) and record["metrics"]["problems"] == stop - len(kept)
    (_, rerun_pid) = started_pids(log)
    assert group_members(rerun_pid) == []


@pytest.mark.slow
def test_sigterm_to_the_shard_job_stops_its_server(vllm_installed: None, tiny_assets: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    spec = shard_spec(tiny_assets, run_dir, 0, 0, 200, vllm_generate(batch_size=1, max_tokens=32))
    output = Path(spec.output_path)
    job = start_job(spec)
    wait_for_lines(partial_path(output), 1, job.is_alive)
    (server_pid,) = started_pids(output.parent / "servers" / output.stem / "server_0.log")

    os.kill(job.pid, signal.SIGTERM)  # SLURM's end of a job, scancel
    job.join(timeout=120)

    assert job.exitcode == 128 + signal.SIGTERM
    assert group_members(server_pid) == [], "no process of the server outlives its job"
    # Left in flight: the scheduler's word (cancelled, or requeued after preemption) decides what it becomes.
    record = Ledger(run_dir).read(spec.target.ledger_key)
    assert record["status"] == "submitted" and record["note"] == "stopped at a safe point after SIGTERM", record


# -- servers the user already runs ---------------------------------------------------------------


@pytest.fixture(scope="module")
def external_server(vllm_installed: None, tiny_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A server started as a user would have it, on a port that another process takes first."""
    folder = tmp_path_factory.mktemp("external")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        offered = iter([taken])
        real_free_port = vllm_server.free_port
        with pytest.MonkeyPatch.context() as patch:
            # The fault: between our bind check and vLLM's bind, the port was taken.
            patch.setattr(vllm_server, "free_port", lambda host: next(offered, None) or real_free_port(host))
            fleet = start_servers(str(tiny_assets / "random_init"), vllm_generate(), ServerFiles(folder, folder / "key"))
    try:
        (endpoint,) = fleet.endpoints
        yield {"url": endpoint.base_url.removesuffix("/v1"), "key": endpoint.api_key, "model": endpoint.model,
               "taken_port": taken, "server": fleet.servers[0]}
    finally:
        fleet.stop()


@pytest.mark.slow
def test_a_port_lost_before_the_server_binds_it_is_retried_on_another(external_server: dict) -> None:
    server = external_server["server"]
    assert server.port != external_server["taken_port"]
    log = server.log_path.read_text()
    assert "Address already in use" in log and len(started_pids(server.log_path)) == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("url_of", "key_of", "extra", "expected"),
    [
        (lambda s: s["url"], lambda s: s["key"], [], None),
        (lambda s: s["url"], lambda s: "wrong-key", [], "refused the API key"),
        (lambda s: s["url"], lambda s: s["key"], ["--model", "no-such-model"], "does not serve model 'no-such-model'"),
        (lambda s: f"http://127.0.0.1:{vllm_server.free_port('127.0.0.1')}", lambda s: s["key"], [], "cannot be reached"),
    ],
    ids=["ok", "wrong-key", "unknown-model", "refused"],
)
def test_check_endpoint(external_server: dict, url_of, key_of, extra: list[str], expected: str | None, monkeypatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", key_of(external_server))
    result = run_cli("tools/check_endpoint.py", url_of(external_server), *extra, timeout=120)
    if expected is None:
        assert result.returncode == 0, result.stderr
        assert f"serves {external_server['model']}" in result.stdout
    else:
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert expected in result.stderr, result.stderr


@pytest.mark.slow
def test_shard_on_external_endpoint_records_a_refused_item_as_failed(
    external_server: dict, tiny_assets: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("SELFTRAIN_TEST_KEY", external_server["key"])
    # Longer than the server's max_model_len: it answers 400.
    problems, problems_path = problems_asking(tiny_assets, tmp_path, 6, {2: "1+" * 400 + "1=?"})
    config = vllm_generate(endpoints=[external_server["url"]], endpoint_api_key_env="SELFTRAIN_TEST_KEY", max_retries=1)
    spec = shard_spec(tiny_assets, tmp_path / "run", 0, 0, 6, config)
    spec.problems_path = str(problems_path)

    metrics = generate.run(spec)

    records = records_of(Path(spec.output_path))
    assert [r["id"] for r in records] == [p["id"] for p in problems]
    failed = records[2]
    assert failed["candidates"] == [] and "BadRequestError" in failed["error"] and "maximum context length" in failed["error"]
    assert all(r["num_candidates"] == 3 for i, r in enumerate(records) if i != 2)
    assert metrics["failed_items"] == 1 and metrics["endpoints"] == [external_server["url"] + "/v1"]
    assert not (tmp_path / "run" / "iter_001" / "generate" / "servers").exists(), "no server of its own"


@pytest.mark.slow
def test_samples_asked_with_log_probabilities_get_those_they_were_drawn_from(external_server: dict, tiny_assets: Path) -> None:
    """GRPO's rollouts from a server: each sample's token ids and the log-probability of each under
    the distribution it was sampled from, after temperature (--logprobs-mode processed_logprobs): at
    a low temperature those of the model's own logits / T, far from the raw ones."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jobs.generation.openai_client import OpenAIBackend, check_endpoint
    from jobs.generation.protocol import Outcome, Request, Sampling

    endpoint, _, _ = check_endpoint(external_server["url"], external_server["key"])
    temperature = 0.1
    messages = [[{"role": "user", "content": q}] for q in ("12+34=?", "7+8=?")]
    outcomes: list[Outcome] = []
    OpenAIBackend([endpoint], vllm_generate()).run(
        [Request(m, Sampling(2, temperature, 1.0, 12, seed=3, logprobs=True)) for m in messages], outcomes.append)
    model_path = tiny_assets / "random_init"
    tokenizer, model = AutoTokenizer.from_pretrained(model_path), AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    gaps, raw_gaps = [], []
    for outcome in sorted(outcomes, key=lambda o: o.index):
        prompt = tokenizer.apply_chat_template(messages[outcome.index], add_generation_prompt=True, tokenize=True, return_dict=False)
        assert len(outcome.completions) == 2 and outcome.error is None
        for completion in outcome.completions:
            assert completion.token_ids and len(completion.token_ids) == len(completion.logprobs) == completion.num_tokens
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + completion.token_ids])).logits[0, len(prompt) - 1:-1]
            tokens = torch.tensor(completion.token_ids)[:, None]
            served = torch.tensor(completion.logprobs)
            gaps.append((served - (logits / temperature).log_softmax(-1).gather(-1, tokens)[:, 0]).abs().max().item())
            raw_gaps.append((served - logits.log_softmax(-1).gather(-1, tokens)[:, 0]).abs().max().item())
    print("largest gap to logits / T:", max(gaps), "to the raw logits:", max(raw_gaps))
    assert max(gaps) < 0.1 < max(raw_gaps)


class FlakyProxy(http.server.ThreadingHTTPServer):
    """In front of the real server, the faults it cannot make on demand: the first requests for
    samples are answered 503, twice, then dropped without an answer, then cut off in the middle of
    the answer; a problem that says ALWAYS-BUSY is answered 503 every time. Everything else is
    passed on as it is."""

    def __init__(self, upstream: str):
        self.upstream, self.attempts, self.faults = upstream, {}, ["503", "503", "drop", "cut"]
        super().__init__(("127.0.0.1", 0), FlakyHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    server: FlakyProxy

    def do_GET(self) -> None:
        self._forward(None)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = json.loads(body)
        if request.get("n", 1) > 1:
            question = request["messages"][-1]["content"]
            self.server.attempts[question] = self.server.attempts.get(question, 0) + 1
            fault = "503" if "ALWAYS-BUSY" in question else (self.server.faults.pop(0) if self.server.faults else None)
            if fault == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault == "cut":  # promises more of the answer than it sends
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b'{"choices": [')
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault == "503":
                self._answer(503, json.dumps({"error": {"message": "busy, try later", "type": "ServiceUnavailable"}}).encode())
                return
        self._forward(body)

    def _forward(self, body: bytes | None) -> None:
        headers = {"Authorization": self.headers["Authorization"], "Content-Type": "application/json"}
        request = urllib.request.Request(self.server.upstream + self.path, data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                self._answer(response.status, response.read())
        except urllib.error.HTTPError as error:
            self._answer(error.code, error.read())

    def _answer(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.slow
def test_busy_and_dropped_requests_are_retried_and_one_still_refused_fails_alone(
    external_server: dict, tiny_assets: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("SELFTRAIN_TEST_KEY", external_server["key"])
    problems, problems_path = problems_asking(tiny_assets, tmp_path, 4, {3: "ALWAYS-BUSY 1+1=?"})
    proxy = FlakyProxy(external_server["url"])
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        # One request at a time: the first problem meets all four faults, then gets through.
        config = vllm_generate(endpoints=[proxy.url], endpoint_api_key_env="SELFTRAIN_TEST_KEY", max_retries=4, batch_size=1)
        spec = shard_spec(tiny_assets, tmp_path / "run", 0, 0, 4, config)
        spec.problems_path = str(problems_path)
        metrics = generate.run(spec)
    finally:
        proxy.shutdown()

    records = records_of(Path(spec.output_path))
    assert [r["id"] for r in records] == [p["id"] for p in problems]
    assert all(r["num_candidates"] == 3 and "error" not in r for r in records[:3]), "retried until answered"
    assert proxy.attempts[problems[0]["question"]] == 5, "two 503s, a dropped connection, a cut answer, then the answer"
    refused = records[3]
    assert refused["candidates"] == [] and "(503): busy, try later" in refused["error"]
    assert proxy.attempts[problems[3]["question"]] == 1 + 4, "asked once and retried max_retries times"
    assert metrics["failed_items"] == 1


@pytest.mark.slow
def test_the_pre_timeout_signal_stops_a_shard_at_a_safe_point(
    external_server: dict, tiny_assets: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("SELFTRAIN_TEST_KEY", external_server["key"])
    config = vllm_generate(endpoints=[external_server["url"]], endpoint_api_key_env="SELFTRAIN_TEST_KEY", batch_size=1)
    spec = shard_spec(tiny_assets, tmp_path / "run", 0, 0, 400, config)
    partial = partial_path(Path(spec.output_path))
    job = start_job(spec)
    wait_for_lines(partial, 2, job.is_alive)

    os.kill(job.pid, signal.SIGUSR2)  # submitit's pre-timeout signal
    job.join(timeout=30)

    assert job.exitcode is not None, "the shard stopped within seconds"
    record = Ledger(tmp_path / "run").read(spec.target.ledger_key)
    assert record["note"] == "requeued after the pre-timeout signal"
    written = partial.read_text()
    assert written.endswith("\n") and 2 <= len(records_of(partial)) < 400, "whole items only, the rest left for the requeue"


# -- the standalone server job (sbatch/vllm_server.sbatch) on the real SLURM cluster ------------------


@pytest.mark.slow
def test_server_job_serves_the_run_model_until_cancelled(
    slurm_cluster: str, vllm_installed: None, tiny_assets: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    server = vllm_generate().vllm
    generate = {"backend": "vllm", "vllm": {"max_model_len": server.max_model_len, "extra_args": server.extra_args,
                                            "env": server.env, "startup_timeout_s": 600}}
    config = write_config(tmp_path / "serve.yaml", small_config(tiny_assets, runs, generate=generate))
    marker = tmp_path / "injected"
    sneaky = f"generate.system_prompt=$(touch {marker}); `touch {marker}`"
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--cpus-per-task=1", f"--output={tmp_path}/server-%j.log",
         str(ROOT / "sbatch" / "vllm_server.sbatch"), str(config), sneaky],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    job_id = submitted.stdout.strip()
    endpoint_file = runs / "small" / "services" / "vllm" / "endpoint.json"
    deadline = time.monotonic() + 600
    while not endpoint_file.exists():
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, check=False).stdout
        assert state.strip() in ("PENDING", "RUNNING", "CONFIGURING"), (tmp_path / f"server-{job_id}.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(1)
    endpoint = json.loads(endpoint_file.read_text())
    key_file = runs / "small" / "vllm_api_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    checked = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "tools/check_endpoint.py", endpoint["url"]],
                             cwd=ROOT, capture_output=True, text=True, env={**os.environ, "VLLM_API_KEY": key_file.read_text()},
                             check=False)
    assert checked.returncode == 0, checked.stderr
    # A service of the run: in its ledger, with its job, node and endpoint.
    record = Ledger(runs / "small").read("services/vllm")
    assert (record["status"], record["job_id"], record["endpoint"]) == ("serving", job_id, endpoint["url"])
    assert record["node"] == endpoint["node"]
    (server_pid,) = started_pids(runs / "small" / "services" / "vllm" / "server_0.log")

    subprocess.run(["scancel", job_id], check=True)
    deadline = time.monotonic() + 120
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, check=False).stdout.strip():
        assert time.monotonic() < deadline
        time.sleep(1)
    assert group_members(server_pid) == [], "no process of the server outlives its job"
    assert not marker.exists(), "an argument ran as a command"
    assert Ledger(runs / "small").read("services/vllm")["status"] == "done", "the service says it stopped"


@pytest.mark.slow
def test_vllm_generation_as_slurm_array_tasks(slurm_cluster: str, vllm_installed: None, tiny_assets: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    server = vllm_generate().vllm
    generate = {"backend": "vllm", "num_shards": 2, "num_samples": 3,
                "vllm": {"max_model_len": server.max_model_len, "extra_args": server.extra_args, "env": server.env}}
    executor = {"cluster": "slurm", "poll_interval_s": 0.5, "max_poll_interval_s": 2.0,
                "generate": {"cpus_per_task": 1, "timeout_min": 15}, "filter": {"timeout_min": 10},
                "train": {"timeout_min": 10}}
    config = write_config(tmp_path / "vllm_slurm.yaml", small_config(
        tiny_assets, runs, num_iterations=1, learning_rates=[1e-3], data={"heldout": None},
        generate=generate, executor=executor))
    result = run_cli("-m", "pipeline.run", str(config), timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    ledger = Ledger(runs / "small")
    shards = [ledger.read(f"iter_001/generate/shard_{i:05d}") for i in range(2)]
    assert all("_" in s["job_id"] for s in shards), "the shards ran as array tasks"
    for index, shard in enumerate(shards):
        output = runs / "small" / "iter_001" / "generate" / f"shard_{index:05d}.jsonl"
        assert all(r["num_candidates"] == 3 and "error" not in r for r in records_of(output))
        assert group_members(shard["metrics"]["servers"][0]["pid"]) == [], "no server outlives its array task"

    # What the run cost, from SLURM's accounting: every job of the ledger, adding up to sacct's own.
    cost = run_cli("tools/cost.py", str(runs / "small"), "--json")
    assert cost.returncode == 0, cost.stderr
    cost = json.loads(cost.stdout)
    ledger_ids = sorted(j for r in all_records(runs / "small").values() for j in r.get("job_ids", []))
    assert sorted(j for stage in cost["stages"] for j in stage["job_ids"]) == ledger_ids
    sacct = subprocess.run(["sacct", "-X", "--duplicates", "-P", "-n", "-j", ",".join(ledger_ids), "--format=JobID,CPUTimeRAW"],
                           capture_output=True, text=True, check=True).stdout
    sacct_cpu_seconds = sum(int(line.split("|")[1]) for line in sacct.splitlines() if line.split("|")[0] in ledger_ids)
    assert sacct_cpu_seconds > 0
    assert cost["total"]["cpu_seconds"] == sacct_cpu_seconds == sum(s["cpu_seconds"] for s in cost["stages"])
    assert sum(i["cpu_seconds"] for i in cost["iterations"]) == sacct_cpu_seconds
    assert cost["total"]["gpu_seconds"] == 0, "no GPU on this cluster"
    (generation,) = [s for s in cost["stages"] if s["stage"] == "generate"]
    assert len(generation["job_ids"]) == 2 and generation["runs"] == 2
    assert 0 < generation["server_start_share"] < 1, "shards started servers, then generated"
    table = run_cli("tools/cost.py", str(runs / "small"))
    assert table.returncode == 0 and "server start share" in table.stdout
    report = run_cli("tools/report.py", str(runs / "small"))
    assert report.returncode == 0 and "cost of" in report.stdout
