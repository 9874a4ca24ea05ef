"""The driver against a real SLURM cluster: arrays, sacct state, faults from outside, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.loop.submitter import NEVER_SATISFIED
from pipeline.scheduling.watch import JobWatcher
from tests.conftest import (
    ROOT,
    ledger_record,
    read_json,
    run_cli,
    slurm_queue,
    small_config,
    wait_for_lines,
    write_config,
)
from tests.test_grpo_pipeline import GRPO
from tests.test_pipeline import assert_each_problem_once

pytestmark = pytest.mark.slow

SLURM_EXECUTOR = {
    "cluster": "slurm", "poll_interval_s": 0.5, "max_poll_interval_s": 2.0,
    "generate": {"cpus_per_task": 1, "timeout_min": 10}, "filter": {"timeout_min": 10},
    "train": {"timeout_min": 10}, "eval": {"timeout_min": 10},
}


def sacct_rows(job_id: str, fields: str = "JobID,State,ExitCode") -> list[str]:
    out = subprocess.run(["sacct", "-X", "--parsable2", "--noheader", "-j", job_id, f"--format={fields}"],
                         capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def sacct_tasks(array_id: str) -> list[str]:
    """``["0|COMPLETED|0:0", ...]`` for the array's tasks.

    For a while after an array ends sacct shows one bare row for all of it (a periodic thread in
    slurmctld fills in the task rows later), so wait for the task rows.
    """
    deadline = time.monotonic() + 120
    while True:
        rows = sacct_rows(array_id)
        if all("_" in row.split("|")[0] for row in rows) or time.monotonic() > deadline:
            return sorted(row.split("_", 1)[1] for row in rows)
        time.sleep(2)


def queued_job_ids() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def problems_file(assets: Path, path: Path, count: int) -> Path:
    """The first ``count`` training problems: enough that a shard is still running when a test hits it."""
    path.write_text("".join((assets / "train.jsonl").read_text().splitlines(keepends=True)[:count]))
    return path


def test_two_iterations_on_slurm(slurm_cluster: str, tiny_assets: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    marker = tmp_path / "injected"
    # Shell syntax in a config value stays text: sbatch gets it quoted, nothing runs it.
    sneaky = {"comment": f"$(touch {marker}); `touch {marker}` | touch {marker}"}
    executor = {**SLURM_EXECUTOR, "generate": {**SLURM_EXECUTOR["generate"], "extra_sbatch": sneaky}}
    config = write_config(tmp_path / "slurm.yaml", small_config(tiny_assets, runs, executor=executor))
    result = run_cli("-m", "pipeline.run", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert not marker.exists(), "a config value ran as a command"
    # The driver returns once the ledger says done; the last job may still be exiting for a moment.
    summary = wait_for_run(runs / "small")
    shards = summary["iterations"][0]["stages"]["generate"]["shards"]
    array_ids = {s["job_ids"][0].split("_")[0] for s in shards}
    assert len(array_ids) == 1, "the shards of an iteration are one job array"
    assert sacct_tasks(array_ids.pop()) == ["0|COMPLETED|0:0", "1|COMPLETED|0:0", "2|COMPLETED|0:0"]
    assert_each_problem_once(runs / "small", 2, 24)
    # status.py shows SLURM's live word beside the ledger's, from sacct.
    assert {(job["status"], job["scheduler_state"], job["exit_code"]) for job in summary["jobs"]} == {("done", "COMPLETED", "0:0")}
    assert {job["node"] for job in summary["jobs"]} == {os.uname().nodename}


def test_a_grpo_rounds_shard_cancelled_as_the_driver_is_killed_is_resubmitted_alone_and_every_group_trains_once(
    slurm_cluster: str, tiny_assets: Path, tmp_path: Path
) -> None:
    """GRPO over the arrays: one generation shard of the round scancelled and the driver SIGKILLed at
    the same moment; the rerun resubmits that shard alone, which keeps the items it had written, and
    the round is scored and trained with every group once."""
    runs = tmp_path / "runs"
    config = write_config(
        tmp_path / "cancel.yaml",
        small_config(tiny_assets, runs, num_iterations=1, method="grpo",
                     data={"train": str(problems_file(tiny_assets, tmp_path / "60.jsonl", 60)), "heldout": None},
                     grpo={**GRPO, "rollouts": "arrays", "temperature": 1.0, "rewards": [{"name": "tests.test_grpo:digits"}]},
                     generate={"batch_size": 1}, executor=SLURM_EXECUTOR),
    )
    run_dir = runs / "small"
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.run", str(config)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    partial = run_dir / "iter_001" / "generate" / "shard_00001.jsonl.partial"
    wait_for_lines(partial, 1, lambda: driver.poll() is None)
    victim = ledger_record(run_dir, "iter_001/generate/shard_00001")["job_id"]
    driver.kill()
    subprocess.run(["scancel", victim], check=True)
    driver.wait()
    rerun = run_cli("-m", "pipeline.run", str(config))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr

    shards = {name: ledger_record(run_dir, f"iter_001/generate/{name}") for name in ("shard_00000", "shard_00001", "shard_00002")}
    assert shards["shard_00001"]["attempts"] == 2
    assert shards["shard_00001"]["job_ids"][0] == victim
    retry = shards["shard_00001"]["job_ids"][1]
    # submitit submits an array of one as a plain job.
    assert "_" not in retry and sacct_rows(retry) == [f"{retry}|COMPLETED|0:0"], "the retry runs that shard alone"
    assert [s["attempts"] for n, s in shards.items() if n != "shard_00001"] == [1, 1]
    assert [s["executions"] for n, s in shards.items() if n != "shard_00001"] == [1, 1], "the other shards ran once"
    assert shards["shard_00001"]["metrics"]["resumed_items"] >= 1, "the retry kept the items written before the cancel"
    assert_each_problem_once(run_dir, 1, 60)
    scored = ledger_record(run_dir, "iter_001/score")
    assert scored["executions"] == 1 and scored["metrics"]["round"]["groups"] == 60
    groups = [json.loads(line) for line in (run_dir / "iter_001" / "score" / "scored.jsonl").read_text().splitlines()]
    assert len(groups) == len({g["id"] for g in groups}) == scored["metrics"]["round"]["kept_groups"] >= 2
    assert all(len(g["samples"]) == GRPO["num_generations"] for g in groups), "every group whole, once"
    assert ledger_record(run_dir, "iter_001/train")["status"] == "done"


def test_gpus_on_a_cluster_without_any_are_refused_at_submission(slurm_cluster: str, tiny_assets: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    executor = {**SLURM_EXECUTOR, "generate": {"gpus_per_task": 1}}
    config = write_config(tmp_path / "gpu.yaml", small_config(tiny_assets, runs, executor=executor, data={"heldout": None}))
    before = queued_job_ids()
    result = run_cli("-m", "pipeline.run", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "iter_001/generate: the scheduler refused the job" in lines[0] and "gres" in lines[0].lower()
    # (A job of an earlier test may still be finishing: only this run's jobs matter.)
    assert queued_job_ids() <= before, "nothing of this run is left in the queue"
    run = ledger_record(runs / "small", "run")
    assert run["status"] == "failed" and "refused" in run["error"]
    shard = ledger_record(runs / "small", "iter_001/generate/shard_00000")
    assert shard["status"] == "failed" and "gres" in shard["error"].lower()


def test_arrays_larger_than_max_array_size_are_split(slurm_cluster: str, tiny_assets: Path, tmp_path: Path) -> None:
    script = str(ROOT / "tools" / "local_slurm.sh")
    env = {**os.environ, "SELFTRAIN_SLURM_MAX_ARRAY_SIZE": "2"}
    subprocess.run(["bash", script, "start"], env=env, check=True, capture_output=True)
    try:
        runs = tmp_path / "runs"
        config = write_config(
            tmp_path / "split.yaml",
            small_config(tiny_assets, runs, num_iterations=1, learning_rates=[1e-3], data={"heldout": None},
                         generate={"num_shards": 3}, executor=SLURM_EXECUTOR),
        )
        result = run_cli("-m", "pipeline.run", str(config))
        assert result.returncode == 0, result.stdout + result.stderr
        job_ids = [ledger_record(runs / "small", f"iter_001/generate/shard_{i:05d}")["job_id"] for i in range(3)]
        first = job_ids[0].split("_")[0]
        # submitit submits the remaining array of one as a plain job.
        assert job_ids[:2] == [f"{first}_0", f"{first}_1"] and "_" not in job_ids[2], "3 shards as arrays of 2 and 1"
        assert_each_problem_once(runs / "small", 1, 24)
    finally:
        subprocess.run(["bash", script, "start"], check=True, capture_output=True)


def test_requeue_resubmits_exactly_the_failed_shard(slurm_cluster: str, tiny_assets: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    config = write_config(
        tmp_path / "requeue.yaml",
        small_config(tiny_assets, runs, num_iterations=1, learning_rates=[1e-3],
                     data={"train": str(problems_file(tiny_assets, tmp_path / "60.jsonl", 60)), "heldout": None},
                     generate={"batch_size": 1, "max_tokens": 24},
                     executor={**SLURM_EXECUTOR, "max_attempts": 1}),
    )
    run_dir = runs / "small"
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.run", str(config)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    partial = run_dir / "iter_001" / "generate" / "shard_00002.jsonl.partial"
    wait_for_lines(partial, 1, lambda: driver.poll() is None)
    victim = ledger_record(run_dir, "iter_001/generate/shard_00002")["job_id"]
    subprocess.run(["scancel", victim], check=True)
    output, _ = driver.communicate(timeout=600)
    # With one attempt allowed the driver stops, saying what failed and how.
    assert driver.returncode == 1, output
    assert "iter_001/generate/shard_00002 failed after 1 attempt(s)" in output and "CANCELLED" in output

    dry = run_cli("tools/requeue.py", str(run_dir), "--dry-run")
    assert dry.returncode == 0 and "would resubmit iter_001/generate as one array of 1: shard_00002" in dry.stdout
    assert ledger_record(run_dir, "iter_001/generate/shard_00002")["attempts"] == 1, "--dry-run submits nothing"

    requeued = run_cli("tools/requeue.py", str(run_dir))
    assert requeued.returncode == 0, requeued.stderr
    record = ledger_record(run_dir, "iter_001/generate/shard_00002")
    assert record["attempts"] == 2 and record["job_ids"][0] == victim and record["job_id"] != victim
    assert f"attempt 2, job {record['job_id']}" in requeued.stdout

    rerun = run_cli("-m", "pipeline.run", str(config))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert [ledger_record(run_dir, f"iter_001/generate/shard_{i:05d}")["attempts"] for i in range(3)] == [1, 1, 2]
    assert_each_problem_once(run_dir, 1, 60)


def test_time_limit_signal_requeues_the_shard_which_resumes(slurm_cluster: str, tiny_assets: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    # The signal comes at the latest 60 s into a run (SLURM may send it earlier, never later). The
    # shard needs longer than that even where it is fast: 240 problems x 2 samples x 128 tokens ended
    # in 34 s on a quiet 2-core machine (1610 tokens/s), before any signal, and took ~90 s on a busy
    # one (~650 tokens/s); 480 make the quiet case ~70 s, so at least one requeue happens.
    # Not less than 60 s: each execution spends ~10 s (~20 s on a busy host) starting Python and
    # loading the model, and a window much shorter than that makes a crawl of many requeues.
    problems = problems_file(tiny_assets, tmp_path / "many.jsonl", 480)
    executor = {**SLURM_EXECUTOR, "generate": {"cpus_per_task": 1, "timeout_min": 2, "signal_delay_s": 60}}
    config = write_config(
        tmp_path / "timeout.yaml",
        small_config(tiny_assets, runs, num_iterations=1, learning_rates=[1e-3],
                     data={"train": str(problems), "heldout": None},
                     generate={"num_shards": 1, "batch_size": 1, "max_tokens": 128}, executor=executor),
    )
    result = run_cli("-m", "pipeline.run", str(config), timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    shard = ledger_record(runs / "small", "iter_001/generate/shard_00000")
    assert shard["status"] == "done" and shard["restart_count"] >= 1, shard
    assert shard["attempts"] == 1 and shard["executions"] == shard["restart_count"] + 1, "requeued, not resubmitted"
    assert shard["metrics"]["resumed_items"] > 0
    assert_each_problem_once(runs / "small", 1, 480)


def wait_for_run(run_dir: Path, timeout_s: float = 600) -> dict:
    """status.py's summary once the run has ended (done or failed) and none of its jobs is queued."""
    deadline = time.monotonic() + timeout_s
    while True:
        # The queue first: a summary read after the run's jobs left it shows how they ended.
        queued = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True, check=True).stdout
        summary = json.loads(run_cli("tools/status.py", str(run_dir), "--json").stdout)
        if summary["status"] in ("done", "failed") and run_dir.name not in queued:
            return summary
        assert time.monotonic() < deadline, summary
        time.sleep(2)


def test_detach_submits_the_chain_and_exits_and_the_run_completes_on_the_cluster(
    slurm_cluster: str, tiny_assets: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "detach.yaml", small_config(tiny_assets, runs, executor=SLURM_EXECUTOR))
    started = time.monotonic()
    result = run_cli("-m", "pipeline.run", str(config), "--detach")
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < 10, "the submitting process returns at once"
    # The base model's eval, then the advance job that submits iteration 1's chain.
    queue = subprocess.run(["squeue", "-h", "-o", "%j|%E"], capture_output=True, text=True, check=True).stdout
    assert "small.advance|afterany" in queue, queue
    # A second --detach while the chain is queued submits nothing new.
    again = run_cli("-m", "pipeline.run", str(config), "--detach")
    assert again.returncode == 0 and "already queued" in again.stdout, again.stdout + again.stderr
    attached = run_cli("-m", "pipeline.run", str(config))
    assert attached.returncode == 2 and "is detached" in attached.stderr

    summary = wait_for_run(runs / "small")
    assert summary["status"] == "done", summary
    for iteration in summary["iterations"]:
        assert {name: stage["status"] for name, stage in iteration["stages"].items()} == dict.fromkeys(
            ("generate", "filter", "train", "eval"), "done")
        assert {shard["attempts"] for shard in iteration["stages"]["generate"]["shards"]} == {1}
    assert_each_problem_once(runs / "small", 2, 24)
    assert {job["scheduler_state"] for job in summary["jobs"]} == {"COMPLETED"}
    assert "run done" in run_cli("tools/status.py", str(runs / "small")).stdout


def test_detached_filter_resubmits_a_cancelled_shard_before_filtering(
    slurm_cluster: str, tiny_assets: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    config = write_config(
        tmp_path / "detach_cancel.yaml",
        small_config(tiny_assets, runs, num_iterations=1, learning_rates=[1e-3],
                     data={"train": str(problems_file(tiny_assets, tmp_path / "60.jsonl", 60)), "heldout": None},
                     generate={"batch_size": 1, "max_tokens": 24}, executor=SLURM_EXECUTOR),
    )
    assert run_cli("-m", "pipeline.run", str(config), "--detach").returncode == 0
    run_dir = runs / "small"
    partial = run_dir / "iter_001" / "generate" / "shard_00001.jsonl.partial"
    wait_for_lines(partial, 1, lambda: True)
    victim = ledger_record(run_dir, "iter_001/generate/shard_00001")["job_id"]
    subprocess.run(["scancel", victim], check=True)

    summary = wait_for_run(run_dir)
    assert summary["status"] == "done", summary
    shard = ledger_record(run_dir, "iter_001/generate/shard_00001")
    assert shard["attempts"] == 2 and shard["job_ids"][0] == victim
    assert shard["metrics"]["resumed_items"] >= 1
    # The first filter job stepped aside for the retry: that is not an attempt.
    assert ledger_record(run_dir, "iter_001/filter")["attempts"] == 1
    assert len(ledger_record(run_dir, "iter_001/filter")["job_ids"]) == 2
    assert_each_problem_once(run_dir, 1, 60)


def test_detached_chain_whose_filter_fails_cancels_what_waits_on_it(
    slurm_cluster: str, tiny_assets: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    # A user's verifier pointing at the wrong function: it imports, then fails when called.
    config = write_config(
        tmp_path / "detach_fail.yaml",
        small_config(tiny_assets, runs, num_iterations=1, learning_rates=[1e-3], data={"heldout": None},
                     filter={"verifier": "json:loads"}, executor={**SLURM_EXECUTOR, "max_attempts": 1}),
    )
    assert run_cli("-m", "pipeline.run", str(config), "--detach").returncode == 0
    run_dir = runs / "small"
    summary = wait_for_run(run_dir)  # nothing of the run is left pending
    assert summary["status"] == "failed" and "iter_001/filter failed after 1 attempt(s)" in summary["error"], summary
    train = ledger_record(run_dir, "iter_001/train")
    assert train["status"] == "planned" and train["attempts"] == 0 and "never ran" in train["note"]
    assert sacct_rows(train["job_ids"][0]) == [f"{train['job_ids'][0]}|CANCELLED|0:0"]


def test_a_job_cancelled_because_its_dependency_failed_is_told_so_at_once(
    slurm_cluster: str, tmp_path: Path
) -> None:
    """sacct learns that a job was cancelled a moment before it learns why (CANCELLED, reason None,
    then Dependency): a poll in between took the chain's train job, cancelled because its filter
    failed, for a job killed from outside, and counted it as a failed attempt."""

    def sbatch(*options: str) -> str:
        return subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/%j.out", *options],
                              capture_output=True, text=True, check=True).stdout.strip()

    failing = sbatch("--wrap=sleep 1; exit 3")
    waiting = sbatch(f"--dependency=afterok:{failing}", "--kill-on-invalid-dep=yes", "--wrap=true")
    watcher, seen = JobWatcher("slurm"), []
    deadline, first_seen = time.monotonic() + 240, None
    # As fast as the watcher answers, from before the job is cancelled until the accounting
    # database has the reason too (about a second after the state here; sometimes at once), or
    # 30 s after the watcher first saw the job cancelled.
    while True:
        info = watcher.poll([waiting])[waiting]
        if info.state == "CANCELLED":
            seen.append(info.reason)
            first_seen = first_seen or time.monotonic()
            rows = sacct_rows(waiting, "State,Reason")
            if any(row.startswith("CANCELLED") and not row.endswith("|None") for row in rows) or time.monotonic() - first_seen > 30:
                break
        assert time.monotonic() < deadline, (
            f"the dependent job was not cancelled: sacct {sacct_rows(waiting, 'State,Reason')}, "
            f"its dependency {sacct_rows(failing)}; queue: {slurm_queue()}")
    assert seen and all(reason in NEVER_SATISFIED for reason in seen), seen


def test_two_process_training_stops_together_on_the_pre_timeout_signal_and_resumes(
    slurm_cluster: str, tiny_assets: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    max_steps, logging_steps = 300, 10
    train_resources = {"timeout_min": 10, "tasks_per_node": 2, "cpus_per_task": 1}
    config = write_config(
        tmp_path / "train_signal.yaml",
        small_config(tiny_assets, runs, data={"heldout": None},
                     train={"max_steps": max_steps, "logging_steps": logging_steps, "save_steps": 10_000,
                            "keep_checkpoints": True},
                     executor={**SLURM_EXECUTOR, "train": train_resources}),
    )
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.run", str(config)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    order_paths = [runs / "small" / "iter_001" / "train" / "data_order" / f"rank_{rank}.json" for rank in (0, 1)]
    deadline = time.monotonic() + 300
    # Each rank writes the order it deals when training begins.
    while not all(path.exists() for path in order_paths):
        assert driver.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    first_deal = [read_json(path) for path in order_paths]
    job_id = ledger_record(runs / "small", "iter_001/train")["job_id"]
    # The signal SLURM sends before a time limit (--signal=USR2@...), delivered now rather than
    # after waiting for a limit: training cannot have finished 300 steps yet.
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    output, _ = driver.communicate(timeout=900)
    assert driver.returncode == 0, output

    record = ledger_record(runs / "small", "iter_001/train")
    assert record["restart_count"] >= 1 and record["attempts"] == 1, "requeued by itself, not resubmitted"
    assert record["executions"] == record["restart_count"] + 1, "rank 0 alone reports"
    metrics = record["metrics"]
    assert metrics["world_size"] == 2 and metrics["effective_batch_size"] == 4 * 1 * 2
    assert "checkpoint-" in metrics["resumed_from"], "the requeued job resumed from the checkpoint"
    resumed_at = int(metrics["resumed_from"].rsplit("-", 1)[1])
    # The checkpoint the stop left: one copy of the weights and optimizer (rank 0's), and the RNG
    # state of each rank, which an exact resume needs.
    checkpoint = Path(metrics["resumed_from"])
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= {p.name for p in checkpoint.iterdir()}
    assert sorted(p.name for p in checkpoint.glob("rng_state*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    steps = [entry["step"] for entry in metrics["step_log"]]
    # One loss curve across the requeue, not a second one from step 0.
    assert steps == list(range(logging_steps, max_steps + 1, logging_steps)) and 0 < resumed_at < max_steps
    assert metrics["steps"] == max_steps
    # Both ranks shuffle with the same seed and each takes its own batches: per step disjoint, per
    # epoch together every example, each epoch in a new order; the requeued job dealt the same.
    orders = [read_json(path) for path in order_paths]
    assert orders == first_deal
    assert [o["rank"] for o in orders] == [0, 1] and {o["world_size"] for o in orders} == {2}
    epochs = [o["epochs"] for o in orders]
    assert len(epochs[0]) == len(epochs[1]) >= 2
    for rank0, rank1 in zip(*epochs, strict=True):
        assert all(len(b0) == len(b1) == 4 and not set(b0) & set(b1) for b0, b1 in zip(rank0, rank1, strict=True))
        assert {i for batch in rank0 + rank1 for i in batch} == set(range(metrics["train_samples"]))
    assert epochs[0][0] != epochs[0][1]
    # One job of two tasks; the second iteration generated with, and trained from, the first's model.
    tasks = subprocess.run(["sacct", "-n", "-P", "-j", job_id, "--format=JobID,NTasks"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert f"{job_id}.0|2" in tasks, tasks
    second = ledger_record(runs / "small", "iter_002/train")
    assert second["status"] == "done" and second["metrics"]["world_size"] == 2


def test_multinode_launcher_trains_a_stage_by_hand_with_torchrun(slurm_cluster: str, tiny_assets: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "by_hand.yaml", small_config(
        tiny_assets, runs, num_iterations=1, learning_rates=[1e-3], data={"heldout": None}, executor=SLURM_EXECUTOR))
    assert run_cli("-m", "pipeline.run", str(config)).returncode == 0
    run_dir = runs / "small"
    marker = tmp_path / "injected"

    def submit(*args: str) -> str:
        command = ["sbatch", "--parsable", "--cpus-per-task=2", f"--output={tmp_path}/train-%j.log",
                   "--export=ALL,SELFTRAIN_PROCS_PER_NODE=2", str(ROOT / "sbatch" / "train_multinode.sbatch"), *args]
        job_id = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        deadline = time.monotonic() + 300
        while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, check=False).stdout.strip():
            assert time.monotonic() < deadline
            time.sleep(1)
        return job_id

    job_id = submit(str(run_dir), "iter_001/train")
    log = (tmp_path / f"train-{job_id}.log").read_text()
    record = ledger_record(run_dir, "iter_001/train")
    assert record["status"] == "done" and record["job_id"] == job_id, log
    assert record["executions"] == 2 and record["metrics"]["world_size"] == 2, "rank 0 of two reported once"
    # Arguments reach the task as text: shell syntax in them runs nothing.
    bad = submit(f"$(touch {marker})", "`touch {marker}`")
    assert "not a run directory" in (tmp_path / f"train-{bad}.log").read_text()
    assert not marker.exists()
