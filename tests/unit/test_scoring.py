"""Scoring that is right, in process: the verifier auto picks per problem (GSM8K data with the
default config), ground truths no verifier can read (unknown, not wrong, in the filter and in the
evaluation), malformed candidates, empty groups, and a filter that says when it could extract almost
no answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobs.generation import evaluate as eval_job
from jobs.generation.config import EvalConfig, GenerateConfig
from jobs.generation.protocol import Completion, Outcome, Request
from jobs.problems.data import load_problems, write_jsonl
from jobs.scoring.config import FilterConfig, RewardConfig, RewardFilterConfig
from jobs.scoring.filtering import filter_generations
from jobs.scoring.pass_rates import select_problems
from jobs.scoring.records import score_candidates
from jobs.scoring.rescore import score_generations
from jobs.scoring.rewards import RewardContext, RewardSet
from jobs.specs import EvalSpec, JobTarget
from pipeline.config import load_config
from pipeline.rules import check_config
from tests.conftest import small_config

pytestmark = pytest.mark.unit

# GSM8K's own lines (question, worked solution ending "#### N"), with the ids our loader asks for.
GSM8K = [
    {"id": "gsm0", "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
     " How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April"
               " and May.\n#### 72"},
    {"id": "gsm1", "question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting."
     " How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
]
# (candidate's raw output, right?) for a truth ending "#### N", N filled in.
CANDIDATES = [
    ("<think>48/2 = 24, 48 + 24</think>\nANSWER: {n}", True),
    ("Adding both months gives \\boxed{{{n}}}.", True),
    ("In May: 24.\nAltogether: {n}\n#### {n}", True),
    ("<think>48/2 = 23</think>\nANSWER: {wrong}", False),
]


def record(pid: str, truth: Any, raws: list[Any]) -> dict[str, Any]:
    return {"id": pid, "question": "?", "ground_truth": truth, "candidates": [{"raw_output": raw} for raw in raws]}


def write_shard(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def pass_rates(output: Path) -> dict[str, dict[str, Any]]:
    lines = (output.parent / f"{output.stem}_pass_rates.jsonl").read_text().splitlines()
    return {rate["id"]: rate for rate in map(json.loads, lines)}


def test_gsm8k_data_with_the_default_config_is_judged_by_the_numeric_verifier(tmp_path: Path) -> None:
    assets = tmp_path / "assets"
    (assets / "random_init").mkdir(parents=True)
    for name, rows in (("train.jsonl", GSM8K), ("warmstart.jsonl", GSM8K), ("heldout.jsonl", [{**GSM8K[0], "id": "held0"}])):
        (assets / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    settings = small_config(assets, tmp_path / "runs")
    del settings["filter"]  # the default filter section
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(settings))
    config = load_config(tmp_path / "run.yaml", [], check=check_config).filter
    assert config.verifier == "auto"

    records = []
    for problem in load_problems(assets / "train.jsonl"):
        n = problem["answer"].rsplit("#### ", 1)[1]
        raws = [raw.format(n=n, wrong=int(n) - 1) for raw, _ in CANDIDATES]
        records.append(record(problem["id"], problem["answer"], raws))
    output = tmp_path / "out" / "filtered.json"
    stats = filter_generations([write_shard(tmp_path / "g.jsonl", records)], output, config, 42, len(CANDIDATES))

    assert stats["problems_per_verifier"] == {"numeric": 2}
    assert pass_rates(output) == {
        p["id"]: {"id": p["id"], "candidates": 4, "correct": 3, "verifier": "numeric"} for p in GSM8K
    }, "ANSWER: 72, \\boxed{72} and #### 72 right, 71 wrong"
    assert stats["total_correct"] == 6 and stats["unextracted_fraction"] == 0 and stats["warnings"] == []
    # The same verdicts from the correctness reward (GRPO's and score_cli's) under that config.
    rewards = RewardSet([RewardConfig("correctness")], RewardContext(config.verifier, config.answer_pattern))
    texts = [c["raw_output"] for c in records[0]["candidates"]]
    assert score_candidates(rewards, records[0], texts).totals == [1.0 if right else 0.0 for _, right in CANDIDATES]


def test_auto_chooses_per_problem_and_an_explicit_verifier_overrides_it(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "g.jsonl", [
        record("mc", "(B) Piano", ["ANSWER: B", "ANSWER: (C) Violin"]),
        record("num", "#### 1,234", ["ANSWER: 1234", "ANSWER: 1243"]),
        record("num_json", 72, ["#### 72", "So 27."]),
        record("text", "Paris", ["ANSWER: Paris.", "ANSWER: pairs"]),
    ])
    output = tmp_path / "f.json"
    stats = filter_generations([shard], output, FilterConfig(strategy="all"), 42, 2)
    assert {pid: (rate["verifier"], rate["correct"]) for pid, rate in pass_rates(output).items()} == {
        "mc": ("multiple_choice", 1), "num": ("numeric", 1), "num_json": ("numeric", 1), "text": ("exact", 1),
    }, "(LaTeX -> math: tests/test_verifiers.py, which pays math-verify's import)"
    assert stats["problems_per_verifier"] == {"exact": 1, "multiple_choice": 1, "numeric": 2}
    forced = filter_generations([shard], output, FilterConfig(strategy="all", verifier="multiple_choice"), 42, 2)
    assert forced["problems_per_verifier"] == {"multiple_choice": 4}
    assert {rate["verifier"] for rate in pass_rates(output).values()} == {"multiple_choice"}


def test_a_ground_truth_the_verifier_cannot_read_leaves_its_problem_out_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shard = write_shard(tmp_path / "g.jsonl", [
        record("ok", "#### 7", ["ANSWER: 7", "ANSWER: 8"]),
        record("words", "seven", ["ANSWER: 7", "ANSWER: 8"]),
        record("empty", "", ["ANSWER: 7", "ANSWER: 8"]),
        record("no_candidates", "#### 3", []),
    ])
    output = tmp_path / "f.json"
    stats = filter_generations([shard], output, FilterConfig(strategy="all", verifier="numeric"), 42, 2, expected=4)
    assert stats["unjudged_problems"] == 3 and stats["total_problems"] == 1
    assert stats["problems_per_category"]["too_hard"] == 0, "unknown is not wrong: no problem is too hard"
    rates = pass_rates(output)
    assert rates["words"] == {"id": "words", "unjudged": True, "verifier": "numeric"}
    assert rates["empty"] == {"id": "empty", "unjudged": True, "verifier": "numeric"}
    assert "3 problem(s) left out: none of their candidates could be judged" in stats["warnings"][0]
    assert "first 'words' (ground truth 'seven', verifier numeric)" in stats["warnings"][0] and "WARNING: 3 problem(s) left out" in capsys.readouterr().out
    problems = [{"id": pid} for pid in ("ok", "words", "empty", "no_candidates")]
    selected, counts = select_problems(problems, output.parent / "f_pass_rates.jsonl", (0.0, 1.0))
    assert [p["id"] for p in selected] == ["ok"] and counts["unjudged"] == 3 and counts["below_band"] == 0
    # The correctness reward: no score (None, as TRL's accuracy_reward), not 0.
    rewards = RewardSet([RewardConfig("correctness")], RewardContext("numeric"))
    assert score_candidates(rewards, record("words", "seven", []), ["ANSWER: 7", "7"]).totals == [None, None]


def test_a_candidate_without_text_fails_only_itself(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "g.jsonl", [record("p", "#### 7", ["ANSWER: 7", None, "ANSWER: 8", "ANSWER: 7"])])
    output = tmp_path / "f.json"
    stats = filter_generations([shard], output, FilterConfig(strategy="all"), 42, 4)
    assert pass_rates(output)["p"] == {"id": "p", "candidates": 3, "correct": 2, "verifier": "numeric"}
    assert stats["malformed_candidates"] == 1 and "1 candidate(s) without a text" in stats["warnings"][0]
    assert [s["id"] for s in json.loads(output.read_text())] == ["p_sol0", "p_sol1"]
    # By rewards: the others are scored, that one has no score from any reward.
    reward = RewardFilterConfig([RewardConfig("correctness"), RewardConfig("tag_count", 0.5)], threshold=1.0)
    stats = filter_generations([shard], output, FilterConfig(strategy="all", reward=reward), 42, 4)
    assert pass_rates(output)["p"]["candidates"] == 3 and stats["total_correct"] == 2
    assert stats["problems_per_verifier"] == {}, "the rewards judged, not a verifier"
    assert stats["reward_failures"]["correctness"]["failed"] == 1
    scored = score_generations([shard], RewardSet(reward.rewards, RewardContext("auto")), tmp_path / "scored.jsonl")
    (line,) = map(json.loads, (tmp_path / "scored.jsonl").read_text().splitlines())
    assert [c["total"] for c in line["candidates"]] == [1.0, None, 0.0, 1.0]
    assert scored.summary["correctness"]["failed"] == 1 and "raw_output" in scored.summary["correctness"]["first_error"]


def test_problems_without_candidates_are_no_groups_in_the_zero_variance_share(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "g.jsonl", [record("none", "#### 1", []), record("same", "#### 1", ["1", "1"])])
    scored = score_generations([shard], RewardSet([RewardConfig("correctness")], RewardContext("auto")), tmp_path / "s.jsonl")
    assert scored.summary["correctness"]["zero_variance_groups"] == 1.0, "one group, of zero variance"


def test_a_filter_that_extracts_almost_no_answers_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cut = "<think>Let me count the clips in April, then in May, then"  # cut by max_tokens inside <think>
    shard = write_shard(tmp_path / "g.jsonl", [record(f"p{i}", "#### 72", [cut] * 9 + ["ANSWER: 72"]) for i in range(2)])
    output = tmp_path / "f.json"
    stats = filter_generations([shard], output, FilterConfig(), 42, 10)
    assert stats["unextracted_fraction"] == pytest.approx(0.9) and stats["warnings"] == []
    stats = filter_generations([shard], output, FilterConfig(warn_unextracted=0.8), 42, 10)
    (warning,) = stats["warnings"]
    assert warning.startswith("no answer could be extracted from 90% of the candidates (over filter.warn_unextracted: 0.8)")
    assert f"WARNING: {warning}" in capsys.readouterr().out
    assert f"WARNING: {warning}" in (tmp_path / "f_analytics.log").read_text()
    assert json.loads((tmp_path / "f_stats.json").read_text())["unextracted_fraction"] == pytest.approx(0.9)


def test_the_control_keeps_as_many_samples_per_problem_as_the_filter_drawn_blind_to_the_verifier(tmp_path: Path) -> None:
    # 40 problems, 8 candidates each, 2 of them right: top_k 3 keeps the 2 right ones.
    records = [record(f"p{i}", "5", ["ANSWER: 5", "ANSWER: 5", *[f"ANSWER: {w}" for w in range(10, 16)]]) for i in range(40)]
    shard = write_shard(tmp_path / "g.jsonl", records)
    kept = {}
    for control in (False, True):
        output = tmp_path / str(control) / "filtered.json"
        config = FilterConfig(verifier="numeric", strategy="top_k", top_k=3, control=control)
        filter_generations([shard], output, config, 42, 8)
        kept[control] = json.loads(output.read_text())
    per_problem = [{p: sum(s["original_id"] == p for s in kept[c]) for p in (r["id"] for r in records)} for c in (False, True)]
    assert per_problem[0] == per_problem[1] == {r["id"]: 2 for r in records}
    assert all(s["response"] == "ANSWER: 5" for s in kept[False])
    # Drawn at random: about a quarter right (2 of 8), not all of them.
    right = sum(s["response"] == "ANSWER: 5" for s in kept[True]) / len(kept[True])
    assert 0.1 < right < 0.5, right


class CannedBackend:
    """Answers the i-th request with ``texts[i]``."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def run(self, requests: list[Request], on_outcome: Any) -> None:
        for index, text in enumerate(self.texts[: len(requests)]):
            on_outcome(Outcome(index, [Completion(text, 3)]))

    def metrics(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


def test_the_evaluation_leaves_problems_it_cannot_judge_out_of_its_accuracy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    heldout = [{"id": "num", "question": "?", "answer": "#### 7"}, {"id": "mc", "question": "?", "answer": "(B) Piano"},
               {"id": "text", "question": "?", "answer": "Paris"}]
    write_jsonl(tmp_path / "heldout.jsonl", heldout)
    write_jsonl(tmp_path / "dev.jsonl", [{"id": "unit", "question": "?", "answer": "5 cm"}])
    texts = ["ANSWER: 7", "ANSWER: (C) Violin", "ANSWER: Paris.", "ANSWER: 5"]
    monkeypatch.setattr(eval_job, "make_backend", lambda *args: CannedBackend(texts))
    out = tmp_path / "eval"

    def evaluate(verifier: str) -> tuple[dict[str, Any], dict[str, tuple[str, bool | None]]]:
        spec = EvalSpec(JobTarget(str(tmp_path), "eval"), str(tmp_path / "heldout.jsonl"), "model", str(out), EvalConfig(),
                        FilterConfig(verifier=verifier), GenerateConfig(), 42, str(tmp_path / "key"),
                        dev_problems_path=str(tmp_path / "dev.jsonl"))
        metrics: dict[str, Any] = {}
        eval_job.evaluate(spec, metrics)
        lines = [json.loads(line) for name in ("predictions", "dev_predictions") for line in (out / f"{name}.jsonl").read_text().splitlines()]
        return metrics, {line["id"]: (line["verifier"], line["correct"]) for line in lines}

    metrics, verdicts = evaluate("auto")
    assert verdicts == {"num": ("numeric", True), "mc": ("multiple_choice", False), "text": ("exact", True), "unit": ("numeric", True)}
    assert (metrics["heldout_accuracy"], metrics["heldout_unjudged"], metrics["dev_accuracy"]) == (pytest.approx(2 / 3), 0, 1.0)
    # Truths numeric cannot read (no number): left out of the accuracy and counted, not judged wrong.
    metrics, verdicts = evaluate("numeric")
    assert verdicts["mc"] == verdicts["text"] == ("numeric", None)
    assert {k: metrics[k] for k in ("heldout_accuracy", "heldout_correct", "heldout_problems", "heldout_unjudged")} == {
        "heldout_accuracy": 1.0, "heldout_correct": 1, "heldout_problems": 3, "heldout_unjudged": 2,
    }


def test_the_evaluation_reports_accuracy_per_category_and_each_rewards_mean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seed 003's answerable / refusable problems, and a GRPO run's rewards over the greedy answers."""
    heldout = [{"id": "a1", "question": "?", "answer": "7", "task_type": "answerable"},
               {"id": "a2", "question": "?", "answer": "8", "task_type": "answerable"},
               {"id": "r1", "question": "?", "answer": "0", "task_type": "refusable"},
               {"id": "x", "question": "?", "answer": "3"}]
    write_jsonl(tmp_path / "heldout.jsonl", heldout)
    texts = ["<think>so</think><answer>7</answer>", "<answer>5</answer>", "<think>no</think><answer>0</answer>", "<answer>3</answer>"]
    monkeypatch.setattr(eval_job, "make_backend", lambda *args: CannedBackend(texts))
    rewards = [RewardConfig(name="correctness"), RewardConfig(name="format", weight=0.1, params={"tags": ["think"], "layout": "present"})]
    spec = EvalSpec(JobTarget(str(tmp_path), "eval"), str(tmp_path / "heldout.jsonl"), "model", str(tmp_path / "eval"), EvalConfig(),
                    FilterConfig(verifier="numeric"), GenerateConfig(), 42, str(tmp_path / "key"), rewards=rewards)
    metrics: dict[str, Any] = {}
    eval_job.evaluate(spec, metrics)
    assert metrics["heldout_accuracy"] == 0.75
    assert metrics["heldout_categories"] == {"answerable": {"accuracy": 0.5, "problems": 2}, "refusable": {"accuracy": 1.0, "problems": 1}}
    assert metrics["heldout_rewards"] == {"correctness": {"mean": 0.75, "failed": 0}, "format": {"mean": 0.5, "failed": 0}}


# A GRPO round's score job (jobs.scoring.rounds) -------------------------------------------------------

def round_shard(path: Path, groups: dict[str, list[str]]) -> str:
    """A generation shard of rollouts: per problem, its samples' answers."""
    lines = [{"id": pid, "question": f"{pid}?", "ground_truth": "7",
              "candidates": [{"raw_output": f"<answer>{a}</answer>", "completion_ids": [1, 2, k], "logprobs": [-0.5, -0.25, -1.0],
                              "policy": 0} for k, a in enumerate(answers)]}
             for pid, answers in groups.items()]
    write_jsonl(path, lines)
    return str(path)


def round_spec(tmp_path: Path, shards: list[str], problems: list[str], **grpo: Any) -> Any:
    from jobs.specs import RoundScoreSpec
    from jobs.training.config import GrpoConfig

    write_jsonl(tmp_path / "train.jsonl", [{"id": pid, "question": f"{pid}?", "answer": "7"} for pid in problems])
    config = GrpoConfig(rollouts="arrays", num_generations=3, **grpo)
    return RoundScoreSpec(JobTarget(str(tmp_path / "run"), "iter_001/score"), 1, shards, str(tmp_path / "train.jsonl"),
                          str(tmp_path / "score"), config, None, "numeric", r"<answer>(.*?)</answer>")


def test_a_rounds_score_job_keeps_the_groups_with_a_signal_up_to_the_round_and_records_what_it_left_out(tmp_path: Path) -> None:
    from jobs.scoring import rounds
    from state import Ledger

    groups = {"all": ["7", "7", "7"], "mixed1": ["7", "3", "3"], "none": ["1", "2", "3"], "mixed2": ["3", "7", "7"], "mixed3": ["7", "1", "2"]}
    shards = [round_shard(tmp_path / "shard_0.jsonl", dict(list(groups.items())[:3])),
              round_shard(tmp_path / "shard_1.jsonl", dict(list(groups.items())[3:]) | {"failed": ["7"]})]
    spec = round_spec(tmp_path, shards, [*groups, "failed"], problems_per_round=2, oversample=3.0)
    rounds.run(spec)
    figures = Ledger(tmp_path / "run").read("iter_001/score")["metrics"]["round"]
    assert {k: figures[k] for k in ("groups", "zero_std_groups", "failed_problems", "kept_groups", "shortfall")} == {
        "groups": 5, "zero_std_groups": 2, "failed_problems": 1, "kept_groups": 2, "shortfall": 0}
    kept = [json.loads(line) for line in (tmp_path / "score" / "scored.jsonl").read_text().splitlines()]
    assert [g["id"] for g in kept] == ["mixed1", "mixed2"]  # the round's order, the first two with a signal
    first = kept[0]["samples"]
    assert [s["rewards"]["correctness"] for s in first] == [1.0, 0.0, 0.0]
    # TRL's group advantages: (r - mean) / (std + 1e-4), std with Bessel's correction.
    assert [s["advantage"] for s in first] == pytest.approx([2 / 3 / (0.57735 + 1e-4), -1 / 3 / (0.57735 + 1e-4), -1 / 3 / (0.57735 + 1e-4)], abs=1e-4)
    assert first[2]["completion_ids"] == [1, 2, 2] and first[2]["logprobs"] == [-0.5, -0.25, -1.0] and first[2]["policy"] == 0

    # Fewer groups with a signal than the round asks for: it trains on what it has, and says how many it lacks.
    rounds.run(round_spec(tmp_path, shards, [*groups, "failed"], problems_per_round=4))
    figures = Ledger(tmp_path / "run").read("iter_001/score")["metrics"]["round"]
    assert (figures["kept_groups"], figures["shortfall"]) == (3, 1)


def test_a_round_whose_groups_all_scored_alike_stops_with_what_to_change(tmp_path: Path) -> None:
    from jobs.scoring import rounds
    from state import Ledger, PermanentJobError

    shards = [round_shard(tmp_path / "shard_0.jsonl", {"all": ["7", "7", "7"], "none": ["1", "1", "2"]})]
    with pytest.raises(PermanentJobError) as stopped:
        rounds.run(round_spec(tmp_path, shards, ["all", "none"], temperature=0.7))
    message = str(stopped.value)
    assert "of 2 groups, 2 got one reward for all their samples" in message
    assert all(key in message for key in ("grpo.temperature (0.7)", "grpo.oversample", "grpo.problems_per_round"))
    record = Ledger(tmp_path / "run").read("iter_001/score")
    assert record["status"] == "failed" and record["permanent"] and not (tmp_path / "score" / "scored.jsonl").exists()
