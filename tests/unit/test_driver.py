"""The driver's decisions, in process: what it submits, resubmits, skips, fails and stops, with a
submitter that records instead of submitting and a scheduler that answers what each test says.

No job runs: the recording submitter writes to the ledger what the test's scenario says the job
did (done with metrics, failed with an error, or still running), as a job would have.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter
from rich.console import Console

from pipeline.config import RunConfig, dump_yaml
from pipeline.loop.driver import Driver
from pipeline.loop.hacking import RunStopped, describe
from pipeline.loop.submitter import Submitter
from pipeline.loop.summary import summarize
from pipeline.planning.planner import Planner
from pipeline.planning.stage import StageFailed, StagePlan
from pipeline.scheduling.watch import JobInfo, SchedulerUnavailable
from state import Ledger

pytestmark = pytest.mark.unit

GENERATE = "iter_001/generate"
SHARDS = [f"{GENERATE}/shard_{i:05d}" for i in range(3)]
# What a job reports, given its task key and attempt number: the fields of its ledger record.
Outcome = Callable[[str, int], dict[str, Any]]
MAX_POLLS = 500


def succeed(key: str, attempt: int) -> dict[str, Any]:
    metrics = {"problems": 2, "generated_tokens": 10, "failed_items": 0} if "/shard_" in key else {}
    return {"status": "done", "metrics": metrics}


def failing(keys: Iterable[str], times: int, error: str = "CUDA out of memory", log: Path | None = None) -> Outcome:
    """Tasks ``keys`` fail their first ``times`` attempts with ``error``; every other attempt succeeds."""
    keys = set(keys)

    def outcome(key: str, attempt: int) -> dict[str, Any]:
        if key in keys and attempt <= times:
            return {"status": "failed", "error": error, **({"log": str(log)} if log else {})}
        return succeed(key, attempt)

    return outcome


def still_running(key: str, attempt: int) -> dict[str, Any]:
    return {"status": "running"}


class FakeWatcher:
    """The scheduler's word: jobs in ``dead`` ended as their JobInfo says; every other job runs."""

    def __init__(self, dead: dict[str, JobInfo] | None = None, unavailable: bool = False):
        self.dead = dict(dead or {})
        self.unavailable = unavailable
        self.polls: list[list[str]] = []
        self.cancelled: list[str] = []

    def poll(self, job_ids: Iterable[str]) -> dict[str, JobInfo]:
        ids = [j for j in job_ids if j]
        self.polls.append(ids)
        # The driver asks once per poll (0.01 s apart here): this many means it waits for nothing.
        assert len(self.polls) < MAX_POLLS, f"the driver polled {MAX_POLLS} times: it waits on a task nothing will change"
        if self.unavailable:
            raise SchedulerUnavailable("slurm_load_jobs error: Socket timed out")
        return {j: self.dead.get(j, JobInfo("RUNNING")) for j in ids}

    def alive(self, job_id: str, info: JobInfo) -> bool:
        return job_id not in self.dead

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)


class RecordingSubmitter(Submitter):
    """The real Submitter (its mark_lost included, asking a FakeWatcher), except that ``submit``
    records the call and writes to the ledger what ``outcome`` says each job did."""

    def __init__(self, driver: Driver, outcome: Outcome = succeed, watcher: FakeWatcher | None = None):
        super().__init__(driver.config, driver.planner.layout, driver.ledger, driver.console.log)
        self.watcher = watcher or FakeWatcher()
        self.outcome = outcome
        self.calls: list[tuple[str, list[str], str | None]] = []
        self.specs: dict[str, Any] = {}  # the spec each task was last submitted with

    def submit(self, stage: StagePlan, tasks: list, dependency: str | None = None) -> list[str]:
        self.calls.append((stage.key, [t.key for t in tasks], dependency))
        self.specs.update({t.key: t.spec for t in tasks})
        job_ids = []
        for index, task in enumerate(tasks):
            attempt = self.ledger.read(task.key).get("attempts", 0) + 1
            job_id = f"{100 + len(self.calls)}_{index}"
            self.ledger.update(task.key, {"status": "submitted", "attempts": attempt, "job_id": job_id, "error": None,
                                          **self.outcome(task.key, attempt)})
            job_ids.append(job_id)
        return job_ids

    def submitted(self) -> list[list[str]]:
        """The task keys of each submission, in order."""
        return [keys for _, keys, _ in self.calls]


def make_config(tmp_path: Path, **sections: Any) -> RunConfig:
    data: dict[str, Any] = {
        "run_name": "unit",
        "runs_dir": str(tmp_path / "runs"),
        "num_iterations": 2,
        "model": {"path": str(tmp_path / "model")},
        "data": {"train": str(tmp_path / "train.jsonl"), "heldout": str(tmp_path / "heldout.jsonl")},
        "generate": {"num_shards": 3},
        "executor": {"cluster": "debug", "poll_interval_s": 0.01, "max_poll_interval_s": 0.01, "max_attempts": 2},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:  # a top-level key
            data[section] = values
    return TypeAdapter(RunConfig).validate_python(data)


def make_driver(tmp_path: Path, outcome: Outcome = succeed, watcher: FakeWatcher | None = None,
                **sections: Any) -> tuple[Driver, RecordingSubmitter]:
    """A driver over ``tmp_path/runs/unit`` (a second call opens the same run: a rerun)."""
    config = make_config(tmp_path, **sections)
    planner = Planner(config, config.run_dir, num_train=6)
    driver = Driver(config, planner, Console(file=io.StringIO(), width=200))
    submitter = RecordingSubmitter(driver, outcome, watcher)
    driver.submitter = driver.services.submitter = submitter
    return driver, submitter


def output(driver: Driver) -> str:
    return driver.console.file.getvalue()


# -- a stage that succeeds -------------------------------------------------------------------


def test_single_task_stage_is_submitted_once_and_done(tmp_path: Path) -> None:
    driver, submitter = make_driver(tmp_path)
    stage = driver.planner.stage("baseline/eval")
    assert not stage.is_array

    assert driver.run_stage(stage) is False

    assert submitter.calls == [("baseline/eval", ["baseline/eval"], None)]
    record = driver.ledger.read("baseline/eval")
    assert record["status"] == "done" and record["attempts"] == 1


def test_array_stage_is_submitted_once_and_done_with_its_totals(tmp_path: Path) -> None:
    driver, submitter = make_driver(tmp_path)
    stage = driver.planner.stage(GENERATE)
    assert stage.is_array
    progress: list[tuple[int, int]] = []

    driver.run_stage(stage, lambda done, total: progress.append((done, total)))

    assert submitter.submitted() == [SHARDS]
    record = driver.ledger.read(GENERATE)
    assert record["status"] == "done"
    assert record["num_tasks"] == 3
    assert "started_at" in record and "ended_at" in record
    metrics = record["metrics"]
    assert metrics["shards"] == 3
    assert metrics["problems_generated"] == 6 and metrics["generated_tokens"] == 30 and metrics["failed_items"] == 0
    assert "wall_seconds" in metrics
    assert progress[0] == (0, 3) and progress[-1] == (3, 3)


# -- failures: retry the failed task alone, then give up with its error ------------------------


def test_failed_shard_is_resubmitted_alone(tmp_path: Path) -> None:
    driver, submitter = make_driver(tmp_path, failing([SHARDS[1]], times=1))

    driver.run_stage(driver.planner.stage(GENERATE))

    assert submitter.submitted() == [SHARDS, [SHARDS[1]]]
    records = driver.ledger.read_many(SHARDS)
    assert [records[k]["attempts"] for k in SHARDS] == [1, 2, 1]
    assert all(records[k]["status"] == "done" for k in SHARDS)
    assert driver.ledger.read(GENERATE)["status"] == "done"


def test_shard_out_of_attempts_fails_the_stage_with_its_key_attempts_and_error(tmp_path: Path) -> None:
    log = tmp_path / "shard_1.err"
    log.write_text("loading model\nTraceback (most recent call last):\ntorch.OutOfMemoryError: CUDA out of memory\n")
    driver, submitter = make_driver(tmp_path, failing([SHARDS[1]], times=99, log=log))

    with pytest.raises(StageFailed) as failure:
        driver.run_stage(driver.planner.stage(GENERATE))

    # executor.max_attempts is 2: the first submission, and one resubmission of the failed shard alone.
    assert submitter.submitted() == [SHARDS, [SHARDS[1]]]
    message = str(failure.value)
    assert f"{SHARDS[1]} failed after 2 attempt(s): CUDA out of memory" in message
    assert "torch.OutOfMemoryError" in message  # the tail of its log
    assert SHARDS[0] not in message and SHARDS[2] not in message
    record = driver.ledger.read(GENERATE)
    assert record["status"] == "failed" and record["error"] == "1 task(s) failed"


def test_single_task_stage_out_of_attempts(tmp_path: Path) -> None:
    driver, submitter = make_driver(tmp_path, failing(["iter_001/train"], times=99, error="NaN loss"),
                                    executor={"max_attempts": 3})

    with pytest.raises(StageFailed, match=r"iter_001/train failed after 3 attempt\(s\): NaN loss"):
        driver.run_stage(driver.planner.stage("iter_001/train"))

    assert submitter.submitted() == [["iter_001/train"]] * 3


def test_in_flight_task_is_waited_on_not_resubmitted(tmp_path: Path) -> None:
    """A job that runs (the scheduler says so) is polled until it reports; no second job is submitted."""
    driver, submitter = make_driver(tmp_path, still_running)
    polls = 0

    def on_progress(done: int, total: int) -> None:
        nonlocal polls
        polls += 1
        if polls == 4:  # the job reports
            driver.ledger.update("baseline/eval", {"status": "done", "metrics": {"heldout_accuracy": 0.5}})

    driver.run_stage(driver.planner.stage("baseline/eval"), on_progress)

    assert submitter.submitted() == [["baseline/eval"]]
    assert polls == 5
    assert driver.ledger.read("baseline/eval")["attempts"] == 1


def test_stage_out_of_attempts_waits_for_its_running_tasks_before_failing(tmp_path: Path) -> None:
    """A shard out of attempts does not abandon its siblings' running jobs: the stage fails once they end."""
    driver, submitter = make_driver(tmp_path)
    driver.ledger.update(SHARDS[0], {"status": "failed", "attempts": 2, "error": "disk full"})
    driver.ledger.update(SHARDS[1], {"status": "running", "attempts": 1, "job_id": "9_1"})
    driver.ledger.update(SHARDS[2], {"status": "done", "attempts": 1})
    polls = 0

    def on_progress(done: int, total: int) -> None:
        nonlocal polls
        polls += 1
        if polls == 3:
            driver.ledger.update(SHARDS[1], {"status": "done"})

    with pytest.raises(StageFailed, match=r"shard_00000 failed after 2 attempt\(s\): disk full"):
        driver.run_stage(driver.planner.stage(GENERATE), on_progress)

    assert polls == 4
    assert submitter.calls == []
    assert driver.ledger.read(GENERATE)["status"] == "failed"


# -- nothing done is redone -------------------------------------------------------------------


def test_done_stage_is_not_submitted(tmp_path: Path) -> None:
    driver, submitter = make_driver(tmp_path)
    driver.ledger.update("baseline/eval", {"status": "done", "attempts": 1})
    driver.ledger.update(GENERATE, {"status": "done"})

    assert driver.run_stage(driver.planner.stage("baseline/eval")) is False
    assert driver.run_stage(driver.planner.stage(GENERATE)) is False

    assert submitter.calls == []


def test_rerun_resubmits_only_what_is_not_done(tmp_path: Path) -> None:
    first, first_submitter = make_driver(tmp_path, failing([SHARDS[1]], times=99))
    with pytest.raises(StageFailed):
        first.run_stage(first.planner.stage(GENERATE))
    assert first_submitter.submitted() == [SHARDS, [SHARDS[1]]]

    # A rerun over the same run dir, allowed more attempts (executor may change between invocations).
    second, second_submitter = make_driver(tmp_path, executor={"max_attempts": 3})
    second.run_stage(second.planner.stage(GENERATE))

    assert second_submitter.submitted() == [[SHARDS[1]]]
    records = second.ledger.read_many(SHARDS)
    assert [records[k]["attempts"] for k in SHARDS] == [1, 3, 1]
    record = second.ledger.read(GENERATE)
    assert record["status"] == "done" and record["metrics"]["shards"] == 3 and record["metrics"]["problems_generated"] == 6


def test_rerun_finishes_an_array_whose_shards_are_all_done_without_submitting(tmp_path: Path) -> None:
    """The driver died after its shards reported, before it marked the stage done."""
    driver, submitter = make_driver(tmp_path)
    for key in SHARDS:
        driver.ledger.update(key, {"status": "done", "attempts": 1, "metrics": {"problems": 2, "generated_tokens": 10}})

    driver.run_stage(driver.planner.stage(GENERATE))

    assert submitter.calls == []
    record = driver.ledger.read(GENERATE)
    assert record["status"] == "done" and record["metrics"]["shards"] == 3 and record["metrics"]["problems_generated"] == 6


def test_rerun_reattaches_to_a_live_job(tmp_path: Path) -> None:
    """A shard an earlier driver submitted, whose job still runs, is waited on: not submitted again."""
    driver, submitter = make_driver(tmp_path)
    driver.ledger.update(SHARDS[0], {"status": "running", "attempts": 1, "job_id": "77_0"})
    for key in SHARDS[1:]:
        driver.ledger.update(key, {"status": "done", "attempts": 1, "metrics": {"problems": 2}})
    polls = 0

    def on_progress(done: int, total: int) -> None:
        nonlocal polls
        polls += 1
        if polls == 3:
            driver.ledger.update(SHARDS[0], {"status": "done", "metrics": {"problems": 2}})

    driver.run_stage(driver.planner.stage(GENERATE), on_progress)

    assert submitter.calls == []
    assert ["77_0"] in submitter.watcher.polls
    assert driver.ledger.read(GENERATE)["status"] == "done"


# -- where the run stands ---------------------------------------------------------------------


def test_current_stage_is_the_first_not_done(tmp_path: Path) -> None:
    driver, _ = make_driver(tmp_path)
    keys = [s.key for s in driver.planner.stages()]
    assert keys[:3] == ["baseline/eval", GENERATE, "iter_001/filter"] and keys[-1] == "export"

    assert driver.current_stage().key == "baseline/eval"
    driver.ledger.update("baseline/eval", {"status": "done"})
    assert driver.current_stage().key == GENERATE
    # A failed or running stage is still the current one; one done later does not count.
    driver.ledger.update(GENERATE, {"status": "failed"})
    driver.ledger.update("iter_001/train", {"status": "done"})
    assert driver.current_stage().key == GENERATE

    for key in keys:
        driver.ledger.update(key, {"status": "done"})
    assert driver.current_stage() is None


# -- jobs that died without reporting (the real Submitter.mark_lost) --------------------------


def lost_submitter(tmp_path: Path, info: JobInfo) -> tuple[Submitter, Ledger, list[str]]:
    config = make_config(tmp_path)
    planner = Planner(config, config.run_dir, num_train=6)
    ledger = Ledger(planner.run_dir)
    logged: list[str] = []
    submitter = Submitter(config, planner.layout, ledger, logged.append)
    submitter.watcher = FakeWatcher({"5_1": info})
    return submitter, ledger, logged


def test_mark_lost_fails_a_dead_job_with_the_scheduler_state_and_exit_code(tmp_path: Path) -> None:
    submitter, ledger, _ = lost_submitter(tmp_path, JobInfo("FAILED", exit_code="1:0"))
    stage = submitter_stage(submitter, GENERATE)
    ledger.update(SHARDS[0], {"status": "done", "attempts": 1, "job_id": "5_0"})
    ledger.update(SHARDS[1], {"status": "running", "attempts": 1, "job_id": "5_1"})
    ledger.update(SHARDS[2], {"status": "running", "attempts": 1, "job_id": "5_2"})  # alive
    records = ledger.read_many(SHARDS)

    submitter.mark_lost(stage.tasks, records)

    assert submitter.watcher.polls == [["5_1", "5_2"]]  # only the in-flight ones, in one query
    for record in (records[SHARDS[1]], ledger.read(SHARDS[1])):
        assert record["status"] == "failed"
        assert record["slurm_state"] == "FAILED" and record["exit_code"] == "1:0"
        assert record["error"] == "job 5_1 ended (FAILED, exit code 1:0) without reporting"
        assert record["attempts"] == 1
    assert ledger.read(SHARDS[0])["status"] == "done"
    assert ledger.read(SHARDS[2])["status"] == "running"


def test_mark_lost_withdraws_a_job_whose_dependency_failed(tmp_path: Path) -> None:
    submitter, ledger, _ = lost_submitter(tmp_path, JobInfo("CANCELLED", reason="DependencyNeverSatisfied"))
    ledger.update("iter_001/filter", {"status": "submitted", "attempts": 2, "job_id": "5_1"})
    stage = submitter_stage(submitter, "iter_001/filter")
    records = ledger.read_many(["iter_001/filter"])

    submitter.mark_lost(stage.tasks, records)

    record = ledger.read("iter_001/filter")
    assert record == records["iter_001/filter"]
    assert record["status"] == "planned" and record["attempts"] == 1  # not an attempt
    assert "never ran" in record["note"]


def test_mark_lost_changes_nothing_when_the_scheduler_cannot_be_asked(tmp_path: Path) -> None:
    submitter, ledger, logged = lost_submitter(tmp_path, JobInfo("FAILED"))
    submitter.watcher.unavailable = True
    ledger.update("iter_001/filter", {"status": "running", "attempts": 1, "job_id": "5_1"})
    records = ledger.read_many(["iter_001/filter"])

    submitter.mark_lost(submitter_stage(submitter, "iter_001/filter").tasks, records)

    assert ledger.read("iter_001/filter")["status"] == "running"
    assert logged and "cannot ask the scheduler" in logged[0]


def submitter_stage(submitter: Submitter, key: str) -> StagePlan:
    return Planner(submitter.config, submitter.layout.run_dir, num_train=6).stage(key)


def test_dead_job_is_resubmitted_then_done(tmp_path: Path) -> None:
    driver, submitter = make_driver(tmp_path, watcher=FakeWatcher({"5_1": JobInfo("OUT_OF_MEMORY", exit_code="0:125")}))
    driver.ledger.update(SHARDS[1], {"status": "running", "attempts": 1, "job_id": "5_1"})
    for key in (SHARDS[0], SHARDS[2]):
        driver.ledger.update(key, {"status": "done", "attempts": 1, "metrics": {"problems": 2}})

    assert [t.key for t in driver.failed_tasks(driver.planner.stage(GENERATE))] == [SHARDS[1]]
    driver.run_stage(driver.planner.stage(GENERATE))

    assert submitter.submitted() == [[SHARDS[1]]]
    record = driver.ledger.read(SHARDS[1])
    assert record["status"] == "done" and record["attempts"] == 2
    assert driver.ledger.read(GENERATE)["status"] == "done"


def test_dead_job_on_its_last_attempt_fails_the_stage_with_the_scheduler_state(tmp_path: Path) -> None:
    driver, submitter = make_driver(tmp_path, watcher=FakeWatcher({"5_1": JobInfo("TIMEOUT", exit_code="0:15")}))
    driver.ledger.update("iter_001/train", {"status": "running", "attempts": 2, "job_id": "5_1"})

    with pytest.raises(StageFailed, match=r"iter_001/train failed after 2 attempt\(s\): job 5_1 ended \(TIMEOUT"):
        driver.run_stage(driver.planner.stage("iter_001/train"))

    assert submitter.calls == []


def test_job_withdrawn_on_its_last_attempt_is_resubmitted(tmp_path: Path) -> None:
    """A job that never ran (its dependency failed) does not use up an attempt."""
    watcher = FakeWatcher({"5_1": JobInfo("CANCELLED", reason="DependencyNeverSatisfied")})
    driver, submitter = make_driver(tmp_path, watcher=watcher)
    driver.ledger.update("iter_001/train", {"status": "submitted", "attempts": 2, "job_id": "5_1"})

    driver.run_stage(driver.planner.stage("iter_001/train"))

    assert submitter.submitted() == [["iter_001/train"]]
    record = driver.ledger.read("iter_001/train")
    assert record["status"] == "done" and record["attempts"] == 2


# -- reward hacking ---------------------------------------------------------------------------

FLAG = {"iteration": 1, "reward": "format", "reward_from": 0.2, "reward_to": 0.9, "heldout_from": 0.5, "heldout_to": 0.2}


def test_check_hacking_stops_the_run_when_asked(tmp_path: Path) -> None:
    driver, _ = make_driver(tmp_path, grpo={"stop_on_hacking": True})

    with pytest.raises(RunStopped, match="stopped by grpo.stop_on_hacking: iteration 1: reward format rose 0.200 -> 0.900"):
        driver.check_iteration({"hacking": [FLAG], "collapse": []}, 1)

    run = driver.ledger.read("run")
    assert run["status"] == "stopped"
    assert "reward format rose" in run["error"] and "ended_at" in run
    assert "reward hacking?" in output(driver)


def test_check_hacking_only_prints_without_stop_on_hacking(tmp_path: Path) -> None:
    driver, _ = make_driver(tmp_path, grpo={"stop_on_hacking": False})

    driver.check_iteration({"hacking": [FLAG], "collapse": []}, 1)

    assert "reward hacking?" in output(driver) and "reward format rose 0.200 -> 0.900" in output(driver)
    assert driver.ledger.read("run") == {}


def test_check_hacking_ignores_other_iterations_and_the_last(tmp_path: Path) -> None:
    driver, _ = make_driver(tmp_path, grpo={"stop_on_hacking": True})

    driver.check_iteration({"hacking": [FLAG], "collapse": []}, 2)  # a flag of another iteration
    assert output(driver) == ""
    driver.check_iteration({"hacking": [FLAG], "collapse": []}, 1, can_stop=False)  # nothing left to stop
    assert "reward hacking?" in output(driver)
    assert driver.ledger.read("run") == {}


# -- the whole loop ---------------------------------------------------------------------------


def frozen_run(driver: Driver) -> None:
    """What pipeline.run writes before the loop: the config and the run's record (summaries read them)."""
    driver.planner.layout.config.parent.mkdir(parents=True, exist_ok=True)
    driver.planner.layout.config.write_text(dump_yaml(driver.config))
    driver.ledger.update("run", {"run_name": driver.config.run_name, "num_train": 6, "status": "running"})


def test_run_submits_every_stage_once_in_order_and_ends_done(tmp_path: Path) -> None:
    driver, submitter = make_driver(tmp_path)
    frozen_run(driver)
    summaries: list[dict[str, Any]] = []
    driver.on_iteration_done = summaries.append

    driver.run()

    plan = driver.planner.stages()
    assert [key for key, _, _ in submitter.calls] == [s.key for s in plan]
    assert all(keys == [t.key for t in s.tasks] for (_, keys, _), s in zip(submitter.calls, plan, strict=True))
    assert all(driver.ledger.read(s.key)["status"] == "done" for s in plan)
    assert driver.ledger.read("run")["status"] == "done"
    assert driver.current_stage() is None
    assert len(summaries) == 2


def test_a_rounds_generation_with_max_staleness_is_submitted_before_the_training_it_runs_beside(tmp_path: Path) -> None:
    driver, submitter = make_driver(tmp_path, method="grpo", num_iterations=3, grpo={"rollouts": "arrays", "max_staleness": 1})
    frozen_run(driver)
    driver.run()
    order = [key for key, _, _ in submitter.calls]
    # Right after the training it runs beside, which the scheduler then serves first.
    assert order.index("iter_002/generate") == order.index("iter_001/train") + 1
    assert order.index("iter_003/generate") == order.index("iter_002/train") + 1
    assert order.count("iter_002/generate") == 1, "submitted once: run_stage waits for it when it is due"
    assert order.index("iter_001/generate") > order.index("baseline/eval"), "the first round samples in its turn"
    assert driver.ledger.read("run")["status"] == "done"


def hacking_metrics(key: str, attempt: int) -> dict[str, Any]:
    """Held-out accuracy falls from 0.5 to 0.2 in iteration 1 while its format reward rises."""
    accuracy = {"baseline/eval": 0.5, "iter_001/eval": 0.2, "iter_002/eval": 0.2}
    if key in accuracy:
        return {"status": "done", "metrics": {"heldout_accuracy": accuracy[key]}}
    if key == "iter_001/train":
        return {"status": "done", "metrics": {"step_log": [{"rewards/format/mean": v} for v in (0.1, 0.2, 0.8, 0.9)]}}
    return succeed(key, attempt)


def test_run_stops_before_the_next_iteration_on_hacking(tmp_path: Path) -> None:
    """configs/demo_grpo_hacking.yaml's case: held-out accuracy also fell below the base model's, so the
    collapse guard fires too; the hacking check, asked to stop, is named first, the guard after it."""
    driver, submitter = make_driver(tmp_path, hacking_metrics, grpo={"stop_on_hacking": True})
    frozen_run(driver)

    with pytest.raises(RunStopped) as stopped:
        driver.run()

    assert str(stopped.value) == (
        "stopped by grpo.stop_on_hacking: iteration 1: reward format rose 0.100 -> 0.900 while held-out accuracy fell 50.0% -> 20.0%;"
        " and by the collapse guard: iteration 1: held-out accuracy 20.0%, below the base model's 50.0% by more than"
        " export.collapse_margin (0.05)")
    assert driver.ledger.read("run")["error"] == str(stopped.value)

    submitted = [key for key, _, _ in submitter.calls]
    # The best so far is exported first: no iteration beat the base model (0.5), so nothing is.
    assert submitted[-2:] == ["iter_001/eval", "export"]
    assert not any(key.startswith("iter_002") for key in submitted)
    assert submitter.specs["export"].iteration == 0
    assert driver.ledger.read("run")["status"] == "stopped"
    assert driver.current_stage().key == "iter_002/generate"


def test_without_stop_on_hacking_the_collapse_guard_alone_stops_it(tmp_path: Path) -> None:
    driver, _ = make_driver(tmp_path, hacking_metrics, grpo={"stop_on_hacking": False})
    frozen_run(driver)

    with pytest.raises(RunStopped, match=r"^stopped by the collapse guard: iteration 1: held-out accuracy 20.0%[^;]*$"):
        driver.run()

    assert "reward hacking? iteration 1" in output(driver), "flagged, not stopped by"


def test_a_failed_export_of_a_stopped_run_keeps_why_it_stopped(tmp_path: Path) -> None:
    driver, submitter = make_driver(tmp_path, failing(["export"], times=99, error="OSError: No space left on device"),
                                    grpo={"stop_on_hacking": True})

    with pytest.raises(RunStopped) as stopped:
        driver.check_iteration({"hacking": [FLAG], "collapse": []}, 1)

    assert submitter.submitted() == [["export"], ["export"]]
    message = str(stopped.value)
    assert message.startswith("stopped by grpo.stop_on_hacking: iteration 1: reward format rose 0.200 -> 0.900")
    assert "then the export of the best iteration so far failed: export failed after 2 attempt(s): OSError: No space left" in message
    run = driver.ledger.read("run")
    assert run["status"] == "stopped"
    assert run["error"] == ("stopped by grpo.stop_on_hacking: " + describe(FLAG) +
                            "; then the export failed: export failed after 2 attempt(s): OSError: No space left on device")


def test_run_without_stop_on_hacking_goes_on(tmp_path: Path) -> None:
    # Held-out accuracy fell 30 points: the collapse guard, turned off here, would stop it.
    driver, submitter = make_driver(tmp_path, hacking_metrics, export={"collapse_margin": None})
    frozen_run(driver)

    driver.run()

    assert submitter.calls[-1][0] == "export"
    assert driver.ledger.read("run")["status"] == "done"
    assert "reward hacking?" in output(driver)


# -- the model exported, and the collapse guard ---------------------------------------------------


def accuracies(heldout: list[float], dev: list[float] | None = None) -> Outcome:
    """Each evaluation reports ``heldout[i]`` (and ``dev[i]``) for iteration i, 0 the base model."""

    def outcome(key: str, attempt: int) -> dict[str, Any]:
        if not key.endswith("/eval"):
            return succeed(key, attempt)
        iteration = 0 if key.startswith("baseline") else int(key[len("iter_"):len("iter_001")])
        metrics = {"heldout_accuracy": heldout[iteration], **({"dev_accuracy": dev[iteration]} if dev else {})}
        return {"status": "done", "metrics": metrics}

    return outcome


def run_to_the_end(driver: Driver) -> None:
    frozen_run(driver)
    driver.run()


def test_the_best_iteration_on_heldout_is_exported_and_the_line_says_heldout_chose_it(tmp_path: Path) -> None:
    driver, submitter = make_driver(tmp_path, accuracies([0.10, 0.30, 0.20]))

    run_to_the_end(driver)

    export = submitter.specs["export"]
    assert export.iteration == 1 and export.model_path == str(driver.planner.layout.trained_model(1))
    assert export.choice == "iteration 1, the best: held-out accuracy 30.0% (base model 10.0%); chosen on the held-out set (no data.dev), so its figure flatters it"
    assert driver.ledger.read("run")["status"] == "done", "a 10-point fall from the best is no collapse: still above the base model"


def test_export_iteration_last_exports_the_last_iteration(tmp_path: Path) -> None:
    driver, submitter = make_driver(tmp_path, accuracies([0.10, 0.30, 0.20]), export={"iteration": "last"})

    run_to_the_end(driver)

    assert submitter.specs["export"].iteration == 2
    assert submitter.specs["export"].model_path == str(driver.planner.layout.trained_model(2))


def test_with_a_dev_set_the_best_is_chosen_on_dev_accuracy_recorded_beside_heldout(tmp_path: Path) -> None:
    (tmp_path / "dev.jsonl").write_text("")
    driver, submitter = make_driver(tmp_path, accuracies(heldout=[0.10, 0.30, 0.20], dev=[0.10, 0.20, 0.40]),
                                    data={"dev": str(tmp_path / "dev.jsonl")})

    run_to_the_end(driver)

    assert submitter.specs["baseline/eval"].dev_problems_path == str(driver.planner.layout.dev_problems)
    export = submitter.specs["export"]
    assert export.iteration == 2 and export.choice == "iteration 2, the best: dev accuracy 40.0% (base model 10.0%)"
    summary = summarize(driver.run_dir)
    assert summary["base_dev_accuracy"] == 0.10
    assert [(e["metrics"]["heldout_accuracy"], e["metrics"]["dev_accuracy"]) for e in summary["iterations"]] == [(0.30, 0.20), (0.20, 0.40)]


def test_a_collapse_stops_the_run_and_exports_the_best_iteration_so_far(tmp_path: Path) -> None:
    driver, submitter = make_driver(tmp_path, accuracies([0.20, 0.30, 0.10, 0.50]), num_iterations=3,
                                    train={"learning_rates": [1e-5] * 3})
    frozen_run(driver)

    with pytest.raises(RunStopped, match=r"stopped by the collapse guard: iteration 2: held-out accuracy 10.0%, below the"
                                         r" base model's 20.0% by more than export.collapse_margin \(0.05\)"):
        driver.run()

    submitted = [key for key, _, _ in submitter.calls]
    assert submitted[-2:] == ["iter_002/eval", "export"] and not any(key.startswith("iter_003") for key in submitted)
    assert submitter.specs["export"].iteration == 1
    run = driver.ledger.read("run")
    assert run["status"] == "stopped" and "collapse guard" in run["error"]
    assert "collapse: iteration 2" in output(driver)
    assert summarize(driver.run_dir)["collapse"][0]["iteration"] == 2

    # A rerun stays stopped, and exports nothing twice.
    again, resubmitter = make_driver(tmp_path, accuracies([0.20, 0.30, 0.10, 0.50]), num_iterations=3,
                                     train={"learning_rates": [1e-5] * 3})
    with pytest.raises(RunStopped):
        again.run()
    assert resubmitter.calls == []


def test_a_flat_run_is_not_stopped_and_says_no_iteration_beat_the_base_model(tmp_path: Path) -> None:
    """A control (samples kept at random) stays within the margin of the base model: it runs to its end."""
    driver, submitter = make_driver(tmp_path, accuracies([0.20, 0.16, 0.19]))

    run_to_the_end(driver)

    assert driver.ledger.read("run")["status"] == "done" and "collapse" not in output(driver)
    export = submitter.specs["export"]
    assert export.iteration == 0
    assert export.choice == ("no iteration beat the base model (held-out accuracy 20.0%; best: iteration 2, 19.0%):"
                             " nothing exported; the base model (model.path) stays the best")


def test_a_collapse_in_the_last_iteration_is_flagged_and_the_best_exported(tmp_path: Path) -> None:
    driver, submitter = make_driver(tmp_path, accuracies([0.20, 0.30, 0.00]))

    run_to_the_end(driver)

    assert driver.ledger.read("run")["status"] == "done", "nothing left to stop"
    assert "collapse: iteration 2: held-out accuracy 0.0%" in output(driver)
    assert submitter.specs["export"].iteration == 1
