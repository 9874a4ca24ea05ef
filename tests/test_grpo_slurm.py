"""GRPO on the real SLURM cluster: two processes (gloo) stopping together on the pre-timeout signal
and resuming at the same step; a rank that dies ending its job at once; seed 002's speaker trained
against the listener service of the run."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.training.sft import rendezvous_port
from state import Ledger
from tests.conftest import ROOT, run_cli, small_config, write_config
from tests.test_services import kill_service_mid_scoring, wait_until
from tests.test_slurm import SLURM_EXECUTOR, sacct_rows

pytestmark = pytest.mark.slow

GRPO = {"num_generations": 2, "batch_size": 2, "max_completion_length": 12, "logging_steps": 1, "save_steps": 1000,
        "learning_rates": [1e-4]}


def log_has_step(run_dir: Path, step: int) -> bool:
    """Whether the training job's log says it finished ``step``."""
    record = Ledger(run_dir).read("iter_001/train")
    log = Path(record.get("log") or "/nonexistent")
    return log.exists() and f"step {step}:" in log.read_text(errors="replace")


def test_two_process_grpo_stops_together_on_the_pre_timeout_signal_and_resumes_at_the_same_step(
    slurm_cluster: str, tiny_assets: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    max_steps = 24
    config = write_config(tmp_path / "grpo_signal.yaml", small_config(
        tiny_assets, runs, method="grpo", num_iterations=1, data={"heldout": None}, export_dir=str(tmp_path / "models"),
        grpo={**GRPO, "max_steps": max_steps}, train={"keep_checkpoints": True},
        executor={**SLURM_EXECUTOR, "train": {"timeout_min": 10, "tasks_per_node": 2, "cpus_per_task": 1}},
    ))
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.run", str(config)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: log_has_step(runs / "small", 3), "three GRPO steps", lambda: driver.poll() is None)
    job_id = Ledger(runs / "small").read("iter_001/train")["job_id"]
    # The signal SLURM sends before a time limit, now: 24 steps cannot be done yet.
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    output, _ = driver.communicate(timeout=1200)
    assert driver.returncode == 0, output

    record = Ledger(runs / "small").read("iter_001/train")
    assert record["restart_count"] >= 1 and record["attempts"] == 1, "requeued by itself, not resubmitted"
    metrics = record["metrics"]
    assert metrics["world_size"] == 2
    resumed_at = int(metrics["resumed_from"].rsplit("-", 1)[1])
    assert 3 <= resumed_at < max_steps
    assert [entry["step"] for entry in metrics["step_log"]] == list(range(1, max_steps + 1)), "one continuous step log"
    assert all(entry["policy_step"] >= resumed_at for entry in metrics["step_log"] if entry["step"] > resumed_at)
    # One job of two tasks; both ranks stopped after the same step (the checkpoint holds each rank's RNG state).
    checkpoint = Path(metrics["resumed_from"])
    assert sorted(p.name for p in checkpoint.glob("rng_state*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    tasks = subprocess.run(["sacct", "-n", "-P", "-j", job_id, "--format=JobID,NTasks"], capture_output=True, text=True, check=True).stdout.split()
    assert f"{job_id}.0|2" in tasks, tasks


def test_a_rank_that_cannot_open_the_rendezvous_ends_the_job_at_once_and_the_retry_trains(
    slurm_cluster: str, tiny_assets: Path, tmp_path: Path
) -> None:
    """Something else listens on the port the training job's rank 0 would meet its peer on: rank 0
    fails (EADDRINUSE) and, without SLURM ending the step, rank 1 would wait for it until the time
    limit while the driver's retry pends behind it."""
    # Job ids are dealt in order and the tests submit one at a time: the run's first job is the next.
    probe = subprocess.run(["sbatch", "--parsable", "--output=/dev/null", "--wrap=true"],
                           capture_output=True, text=True, check=True).stdout.strip()
    first_job = str(int(probe.split(";")[0]) + 1)
    runs = tmp_path / "runs"
    timeout_min = 10
    config = write_config(tmp_path / "grpo_port.yaml", small_config(
        tiny_assets, runs, method="grpo", num_iterations=1, data={"heldout": None}, export_dir=str(tmp_path / "models"),
        grpo={**GRPO, "max_steps": 2},
        executor={**SLURM_EXECUTOR, "train": {"timeout_min": timeout_min, "tasks_per_node": 2, "cpus_per_task": 1}},
    ))
    started = time.monotonic()
    with socket.create_server(("0.0.0.0", rendezvous_port(first_job))):
        driver = subprocess.Popen([sys.executable, "-m", "pipeline.run", str(config)], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_until(lambda: Ledger(runs / "small").read("iter_001/train").get("attempts", 0) >= 2, "a second attempt",
                   lambda: driver.poll() is None)
    output, _ = driver.communicate(timeout=900)
    assert driver.returncode == 0, output
    assert time.monotonic() - started < timeout_min * 60 / 2, "the failed job waited for its time limit"

    record = Ledger(runs / "small").read("iter_001/train")
    assert record["status"] == "done" and record["attempts"] == 2 and record["job_id"] != first_job
    assert record["metrics"]["world_size"] == 2
    state, elapsed = sacct_rows(first_job, "State,ElapsedRaw")[0].split("|")
    assert state == "FAILED" and int(elapsed) < 120, (state, elapsed)
    logs = runs / "small" / "submitit" / "iter_001" / "train"
    assert "EADDRINUSE" in next(logs.glob(f"*/{first_job}_0_log.err")).read_text()


def test_seed_002_speaker_trained_with_grpo_against_the_listener_service_on_slurm(
    slurm_cluster: str, tiny_assets: Path, reward_models: Path, tmp_path: Path
) -> None:
    """Seed 002's referential game: the speaker (the tiny policy) describes a target, the listener (a
    service of the run, a SLURM job) picks among the candidates, service_score pays 1 for the target;
    format and one_sentence beside it. The listener's job cancelled mid-training is resubmitted; the
    reward's failure count says whether any score was lost."""
    runs = tmp_path / "runs"
    games = tmp_path / "games.jsonl"
    games.write_text("".join((reward_models / "games.jsonl").read_text().splitlines(keepends=True)[:32]))
    rewards = [{"name": "service_score", "weight": 1.0},
               {"name": "format", "weight": 0.5, "tags": ["thinking", "coarse", "detailed"], "layout": "present"},
               {"name": "one_sentence", "weight": 1.0}]
    executor = {**SLURM_EXECUTOR, "train": {"timeout_min": 15, "cpus_per_task": 1},
                "reward": {"cpus_per_task": 1, "timeout_min": 20}}
    config = write_config(tmp_path / "speaker.yaml", small_config(
        tiny_assets, runs, method="grpo", num_iterations=1, data={"train": str(games), "heldout": None},
        export_dir=str(tmp_path / "models"), grpo={**GRPO, "max_steps": 12, "rewards": rewards},
        services={"reward": {"model": str(reward_models / "listener"), "kind": "yes_probability", "chunk_delay_s": 0.2,
                             "wait_s": 600}},
        executor=executor,
    ))
    run_dir = runs / "small"
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.run", str(config)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ledger = Ledger(run_dir)
    wait_until(lambda: ledger.read("iter_001/train").get("status") == "running", "GRPO training starts", lambda: driver.poll() is None)
    victim = kill_service_mid_scoring(run_dir, driver, lambda record: subprocess.run(["scancel", record["job_id"]], check=True),
                                      consumer="iter_001/train")
    output, _ = driver.communicate(timeout=1500)
    assert driver.returncode == 0, output.decode()

    service = ledger.read("services/reward")
    assert service["job_ids"][0] == victim["job_id"] and len(service["job_ids"]) == 2 and service["status"] == "done"
    train = ledger.read("iter_001/train")["metrics"]
    assert train["reward_failures"]["service_score"]["failed"] == 0, "the client waited for the new listener: no score lost"
    assert {"rewards/service_score/mean", "rewards/format/mean", "rewards/one_sentence/mean"} <= set(train["step_log"][0])
    status = json.loads(run_cli("tools/status.py", str(run_dir), "--json").stdout)
    assert status["services"]["reward"]["restarts"] == 1
    wait_until(lambda: not subprocess.run(["squeue", "-h", "-n", "small.services.reward"], capture_output=True, text=True,
                                          check=True).stdout.strip(), "the service's job ends", lambda: True, timeout_s=120)
