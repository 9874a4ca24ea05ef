"""Where a run stands, read from its ledger: the data behind the driver's decisions after an
iteration (the reward-hacking check), tools/status.py and the views' tables."""

from __future__ import annotations

import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, read_run_config
from pipeline.layout import BASELINE, RunLayout, iteration_name
from pipeline.loop.hacking import collapse_flags, hacking_flags
from pipeline.loop.services import configured, service_fields, service_key
from pipeline.planning.planner import Planner
from pipeline.planning.stages import ADVANCE, EXPORT, choice_metric
from pipeline.scheduling.watch import IN_FLIGHT, process_identity
from state import InputError, Ledger
from state.ledger import now


def _job_fields(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "status": record.get("status", "planned"),
        "attempts": record.get("attempts", 0),
        "job_ids": record.get("job_ids", []),
        "restart_count": record.get("restart_count", 0),
        "error": record.get("error"),
    }


def driver_identity(run_dir: Path | str) -> dict[str, Any]:
    """What the driving process records in the run's record (key ``driver``), so that status can tell
    whether it still runs, and how to start it again."""
    args = sys.argv[1:] if sys.argv[0].endswith(os.path.join("pipeline", "run.py")) else [str(RunLayout(run_dir).config)]
    return {"pid": os.getpid(), "host": socket.gethostname(), "process": process_identity(os.getpid()), "started_at": now(),
            "resume": f"cd {shlex.quote(os.getcwd())} && python -m pipeline.run {shlex.join(args)}"}


def driver_state(run: dict[str, Any], advance: dict[str, Any]) -> dict[str, Any]:
    """Who drives the run: ``state`` is ``detached`` (its advance job does: no driver process by design),
    ``alive``, ``gone`` (the process ended while the ledger says the run is running: Ctrl-C, SIGKILL),
    ``unknown`` (it ran on another host, or recorded nothing), or None once the run has ended."""
    driver = run.get("driver") or {}
    fields = {"pid": driver.get("pid"), "host": driver.get("host"), "resume": driver.get("resume")}
    if run.get("status") != "running":
        return {**fields, "state": None}
    if advance.get("status") in IN_FLIGHT:
        return {**fields, "state": "detached"}
    if not driver or driver["host"] != socket.gethostname():
        return {**fields, "state": "unknown"}
    if driver["process"] is None:  # no /proc where it ran: whether the pid exists is all there is to know
        try:
            os.kill(driver["pid"], 0)
        except ProcessLookupError:
            return {**fields, "state": "gone"}
        except PermissionError:
            pass
        return {**fields, "state": "alive"}
    return {**fields, "state": "alive" if process_identity(driver["pid"]) == driver["process"] else "gone"}


def run_warnings(config: RunConfig, base: dict[str, Any], iterations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stages whose completions were cut at max_tokens over the run's threshold (``truncated_fraction``
    over generate.warn_truncated), each with a message saying what to change. Warnings a job computes
    itself (the filter's ``warnings`` metric) are its own, in its metrics."""
    stages = [(0, "eval", base, "eval.max_tokens")] + [(e["iteration"], name, info["metrics"], info.get("length_key"))
                                                        for e in iterations for name, info in e["stages"].items()]
    found = []
    threshold = config.generate.warn_truncated
    for iteration, name, metrics, limit in stages:
        truncated = metrics.get("truncated_fraction")
        if truncated is not None and truncated > threshold:
            where = f"iteration {iteration} {name}" if iteration else f"{BASELINE} {name}"
            found.append({"iteration": iteration, "stage": name, "key": "truncated_fraction", "value": truncated, "threshold": threshold,
                          "message": f"{where}: {truncated:.0%} of the completions ({metrics.get('truncated')}) hit max_tokens"
                                     f" (over generate.warn_truncated: {threshold:g}): their answers are cut off; raise {limit}"})
    return found


def stored_config(run_dir: Path | str) -> RunConfig:
    """The config of the run in ``run_dir``; InputError (one line naming the folder or the file) when
    it is not a run directory or its config.yaml cannot be read (status and report: exit 2)."""
    layout = RunLayout(run_dir)
    if not (layout.run_dir / "ledger").is_dir() or not layout.config.is_file():
        raise InputError(f"{run_dir}: not a run directory (no ledger/ and config.yaml in it)")
    return read_run_config(layout.config)


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
            if record.get("status") == "running" and record.get("progress"):
                info["progress"] = record["progress"]  # a training job's steps, from jobs/training/callbacks.py
            if stage.is_array:
                info["shards"] = [
                    # shard_00003, or shard_00003_split_01: part of a re-split straggler's rest
                    {"index": int(name.split("_")[1]), "name": name, **_job_fields(child), "executions": child.get("executions", 0)}
                    for name, child in ledger.children(stage.key).items()
                ]
            if stage.length_key:
                info["length_key"] = stage.length_key
            stages[stage.name] = info
            metrics.update({key: info["metrics"].get(key) for key in stage.reports})
        iterations.append({"iteration": iteration, "name": iteration_name(iteration), "method": planner.config.method_of(iteration),
                           "stages": stages, "metrics": metrics})
    base_accuracy = (base.get("metrics") or {}).get("heldout_accuracy")
    metric = choice_metric(planner.config)
    export = ledger.read(EXPORT)
    exported = export.get("metrics") or {}
    return {
        "run_dir": str(planner.run_dir),
        "run_name": run.get("run_name"),
        "status": run.get("status"),
        "error": run.get("error"),
        "stage_names": planner.stage_names({entry["iteration"]: entry["stages"] for entry in iterations}),
        "base_heldout_accuracy": base_accuracy,
        "base_dev_accuracy": (base.get("metrics") or {}).get("dev_accuracy"),
        # Per category of the held-out problems, and each GRPO reward's mean over the greedy answers.
        "base_heldout_categories": (base.get("metrics") or {}).get("heldout_categories"),
        "base_heldout_rewards": (base.get("metrics") or {}).get("heldout_rewards"),
        "iterations": iterations,
        # Rewards that rose while held-out accuracy fell (pipeline/loop/hacking.py).
        "hacking": hacking_flags(iterations, base_accuracy, planner.config.grpo.hacking_margin),
        # Iterations below the base model by more than export.collapse_margin (dev accuracy, else held-out).
        "collapse": collapse_flags(iterations, (base.get("metrics") or {}).get(metric or ""), planner.config.export.collapse_margin, metric),
        "services": {name: service_fields(ledger.read(service_key(name))) for name in configured(planner.config)},
        # The final model, exported as the seeds name it, and why that iteration (export.iteration):
        # "iteration 2, the best: ..." or "no iteration beat the base model ...: nothing exported".
        "export": {**_job_fields(export), "path": exported.get("export"), "iteration": exported.get("exported_iteration"),
                   "choice": exported.get("choice") or exported.get("export")},
        # A detached run's job that submits the next chain (pipeline/loop/detach.py).
        "advance": _job_fields(advance := ledger.read(ADVANCE)),
        # Whether the process driving the run still runs (a detached run has none), and how to resume it.
        "driver": driver_state(run, advance),
        # Completions cut at max_tokens over generate.warn_truncated; a filter's own warnings are in its metrics.
        "warnings": run_warnings(planner.config, base.get("metrics") or {}, iterations),
    }
