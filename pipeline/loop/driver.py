"""The run loop: every stage of every iteration, as the method's recipe lists them, resumable from the ledger.

Every stage goes through ``run_stage``: it starts the services the stage needs, submits the
stage's tasks that are not done, waits while the ledger says they are in flight and the watcher
says their job lives, resubmits failed ones up to ``executor.max_attempts``, and stops with a
summary when that is not enough. Nothing done is redone: a rerun finds ``done`` records and skips
them, and reattaches to live jobs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console

from pipeline.config import RunConfig, load_config
from pipeline.layout import RunLayout
from pipeline.loop.hacking import RunStopped, describe, describe_collapse
from pipeline.loop.services import ServiceKeeper
from pipeline.loop.submitter import IN_FLIGHT, Submitter, may_retry
from pipeline.loop.summary import driver_identity, summarize
from pipeline.planning.planner import Planner
from pipeline.planning.stage import StageFailed, StagePlan, Task
from pipeline.planning.stages import EXPORT
from pipeline.rules import check_config
from pipeline.scheduling.executors import require_scheduler
from pipeline.scheduling.resplit import Splitter
from state import InputError, Ledger, Status
from state.ledger import now

HEADLINE_METRICS = ("problems_generated", "failed_items", "tokens_per_s", "mean_correct_rate", "filtered_samples", "round",
                    "final_loss", "heldout_accuracy", "dev_accuracy")


def log_tail(path: str | None, lines: int = 15) -> str:
    if not path or not Path(path).exists():
        return ""
    text = Path(path).read_text(errors="replace").splitlines()
    return "\n".join("    " + line for line in text[-lines:])


class Driver:
    def __init__(self, config: RunConfig, planner: Planner, console: Console,
                 on_iteration_done: Callable[[dict[str, Any]], None] | None = None):
        """``on_iteration_done(summary)`` is told what the run looks like after each iteration (the
        views print their tables from it)."""
        self.config = config
        self.planner = planner
        self.run_dir = planner.run_dir
        self.ledger = Ledger(self.run_dir)
        self.console = console
        self.submitter = Submitter(config, planner.layout, self.ledger, console.log)
        self.services = ServiceKeeper(planner, self.submitter, console.log)
        self.on_iteration_done = on_iteration_done

    @classmethod
    def open(cls, run_dir: Path, console: Console) -> Driver:
        """A driver for an existing run directory, from the config and data frozen in it."""
        config_path = RunLayout(run_dir).config
        if not config_path.is_file():
            raise InputError(f"{run_dir}: not a run directory (no config.yaml in it)")
        config = load_config(config_path, check=check_config, stored=True)
        require_scheduler(config.executor.cluster)
        return cls(config, Planner(config, run_dir), console)

    # -- one stage -----------------------------------------------------------------------

    def current_stage(self) -> StagePlan | None:
        """The first stage that is not done, or None when the run is complete."""
        pending = (s for s in self.planner.stages() if self.ledger.read(s.key).get("status") != str(Status.DONE))
        return next(pending, None)

    def failed_tasks(self, stage: StagePlan) -> list[Task]:
        """Tasks that failed, were cancelled or timed out (after asking the scheduler)."""
        records = self.ledger.read_many(t.key for t in stage.tasks)
        self.submitter.mark_lost(stage.tasks, records)
        return [t for t in stage.tasks if records[t.key].get("status") == str(Status.FAILED)]

    def run_stage(self, stage: StagePlan, on_progress: Callable[[int, int], None] | None = None,
                  beside: Sequence[StagePlan] = ()) -> bool:
        """Run a stage to its end; True when it gained tasks on the way (a re-split straggler's rest),
        whose outputs the stages after it must be planned again to read. The stages ``beside`` it
        (StagePlan.starts_beside) are started once its own tasks are submitted: a scheduler short of
        resources gives them to this stage first."""
        if self.ledger.read(stage.key).get("status") == str(Status.DONE):
            for later in beside:
                self.start_beside(later)
            return False
        if stage.is_array:
            self.start_array(stage)
        self.services.ensure(stage)
        executor = self.config.executor
        interval, last_seen, resplit = executor.poll_interval_s, None, False
        splitter = Splitter(self.ledger, stage.key, stage.resplit, self.submitter.cancel, self.console.log) if stage.resplit else None
        while True:
            records = self.ledger.read_many(t.key for t in stage.tasks)
            self.submitter.mark_lost(stage.tasks, records)
            if splitter and stage.split and splitter.step(stage.split, records):
                stage = self.planner.stage(stage.key)  # with the tasks of the straggler's rest
                self.ledger.update(stage.key, {"num_tasks": len(stage.tasks)})
                resplit = True
                continue
            statuses = [records[t.key].get("status") for t in stage.tasks]
            if beside and not {None, str(Status.PLANNED)} & set(statuses):
                for later in beside:  # this stage's tasks are all submitted: the scheduler has them first
                    self.start_beside(later)
                beside = ()
            done = statuses.count(str(Status.DONE))
            if on_progress:
                on_progress(done, len(stage.tasks))
            if done == len(stage.tasks):
                break
            failed = [t for t in stage.tasks if records[t.key].get("status") in (None, str(Status.FAILED), str(Status.PLANNED))]
            retry = [t for t in failed if may_retry(records[t.key], executor.max_attempts)]
            exhausted = [t for t in failed if t not in retry]
            if exhausted and not any(status in IN_FLIGHT for status in statuses):
                if stage.is_array:
                    self.ledger.set_status([stage.key], Status.FAILED, error=f"{len(exhausted)} task(s) failed")
                raise StageFailed(self.failure_summary(exhausted, records))
            if retry:
                self.submitter.submit(stage, retry)
                continue
            self.services.revive(stage)
            # Back off while nothing changes, so that a long stage costs the scheduler few queries.
            interval = executor.poll_interval_s if statuses != last_seen else min(interval * 1.5, executor.max_poll_interval_s)
            last_seen = statuses
            time.sleep(interval)
        if stage.is_array:
            self.finish_array(stage, records)
        return resplit

    def start_beside(self, stage: StagePlan) -> None:
        """Submits the tasks never submitted of a stage that runs beside the one about to run (a GRPO
        round's generation with grpo.max_staleness); run_stage waits for it, and retries what
        failed, when it is due."""
        if self.ledger.read(stage.key).get("status") == str(Status.DONE):
            return
        if stage.is_array:
            self.start_array(stage)
        self.services.ensure(stage)
        records = self.ledger.read_many(t.key for t in stage.tasks)
        fresh = [t for t in stage.tasks if records[t.key].get("status") in (None, str(Status.PLANNED))]
        if fresh:
            self.console.log(f"{stage.label}: started beside {stage.starts_beside}", highlight=False)
            self.submitter.submit(stage, fresh)

    def failure_summary(self, tasks: list[Task], records: dict[str, dict[str, Any]]) -> str:
        lines = []
        for task in tasks:
            record = records[task.key]
            why = " (not retried: the error is permanent)" if record.get("permanent") else ""
            lines.append(f"{task.key} failed after {record.get('attempts', 0)} attempt(s){why}: {record.get('error')}")
            tail = log_tail(record.get("log"))
            if tail:
                lines.append(f"  last lines of {record.get('log')}:\n{tail}")
        return "\n".join(lines)

    def start_array(self, stage: StagePlan) -> None:
        def first_start(record: dict[str, Any]) -> None:
            record.setdefault("started_at", now())

        self.ledger.update(stage.key, {"status": str(Status.RUNNING), "num_tasks": len(stage.tasks)}, first_start)

    def finish_array(self, stage: StagePlan, records: dict[str, dict[str, Any]]) -> None:
        """Mark an array stage whose tasks are all done as done, with its totals."""
        started = self.ledger.read(stage.key).get("started_at")
        seconds = (datetime.now(UTC) - datetime.fromisoformat(started)).total_seconds() if started else 0.0
        totals = stage.totals([records[t.key].get("metrics") or {} for t in stage.tasks]) if stage.totals else {}
        tokens = totals.get("generated_tokens")
        totals.update(shards=len(stage.tasks), wall_seconds=round(seconds, 2))
        if tokens is not None:
            totals["tokens_per_s"] = round(tokens / seconds, 1) if seconds else None
        self.ledger.set_status([stage.key], Status.DONE, metrics=totals)

    def check_iteration(self, summary: dict[str, Any], iteration: int, can_stop: bool = True, wait: bool = True) -> None:
        """After an iteration: say what the reward-hacking check and the collapse guard saw, and stop the
        run before the next iteration on hacking if grpo.stop_on_hacking says so, or on a collapse; the
        reason names each check that fired, the hacking check first."""
        flags = [flag for flag in summary["hacking"] if flag["iteration"] == iteration]
        for flag in flags:
            self.console.print(f"[yellow]reward hacking?[/yellow] {describe(flag)}", highlight=False)
        collapsed = [flag for flag in summary["collapse"] if flag["iteration"] == iteration]
        for flag in collapsed:
            self.console.print(f"[red]collapse:[/red] {describe_collapse(flag)}", highlight=False)
        if not can_stop:
            return
        reasons = []
        if flags and self.config.grpo.stop_on_hacking:
            reasons.append(f"grpo.stop_on_hacking: {describe(flags[0])}")
        if collapsed:
            reasons.append(f"the collapse guard: {describe_collapse(collapsed[0])}")
        if reasons:
            self.stop("stopped by " + "; and by ".join(reasons), wait)

    def stop(self, why: str, wait: bool) -> NoReturn:
        """Stop the run: record why, then export the best iteration so far (export.iteration), waiting for
        it unless ``wait`` is false (a detached run's advance job: the export job goes on its own), and
        raise RunStopped; an export that fails is added to the reason, which it does not replace."""
        self.ledger.update("run", {"status": "stopped", "error": why, "ended_at": now()})
        export = self.planner.stage(EXPORT)
        if not wait:
            if self.ledger.read(EXPORT).get("status") not in (*IN_FLIGHT, str(Status.DONE)):
                self.submitter.submit(export, export.tasks)
            raise RunStopped(why)
        try:
            self.run_stage(export)
        except StageFailed as failure:
            self.ledger.update("run", {"error": f"{why}; then the export failed: {str(failure).splitlines()[0]}"})
            raise RunStopped(f"{why}\nthen the export of the best iteration so far failed: {failure}") from failure
        self.console.print(f"final model: {(self.ledger.read(EXPORT).get('metrics') or {}).get('choice')}", highlight=False)
        raise RunStopped(why)

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
        # Which process drives the run: tools/status.py tells when it is gone (Ctrl-C, SIGKILL).
        self.ledger.update("run", {"driver": driver_identity(self.run_dir)})
        plan = self.planner.stages()
        # Bars on a terminal; in a log file (a batch job, CI) one line per stage is easier to read.
        with Progress(*columns, console=self.console, disable=not self.console.is_terminal) as progress:
            try:
                for index in range(len(plan)):
                    stage = self.planner.stage(plan[index].key) if plan[index].planned_when_due else plan[index]
                    beside = [later for later in plan[index + 1:] if later.starts_beside == stage.key]
                    bar = progress.add_task(stage.label, total=len(stage.tasks))
                    started = time.monotonic()
                    if self.run_stage(stage, lambda done, total, bar=bar: progress.update(bar, completed=done, total=total), beside):
                        plan = self.planner.stages()  # the stages after it read the outputs the re-split added
                    following = plan[index + 1] if index + 1 < len(plan) else None
                    # A service no later stage needs right away gives its resources back.
                    self.services.release(keep=following.services if following else ())
                    metrics = self.ledger.read(stage.key).get("metrics") or {}
                    shown = {k: v for k, v in metrics.items() if k in HEADLINE_METRICS}
                    self.console.log(f"{stage.label}: done in {time.monotonic() - started:.0f} s {shown}", highlight=False)
                    if stage.iteration and (following is None or following.iteration != stage.iteration):
                        summary = summarize(self.run_dir)
                        if self.on_iteration_done:
                            self.on_iteration_done(summary)
                        self.check_iteration(summary, stage.iteration, can_stop=following is not None)
            except (StageFailed, RunStopped):
                self.services.release()
                raise
        self.ledger.update("run", {"status": str(Status.DONE), "ended_at": now()})
