"""What a run cost, per iteration and stage: from SLURM's accounting for a SLURM run, from what its
jobs measured of themselves for a local one.

SLURM: every job the ledger recorded for a task (every attempt: ``job_ids``) is looked up in one ``sacct``
call, requeued runs of a job included (``--duplicates``): GPU-seconds are elapsed x allocated GPUs
(``AllocTRES`` gres/gpu), CPU-seconds are sacct's own ``CPUTimeRAW`` (elapsed x allocated CPUs),
queue wait is start - submit. Stages whose jobs start vLLM servers (generation shards, evaluation)
also say what share of their working time went to starting servers rather than generating, from
the ``server_start_s`` and ``seconds`` their tasks report.

Local (``executor.cluster: local``): each job's ledger record (``usage``) holds its wall seconds from
start to end and the CPU seconds (user + system) of its process and of the child processes it waited
for; a job killed before it could report is counted as unmeasured. A stage's elapsed time runs from
its first job's start to its last job's end (its jobs may run side by side).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.table import Table

from pipeline.loop.services import configured, service_key
from pipeline.loop.summary import run_planner
from pipeline.scheduling.watch import sacct_text
from state import Ledger

FIELDS = ("JobID", "State", "Submit", "Start", "ElapsedRaw", "AllocTRES", "CPUTimeRAW")
# What local_cost sums per stage, iteration and run.
LOCAL_FIGURES = ("jobs", "executions", "unmeasured", "wall_seconds", "cpu_seconds")


class CostUnavailable(RuntimeError):
    """The run's costs cannot be counted this way (SLURM's accounting of a run that is not a SLURM run,
    the jobs' own measures of a run whose jobs ran inside the driver)."""


@dataclass
class StageCost:
    iteration: int | None  # None: the run's services
    stage: str
    job_ids: list[str] = field(default_factory=list)
    runs: int = 0  # sacct rows: a requeued job runs more than once
    gpu_seconds: float = 0.0
    cpu_seconds: float = 0.0
    queue_wait_seconds: float = 0.0
    max_queue_wait_seconds: float = 0.0
    server_start_seconds: float | None = None
    generation_seconds: float | None = None

    @property
    def server_start_share(self) -> float | None:
        working = (self.server_start_seconds or 0.0) + (self.generation_seconds or 0.0)
        return self.server_start_seconds / working if self.server_start_seconds is not None and working else None

    def add_run(self, row: dict[str, str]) -> None:
        elapsed = int(row["ElapsedRaw"] or 0)
        self.runs += 1
        self.gpu_seconds += elapsed * allocated_gpus(row["AllocTRES"])
        self.cpu_seconds += int(row["CPUTimeRAW"] or 0)
        wait = queue_wait(row["Submit"], row["Start"])
        self.queue_wait_seconds += wait
        self.max_queue_wait_seconds = max(self.max_queue_wait_seconds, wait)

    def add_servers(self, metrics: dict[str, Any]) -> None:
        if metrics.get("server_start_s") is None:
            return
        self.server_start_seconds = (self.server_start_seconds or 0.0) + metrics["server_start_s"]
        self.generation_seconds = (self.generation_seconds or 0.0) + (metrics.get("seconds") or 0.0)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gpu_hours": self.gpu_seconds / 3600, "cpu_hours": self.cpu_seconds / 3600,
                "server_start_share": self.server_start_share}


def allocated_gpus(tres: str) -> int:
    """``billing=2,cpu=2,gres/gpu=4,mem=8G,node=1`` -> 4. SLURM lists typed GPUs (``gres/gpu:h100=4``)
    beside the untyped total; the typed ones count only where no total is given."""
    total = re.search(r"(?:^|,)gres/gpu=(\d+)", tres)
    if total:
        return int(total.group(1))
    return sum(int(n) for n in re.findall(r"gres/gpu:[^=,]+=(\d+)", tres))


def queue_wait(submit: str, start: str) -> float:
    try:
        return max(0.0, (datetime.fromisoformat(start) - datetime.fromisoformat(submit)).total_seconds())
    except ValueError:  # "Unknown" / "None": not started
        return 0.0


def stage_records(run_dir: Path) -> tuple[str, list[tuple[StageCost, list[dict[str, Any]]]]]:
    """The run's ``executor.cluster``, and each stage of the run (and each service) with its tasks' ledger records."""
    planner = run_planner(run_dir)
    ledger = Ledger(run_dir)
    groups = []
    for stage in planner.stages():
        records = ledger.read_many(task.key for task in stage.tasks)
        groups.append((StageCost(stage.iteration, stage.name), list(records.values())))
    for name in configured(planner.config):
        groups.append((StageCost(None, f"service {name}"), [ledger.read(service_key(name))]))
    return planner.config.executor.cluster, groups


def run_cost(run_dir: Path | str) -> dict[str, Any]:
    """The run's costs per stage, per iteration and in all, from one sacct call."""
    cluster, groups = stage_records(Path(run_dir))
    if cluster != "slurm":
        raise CostUnavailable(
            f"{run_dir} ran on executor.cluster={cluster}: GPU- and CPU-hours come from "
            "SLURM's accounting (sacct), which only a SLURM run has"
        )
    owner: dict[str, StageCost] = {}
    for cost, records in groups:
        for record in records:
            cost.job_ids += record.get("job_ids", [])
            cost.add_servers(record.get("metrics") or {})
        owner.update(dict.fromkeys(cost.job_ids, cost))
    for row in accounting(owner):
        cost = owner.get(row["JobID"])
        if cost is not None:
            cost.add_run(row)
    stages = [cost for cost, _ in groups if cost.job_ids]
    return {
        "run_dir": str(Path(run_dir).resolve()),
        "stages": [cost.as_dict() for cost in stages],
        "iterations": [_sum(i, [c for c in stages if c.iteration == i]).as_dict()
                       for i in sorted({c.iteration for c in stages if c.iteration is not None})],
        "total": _sum(None, stages).as_dict(),
    }


def accounting(job_ids: Iterable[str]) -> list[dict[str, str]]:
    """sacct's rows for these jobs, every run of a requeued job included."""
    text = sacct_text(list(job_ids), FIELDS, "--duplicates")
    return [dict(zip(FIELDS, line.split("|"), strict=True)) for line in text.splitlines() if line.count("|") == len(FIELDS) - 1]


def _sum(iteration: int | None, costs: list[StageCost]) -> StageCost:
    total = StageCost(iteration, "all")
    for cost in costs:
        total.job_ids += cost.job_ids
        total.runs += cost.runs
        total.gpu_seconds += cost.gpu_seconds
        total.cpu_seconds += cost.cpu_seconds
        total.queue_wait_seconds += cost.queue_wait_seconds
        total.max_queue_wait_seconds = max(total.max_queue_wait_seconds, cost.max_queue_wait_seconds)
        if cost.server_start_seconds is not None:
            total.add_servers({"server_start_s": cost.server_start_seconds, "seconds": cost.generation_seconds})
    return total


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.4f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def cost_table(cost: dict[str, Any]) -> Table:
    table = Table(title=f"cost of {cost['run_dir']} (SLURM accounting)")
    columns = ("iteration", "stage", "jobs", "runs", "GPU-h", "CPU-h", "queue wait s (sum / max)", "server start share")
    return _fill(table, columns, cost, _cells)


def _fill(table: Table, columns: tuple[str, ...], cost: dict[str, Any], cells: Callable[[dict[str, Any]], list[str]]) -> Table:
    """``table`` with ``columns``: a row per stage, each iteration's total after its stages, the run's last."""
    for column in columns:
        table.add_column(column, justify="left" if column in ("iteration", "stage") else "right")
    iterations = {row["iteration"]: row for row in cost["iterations"]}
    rows = cost["stages"]
    for index, row in enumerate(rows):
        table.add_row(*cells(row))
        following = rows[index + 1]["iteration"] if index + 1 < len(rows) else object()
        if row["iteration"] in iterations and following != row["iteration"]:
            table.add_row(*cells(iterations[row["iteration"]]), style="bold", end_section=True)
    table.add_row(*cells({**cost["total"], "iteration": "run"}), style="bold")
    return table


def _label(iteration: int | str | None) -> str:
    """An iteration as the tables name it: baseline (0), services (None), run (the total)."""
    return "services" if iteration is None else "baseline" if iteration == 0 else str(iteration)


def _cells(row: dict[str, Any]) -> list[str]:
    return [_label(row["iteration"]), row["stage"], str(len(row["job_ids"])), str(row["runs"]), _hours(row["gpu_seconds"]),
            _hours(row["cpu_seconds"]), f"{row['queue_wait_seconds']:.0f} / {row['max_queue_wait_seconds']:.0f}",
            _share(row["server_start_share"])]


def local_cost(run_dir: Path | str) -> dict[str, Any]:
    """A local run's wall and CPU seconds per stage, per iteration and in all, from its ledger."""
    cluster, groups = stage_records(Path(run_dir))
    if cluster == "debug":
        raise CostUnavailable(f"{run_dir} ran on executor.cluster=debug, inside the driver's process: its jobs have no figures of their own")
    stages = []
    for cost, records in groups:
        ran = [r for r in records if r.get("job_ids") or r.get("usage")]
        if not ran:
            continue
        usage = [r.get("usage") or {} for r in ran]
        stages.append(_elapsed({
            "iteration": cost.iteration, "stage": cost.stage,
            "jobs": sum(len(r.get("job_ids", [])) for r in ran),
            "executions": sum(u.get("executions", 0) for u in usage),
            # Ended without a word of its usage: killed, or run by an earlier version.
            "unmeasured": sum(not u and r.get("status") in ("done", "failed") for r, u in zip(ran, usage, strict=True)),
            "wall_seconds": round(sum(u.get("wall_s", 0.0) for u in usage), 1),
            "cpu_seconds": round(sum(u.get("cpu_s", 0.0) for u in usage), 1),
            "started_at": min((r["started_at"] for r in ran if r.get("started_at")), default=None),
            "ended_at": max((r["ended_at"] for r in ran if r.get("ended_at")), default=None),
        }))
    iterations = sorted({s["iteration"] for s in stages if s["iteration"] is not None})
    return {
        "run_dir": str(Path(run_dir).resolve()),
        "stages": stages,
        "iterations": [_local_sum(i, [s for s in stages if s["iteration"] == i]) for i in iterations],
        "total": _local_sum(None, stages),
    }


def _elapsed(row: dict[str, Any]) -> dict[str, Any]:
    start, end = row["started_at"], row["ended_at"]
    elapsed = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds() if start and end and end >= start else None
    return {**row, "elapsed_seconds": elapsed}


def _local_sum(iteration: int | None, rows: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"iteration": iteration, "stage": "all", **{k: sum(r[k] for r in rows) for k in LOCAL_FIGURES}}
    total["wall_seconds"], total["cpu_seconds"] = round(total["wall_seconds"], 1), round(total["cpu_seconds"], 1)
    total["started_at"] = min((r["started_at"] for r in rows if r["started_at"]), default=None)
    total["ended_at"] = max((r["ended_at"] for r in rows if r["ended_at"]), default=None)
    return _elapsed(total)


def local_table(cost: dict[str, Any]) -> Table:
    table = Table(title=f"cost of {cost['run_dir']} (the jobs' own measures)",
                  caption="wall, CPU: summed over the stage's jobs; elapsed: first start to last end")
    return _fill(table, ("iteration", "stage", "jobs", "wall s", "CPU s", "elapsed s", "unmeasured"), cost, _local_cells)


def _local_cells(row: dict[str, Any]) -> list[str]:
    elapsed = row["elapsed_seconds"]
    return [_label(row["iteration"]), row["stage"], str(row["jobs"]), f"{row['wall_seconds']:.0f}", f"{row['cpu_seconds']:.0f}",
            "-" if elapsed is None else f"{elapsed:.0f}", str(row["unmeasured"])]
