"""tools/report.py: the seed's table across iterations, its warning signs, and the PNG."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from jobs.scoring import filtering as filter_job
from jobs.scoring.config import FilterConfig
from jobs.specs import FilterSpec, JobTarget
from pipeline.loop.summary import summarize
from pipeline.views.tables import warning_signs
from state import Ledger, Status
from tests.conftest import run_cli, small_config, write_config
from tests.test_filter import seed_record, write_shard

# Correct counts (of K = 16) per iteration: weak (60 % too hard), healthy, saturated (60 % mastered).
ITERATIONS = [
    [0] * 12 + [2] * 4 + [8] * 4,
    [0] * 10 + [3] * 10 + [11] * 50 + [14] * 20 + [16] * 10,
    [2] * 2 + [8] * 4 + [13] * 2 + [16] * 12,
]
HELDOUT = [0.2, 0.3, 0.45, 0.6]


def filtered_run(run_dir: Path) -> Path:
    """A run's ledger as the driver and jobs leave it: real filter jobs over shards, eval metrics."""
    ledger = Ledger(run_dir)
    ledger.update("run", {"run_name": "weak_to_strong", "num_iterations": len(ITERATIONS), "status": "done", "num_train": 20})
    write_config(run_dir / "config.yaml", {"run_name": "weak_to_strong", "num_iterations": len(ITERATIONS), "model": {"path": "m"},
                                           "data": {"train": "t.jsonl", "heldout": "h.jsonl"}})
    ledger.set_status(["baseline/eval"], Status.DONE, metrics={"heldout_accuracy": HELDOUT[0]})
    for iteration, counts in enumerate(ITERATIONS, start=1):
        folder = run_dir / f"iter_{iteration:03d}"
        folder.mkdir(parents=True)
        shard = write_shard(folder / "shard.jsonl", [seed_record(f"p{i}", c) for i, c in enumerate(counts)])
        key = f"iter_{iteration:03d}/filter"
        filter_job.run(
            FilterSpec(JobTarget(str(run_dir), key), [str(shard)], len(counts), str(folder / "filter"), FilterConfig(strategy="all"), 16, 42)
        )
        ledger.set_status([f"iter_{iteration:03d}/eval"], Status.DONE, metrics={"heldout_accuracy": HELDOUT[iteration]})
    return run_dir


def test_report_prints_the_seed_table_flags_warning_signs_and_writes_the_png(tmp_path: Path) -> None:
    run_dir = filtered_run(tmp_path / "run")
    result = run_cli("tools/report.py", str(run_dir))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for row in ("Too hard (0 correct)", "Learning zone", "Mastered", "Mean correct rate", "Held-out accuracy", "Iteration 3"):
        assert row in out, row
    assert "60.0%" in out and "20.0%" in out and "45.0%" in out
    assert "0% correct rate" in out and "100% correct rate" in out and "16 correct" in out
    assert 'Too many "too hard" problems (>50%): iteration 1 (60.0% too_hard): the model is too weak' in out
    assert 'Too many "mastered" problems (>50%): iteration 3 (60.0% mastered): the dataset is too easy' in out
    assert "Very small filtered dataset (<1000 samples): iteration 1 (40 samples), iteration 3 (254 samples)" in out
    assert "generate.num_samples" in out and "consider stopping ReST" in out and "filter.include_mastered=true" in out
    assert out.count("filter.include_mastered=true") == 1, "advice once per sign, not per iteration"
    assert "iteration 2 (" not in out, "1020 samples, 10 % too hard, 10 % mastered: nothing to flag"

    with Image.open(run_dir / "report.png") as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 300


def test_report_draws_the_control_and_says_what_self_training_adds_over_it(tmp_path: Path) -> None:
    run_dir, control = filtered_run(tmp_path / "run"), filtered_run(tmp_path / "control")
    for iteration, accuracy in enumerate([0.22, 0.18, 0.25], start=1):
        Ledger(control).set_status([f"iter_{iteration:03d}/eval"], Status.DONE, metrics={"heldout_accuracy": accuracy})
    result = run_cli("tools/report.py", str(run_dir), "--control", str(control))
    assert result.returncode == 0, result.stderr
    assert ("held-out accuracy to iteration 3: self-training 20.0% -> 60.0% (+40.0 points), control control 20.0% -> 25.0%"
            " (+5.0); self-training adds +35.0 points over the control") in " ".join(result.stdout.split())
    missing = run_cli("tools/report.py", str(run_dir), "--control", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and missing.stderr.strip().endswith("not a run directory (no ledger/ and config.yaml in it)")
    assert len(missing.stderr.strip().splitlines()) == 1


def test_summary_keeps_its_keys_and_adds_the_distributions(tmp_path: Path) -> None:
    summary = summarize(filtered_run(tmp_path / "run"))
    metrics = summary["iterations"][1]["metrics"]
    assert {"heldout_accuracy", "mean_correct_rate", "categories", "filtered_samples", "final_loss"} <= set(metrics)
    assert metrics["categories"] == {"too_hard": 0.1, "challenging": 0.1, "learning_zone": 0.5, "almost_mastered": 0.2, "mastered": 0.1}
    assert metrics["filtered_samples"] == 10 * 3 + 50 * 11 + 20 * 14 + 10 * 16
    assert metrics["correct_count_histogram"]["11"] == 50 and metrics["correct_rate_buckets"]["0%"] == 10
    assert metrics["total_candidates"] == 100 * 16
    assert [(s["iteration"], s["sign"].split(" (")[0]) for s in warning_signs(summary)] == [
        (1, 'Too many "too hard" problems'), (1, "Very small filtered dataset"),
        (3, 'Too many "mastered" problems'), (3, "Very small filtered dataset"),
    ]


def test_not_a_run_directory_is_one_line(tmp_path: Path) -> None:
    result = run_cli("tools/report.py", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path}: not a run directory (no ledger/ and config.yaml in it)"


@pytest.mark.slow
def test_report_on_a_real_run(tiny_assets: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "small.yaml", small_config(tiny_assets, runs))
    assert run_cli("-m", "pipeline.run", str(config)).returncode == 0
    result = run_cli("tools/report.py", str(runs / "small"))
    assert result.returncode == 0, result.stderr
    assert "Held-out accuracy" in result.stdout and "Iteration 2" in result.stdout
    assert "Very small filtered dataset" in result.stdout, "24 problems cannot give 1000 samples"
    assert (runs / "small" / "report.png").stat().st_size > 10_000


def test_report_on_a_grpo_run_without_filter_shows_each_reward_and_the_hacking_flag(tmp_path: Path) -> None:
    """GRPO without a pass-rate band has no filter stage, hence no categories: the report still
    prints, charts each reward's curve, shows the rollouts' pass-rate distribution, the watch's flag,
    the collapse guard's and the final model's choice (configs/demo_grpo_hacking.yaml's case)."""
    run_dir = tmp_path / "run"
    ledger = Ledger(run_dir)
    ledger.update("run", {"run_name": "hacked", "num_iterations": 2, "status": "stopped", "num_train": 20})
    write_config(run_dir / "config.yaml", {"run_name": "hacked", "method": "grpo", "num_iterations": 2, "model": {"path": "m"},
                                           "data": {"train": "t.jsonl", "heldout": "h.jsonl"},
                                           "grpo": {"rewards": [{"name": "format", "tags": ["think"], "layout": "present"}]},
                                           "export": {"iteration": "best", "collapse_margin": 0.05}})
    ledger.set_status(["baseline/eval"], Status.DONE, metrics={"heldout_accuracy": 0.118})
    step_log = [{"step": 2 * (i + 1), "policy_step": 2 * i + 1, "reward": f, "rewards/format/mean": f, "frac_reward_zero_std": 1 - f,
                 "groups/none_pass": 0.5 + i / 16, "groups/some_pass": 0.5 - i / 16, "groups/all_pass": 0.0}
                for i, f in enumerate([0.92, 0.86, 0.88, 0.88, 0.95, 0.97, 1.0, 0.94])]
    ledger.set_status(["iter_001/train"], Status.DONE, metrics={"step_log": step_log, "final_reward": 0.94})
    ledger.set_status(["iter_001/eval"], Status.DONE, metrics={"heldout_accuracy": 0.0})
    choice = "no iteration beat the base model (held-out accuracy 11.8%; best: iteration 1, 0.0%): nothing exported"
    ledger.set_status(["export"], Status.DONE, metrics={"exported_iteration": 0, "export": None, "choice": choice})
    result = run_cli("tools/report.py", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert "reward format (start -> end)" in result.stdout and "0.890 -> 0.970" in result.stdout
    assert "reward hacking? iteration 1: reward format rose 0.890 -> 0.970 while held-out accuracy fell 11.8% -> 0.0%" in result.stdout
    # What GRPO has, not the filter's panels left empty: its rounds, with the share of groups of one reward.
    assert "GRPO rollouts by round" in result.stdout and "Groups of one reward" in result.stdout and "14.0%" in result.stdout
    # The pass-rate distribution: groups where none of the samples passes grow, round by round.
    assert "Groups where no sample passes" in result.stdout and "50.0%" in result.stdout and "93.8%" in result.stdout
    assert ("collapse: iteration 1: held-out accuracy 0.0%, below the base model's 11.8% by more than export.collapse_margin (0.05)"
            in result.stdout)
    assert f"final model: {choice}" in result.stdout
    assert "correct-rate distribution" not in result.stdout and "Too hard" not in result.stdout
    with Image.open(run_dir / "report.png") as image:
        assert image.format == "PNG" and image.width > 1000


def test_the_rollouts_pass_rate_distribution_counts_groups_with_a_judged_sample() -> None:
    """What the GRPO panel's rows show, as the training job counts it: groups (here of 2 samples) where
    no sample passes, some do, or all do; a sample the verifier cannot judge (NaN) is left out, and
    a group with none judged is not counted."""
    import torch

    from jobs.training.grpo_trainer import pass_shares

    nan = float("nan")
    passed = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, nan, nan, 1.0, nan])
    assert pass_shares(passed, 2) == {"groups/none_pass": 0.25, "groups/some_pass": 0.25, "groups/all_pass": 0.5}
    assert pass_shares(torch.tensor([nan, nan]), 2) == {}, "no group judged: no figure, not 0 %"
