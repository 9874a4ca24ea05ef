"""The GRPO training job (jobs.training.grpo): real GRPO steps of the demo's tiny random model on CPU."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from jobs.scoring.config import RewardConfig
from jobs.scoring.reward_functions import completion_text
from jobs.specs import GrpoSpec, JobTarget
from jobs.training.config import GrpoConfig, TrainConfig
from jobs.training.grpo import STALLED_EXIT, run
from state import Ledger
from tests.conftest import ROOT, read_json

DIGITS = RewardConfig(name="tests.test_grpo:digits")


# Rewards the tests train with (named "tests.test_grpo:<function>", as a user's own reward is).
def digits(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
    """The share of digits in a completion: a random model's samples differ in it, so groups have variance."""
    texts = [completion_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in texts]


def broken(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
    raise RuntimeError("the judge is down")


_calls = 0


def hang_once(prompts: Sequence[Any], completions: Sequence[Any], *, marker: str, at_call: int = 1,
              **columns: Any) -> list[float]:
    """Never returns on its ``at_call``-th call of the first attempt (while ``marker`` does not exist);
    scores 0.0 otherwise."""
    global _calls
    _calls += 1
    if _calls == at_call and not Path(marker).exists():
        Path(marker).touch()
        time.sleep(3600)
    return [0.0] * len(completions)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One thread, as a job given one CPU runs: a tiny model gains nothing from more, and loses much
    when the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def problems(tiny_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 problems: with 4 prompts per generation batch an epoch is 2 generations, so runs cross epochs."""
    path = tmp_path_factory.mktemp("grpo_data") / "problems.jsonl"
    path.write_text("".join((tiny_assets / "train.jsonl").read_text().splitlines(keepends=True)[:8]))
    return path


def grpo_spec(assets: Path, problems: Path, run_dir: Path, rewards: list[RewardConfig] | None = None,
              **grpo: Any) -> GrpoSpec:
    settings: dict[str, Any] = {"num_generations": 2, "batch_size": 4, "steps_per_generation": 2, "max_steps": 4,
                                "max_completion_length": 12, "logging_steps": 1, "save_steps": 100, **grpo}
    return GrpoSpec(
        target=JobTarget(str(run_dir), "iter_001/grpo"), problems_path=str(problems),
        init_model=str(assets / "random_init"), base_model=str(assets / "random_init"), iteration=1,
        output_dir=str(run_dir / "iter_001" / "grpo"), learning_rate=1e-3,
        grpo=GrpoConfig(rewards=rewards or [RewardConfig(name="correctness"), DIGITS], **settings),
        train=TrainConfig(method="lora", lora_r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          gradient_checkpointing=False, warmup_ratio=0.0),
        system_prompt=None, verifier="numeric", answer_pattern=r"ANSWER:\s*(\S+)", services={}, seed=0,
    )


def rollouts(spec: GrpoSpec) -> list[dict[str, Any]]:
    path = Path(spec.output_dir) / "rollouts" / "rank_0.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def start_job(spec: GrpoSpec, folder: Path) -> subprocess.Popen[str]:
    """The job in a process of its own, as a scheduler starts it (a signal or os._exit ends it, not pytest)."""
    pickled = folder / "spec.pkl"
    pickled.write_bytes(pickle.dumps(spec))
    code = "import pickle, sys; from jobs.training.grpo import run; run(pickle.load(open(sys.argv[1], 'rb')))"
    return subprocess.Popen([sys.executable, "-c", code, str(pickled)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_line(job: subprocess.Popen[str], text: str, timeout_s: float = 120) -> list[str]:
    """The job's log lines until one containing ``text``."""
    assert job.stderr is not None
    seen, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = job.stderr.readline()
        assert line, "the job ended early:\n" + "".join(seen[-30:])
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"no {text!r} in the job's log:\n" + "".join(seen[-30:]))


def test_grpo_job_trains_and_writes_model_adapter_card_and_step_log(tiny_assets: Path, problems: Path, tmp_path: Path) -> None:
    spec = grpo_spec(tiny_assets, problems, tmp_path / "run")
    metrics = run(spec)

    output = Path(spec.output_dir)
    record = Ledger(tmp_path / "run").read(spec.target.ledger_key)
    assert record["status"] == "done" and record["metrics"]["steps"] == 4
    assert (output / "adapter" / "adapter_config.json").exists()
    assert (output / "model" / "config.json").exists() and (output / "model" / "tokenizer_config.json").exists()
    from safetensors.torch import load_file

    trained, start = (load_file(str(folder / "model.safetensors")) for folder in (output / "model", tiny_assets / "random_init"))
    assert any(not torch.equal(trained[name], start[name]) for name in start), "the merged model learned something"
    assert not (output / "checkpoints").exists(), "checkpoints are deleted once the model is saved"

    card = read_json(output / "model_card.json")
    assert card["method"] == "grpo" and card["fine_tuning"] == "lora" and card["init_model"] == spec.init_model
    assert card["rewards"] == [{"name": "correctness", "weight": 1.0}, {"name": "digits", "weight": 1.0}]
    steps = card["step_log"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    # Two optimizer steps per generation batch: the rollouts of steps 1-2 come from the starting
    # policy, those of steps 3-4 from the policy after step 2.
    assert [s["policy_step"] for s in steps] == [0, 0, 2, 2]
    for entry in steps:
        for key in ("loss", "learning_rate", "reward", "reward_std", "frac_reward_zero_std", "kl", "entropy",
                    "completions/mean_length", "completions/clipped_ratio", "tokens_per_s", "peak_memory_mib",
                    "rewards/correctness/mean", "rewards/correctness/std", "rewards/digits/mean", "rewards/digits/std",
                    "groups/none_pass", "groups/some_pass", "groups/all_pass"):
            assert isinstance(entry[key], float | int), (key, entry)
        assert entry["rewards/correctness/failed"] == entry["rewards/digits/failed"] == 0
    assert any(s["rewards/digits/mean"] > 0 for s in steps)
    assert metrics["final_reward"] == steps[-1]["reward"] and metrics["world_size"] == 1 and metrics["resumed_from"] is None
    assert metrics["reward_failures"] == {"correctness": {"failed": 0, "first_error": None},
                                          "digits": {"failed": 0, "first_error": None}}
    # Each generation: 4 prompts x 2 completions, each prompt's group side by side.
    dealt = rollouts(spec)
    assert [r["policy_step"] for r in dealt] == [0, 2]
    assert all(len(r["ids"]) == 8 and r["ids"][0::2] == r["ids"][1::2] for r in dealt)


def test_a_failed_reward_is_counted_and_left_out_not_scored_zero(tiny_assets: Path, problems: Path, tmp_path: Path) -> None:
    spec = grpo_spec(tiny_assets, problems, tmp_path / "run", rewards=[DIGITS, RewardConfig(name="tests.test_grpo:broken")],
                     max_steps=2, steps_per_generation=1)
    metrics = run(spec)

    steps = metrics["step_log"]
    assert [s["rewards/broken/mean"] for s in steps] == [None, None], "no score, not a score of 0"
    assert [s["rewards/broken/failed"] for s in steps] == [4, 8], "every completion counted, step by step"
    assert all(s["rewards/digits/mean"] is not None for s in steps)
    assert metrics["reward_failures"]["broken"] == {"failed": 8, "first_error": "RuntimeError: the judge is down"}
    assert metrics["reward_failures"]["digits"]["failed"] == 0


def test_the_pre_timeout_signal_checkpoints_and_a_rerun_resumes_with_one_log_and_the_same_data(
    tiny_assets: Path, problems: Path, tmp_path: Path
) -> None:
    max_steps = 10
    reference = grpo_spec(tiny_assets, problems, tmp_path / "reference", max_steps=max_steps)
    run(reference)
    spec = grpo_spec(tiny_assets, problems, tmp_path / "run", max_steps=max_steps)
    job = start_job(spec, tmp_path)
    wait_for_line(job, "step 4:")
    job.send_signal(signal.SIGUSR2)  # SLURM's signal before the time limit (--signal=USR2@...)
    job.communicate(timeout=120)

    record = Ledger(tmp_path / "run").read(spec.target.ledger_key)
    # Outside SLURM there is nothing to requeue with: the job says so after checkpointing.
    assert record["status"] == "submitted" and record["note"] == "requeued after the pre-timeout signal", record
    checkpoints = list((Path(spec.output_dir) / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1, "save_steps is 100: the signal made the one checkpoint"
    stopped_at = int(checkpoints[0].name.split("-")[1])
    # After the step in progress: inside the second epoch and inside a generation cycle, where TRL's
    # own resume would deal the first epoch's order again and shift every later generation.
    assert stopped_at == 5

    metrics = run(spec)  # the requeued job
    assert metrics["resumed_from"] == str(checkpoints[0])
    steps = metrics["step_log"]
    assert [s["step"] for s in steps] == list(range(1, max_steps + 1)), "one log across the stop, no step twice"
    # Generations every 2 steps, as before the stop; a stop inside a generation cycle regenerates
    # that cycle's prompts with the resumed policy.
    expected = [stopped_at if step == stopped_at else step - step % 2 for step in range(max_steps)]
    assert [s["policy_step"] for s in steps] == expected
    # The same prompts in the same order as a run never stopped, across epochs (4 prompts per
    # generation, 8 problems: a new epoch every 2 generations, each in its own order).
    reference_ids = {r["policy_step"]: r["ids"] for r in rollouts(reference)}
    resumed = rollouts(spec)
    assert [r["policy_step"] for r in resumed] == sorted({*range(0, max_steps, 2), stopped_at})
    assert all(r["ids"] == reference_ids[r["policy_step"] - r["policy_step"] % 2] for r in resumed)
    assert len({tuple(ids) for ids in reference_ids.values()}) == len(reference_ids), "each epoch dealt anew"


def test_a_stalled_step_fails_the_job_with_a_clear_error_and_the_retry_resumes(
    tiny_assets: Path, problems: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "hung_once"
    hang = RewardConfig(name="tests.test_grpo:hang_once", params={"marker": str(marker), "at_call": 3})
    spec = grpo_spec(tiny_assets, problems, tmp_path / "run", rewards=[DIGITS, hang], max_steps=4, steps_per_generation=1,
                     save_steps=1, stall_timeout_s=5.0)
    job = start_job(spec, tmp_path)
    wait_for_line(job, "step 2:")
    started = time.monotonic()
    job.communicate(timeout=120)

    assert marker.exists() and job.returncode == STALLED_EXIT
    assert time.monotonic() - started < 60, "ended soon after the timeout, not at a time limit"
    record = Ledger(tmp_path / "run").read(spec.target.ledger_key)
    assert record["status"] == "failed", record
    assert record["error"].startswith("stalled: no training progress for ") and "after step 2" in record["error"], record

    metrics = run(spec)  # the driver's retry
    assert metrics["resumed_from"].endswith("checkpoint-2")
    assert [s["step"] for s in metrics["step_log"]] == [1, 2, 3, 4]
    assert Ledger(tmp_path / "run").read(spec.target.ledger_key)["status"] == "done"


def test_a_checkpoint_left_half_written_by_a_kill_is_passed_over_for_the_last_complete_one(
    tiny_assets: Path, problems: Path, tmp_path: Path
) -> None:
    spec = grpo_spec(tiny_assets, problems, tmp_path / "run", max_steps=3, steps_per_generation=1, save_steps=1)
    spec.train.keep_checkpoints = True
    run(spec)
    checkpoints = Path(spec.output_dir) / "checkpoints"
    # What a SIGKILL during the save of step 3 leaves (seen in the driver-kill test): the folder with
    # the weights written and the rest missing. A real kill lands there only by chance.
    for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (checkpoints / "checkpoint-3" / name).unlink()
    for made in ("model", "adapter"):
        shutil.rmtree(Path(spec.output_dir) / made)

    metrics = run(spec)  # the retry
    assert metrics["resumed_from"] == str(checkpoints / "checkpoint-2")
    assert [s["step"] for s in metrics["step_log"]] == [1, 2, 3]
    assert (Path(spec.output_dir) / "model").is_dir()
