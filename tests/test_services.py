"""A reward model served as a job of the run: the driver starts it before the filter that needs it,
keeps it alive when it dies, stops it afterwards; ReST on seed 002's listener score.

Real parts: a tiny listener built offline (tools.demo build-reward-models), its FastAPI service
as a submitit job (local, and on the real SLURM cluster), real generation and training jobs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from jobs.problems.data import read_jsonl
from jobs.scoring.config import RewardConfig
from jobs.scoring.records import raw_outputs, read_generations, score_candidates
from jobs.scoring.rewards import RewardContext, RewardSet
from jobs.services.config import RewardServiceConfig
from jobs.services.reward_server import RewardServer
from jobs.specs import ServiceRef
from state import Ledger, atomic_write_json
from tests.conftest import ROOT, run_cli, slurm_queue, small_config, write_config

pytestmark = pytest.mark.slow

# Seed 002's accuracy reward through the listener: a candidate is kept when the listener picks the
# target from the speaker's description.
LISTENER_REWARD = {"rewards": [{"name": "service_score"}], "threshold": 1.0}


def games_config(tiny_assets: Path, reward_models: Path, runs: Path, count: int, **sections: Any) -> dict[str, Any]:
    """ReST on seed 002's referential game: the tiny policy describes a target, the listener service picks."""
    games = runs.parent / f"games_{count}.jsonl"
    games.write_text("".join((reward_models / "games.jsonl").read_text().splitlines(keepends=True)[:count]))
    service = {"model": str(reward_models / "listener"), "kind": "yes_probability", "startup_timeout_s": 600, "wait_s": 600}
    config = small_config(
        tiny_assets, runs, num_iterations=1, learning_rates=[1e-3], data={"train": str(games), "heldout": None},
        generate={"num_samples": 2, "max_tokens": 16, "batch_size": 4, "num_shards": 2},
        filter={"strategy": "all", "reward": LISTENER_REWARD}, services={"reward": service},
    )
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    return config


def slow_listener(models: Path) -> dict[str, Any]:
    """The listener service, its scoring stretched out so that a kill lands in the middle of it: the
    filter asks one problem's candidates per call, so a pause between chunks of one candidate each
    (40 problems on 2 filter workers: ~10 s per filter; with chunks of 4 there was no pause, and a
    filter took ~1 s)."""
    return {"model": str(models / "listener"), "kind": "yes_probability", "chunk_size": 1, "chunk_delay_s": 0.5, "wait_s": 600}


def wait_until(condition: Any, what: str, running: Any, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert running(), f"the driver ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}; SLURM's queue: {slurm_queue()}"
        time.sleep(0.2)


def served_requests(url: str) -> int:
    import urllib.request

    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
        return json.loads(response.read())["served"]


def kill_service_mid_scoring(run_dir: Path, driver: subprocess.Popen[bytes], kill: Any, consumer: str = "iter_001/filter") -> dict[str, Any]:
    """Once ``consumer`` (a stage) has had some scores from the service, kill the service's job; its record then."""
    ledger = Ledger(run_dir)

    def scoring() -> bool:
        record = ledger.read("services/reward")
        if record.get("status") != "serving" or ledger.read(consumer).get("status") != "running":
            return False
        try:
            return served_requests(record["endpoint"]) > 0
        except OSError:
            return False

    wait_until(scoring, "the filter is being scored by the service", lambda: driver.poll() is None)
    victim = ledger.read("services/reward")
    kill(victim)
    return victim


def listener_verdicts(run_dir: Path, models: Path, work: Path) -> Counter[tuple[str, str]]:
    """(problem id, response) of every candidate the listener accepts, scored here by a fresh server of
    the same model: what a filter that lost or invented no score keeps (strategy all)."""
    config = RewardServiceConfig(model=str(models / "listener"), kind="yes_probability")
    key = work / "key"
    key.write_text("k" * 32)
    server = RewardServer(config, key.read_text(), "127.0.0.1", 0)
    ready: list[str] = []
    event = threading.Event()
    thread = threading.Thread(target=server.run, args=(lambda url: (ready.append(url), event.set()),), daemon=True)
    thread.start()
    assert event.wait(300), "the checking server did not start"
    try:
        atomic_write_json(work / "endpoint.json", {"url": ready[0], "kind": config.kind})
        ref = ServiceRef("reward", str(work / "endpoint.json"), str(key), config)
        rewards = RewardSet([RewardConfig(**reward) for reward in LISTENER_REWARD["rewards"]], RewardContext(services={"reward": ref}))
        accepted: Counter[tuple[str, str]] = Counter()
        for shard in sorted((run_dir / "iter_001" / "generate").glob("shard_*.jsonl")):
            for number, record in read_generations(shard):
                texts = raw_outputs(record, f"{shard}:{number}")
                scores = score_candidates(rewards, record, texts)
                accepted.update((record["id"], text) for text, total in zip(texts, scores.totals, strict=True) if total == 1.0)
        assert rewards.failures == {"service_score": 0}
        return accepted
    finally:
        server.stop()
        thread.join(30)


def kept(run_dir: Path) -> Counter[tuple[str, str]]:
    samples = json.loads((run_dir / "iter_001" / "filter" / "filtered.json").read_text())
    return Counter((s["original_id"], s["response"]) for s in samples)


def test_the_listener_serves_the_filter_as_a_job_and_comes_back_after_a_kill(
    tiny_assets: Path, reward_models: Path, tmp_path: Path
) -> None:
    """Embedded default: the service is a local job of the run; killed (SIGKILL) while the filter is
    being scored, the driver resubmits it, the filter's client waits for it, no score is lost or made up."""
    runs = tmp_path / "runs"
    config = games_config(tiny_assets, reward_models, runs, 40, services={"reward": slow_listener(reward_models)})
    path = write_config(tmp_path / "games.yaml", config)
    run_dir = runs / "small"
    dry = run_cli("-m", "pipeline.run", str(path), "--dry-run")
    assert dry.returncode == 0 and "service reward" in dry.stdout and "(needs" in dry.stdout, dry.stdout

    driver = subprocess.Popen([sys.executable, "-m", "pipeline.run", str(path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    victim = kill_service_mid_scoring(run_dir, driver, lambda record: os.kill(record["pid"], signal.SIGKILL))
    output, _ = driver.communicate(timeout=900)
    assert driver.returncode == 0, output.decode()

    service = Ledger(run_dir).read("services/reward")
    assert service["attempts"] == 2 and len(service["job_ids"]) == 2, "the dead service was started again"
    assert service["job_ids"][0] == victim["job_id"]
    assert service["status"] == "done", "stopped once no stage needed it"
    assert service["endpoint"] != victim["endpoint"], "the new job listens on a port of its own"
    filtered = Ledger(run_dir).read("iter_001/filter")
    assert filtered["metrics"]["reward_failures"]["service_score"]["failed"] == 0, "no score lost"
    assert kept(run_dir) == listener_verdicts(run_dir, reward_models, tmp_path), "no score lost or made up"
    assert not (run_dir / "services" / "reward" / "endpoint.json").exists(), "a stopped service leaves no endpoint behind"

    status = json.loads(run_cli("tools/status.py", str(run_dir), "--json").stdout)
    assert status["services"]["reward"]["restarts"] == 1 and status["services"]["reward"]["endpoint"] == service["endpoint"]


def test_rest_on_the_listener_score_on_slurm(slurm_cluster: str, tiny_assets: Path, reward_models: Path, tmp_path: Path) -> None:
    """Two ReST iterations whose filter keeps what the listener service (a SLURM job of the run)
    accepts; its job cancelled mid-scoring is resubmitted; status.py shows it with node and endpoint."""
    runs = tmp_path / "runs"
    executor = {"cluster": "slurm", "poll_interval_s": 0.5, "max_poll_interval_s": 2.0,
                "generate": {"cpus_per_task": 1, "timeout_min": 10}, "filter": {"timeout_min": 10},
                "train": {"timeout_min": 10}, "reward": {"cpus_per_task": 1, "timeout_min": 20}}
    config = games_config(tiny_assets, reward_models, runs, 40, num_iterations=2, train={"learning_rates": [1e-3, 5e-4]}, executor=executor,
                          services={"reward": slow_listener(reward_models)})
    path = write_config(tmp_path / "games_slurm.yaml", config)
    run_dir = runs / "small"
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.run", str(path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def shown_while_serving() -> bool:
        record = Ledger(run_dir).read("services/reward")
        if record.get("status") != "serving":
            return False
        status = json.loads(run_cli("tools/status.py", str(run_dir), "--json").stdout)
        shown = status["services"]["reward"]
        assert (shown["status"], shown["node"], shown["endpoint"]) == ("serving", record["node"], record["endpoint"])
        if not any(job["task"] == "service reward" and job["scheduler_state"] == "RUNNING" for job in status["jobs"]):
            return False  # sacct (slurmdbd) learns of a job's start a moment after slurmctld: ask again
        table = run_cli("tools/status.py", str(run_dir)).stdout
        assert "services" in table and record["endpoint"] in table
        return True

    wait_until(shown_while_serving, "the service serves", lambda: driver.poll() is None)
    victim = kill_service_mid_scoring(run_dir, driver, lambda record: subprocess.run(["scancel", record["job_id"]], check=True))
    output, _ = driver.communicate(timeout=1500)
    assert driver.returncode == 0, output.decode()

    ledger = Ledger(run_dir)
    service = ledger.read("services/reward")
    # Iteration 1: the cancelled job and its replacement; iteration 2: a new start of its own (its attempts count anew).
    assert service["job_ids"][0] == victim["job_id"] and len(service["job_ids"]) == 3, service
    assert service["attempts"] == 1 and service["status"] == "done"
    for iteration in (1, 2):
        filtered = ledger.read(f"iter_{iteration:03d}/filter")
        assert filtered["status"] == "done" and filtered["metrics"]["reward_failures"]["service_score"]["failed"] == 0
        assert ledger.read(f"iter_{iteration:03d}/train")["status"] == "done"
    assert kept(run_dir) == listener_verdicts(run_dir, reward_models, tmp_path), "no score lost or made up"
    assert read_jsonl(run_dir / "data" / "train.jsonl")[0]["candidate_texts"], "the games' columns reach the run"
    assert not subprocess.run(["squeue", "-h", "-n", "small.services.reward"], capture_output=True, text=True, check=True).stdout.strip(), (
        "no service job outlives the run"
    )
