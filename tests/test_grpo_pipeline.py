"""GRPO as a method of the loop: a mixed schedule (ReST, ReST, then GRPO on a pass-rate band) on the
embedded default with real jobs, the export of the final model, resume as a no-op; pass-rate selection."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.scoring.pass_rates import select_problems
from jobs.specs import ExportSpec, JobTarget
from jobs.training import export
from tests.conftest import (
    ROOT,
    ledger_record,
    read_json,
    run_cli,
    small_config,
    write_config,
)
from tests.test_pipeline import job_records

GRPO = {"num_generations": 2, "batch_size": 2, "max_steps": 2, "max_completion_length": 12, "logging_steps": 1,
        "save_steps": 1000, "learning_rates": [1e-4], "rewards": [{"name": "correctness", "weight": 2.0}, {"name": "tag_count"}]}


def test_pass_rate_band_keeps_the_problems_inside_it_and_says_why_others_left(tmp_path: Path) -> None:
    rates = tmp_path / "rates.jsonl"
    rates.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "none", "candidates": 8, "correct": 0}, {"id": "some", "candidates": 8, "correct": 2},
        {"id": "half", "candidates": 8, "correct": 4}, {"id": "all", "candidates": 8, "correct": 8},
        {"id": "broken", "failed": True},
    ]))
    problems = [{"id": i, "question": "q", "answer": "a"} for i in ("none", "some", "half", "all", "broken", "unseen")]
    selected, counts = select_problems(problems, rates, (0.25, 0.5))
    assert [p["id"] for p in selected] == ["some", "half"], "bounds included"
    assert counts == {"band": [0.25, 0.5], "selected": 2, "problems": 6, "below_band": 1, "above_band": 1, "no_pass_rate": 2,
                      "unjudged": 0}


@pytest.mark.parametrize("name", ["demo_grpo", "demo_grpo_hacking", "demo_grpo_arrays"])
def test_the_grpo_demo_configs_are_valid(name: str, tiny_assets: Path, tmp_path: Path) -> None:
    """configs/<name>.yaml plans as written, from a folder with the demo's assets (the random model
    stands in for the warm-started one: a dry run loads no weights)."""
    demo = tmp_path / "demo_assets"
    demo.mkdir()
    for part in ("train.jsonl", "heldout.jsonl"):
        (demo / part).symlink_to(tiny_assets / part)
    (demo / "base_model").symlink_to(tiny_assets / "random_init")
    dry = run_cli("-m", "pipeline.run", str(ROOT / "configs" / f"{name}.yaml"), "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "iteration 2: train" in dry.stdout and "GRPO" in dry.stdout and "nothing submitted" in dry.stdout
    assert not (tmp_path / "runs").exists(), "--dry-run writes nothing"


@pytest.mark.slow
def test_rest_rest_then_grpo_runs_to_the_end_exports_and_resumes_as_a_no_op(tiny_assets: Path, tmp_path: Path) -> None:
    runs, exports = tmp_path / "runs", tmp_path / "models"
    config = write_config(tmp_path / "mixed.yaml", small_config(
        tiny_assets, runs, num_iterations=3, schedule=["rest", "rest", "grpo"], export_dir=str(exports),
        grpo={**GRPO, "pass_rate_band": [0.0, 0.5]}, export={"iteration": "last"},
    ))
    run_dir = runs / "small"
    dry = run_cli("-m", "pipeline.run", str(config), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "GRPO, lr 0.0001" in dry.stdout and "export" in dry.stdout

    first = run_cli("-m", "pipeline.run", str(config))
    assert first.returncode == 0, first.stdout + first.stderr
    summary = json.loads(run_cli("tools/status.py", str(run_dir), "--json").stdout)
    assert [it["method"] for it in summary["iterations"]] == ["rest", "rest", "grpo"]
    grpo = summary["iterations"][2]
    # The band measured iteration 3's pass rates with iteration 2's model first, then trained on those inside it.
    assert {name: stage["status"] for name, stage in grpo["stages"].items()} == dict.fromkeys(("generate", "filter", "train", "eval"), "done")
    assert (run_dir / "iter_003" / "filter" / "filtered_pass_rates.jsonl").is_file()
    selection = grpo["metrics"]["selection"]
    assert selection["problems"] == 24 and selection["selected"] + selection["below_band"] + selection["above_band"] + selection["no_pass_rate"] == 24
    train = grpo["stages"]["train"]["metrics"]
    steps = train["step_log"]
    assert [entry["step"] for entry in steps] == [1, 2]
    assert {"reward", "rewards/correctness/mean", "rewards/tag_count/mean", "frac_reward_zero_std", "policy_step"} <= set(steps[0])
    assert grpo["metrics"]["final_reward"] == steps[-1]["reward"]
    card = read_json(run_dir / "iter_003" / "train" / "model_card.json")
    assert card["method"] == "grpo" and card["init_model"] == str(run_dir / "iter_002" / "train" / "model")

    # The final model, also where the seeds put theirs: <method>_<model>_<timestamp>/.
    (exported,) = exports.iterdir()
    assert exported.name.startswith("grpo_random_init_") and summary["export"]["path"] == str(exported)
    assert (exported / "config.json").is_file() and (exported / "tokenizer_config.json").is_file()
    assert read_json(exported / "export.json")["iteration"] == 3
    report = run_cli("tools/report.py", str(run_dir))
    assert report.returncode == 0 and "Training reward (last step)" in report.stdout

    before = job_records(run_dir)
    again = run_cli("-m", "pipeline.run", str(config))
    assert again.returncode == 0 and "resuming" in again.stdout, again.stdout + again.stderr
    assert job_records(run_dir) == before, "a finished run resumes as a no-op"
    assert list(exports.iterdir()) == [exported]


@pytest.mark.slow
def test_driver_and_training_job_killed_mid_grpo_then_rerun_resumes_from_the_last_checkpoint(tiny_assets: Path, tmp_path: Path) -> None:
    """The node running a GRPO iteration dies (the driver and the training job SIGKILLed) after a
    checkpoint; the rerun resubmits the job, which resumes from that checkpoint: no step before it is
    trained again, one continuous step log, and the run finishes."""
    runs = tmp_path / "runs"
    max_steps = 12
    config = write_config(tmp_path / "grpo_kill.yaml", small_config(
        tiny_assets, runs, method="grpo", num_iterations=1, data={"heldout": None}, export_dir=str(tmp_path / "models"),
        grpo={**GRPO, "max_steps": max_steps, "save_steps": 3},
    ))
    run_dir = runs / "small"
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.run", str(config)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    checkpoints = run_dir / "iter_001" / "train" / "checkpoints"
    deadline = time.monotonic() + 600
    while not any(p.name in ("checkpoint-6", "checkpoint-9") for p in (checkpoints.iterdir() if checkpoints.is_dir() else [])):
        assert driver.poll() is None, driver.stdout.read().decode() if driver.stdout else ""
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.1)
    record = ledger_record(run_dir, "iter_001/train")
    os.kill(driver.pid, signal.SIGKILL)
    os.kill(record["pid"], signal.SIGKILL)
    driver.wait()

    rerun = run_cli("-m", "pipeline.run", str(config))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    train = ledger_record(run_dir, "iter_001/train")
    metrics = train["metrics"]
    resumed_at = int(metrics["resumed_from"].rsplit("-", 1)[1])
    assert train["attempts"] == 2 and train["executions"] == 2 and resumed_at in (3, 6, 9)
    assert [entry["step"] for entry in metrics["step_log"]] == list(range(1, max_steps + 1)), "one continuous step log"
    # The steps after the checkpoint were trained by the second job, with rollouts of its own policies.
    assert all(entry["policy_step"] >= resumed_at for entry in metrics["step_log"] if entry["step"] > resumed_at)


@pytest.mark.slow
def test_grpo_rounds_train_on_the_samples_of_the_generation_arrays_with_their_log_probabilities(tiny_assets: Path, tmp_path: Path) -> None:
    """grpo.rollouts: arrays, two rounds of 12 of the 24 problems on the embedded default, overlapping
    (max_staleness: 1): round 2's shards sample with the base policy while round 1 trains, and keep
    every token's log-probability; the score job keeps the groups with a signal; the training job
    trains on those samples. Round 1's first step, on-policy, finds the trainer's log-probabilities
    equal to the stored ones, and the next, one update later, finds them apart and weighs the samples
    for it; round 2's samples are one round stale from its first step, and say so."""
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "arrays.yaml", small_config(
        tiny_assets, runs, method="grpo", export_dir=str(tmp_path / "models"),
        # A reward in which a random model's samples differ: groups with variance, so an update moves the policy.
        grpo={**GRPO, "rollouts": "arrays", "problems_per_round": 12, "max_staleness": 1, "temperature": 1.0, "learning_rates": [1e-2],
              "rewards": [{"name": "tests.test_grpo:digits"}]},
        train={"warmup_ratio": 0.0},
    ))
    run_dir = runs / "small"
    done = run_cli("-m", "pipeline.run", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    # status.py, a script, finds the run's reward (a module of the folder it runs from) as the run did.
    summary = json.loads(run_cli("tools/status.py", str(run_dir), "--json").stdout)
    for iteration in summary["iterations"]:
        assert {name: stage["status"] for name, stage in iteration["stages"].items()} == dict.fromkeys(("generate", "score", "train", "eval"), "done")
    sampled = []
    for round_ in (1, 2):
        records = [json.loads(line) for shard in sorted((run_dir / f"iter_{round_:03d}" / "generate").glob("shard_*.jsonl"))
                   for line in shard.read_text().splitlines()]
        assert len(records) == 12 and all(len(r["candidates"]) == 2 for r in records), "grpo.num_generations samples of each problem"
        sampled.append({r["id"] for r in records})
        for candidate in (c for r in records for c in r["candidates"]):
            assert candidate["policy"] == 0, "sampled by the base policy: round 2 one round stale"
            assert len(candidate["completion_ids"]) == len(candidate["logprobs"]) == candidate["num_tokens"] <= 12
            assert all(lp <= 0 for lp in candidate["logprobs"])
        # The score job: every group scored once, those whose samples all scored alike left out.
        scored = ledger_record(run_dir, f"iter_{round_:03d}/score")["metrics"]["round"]
        assert scored["groups"] == 12 and scored["failed_problems"] == 0
        assert scored["kept_groups"] + scored["zero_std_groups"] + scored["unscored_groups"] == 12 and scored["kept_groups"] >= 2
        kept = [json.loads(line) for line in (run_dir / f"iter_{round_:03d}" / "score" / "scored.jsonl").read_text().splitlines()]
        assert len(kept) == scored["kept_groups"] and all(len({s["reward"] for s in g["samples"]}) > 1 for g in kept)
        train = ledger_record(run_dir, f"iter_{round_:03d}/train")["metrics"]
        assert train["rollouts"] == "arrays" and train["steps"] == 2
        first, second = train["step_log"]
        assert scored["staleness"] == round_ - 1 and {s["rollouts/staleness"] for s in (first, second)} == {round_ - 1}
        if round_ == 1:
            assert first["sampling/sampling_logp_difference/mean"] < 1e-4, "the stored log-probabilities are the trainer's own"
        else:
            assert first["sampling/sampling_logp_difference/mean"] > 1e-3, "samples of the policy before the last differ from its first step"
        assert second["sampling/sampling_logp_difference/mean"] > 1e-3, "one update later they differ"
        assert second["sampling/importance_sampling_ratio/min"] != second["sampling/importance_sampling_ratio/max"]
    # The overlap: round 2's shards ran while round 1 trained.
    train = ledger_record(run_dir, "iter_001/train")
    for shard in ("shard_00000", "shard_00001"):
        generated = ledger_record(run_dir, f"iter_002/generate/{shard}")
        assert generated["started_at"] < train["ended_at"] and train["started_at"] < generated["ended_at"]
    assert len(sampled[0] | sampled[1]) == 24, "the two rounds of 12 problems share none: all 24 sampled once"
    # The held-out evaluation scores the greedy answers with the run's rewards too, the base model's as well.
    for key in ("baseline/eval", "iter_002/eval"):
        assert ledger_record(run_dir, key)["metrics"]["heldout_rewards"]["digits"]["mean"] is not None
    card = read_json(run_dir / "iter_002" / "train" / "model_card.json")
    assert card["init_model"] == str(run_dir / "iter_001" / "train" / "model")


def test_two_exports_in_the_same_second_keep_both_models(tiny_assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export.time, "strftime", lambda _format: "20261202_010203")
    folders = []
    for run in ("a", "b"):
        spec = ExportSpec(target=JobTarget(str(tmp_path / run), "export"), model_path=str(tiny_assets / "random_init"),
                          export_dir=str(tmp_path / "models"), method="rest", model_name="random_init",
                          run_dir=str(tmp_path / run), iteration=2)
        metrics: dict = {}
        export.export(spec, metrics)
        folders.append(Path(metrics["export"]))
    assert [f.name for f in folders] == ["rest_random_init_20261202_010203", "rest_random_init_20261202_010203_2"]
    assert [read_json(f / "export.json")["run_dir"] for f in folders] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert all((f / "config.json").is_file() for f in folders)
