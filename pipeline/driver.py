"""The iteration loop: generate -> filter -> train -> eval, resumable from the ledger.

Every stage goes through ``run_stage``: it submits the stage's tasks that are not done, waits
while the ledger says they are in flight and the watcher says their job lives, resubmits failed
ones up to ``executor.max_attempts``, and stops with a summary when that is not enough. Nothing
done is redone: a rerun finds ``done`` records and skips them, and reattaches to live jobs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from pipeline.config import RunConfig
from pipeline.executors import JobWatcher, make_executor, submit_array
from pipeline.plan import BASELINE, Planner, StagePlan, Task
from pipeline.status import iteration_table, summarize
from state import Ledger, Status
from state.ledger import now

IN_FLIGHT = (str(Status.SUBMITTED), str(Status.RUNNING))
HEADLINE_METRICS = ("problems_generated", "tokens_per_s", "mean_correct_rate", "filtered_samples", "final_loss", "heldout_accuracy")


class StageFailed(Exception):
    """A stage's tasks failed ``max_attempts`` times; the message says which and why."""


def log_tail(path: str | None, lines: int = 15) -> str:
    if not path or not Path(path).exists():
        return ""
    text = Path(path).read_text(errors="replace").splitlines()
    return "\n".join("    " + line for line in text[-lines:])


class Driver:
    def __init__(self, config: RunConfig, planner: Planner, console: Console | None = None):
        self.config = config
        self.planner = planner
        self.run_dir = planner.run_dir
        self.ledger = Ledger(self.run_dir)
        self.watcher = JobWatcher(config.executor.cluster)
        self.console = console or Console()
        self.submissions = 0

    # -- one stage -----------------------------------------------------------------------

    def _submit(self, stage: StagePlan, tasks: list[Task]) -> None:
        """Submit ``tasks`` as one array; the ledger knows the attempt before the job can start."""

        def next_attempt(record: dict[str, Any]) -> None:
            record["attempts"] = record.get("attempts", 0) + 1

        self.ledger.update_many(
            {t.key: {"status": str(Status.SUBMITTED), "submitted_at": now(), "error": None} for t in tasks}, next_attempt
        )
        self.submissions += 1
        folder = self.run_dir / "submitit" / stage.key / f"{time.strftime('%Y%m%d-%H%M%S')}-{self.submissions}"
        executor = make_executor(
            self.config.executor.cluster, folder, stage.resources, f"{self.config.run_name}.{stage.key.replace('/', '.')}"
        )
        try:
            jobs = submit_array(executor, tasks[0].function, [t.spec for t in tasks])
        except Exception as error:  # noqa: BLE001 - sbatch refusals, OS errors: all end the stage alike
            self.ledger.set_status([t.key for t in tasks], Status.FAILED, error=f"submission failed: {error}")
            raise StageFailed(f"{stage.key}: submission failed: {error}") from None
        self.watcher.track(jobs)

        def add_job_id(job: Any) -> Callable[[dict[str, Any]], None]:
            def mutate(record: dict[str, Any]) -> None:
                record["job_id"] = job.job_id
                record["job_ids"] = [*record.get("job_ids", []), job.job_id]
                record["log"] = str(job.paths.stderr)

            return mutate

        for task, job in zip(tasks, jobs, strict=True):
            self.ledger.update(task.key, mutate=add_job_id(job))

    def _lost(self, record: dict[str, Any]) -> bool:
        """In flight per the ledger, but its job is gone without reporting (killed from outside)."""
        return record.get("status") in IN_FLIGHT and not self.watcher.alive(record.get("job_id"))

    def run_stage(self, stage: StagePlan, on_progress: Callable[[int, int], None] | None = None) -> None:
        if self.ledger.read(stage.key).get("status") == str(Status.DONE):
            return
        # A one-job stage's record is its job's record; an array's stage record sums up its tasks.
        is_array = [t.key for t in stage.tasks] != [stage.key]
        if is_array:
            self.ledger.update(stage.key, {"status": str(Status.RUNNING), "num_tasks": len(stage.tasks)})
        started = time.monotonic()
        max_attempts = self.config.executor.max_attempts
        while True:
            records = {t.key: self.ledger.read(t.key) for t in stage.tasks}
            for task in stage.tasks:
                record = records[task.key]
                if self._lost(record):
                    state = self.watcher.state(record.get("job_id"))
                    records[task.key] = self.ledger.update(
                        task.key, {"status": str(Status.FAILED), "error": f"job {record.get('job_id')} ended ({state}) without reporting"}
                    )
            done = [t for t in stage.tasks if records[t.key].get("status") == str(Status.DONE)]
            if on_progress:
                on_progress(len(done), len(stage.tasks))
            if len(done) == len(stage.tasks):
                break
            failed = [t for t in stage.tasks if records[t.key].get("status") in (None, str(Status.FAILED), str(Status.PLANNED))]
            retry = [t for t in failed if records[t.key].get("attempts", 0) < max_attempts]
            exhausted = [t for t in failed if t not in retry]
            in_flight = [t for t in stage.tasks if records[t.key].get("status") in IN_FLIGHT]
            if exhausted and not in_flight:
                if is_array:
                    self.ledger.set_status([stage.key], Status.FAILED, error=f"{len(exhausted)} task(s) failed")
                raise StageFailed(self._failure_summary(exhausted, records))
            if retry:
                self._submit(stage, retry)
                continue
            time.sleep(self.config.executor.poll_interval_s)
        if is_array:
            metrics = self._array_metrics(stage, records, time.monotonic() - started)
            self.ledger.set_status([stage.key], Status.DONE, metrics=metrics)

    def _failure_summary(self, tasks: list[Task], records: dict[str, dict[str, Any]]) -> str:
        lines = []
        for task in tasks:
            record = records[task.key]
            lines.append(f"{task.key} failed after {record.get('attempts', 0)} attempt(s): {record.get('error')}")
            tail = log_tail(record.get("log"))
            if tail:
                lines.append(f"  last lines of {record.get('log')}:\n{tail}")
        return "\n".join(lines)

    @staticmethod
    def _array_metrics(stage: StagePlan, records: dict[str, dict[str, Any]], seconds: float) -> dict[str, Any]:
        metrics = [records[t.key].get("metrics") or {} for t in stage.tasks]
        problems = sum(m.get("problems", 0) for m in metrics)
        tokens = sum(m.get("generated_tokens", 0) for m in metrics)
        return {
            "shards": len(stage.tasks),
            "problems_generated": problems,
            "generated_tokens": tokens,
            "wall_seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        }

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        # Bars on a terminal; in a log file (a batch job, CI) one line per stage is easier to read.
        with Progress(*columns, console=self.console, disable=not self.console.is_terminal) as progress:

            def run(stage: StagePlan, label: str) -> None:
                bar = progress.add_task(label, total=len(stage.tasks))
                started = time.monotonic()
                self.run_stage(stage, lambda done, total: progress.update(bar, completed=done, total=total))
                metrics = self.ledger.read(stage.key).get("metrics") or {}
                shown = {k: v for k, v in metrics.items() if k in HEADLINE_METRICS}
                self.console.log(f"{label}: done in {time.monotonic() - started:.0f} s {shown}", highlight=False)

            if self.config.data.heldout:
                run(self.planner.eval(0), f"{BASELINE}: eval base model")
            for iteration in range(1, self.config.num_iterations + 1):
                for stage in self.planner.iteration(iteration):
                    run(stage, f"iteration {iteration}: {stage.name}")
                self.console.print(iteration_table(summarize(self.run_dir)))
        self.ledger.update("run", {"status": str(Status.DONE), "ended_at": now()})
