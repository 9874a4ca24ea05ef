"""tools/status.py's decisions, in process: a driver gone, the ledger's and the scheduler's words in
agreement, a training job's step and ETA, tables whole at 80 columns, GRPO's rounds, the run's
warnings (its thresholds', and its filters' own), the collapse guard, dev accuracy and the export's
choice, one line for a damaged run directory; and the counts they read (truncation)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from jobs.generation.generate import finish
from pipeline.loop.summary import driver_identity, summarize
from pipeline.scheduling.watch import process_identity
from pipeline.views.tables import (
    fitted,
    grpo_tables,
    iteration_table,
    progress_text,
    stage_table,
)
from state import Ledger, Status
from tests.conftest import write_config
from tools import status

pytestmark = pytest.mark.unit


def make_run(run_dir: Path, iterations: int = 1, **config: Any) -> Ledger:
    """A local run's directory: its config and the ledger's run record (running)."""
    run_dir.mkdir()
    write_config(run_dir / "config.yaml", {"run_name": "small", "num_iterations": iterations, "model": {"path": "m"},
                                           "data": {"train": "t.jsonl", "heldout": "h.jsonl"}, "executor": {"cluster": "local"},
                                           "train": {"learning_rates": [1e-5] * iterations}, **config})
    ledger = Ledger(run_dir)
    ledger.update("run", {"run_name": "small", "num_iterations": iterations, "num_train": 6, "status": "running"})
    return ledger


def dead_pid() -> int:
    """The pid of a process that ran and is gone (reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def status_of(run_dir: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = status.main([str(run_dir), *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def eighty_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")


def test_a_killed_driver_is_gone_and_status_says_how_to_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The ledger as a SIGKILLed local driver leaves it: the run and its training running, their processes gone."""
    run_dir = tmp_path / "run"
    ledger = make_run(run_dir)
    identity = driver_identity(run_dir)
    ledger.update("run", {"driver": {**identity, "pid": (pid := dead_pid())}})
    ledger.update("iter_001/train", {"status": "running", "attempts": 1, "job_id": str(pid), "job_ids": [str(pid)]})
    code, out, _ = status_of(run_dir, capsys)
    assert code == 0
    text = " ".join(out.split())
    assert f"driver gone: process {pid} on {identity['host']}" in text
    assert f"to go on: cd {os.getcwd()} && python -m pipeline.run" in text and "(its driver is gone)" in text
    # The training job ended without reporting: the ledger's "running" is not left standing alone.
    assert "(lost:" in text and "ENDED" in text
    summary = json.loads(status_of(run_dir, capsys, "--json")[1])
    assert summary["driver"]["state"] == "gone" and summary["driver"]["pid"] == pid
    assert [(job["status"], job["scheduler_state"], job["lost"]) for job in summary["jobs"]] == [("running", "ENDED", True)]


def test_a_live_driver_a_detached_run_and_an_ended_run_are_not_called_gone(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ledger = make_run(run_dir)
    ledger.update("run", {"driver": driver_identity(run_dir)})  # this process: alive
    assert summarize(run_dir)["driver"]["state"] == "alive"
    # A pid used again by another process is not the driver.
    ledger.update("run", {"driver": {**driver_identity(run_dir), "process": f"{process_identity(os.getpid())}0"}})
    assert summarize(run_dir)["driver"]["state"] == "gone"
    # --detach: the advance job drives the run, no process does (an old attached driver's record stays).
    ledger.update("advance", {"status": str(Status.SUBMITTED), "job_id": "17", "job_ids": ["17"]})
    assert summarize(run_dir)["driver"]["state"] == "detached"
    ledger.update("run", {"status": "done"})
    assert summarize(run_dir)["driver"]["state"] is None


def test_scheduler_and_ledger_agree() -> None:
    """The local executor says FINISHED for any process that ended: beside a failed record that reads
    as a contradiction, so status says ENDED; a record in flight whose job ended is lost."""
    rows = [{"status": s, "scheduler_state": state, "reason": None, "node": None, "elapsed": None, "exit_code": None}
            for s, state in (("failed", "FINISHED"), ("done", "FINISHED"), ("running", "FINISHED"), ("running", "RUNNING"))]
    status.reconcile(rows, "local")
    assert [(r["status"], r["scheduler_state"], r["lost"]) for r in rows] == [
        ("failed", "ENDED", False), ("done", "ENDED", False), ("running", "ENDED", True), ("running", "RUNNING", False)]
    slurm = [{"status": s, "scheduler_state": state, "exit_code": "1:0"}
             for s, state in (("failed", "FAILED"), ("submitted", "PENDING"), ("running", "UNKNOWN"), ("running", "CANCELLED"))]
    status.reconcile(slurm, "slurm")
    assert [(r["scheduler_state"], r["lost"]) for r in slurm] == [("FAILED", False), ("PENDING", False), ("UNKNOWN", False),
                                                                  ("CANCELLED", True)]


def test_a_training_job_shows_its_step_and_eta(tmp_path: Path) -> None:
    at = (datetime.now(UTC) - timedelta(seconds=10)).isoformat(timespec="seconds")
    # 60 steps left at 0.5 steps/s, reported 10 s ago (to the second).
    assert re.fullmatch(r"step 40/100, ETA 1(09|10) s", progress_text({"done": 40, "total": 100, "problems_per_s": 0.5, "at": at}, "step"))
    assert progress_text({"done": 100, "total": 100, "problems_per_s": 0.5, "at": at}, "step") == "step 100/100"
    run_dir = tmp_path / "run"
    make_run(run_dir).update("iter_001/train", {"status": "running", "attempts": 1, "progress": {"done": 3, "total": 50, "problems_per_s": 0.01, "at": at}})
    text = render(stage_table(summarize(run_dir)))
    assert "step 3/50, ETA 78 min" in " ".join(text.split())


def render(*tables: Any, width: int = 80) -> str:
    console = Console(file=io.StringIO(), width=width)
    for table in tables:
        console.print(table)
    return console.file.getvalue()


def assert_whole(text: str, words: list[str]) -> None:
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80
    found = set(re.findall(r"[\w%.:-]+", text))
    assert set(words) <= found, set(words) - found


def test_every_cell_whole_at_80_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Six iterations in the analytics table, shards in every state, a job of each kind: no cell cut."""
    run_dir = tmp_path / "run"
    ledger = make_run(run_dir, iterations=6)
    for i in range(1, 7):
        states = ("done", "submitted", "running", "failed") if i == 6 else ("done",) * 4
        ledger.update_many({f"iter_{i:03d}/generate/shard_{n:05d}": {"status": s, "attempts": 2, "job_id": f"{700000 + n}_{n}",
                                                                      "job_ids": [f"{700000 + n}_{n}"]} for n, s in enumerate(states)})
        ledger.update(f"iter_{i:03d}/filter", {"status": "done", "metrics": {"categories": {"too_hard": 0.1, "learning_zone": 0.9},
                                                                            "mean_correct_rate": 0.45, "filtered_samples": 123456}})
        ledger.update(f"iter_{i:03d}/eval", {"status": "done", "metrics": {"heldout_accuracy": 0.3333}})
    code, out, _ = status_of(run_dir, capsys)
    assert code == 0
    assert_whole(out, ["submitted", "running", "failed", "attempt", "Iteration", "Learning", "Decreasing", "plateau", "123456",
                       "33.3%", "shard_00003", "700003_3", "ENDED"])
    assert out.count("analytics across iterations") == 2, "six iterations do not fit 80 columns whole: two tables"


def test_an_empty_ledger_is_titled_by_its_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "fresh_run"
    run_dir.mkdir()
    write_config(run_dir / "config.yaml", {"run_name": "fresh", "model": {"path": "m"}, "data": {"train": "t.jsonl"},
                                           "num_iterations": 1, "train": {"learning_rates": [1e-5]}})
    (run_dir / "ledger").mkdir()
    (run_dir / "data").mkdir()
    (run_dir / "data" / "train.jsonl").write_text('{"id": "1", "question": "q", "answer": "a"}\n')
    code, out, _ = status_of(run_dir, capsys)
    assert code == 0 and "None" not in out and "fresh_run" in out and "run not started" in out


def test_a_damaged_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    make_run(run_dir)
    (run_dir / "config.yaml").write_text("run_name: [unclosed\n  model: {\n")
    code, out, err = status_of(run_dir, capsys)
    assert code == 2 and not out and len(err.strip().splitlines()) == 1 and str(run_dir / "config.yaml") in err
    assert status_of(tmp_path, capsys)[0] == 2


def test_truncation_over_its_threshold_and_the_filters_own_warnings_are_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    ledger = make_run(run_dir, generate={"warn_truncated": 0.3})
    ledger.update("iter_001/generate", {"status": "done", "metrics": {"truncated": 40, "truncated_fraction": 0.4}})
    # What jobs/scoring/filtering.py records: its warnings, each computed there, once.
    filtered = ["2 problem(s) left out: none of their candidates could be judged (...), first 'p7'",
                "no answer could be extracted from 95% of the candidates (over filter.warn_unextracted: 0.9), so they are judged wrong"]
    ledger.update("iter_001/filter", {"status": "done", "metrics": {"unextracted_fraction": 0.95, "warnings": filtered}})
    ledger.update("iter_001/eval", {"status": "done", "metrics": {"truncated": 1, "truncated_fraction": 0.25}})  # under 0.3
    ledger.update("baseline/eval", {"status": "done", "metrics": {"truncated": 5, "truncated_fraction": 0.5}})
    summary = summarize(run_dir)
    assert [(w["iteration"], w["stage"], w["key"]) for w in summary["warnings"]] == [
        (0, "eval", "truncated_fraction"), (1, "generate", "truncated_fraction")], "the filter's are its own, not computed again"
    assert summary["iterations"][0]["metrics"]["warnings"] == filtered
    out = status_of(run_dir, capsys)[1]
    text = " ".join(out.split())
    assert ("iteration 1 generate: 40% of the completions (40) hit max_tokens (over generate.warn_truncated: 0.3): their answers"
            " are cut off; raise generate.max_tokens") in text
    assert "baseline eval: 50% of the completions (5) hit max_tokens" in text and "raise eval.max_tokens" in text
    assert f"iteration 1 filter: {filtered[0]}" in text and f"iteration 1 filter: {filtered[1]}" in text
    assert text.count("no answer could be extracted") == 1
    assert text.index("baseline eval") < text.index("iteration 1 generate") < text.index("iteration 1 filter: 2 problem(s)")
    assert_whole(out, ["judged", "max_tokens", "extracted", "candidates"])


def test_collapse_dev_accuracy_and_the_exports_choice_are_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A collapse in the last iteration stops nothing: status and report are where a user sees it,
    beside the dev accuracy the choice was made on and the choice itself (nothing exported here)."""
    run_dir = tmp_path / "run"
    (tmp_path / "dev.jsonl").write_text("")
    ledger = make_run(run_dir, iterations=2, data={"train": "t.jsonl", "heldout": "h.jsonl", "dev": str(tmp_path / "dev.jsonl")},
                      export={"collapse_margin": 0.05})
    for key, heldout, dev in (("baseline/eval", 0.25, 0.20), ("iter_001/eval", 0.20, 0.18), ("iter_002/eval", 0.0, 0.05)):
        ledger.update(key, {"status": "done", "metrics": {"heldout_accuracy": heldout, "dev_accuracy": dev}})
    choice = "no iteration beat the base model (dev accuracy 20.0%; best: iteration 1, 18.0%): nothing exported; the base model (model.path) stays the best"
    ledger.update("export", {"status": "done", "metrics": {"exported_iteration": 0, "export": None, "choice": choice}})
    ledger.update("run", {"status": "done"})
    out = status_of(run_dir, capsys)[1]
    text = " ".join(out.split())
    assert re.search(r"Dev accuracy \S* 20\.0% \S* 18\.0% \S* 5\.0%", text), text
    assert ("collapse: iteration 2: dev accuracy 5.0%, below the base model's 20.0% by more than export.collapse_margin (0.05)"
            in text)
    assert f"final model: {choice}" in text
    assert_whole(out, ["Dev", "export.collapse_margin", "exported", "model.path"])
    summary = json.loads(status_of(run_dir, capsys, "--json")[1])
    assert summary["export"]["choice"] == choice and [f["iteration"] for f in summary["collapse"]] == [2]


def test_a_failed_export_is_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    ledger = make_run(run_dir)
    ledger.update("export", {"status": "failed", "attempts": 2, "error": "OSError: [Errno 28] No space left on device"})
    text = " ".join(status_of(run_dir, capsys)[1].split())
    assert "final model: the export failed: OSError: [Errno 28] No space left on device" in text


def test_grpo_shows_its_rounds_instead_of_empty_filter_panels(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ledger = make_run(run_dir, iterations=1, method="grpo")
    steps = [{"step": s, "policy_step": s - (s - 1) % 2, "reward": 0.1 * s, "reward_std": 0.2, "frac_reward_zero_std": 0.5 - 0.025 * s,
              "rewards/correctness/mean": 0.05 * s, "rewards/format/mean": 1.0,
              # The pass-rate distribution jobs/training/grpo_trainer.py records.
              "groups/none_pass": 0.625, "groups/some_pass": 0.25, "groups/all_pass": 0.125} for s in range(1, 21)]
    ledger.update("iter_001/train", {"status": "done", "metrics": {"step_log": steps, "final_reward": 2.0}})
    summary = summarize(run_dir)
    console = Console(file=io.StringIO(), width=80)
    rounds = grpo_tables(console, summary)
    text = render(*fitted(console, lambda part: iteration_table(summary, part), summary["iterations"]), *rounds)
    assert "Too hard" not in text and "Filtered samples" not in text, "no filter: no rows of its analytics"
    assert "GRPO rollouts by round" in " ".join(text.split()), "the title, wrapped as the table is narrow"
    assert {"Groups", "correctness,", "Reward,"} <= set(text.split())
    # 8 of the 10 rounds, the first and the last among them, in tables as wide as 80 columns allow.
    assert [column.header for table in rounds for column in table.columns[1:]] == [f"step {s}" for s in (1, 3, 7, 9, 11, 13, 17, 19)]
    assert_whole(text, ["correctness", "47.5%", "2.5%", "1.000", "0.100", "0.950", "passes", "62.5%", "25.0%", "12.5%"])
    assert [row for row in rounds[0].columns[0].cells if "pass" in row] == [
        "Groups where no sample passes", "Groups where some pass", "Groups where all pass"]


def test_a_round_over_the_arrays_shows_the_groups_it_trained_on_and_its_shortfall(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    ledger = make_run(run_dir, iterations=2, method="grpo", grpo={"rollouts": "arrays", "problems_per_round": 8, "oversample": 1.5})
    figures = {"groups": 12, "zero_std_groups": 5, "unscored_groups": 0, "failed_problems": 0, "target_groups": 8}
    ledger.update("iter_001/score", {"status": "done", "metrics": {"round": {**figures, "kept_groups": 7, "shortfall": 1}}})
    ledger.update("iter_002/score", {"status": "done", "metrics": {"round": {**figures, "kept_groups": 8, "shortfall": 0, "staleness": 1}}})
    # The held-out evaluation: accuracy per category, and each reward's mean over the greedy answers.
    for key, (answerable, iou) in {"baseline/eval": (0.25, 0.1), "iter_001/eval": (0.5, 0.4)}.items():
        ledger.update(key, {"status": "done", "metrics": {
            "heldout_accuracy": 0.3, "heldout_categories": {"answerable": {"accuracy": answerable, "problems": 4}},
            "heldout_rewards": {"refuse_iou": {"mean": iou, "failed": 0}}}})
    code, out, _ = status_of(run_dir, capsys)
    assert code == 0
    assert_whole(out, ["score", "Groups", "alike", "short", "answerable", "25.0%", "50.0%", "refuse_iou", "0.100", "0.400"])
    cells = " ".join(out.split())
    assert "│ 7 of 8, 5 │ 8 of 8, 5 │" in cells and "│ alike, 1 short │ alike, 1 stale │" in cells, \
        "each round's groups, its shortfall, its staleness"
    # A round's samples are as long as grpo.max_completion_length lets them be, not generate.max_tokens.
    ledger.update("iter_002/generate", {"status": "done", "metrics": {"truncated": 90, "truncated_fraction": 0.9}})
    cells = " ".join(status_of(run_dir, capsys)[1].split())
    assert "iteration 2 generate: 90% of the completions (90) hit max_tokens" in cells and "raise grpo.max_completion_length" in cells


def test_generation_counts_completions_cut_at_max_tokens(tmp_path: Path) -> None:
    """Resumed items count too; a problem's own max_tokens is its limit."""
    partial, output = tmp_path / "shard.jsonl.partial", tmp_path / "shard.jsonl"
    lines = [{"id": "a", "candidates": [{"num_tokens": 10}, {"num_tokens": 3}]},
             {"id": "b", "candidates": [{"num_tokens": 5}, {"num_tokens": 4}]}]
    partial.write_text("".join(json.dumps(line) + "\n" for line in lines))
    counts = finish(partial, output, [{"id": "a"}, {"id": "b", "max_tokens": 5}], 10)
    assert counts == {"failed_items": 0, "completions": 4, "truncated": 2, "truncated_fraction": 0.5}
    assert output.is_file()
