"""The whole loop on the embedded default (submitit's local executor), with real jobs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs.problems.data import read_jsonl
from state import Ledger
from tests.conftest import (
    ROOT,
    ledger_record,
    read_json,
    run_cli,
    small_config,
    tree_snapshot,
    wait_for_lines,
    write_config,
)

pytestmark = pytest.mark.slow


def all_records(run_dir: Path) -> dict[str, dict]:
    root = run_dir / "ledger"
    keys = {str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.jsonl")}
    return Ledger(run_dir).read_many(keys)


def job_records(run_dir: Path) -> dict[str, dict]:
    """Records that jobs executed (shards and one-job stages), by key."""
    return {k: r for k, r in all_records(run_dir).items() if "executions" in r}


def assert_each_problem_once(run_dir: Path, iterations: int, num_problems: int) -> None:
    for i in range(1, iterations + 1):
        ids = []
        for shard in sorted((run_dir / f"iter_{i:03d}" / "generate").glob("shard_*.jsonl")):
            ids += [record["id"] for record in read_jsonl(shard)]
        assert len(ids) == num_problems and len(set(ids)) == num_problems, f"iteration {i}"


def test_two_iterations_end_to_end_then_resume_is_a_no_op(tiny_assets: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "small.yaml", small_config(tiny_assets, runs, train={"report_to": ["tensorboard"]}))
    run_dir = runs / "small"

    # Flags may come anywhere on the command line, before overrides too.
    dry = run_cli("-m", "pipeline.run", str(config), "--dry-run", "generate.num_samples=2")
    assert dry.returncode == 0, dry.stderr
    assert "array of 3" in dry.stdout and "iteration 2: train" in dry.stdout and "nothing submitted" in dry.stdout
    assert not runs.exists(), "--dry-run writes nothing"

    first = run_cli("-m", "pipeline.run", str(config))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "analytics across iterations" in first.stdout and "Held-out accuracy" in first.stdout

    status = run_cli("tools/status.py", str(run_dir), "--json")
    assert status.returncode == 0, status.stderr
    summary = json.loads(status.stdout)
    assert summary["base_heldout_accuracy"] is not None
    assert [it["iteration"] for it in summary["iterations"]] == [1, 2]
    for it in summary["iterations"]:
        assert {s: it["stages"][s]["status"] for s in it["stages"]} == dict.fromkeys(("generate", "filter", "train", "eval"), "done")
        shards = it["stages"]["generate"]["shards"]
        assert [s["index"] for s in shards] == [0, 1, 2]
        assert all(s["status"] == "done" and s["attempts"] == 1 and len(s["job_ids"]) == 1 for s in shards)
        assert it["metrics"]["heldout_accuracy"] is not None and it["metrics"]["mean_correct_rate"] is not None
        assert set(it["metrics"]["categories"]) == {"too_hard", "challenging", "learning_zone", "almost_mastered", "mastered"}
    table = run_cli("tools/status.py", str(run_dir))
    assert table.returncode == 0 and "3 done" in table.stdout
    # On the embedded default each job measured its own wall and CPU time.
    cost = run_cli("tools/cost.py", str(run_dir), "--json")
    assert cost.returncode == 0, cost.stderr
    stages = json.loads(cost.stdout)["stages"]
    assert {"eval", "generate", "filter", "train"} <= {s["stage"] for s in stages}
    assert all(s["unmeasured"] == 0 and s["cpu_seconds"] > 0 for s in stages if s["stage"] != "filter"), stages

    # The filter's outputs in the seed's layout; LoRA adapter and merged model; the model card.
    filtered = run_dir / "iter_001" / "filter"
    for name in ("filtered.json", "filtered_stats.json", "filtered_analytics.json", "filtered_by_category.json",
                 "filtered_no_correct.json", "filtered_analytics.log"):
        assert (filtered / name).is_file(), name
    train = run_dir / "iter_002" / "train"
    assert (train / "adapter" / "adapter_config.json").is_file() and (train / "model" / "config.json").is_file()
    card = read_json(train / "model_card.json")
    assert card["init_model"] == str(run_dir / "iter_001" / "train" / "model"), "iteration 2 continues from iteration 1"
    assert card["learning_rate"] == 5e-4 and card["steps"] == 2 and card["train_samples"] > 0
    assert card["iteration"] == 2 and card["base_model"] == str((tiny_assets / "random_init").resolve())
    # Every logged step: loss, learning rate, throughput and memory, in the ledger too.
    assert [entry["step"] for entry in card["step_log"]] == [1, 2]
    assert max(entry["learning_rate"] for entry in card["step_log"]) == 5e-4, "the iteration's rate after warmup"
    for entry in card["step_log"]:
        assert entry["loss"] > 0
        assert entry["tokens_per_s"] > 0 and entry["samples_per_s"] > 0 and entry["peak_memory_mib"] > 100
    assert ledger_record(run_dir, "iter_002/train")["metrics"]["step_log"] == card["step_log"]
    assert list((train / "tensorboard").glob("events.out.tfevents.*")), "train.report_to: tensorboard writes beside the model"
    # Training logs a user reads: no deprecation warnings, no progress bar per weight load or save.
    train_logs = list((run_dir / "submitit").glob("iter_*/train/*/*_log.err"))
    assert len(train_logs) == 2
    for log in train_logs:
        text = log.read_text()
        assert "Warning" not in text and "Writing model shards" not in text and "Loading weights" not in text, text
    assert_each_problem_once(run_dir, 2, 24)

    # Rerunning the finished run resubmits nothing.
    before = {k: (r.get("executions"), r.get("attempts")) for k, r in job_records(run_dir).items()}
    again = run_cli("-m", "pipeline.run", str(config))
    assert again.returncode == 0, again.stderr
    assert {k: (r.get("executions"), r.get("attempts")) for k, r in job_records(run_dir).items()} == before

    # A changed config is refused, naming what changed, and the run directory stays as it was.
    snapshot = tree_snapshot(run_dir)
    changed = run_cli("-m", "pipeline.run", str(config), "generate.num_samples=4")
    assert changed.returncode == 2
    assert "generate.num_samples: 2 -> 4" in changed.stderr and "run_name=NEW_NAME" in changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1
    assert tree_snapshot(run_dir) == snapshot
    # Execution settings may change between invocations of one run.
    assert run_cli("-m", "pipeline.run", str(config), "executor.poll_interval_s=0.5").returncode == 0
    # A run written by an older selftrain, whose config lacks a key added since, resumes: the
    # key's default is not a change.
    stored = run_dir / "config.yaml"
    older = yaml.safe_load(stored.read_text())
    del older["eval"]["backend"]
    stored.write_text(yaml.safe_dump(older, sort_keys=False))
    assert run_cli("-m", "pipeline.run", str(config)).returncode == 0


def test_sigkill_during_iteration_2_generation_then_rerun(tiny_assets: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    # Many small batches make iteration 2's generation last long enough to be caught.
    config = write_config(
        tmp_path / "kill.yaml",
        small_config(tiny_assets, runs, generate={"batch_size": 1, "max_tokens": 24}, data={"heldout": None}),
    )
    run_dir = runs / "small"
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", str(config)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 300
    while not ledger_record(run_dir, "iter_002/generate"):
        assert driver.poll() is None, driver.stdout.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    assert ledger_record(run_dir, "iter_002/generate")["status"] == "running"
    assert ledger_record(run_dir, "iter_001/train")["status"] == "done"
    status = run_cli("tools/status.py", str(run_dir))
    assert status.returncode == 0, status.stderr
    said = " ".join(status.stdout.split())
    assert f"driver gone: process {driver.pid} on" in said and "to go on: cd" in said and "(its driver is gone)" in said

    rerun = run_cli("-m", "pipeline.run", str(config))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resuming run" in rerun.stdout
    records = job_records(run_dir)
    assert records, "the ledger lists the executed jobs"
    twice = {k: r["executions"] for k, r in records.items() if r["executions"] != 1}
    assert not twice, f"work ran twice: {twice}"
    assert all(r["status"] == "done" for r in records.values())
    assert_each_problem_once(run_dir, 2, 24)


# The driver, SIGKILLed right after the scheduler accepted the generation shards and before their
# job ids were recorded: the one moment a timed kill hits only by chance. Its jobs are frozen
# (SIGSTOP) before they can start, so that the rerun finds the records without a job id.
DIE_AFTER_SUBMITTING = """
import os, signal, sys
import pipeline.loop.submitter
import submitit.local.local as local
start_controller = local.start_controller
def start_frozen(*args, setup=(), **kwargs):
    # The job's shell stops itself before it starts anything; SIGCONT to its pid (the job id) wakes it.
    return start_controller(*args, setup=["kill -STOP $$", *setup], **kwargs)
submit_array = pipeline.loop.submitter.submit_array
def submit_then_die(executor, function, specs, max_array_size):
    if "/generate/" not in specs[0].target.ledger_key:
        return submit_array(executor, function, specs, max_array_size)
    local.start_controller = start_frozen
    jobs = submit_array(executor, function, specs, max_array_size)
    print("frozen", *(job.job_id for job in jobs), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
pipeline.loop.submitter.submit_array = submit_then_die
from pipeline.run import main
sys.exit(main(sys.argv[1:]))
"""


def test_driver_killed_before_recording_job_ids_then_rerun(tiny_assets: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    config = write_config(
        tmp_path / "lost.yaml",
        small_config(tiny_assets, runs, num_iterations=1, learning_rates=[1e-3], data={"heldout": None}),
    )
    run_dir = runs / "small"
    # Output to files: the orphaned jobs inherit it and would hold a pipe open.
    killed_log = tmp_path / "killed.log"
    with open(killed_log, "w") as log:
        killed = subprocess.Popen([sys.executable, "-c", DIE_AFTER_SUBMITTING, str(config)], cwd=ROOT, stdout=log, stderr=log)
        assert killed.wait(timeout=300) == -signal.SIGKILL, killed_log.read_text()
    orphans = [int(pid) for pid in killed_log.read_text().split("frozen", 1)[1].split()]

    def wake_orphans() -> None:
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    try:
        shards = list(Ledger(run_dir).children("iter_001/generate").values())
        assert len(shards) == 3 and all(s["status"] == "submitted" and not s.get("job_ids") for s in shards)
        # The rerun finds submitted shards without a job id: lost, so it resubmits them. The lost
        # jobs wake up afterwards and must step aside.
        with open(tmp_path / "rerun.log", "w") as log:
            rerun = subprocess.Popen([sys.executable, "-m", "pipeline.run", str(config)], cwd=ROOT, stdout=log, stderr=log)
            time.sleep(10)  # the rerun starts and polls its jobs in about 3 s
            wake_orphans()
            assert rerun.wait(timeout=600) == 0, (tmp_path / "rerun.log").read_text()
        # The lost jobs may outlive the rerun: what they did counts only once they have ended.
        deadline = time.monotonic() + 120
        while any(Path(f"/proc/{pid}").exists() for pid in orphans):
            assert time.monotonic() < deadline, "the lost jobs never ended"
            time.sleep(0.2)
    finally:
        wake_orphans()
    records = job_records(run_dir)
    twice = {k: r["executions"] for k, r in records.items() if r["executions"] != 1}
    assert not twice, f"work ran twice: {twice}"
    assert all(r["status"] == "done" for r in records.values())
    assert all(r["attempts"] == 2 for k, r in records.items() if "/generate/" in k)
    lost_logs = "".join(p.read_text() for p in (run_dir / "submitit").rglob("*_log.err"))
    assert lost_logs.count(" steps aside: ") == 3, "each lost job left the task alone"
    assert_each_problem_once(run_dir, 1, 24)


def test_a_shard_killed_from_outside_is_retried_and_resumes(tiny_assets: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    config = write_config(
        tmp_path / "retry.yaml",
        small_config(
            tiny_assets, runs, num_iterations=1, learning_rates=[1e-3],
            generate={"batch_size": 1, "max_tokens": 24, "num_shards": 2}, data={"heldout": None},
        ),
    )
    run_dir = runs / "small"
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", str(config)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    partial = run_dir / "iter_001" / "generate" / "shard_00000.jsonl.partial"
    # Kill the shard's worker once it has written some items, as an OOM killer or a node would.
    wait_for_lines(partial, 2, lambda: driver.poll() is None)
    os.kill(ledger_record(run_dir, "iter_001/generate/shard_00000")["pid"], signal.SIGKILL)
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, output.decode()

    record = ledger_record(run_dir, "iter_001/generate/shard_00000")
    assert record["status"] == "done" and record["attempts"] == 2 and len(record["job_ids"]) == 2
    assert record["metrics"]["resumed_items"] >= 2, "the retry kept the items written before the kill"
    assert ledger_record(run_dir, "iter_001/generate/shard_00001")["attempts"] == 1
    assert_each_problem_once(run_dir, 1, 24)


def test_debug_cluster_runs_the_same_jobs_in_process(tiny_assets: Path, tmp_path: Path) -> None:
    """Also: a dev set (data.dev) evaluated beside the held-out one, and the run's last line saying
    which iteration was exported and why (export.iteration: best, chosen on dev accuracy)."""
    runs = tmp_path / "runs"
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join((tiny_assets / "heldout.jsonl").read_text().splitlines(keepends=True)[8:14]))
    config = write_config(
        tmp_path / "debug.yaml",
        small_config(tiny_assets, runs, num_iterations=1, learning_rates=[1e-3], executor={"cluster": "debug"}, data={"dev": str(dev)}),
    )
    result = run_cli("-m", "pipeline.run", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(run_cli("tools/status.py", str(runs / "small"), "--json").stdout)
    assert [s["status"] for s in summary["iterations"][0]["stages"].values()] == ["done"] * 4
    assert_each_problem_once(runs / "small", 1, 24)
    assert summary["base_dev_accuracy"] is not None and summary["iterations"][0]["metrics"]["dev_accuracy"] is not None
    assert len((runs / "small" / "baseline" / "eval" / "dev_predictions.jsonl").read_text().splitlines()) == 6
    assert len((runs / "small" / "iter_001" / "eval" / "predictions.jsonl").read_text().splitlines()) == 8
    choice = summary["export"]["choice"]
    assert "dev accuracy" in choice and f"final model: {choice}" in " ".join(result.stdout.split())
    assert (summary["export"]["path"] is None) == choice.startswith("no iteration beat the base model")


GOLDEN = Path(__file__).parent / "golden" / "dry_run_slurm.txt"


def test_dry_run_prints_the_exact_sbatch_scripts(slurm_cluster: str, tiny_assets: Path, tmp_path: Path) -> None:
    """Compared with a golden file; regenerate it with UPDATE_GOLDEN=1 after a deliberate change.

    submitit renders the scripts, and only where SLURM's commands are installed.
    """
    runs = tmp_path / "runs"
    executor = {
        "cluster": "slurm",
        "generate": {"partition": "gpu", "gpus_per_task": 1, "cpus_per_task": 8, "mem_gb": 64, "array_parallelism": 2,
                     "account": "lab", "qos": "high", "constraint": "a100", "timeout_min": 120},
        "train": {"nodes": 2, "tasks_per_node": 4, "gpus_per_task": 1,
                  "extra_sbatch": {"comment": "ReST $(not run); `nor this`", "exclude": "node7"}},
    }
    config = write_config(
        tmp_path / "golden.yaml",
        small_config(tiny_assets, runs, num_iterations=1, learning_rates=[1e-3], executor=executor),
    )
    result = run_cli("-m", "pipeline.run", str(config), "--dry-run")
    assert result.returncode == 0, result.stderr
    plan, scripts = result.stdout.split("# ---- sbatch script", 1)
    assert "ddp" in plan, "the plan names the training strategy"
    scripts = "# ---- sbatch script" + scripts
    scripts = scripts.replace(str(runs.resolve()), "RUNS").replace(sys.executable, "PYTHON")
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(scripts)
    assert scripts == GOLDEN.read_text()
    assert not runs.exists()
