"""Where a run stands, read from its ledger: the data behind the driver's decisions after an
iteration (the reward-hacking check), tools/status.py and the views' tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import read_run_config
from pipeline.layout import BASELINE, RunLayout, iteration_name
from pipeline.loop.hacking import hacking_flags
from pipeline.loop.services import configured, service_fields, service_key
from pipeline.planning.planner import Planner
from pipeline.planning.stages import ADVANCE, EXPORT
from state import Ledger


def _job_fields(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "status": record.get("status", "planned"),
        "attempts": record.get("attempts", 0),
        "job_ids": record.get("job_ids", []),
        "restart_count": record.get("restart_count", 0),
        "error": record.get("error"),
    }


def run_planner(run_dir: Path | str) -> Planner:
    """The plan of an existing run, from the config frozen in it."""
    layout = RunLayout(run_dir)
    num_train = Ledger(run_dir).read("run").get("num_train")
    return Planner(read_run_config(layout.config), layout.run_dir, num_train)


def summarize(run_dir: Path | str) -> dict[str, Any]:
    """Where the run stands: every stage of every iteration as its recipe lists them, with the metrics
    each stage reports for its iteration; services; the detached run's advance job."""
    ledger = Ledger(run_dir)
    run = ledger.read("run")
    planner = run_planner(run_dir)
    base = ledger.read(f"{BASELINE}/eval")
    iterations = []
    for iteration in range(1, planner.config.num_iterations + 1):
        stages: dict[str, Any] = {}
        metrics: dict[str, Any] = {}
        for stage in planner.iteration(iteration):
            record = ledger.read(stage.key)
            info = {**_job_fields(record), "metrics": record.get("metrics") or {}}
            if stage.is_array:
                info["shards"] = [
                    # shard_00003, or shard_00003_split_01: part of a re-split straggler's rest
                    {"index": int(name.split("_")[1]), "name": name, **_job_fields(child), "executions": child.get("executions", 0)}
                    for name, child in ledger.children(stage.key).items()
                ]
            stages[stage.name] = info
            metrics.update({key: info["metrics"].get(key) for key in stage.reports})
        iterations.append({"iteration": iteration, "name": iteration_name(iteration), "method": planner.config.method_of(iteration),
                           "stages": stages, "metrics": metrics})
    base_accuracy = (base.get("metrics") or {}).get("heldout_accuracy")
    return {
        "run_dir": str(planner.run_dir),
        "run_name": run.get("run_name"),
        "status": run.get("status"),
        "error": run.get("error"),
        "stage_names": planner.stage_names(),
        "base_heldout_accuracy": base_accuracy,
        "iterations": iterations,
        # Rewards that rose while held-out accuracy fell (pipeline/loop/hacking.py).
        "hacking": hacking_flags(iterations, base_accuracy, planner.config.grpo.hacking_margin),
        "services": {name: service_fields(ledger.read(service_key(name))) for name in configured(planner.config)},
        # The final model, exported as the seeds name it.
        "export": {**_job_fields(export := ledger.read(EXPORT)), "path": (export.get("metrics") or {}).get("export")},
        # A detached run's job that submits the next chain (pipeline/loop/detach.py).
        "advance": _job_fields(ledger.read(ADVANCE)),
    }
