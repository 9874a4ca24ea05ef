"""tools/samples.py and tools/cost.py on runs built the way a run leaves them: shards written by the
generation job's own record builder at the layout's paths, eval predictions, ledger records as
jobs report them (``jobs.runtime.reporting``)."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from jobs.generation.generate import generation_record
from jobs.generation.protocol import Completion
from jobs.problems.data import write_jsonl
from jobs.runtime import reporting
from jobs.specs import JobTarget
from pipeline.config import load_config
from pipeline.layout import RunLayout
from pipeline.views.samples import samples_view
from state import Ledger
from tests.conftest import small_config, write_config
from tools import cost, samples

pytestmark = pytest.mark.unit

PROBLEMS = [{"id": f"p{i}", "question": f"{i}+{i}=?", "answer": str(2 * i)} for i in range(4)]


def grpo_run(tmp_path: Path, verifier: str = "numeric") -> RunLayout:
    """A GRPO run with a pass-rate band (so it generates), rewarded for correctness and a <think> block;
    its first iteration's two shards and the base model's held-out predictions written."""
    for name in ("train.jsonl", "heldout.jsonl"):
        write_jsonl(tmp_path / "assets" / name, PROBLEMS)
    config = small_config(tmp_path / "assets", tmp_path / "runs", method="grpo", filter={"verifier": verifier},
                          grpo={"rewards": [{"name": "correctness"}, {"name": "format", "weight": 0.1, "tags": ["think"], "layout": "present"}],
                                "pass_rate_band": [0.1, 0.9], "num_generations": 2, "batch_size": 2})
    layout = RunLayout(tmp_path / "runs" / "small")
    layout.run_dir.mkdir(parents=True)
    write_config(layout.config, config)
    Ledger(layout.run_dir).update("run", {"num_train": len(PROBLEMS)})
    write_jsonl(layout.heldout_problems, PROBLEMS)
    samples_of = {
        "p0": [("<think>0+0</think> ANSWER: 0", 7), ("ANSWER: 1", 3)],
        "p1": [("<think>1+1</think> ANSWER: 2", 7), ("<think>1+1</think> ANSWER: 3", 7)],
        "p2": [("<think>2+2</think> \\boxed{4}", 7), ("#### 4", 2)],
        "p3": [("<think>never closed", 80), ("6", 1)],
    }
    shards = layout.shard_outputs(1, "generate", ["shard_00000", "shard_00001"])
    for name, problems in zip(shards, (PROBLEMS[:2], PROBLEMS[2:]), strict=True):
        write_jsonl(Path(shards[name]), [generation_record(p, [Completion(*c) for c in samples_of[p["id"]]]) for p in problems])
    predictions = [{"id": p["id"], "prediction": None, "correct": False, "raw_output": f"ANSWER: {p['answer']}"} for p in PROBLEMS]
    write_jsonl(layout.stage_dir(0, "eval") / "predictions.jsonl", predictions)
    return layout


def rendered(view: Any) -> str:
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115 (closed with the console)
    console.print(view)
    return console.export_text()


def test_samples_show_each_sample_with_its_answer_verdict_and_rewards_at_80_columns(tmp_path: Path) -> None:
    layout = grpo_run(tmp_path)
    text = rendered(samples_view(layout.run_dir, None, 4, [], False, 0, 160))
    assert "generation samples of iter_001 (2 shards)" in text
    assert all(len(line) <= 80 for line in text.splitlines())
    blocks = {block.split()[0]: block for block in text.split("problem ")[1:]}
    assert sorted(blocks) == ["p0", "p1", "p2", "p3"], "every problem drawn once"
    # Sample rows: #, answer, verdict, tokens, correctness, format, total, then the sample's end.
    rows = {pid: [line.split() for line in block.splitlines() if line.split()[:1] in (["1"], ["2"])] for pid, block in blocks.items()}
    assert rows["p1"][0][:7] == ["1", "2", "right", "7", "1", "1", "1.1"]
    assert rows["p1"][1][:7] == ["2", "3", "wrong", "7", "0", "1", "0.1"]
    assert rows["p2"][0][:3] == ["1", "4", "right"] and rows["p2"][1][:3] == ["2", "4", "right"], "\\boxed{} and ####"
    assert rows["p3"][0][:3] == ["1", "wrong", "80"], "a <think> never closed has no answer"
    assert rows["p0"][1][4:7] == ["0", "0", "0"], "no <think> block: no format reward"
    assert "2 of 2 samples right" in blocks["p2"] and "1 of 2 samples right" in blocks["p3"], "a bare last line is the answer"


def test_samples_judge_as_the_filter_does_and_name_the_verifier_auto_chose(tmp_path: Path) -> None:
    layout = grpo_run(tmp_path, verifier="auto")
    # A data set's numeric truth (4, not "4") and a candidate without a text, which the filter leaves out.
    (shard,) = layout.shard_outputs(1, "generate", ["shard_00002"]).values()
    record = generation_record({"id": "p9", "question": "2+2=?", "answer": "4"}, [Completion("ANSWER: 4", 3), Completion("x", 1), Completion("ANSWER: 5", 3)])
    record["ground_truth"], record["candidates"][1]["raw_output"] = 4, None
    write_jsonl(Path(shard), [record])
    text = rendered(samples_view(layout.run_dir, 1, 1, ["p9"], False, 0, 160))
    assert "verifier: numeric (auto)" in text
    rows = [line.split() for line in text.splitlines() if line.split()[:1] in (["1"], ["2"], ["3"]) and "samples" not in line]
    assert [row[:3] for row in rows] == [["1", "4", "right"], ["2", "no", "output"], ["3", "5", "wrong"]]
    assert "1 of 2 samples right; 1 not judged" in text


def test_samples_of_the_base_model_are_its_held_out_predictions(tmp_path: Path) -> None:
    layout = grpo_run(tmp_path)
    text = rendered(samples_view(layout.run_dir, 0, 3, ["p3"], False, 0, 160))
    assert "held-out predictions (greedy) of the base model" in text
    assert "problem p3" in text and "problem p0" not in text and "1 of 1 samples right" in text


@pytest.mark.parametrize(("argv", "message"), [
    (["--iteration", "5"], "--iteration: 5 is not an iteration of the run (0 to 2"),
    (["--iteration", "2"], "--iteration 2: nothing to show yet (iterations with samples: [0, 1])"),
    (["--id", "nope"], "--id: no problem 'nope' among these samples"),
])
def test_samples_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    layout = grpo_run(tmp_path)
    assert samples.main([str(layout.run_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("tool", [cost, samples])
@pytest.mark.parametrize(("damage", "message"), [
    ("config", "config.yaml"),
    ("ledger", "not a run directory (no ledger/ and config.yaml in it)"),
])
def test_cost_and_samples_on_a_damaged_run_say_so_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], tool: Any,
                                                               damage: str, message: str) -> None:
    layout = grpo_run(tmp_path)
    if damage == "config":
        layout.config.write_text("num_iterations: [2\n")
    else:
        shutil.rmtree(layout.run_dir / "ledger")
    assert tool.main([str(layout.run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err


def busy_job(target: JobTarget, cpu_seconds: float) -> None:
    with reporting(target):
        deadline = time.process_time() + cpu_seconds
        while time.process_time() < deadline:
            pass


def test_cost_of_a_local_run_sums_what_its_jobs_measured(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = grpo_run(tmp_path)  # a local run (small_config's executor)
    ledger = Ledger(layout.run_dir)
    # A real job's report, from a process of its own as the local executor runs it: 0.2 s of CPU.
    key = "iter_001/filter"
    ledger.update(key, {"status": "submitted", "job_ids": ["4242"]})
    job = multiprocessing.get_context("fork").Process(target=busy_job, args=(JobTarget(str(layout.run_dir), key), 0.2))
    job.start()
    job.join()
    measured = ledger.read(key)["usage"]
    assert measured["executions"] == 1 and 0.2 <= measured["cpu_s"] < 1.0 and 0 <= measured["wall_s"] < 60
    # Two shards that ran side by side, one of them twice; the base model's eval killed before it reported.
    shards = {"iter_001/generate/shard_00000": (["1", "2"], {"executions": 2, "wall_s": 30.0, "cpu_s": 50.0}, "00:00:00", "00:01:40"),
              "iter_001/generate/shard_00001": (["3"], {"executions": 1, "wall_s": 20.0, "cpu_s": 15.5}, "00:00:10", "00:00:30")}
    for task, (jobs, usage, start, end) in shards.items():
        ledger.update(task, {"status": "done", "job_ids": jobs, "usage": usage,
                             "started_at": f"2026-01-01T{start}+00:00", "ended_at": f"2026-01-01T{end}+00:00"})
    ledger.update("baseline/eval", {"status": "failed", "job_ids": ["5"]})
    assert cost.main([str(layout.run_dir), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    by_stage = {(s["iteration"], s["stage"]): s for s in figures["stages"]}
    generate = by_stage[(1, "generate")]
    assert (generate["jobs"], generate["executions"], generate["wall_seconds"], generate["cpu_seconds"]) == (3, 3, 50.0, 65.5)
    assert generate["elapsed_seconds"] == 100.0
    assert by_stage[(0, "eval")]["unmeasured"] == 1 and by_stage[(0, "eval")]["cpu_seconds"] == 0
    assert [i["cpu_seconds"] for i in figures["iterations"] if i["iteration"] == 1] == [round(65.5 + measured["cpu_s"], 1)]
    assert figures["total"]["jobs"] == 5 and figures["total"]["unmeasured"] == 1
    assert cost.main([str(layout.run_dir)]) == 0
    table = capsys.readouterr().out
    assert "the jobs' own measures" in table and "generate" in table and "unmeasured" in table


def test_the_readmes_template_config_passes_the_sections_rules() -> None:
    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "template.yaml")
    assert (config.model.path, config.data.train, config.executor.cluster) == ("models/my_base_model", "data/my_train.jsonl", "local")
