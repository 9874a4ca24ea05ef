"""The seed's learning-zone table, strategies, re-filtering seed files, and bad shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from jobs.scoring.config import FilterConfig, RewardConfig, RewardFilterConfig
from jobs.scoring.filter_cli import main
from jobs.scoring.filtering import filter_generations
from jobs.scoring.learning_zone import categorize, category_ranges, keep_count
from state import InputError
from tests.conftest import run_cli

BOUNDS = FilterConfig().zone_bounds


def test_k16_gives_the_seed_table_exactly() -> None:
    assert category_ranges(16, BOUNDS) == {
        "too_hard": "0", "challenging": "1-3", "learning_zone": "4-11", "almost_mastered": "12-14", "mastered": "15-16",
    }


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (8, {"too_hard": "0", "challenging": "1", "learning_zone": "2-5", "almost_mastered": "6-7", "mastered": "8"}),
        (32, {"too_hard": "0", "challenging": "1-7", "learning_zone": "8-23", "almost_mastered": "24-28", "mastered": "29-32"}),
    ],
)
def test_categories_are_fractions_of_k(k: int, expected: dict[str, str]) -> None:
    assert category_ranges(k, BOUNDS) == expected


@pytest.mark.parametrize(
    ("category", "correct", "kept"),
    [("too_hard", 0, 0), ("challenging", 3, 3), ("learning_zone", 9, 3), ("almost_mastered", 13, 1), ("mastered", 16, 0)],
)
def test_learning_zone_keeps_as_the_seed_says(category: str, correct: int, kept: int) -> None:
    assert categorize(correct, 16, BOUNDS) == category
    assert min(keep_count(category, correct, FilterConfig(), "p", 42), correct) == kept


def test_mastered_sampling_is_seeded_and_near_the_rate() -> None:
    config = FilterConfig(include_mastered=True, mastered_sample_rate=0.1)
    draws = [keep_count("mastered", 16, config, f"p{i}", 42) for i in range(2000)]
    assert draws == [keep_count("mastered", 16, config, f"p{i}", 42) for i in range(2000)]
    assert 150 < sum(draws) < 250


def seed_record(pid: str, correct: int, k: int = 16) -> dict:
    """A generations.jsonl line as the seed's generate.py writes it (no num_tokens)."""
    candidates = []
    for i in range(k):
        answer = "(A) 3 sounds" if i < correct else "(B) 4 sounds"
        raw = f"<think>{'x' * (i + 1)}</think>\nANSWER: {answer}"
        candidates.append({"raw_output": raw, "thinking_prediction": "x", "answer_text": f"ANSWER: {answer}", "answer_prediction": answer})
    return {"id": pid, "sound": f"{pid}.wav", "question": "How many sounds?", "ground_truth": "(A) 3 sounds",
            "candidates": candidates, "num_candidates": k}


def test_refilter_seed_generations_with_the_cli(tmp_path: Path) -> None:
    generations = tmp_path / "generations.jsonl"
    generations.write_text("".join(json.dumps(seed_record(f"s{c:02d}", c)) + "\n" for c in range(17)))
    output = tmp_path / "out" / "filtered.json"
    assert main(["--generations", str(generations), "--output", str(output), "--strategy", "learning_zone"]) == 0
    filtered = json.loads(output.read_text())
    kept = {}
    for sample in filtered:
        kept[sample["original_id"]] = kept.get(sample["original_id"], 0) + 1
    # Seed table at K=16: 1-3 keep all, 4-11 keep 3, 12-14 keep 1, 0 and 15-16 none.
    assert kept == {f"s{c:02d}": (c if c <= 3 else 3 if c <= 11 else 1) for c in range(1, 15)}
    first = next(s for s in filtered if s["original_id"] == "s05")
    assert first == {
        "id": "s05_sol0", "original_id": "s05", "sound": "s05.wav", "question": "How many sounds?", "answer": "(A) 3 sounds",
        "response": "<think>x</think>\nANSWER: (A) 3 sounds", "thinking_prediction": "x", "answer_prediction": "(A) 3 sounds",
        "category": "learning_zone",
    }, "shortest correct first, in the seed's filtered.json format"
    stats = json.loads((tmp_path / "out" / "filtered_stats.json").read_text())
    assert stats["problems_per_category"] == {"too_hard": 1, "challenging": 3, "learning_zone": 8, "almost_mastered": 3, "mastered": 2}
    assert json.loads((tmp_path / "out" / "filtered_no_correct.json").read_text()) == ["s00"]
    by_category = json.loads((tmp_path / "out" / "filtered_by_category.json").read_text())
    assert by_category["mastered"] == ["s15", "s16"]
    analytics = json.loads((tmp_path / "out" / "filtered_analytics.json").read_text())
    assert analytics["correct_count_histogram"] == {str(i): 1 for i in range(17)}
    log = (tmp_path / "out" / "filtered_analytics.log").read_text()
    assert "learning_zone" in log and "4-11 correct - PRIORITIZE!" in log and "16 correct:" in log


@pytest.mark.parametrize(("strategy", "total"), [("all", sum(range(17))), ("best", 16), ("top_k", 3 * 14 + 2 + 1)])
def test_legacy_strategies(tmp_path: Path, strategy: str, total: int) -> None:
    generations = tmp_path / "g.jsonl"
    generations.write_text("".join(json.dumps(seed_record(f"s{c:02d}", c)) + "\n" for c in range(17)))
    stats = filter_generations([generations], tmp_path / "f.json", FilterConfig(strategy=strategy, top_k=3), 42, 16)
    assert stats["filtered_samples"] == total


def write_shard(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_bad_shards_are_named_by_file_and_line_and_publish_nothing(tmp_path: Path) -> None:
    output = tmp_path / "out" / "f.json"
    good = write_shard(tmp_path / "good.jsonl", [seed_record("a", 3), seed_record("b", 5)])
    filter_generations([good], output, FilterConfig(), 42, 16)
    before = {p.name: p.read_bytes() for p in output.parent.iterdir()}

    torn = tmp_path / "torn.jsonl"
    torn.write_text(json.dumps(seed_record("c", 3)) + "\n" + json.dumps(seed_record("d", 3))[:50])
    with pytest.raises(InputError, match=r"torn.jsonl:2: truncated last line"):
        filter_generations([torn], output, FilterConfig(), 42, 16)
    other = write_shard(tmp_path / "other.jsonl", [seed_record("x", 1), seed_record("b", 2)])
    with pytest.raises(InputError, match=rf"duplicate problem id 'b': {good}:2 and {other}:2"):
        filter_generations([good, other], output, FilterConfig(), 42, 16)
    with pytest.raises(InputError, match=rf"duplicate problem id 'a': {good}:1 and {good}:1"):
        filter_generations([good, good], output, FilterConfig(), 42, 16)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(seed_record("e", 1)) + "\n{not json\n")
    with pytest.raises(InputError, match=r"broken.jsonl:2: malformed JSON"):
        filter_generations([broken], output, FilterConfig(), 42, 16)
    no_truth = seed_record("f", 1)
    del no_truth["ground_truth"]
    with pytest.raises(InputError, match=r"bad.jsonl:2: not a generations.jsonl record \(missing 'ground_truth'\)"):
        filter_generations([write_shard(tmp_path / "bad.jsonl", [seed_record("e", 1), no_truth])], output, FilterConfig(), 42, 16)
    with pytest.raises(InputError, match="the shards hold 2 problems, expected 3"):
        filter_generations([good], output, FilterConfig(), 42, 16, expected=3)
    assert {p.name: p.read_bytes() for p in output.parent.iterdir()} == before, "a failed filter leaves the last outputs as they were"


def test_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--generations", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "f.json")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing.jsonl'}: file not found"
    shard = write_shard(tmp_path / "g.jsonl", [seed_record("a", 1)])
    assert main(["--generations", str(shard), "--output", str(tmp_path / "f.json"), "--verifier", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown verifier 'nope'")


def gsm8k_record(pid: str, answers: list[str], truth: str = "#### 1,234") -> dict:
    """A record whose candidates end GSM8K-style; the ground truth is the data set's full solution."""
    candidates = [{"raw_output": f"Adding up step by step.\nResult => {a} <="} for a in answers]
    return {"id": pid, "question": "Sum?", "ground_truth": truth, "candidates": candidates}


def test_cli_numeric_verifier_and_answer_patterns(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "g.jsonl", [gsm8k_record("p", ["1234", "1,234", "1,243", "1234.0"])])
    output = tmp_path / "f.json"
    # Without the pattern the last line "Result => 1234 <=" still ends in the right number.
    assert main(["--generations", str(shard), "--output", str(output), "--verifier", "numeric", "--strategy", "all"]) == 0
    assert [s["answer_prediction"] for s in json.loads(output.read_text())] == [
        "Result => 1234 <=", "Result => 1,234 <=", "Result => 1234.0 <=",
    ]
    args = ["--generations", str(shard), "--output", str(output), "--verifier", "numeric", "--strategy", "all"]
    assert main([*args, "--answer-pattern", r"=>\s*(\S+)\s*<="]) == 0
    assert [s["answer_prediction"] for s in json.loads(output.read_text())] == ["1234", "1,234", "1234.0"]


def test_per_category_ids_and_dedupe(tmp_path: Path) -> None:
    same = gsm8k_record("dup", ["7", "7", "8"], truth="7")
    shards = [
        write_shard(tmp_path / "a.jsonl", [seed_record(f"s{c:02d}", c) for c in range(0, 17, 2)]),
        write_shard(tmp_path / "b.jsonl", [seed_record(f"s{c:02d}", c) for c in range(1, 17, 2)] + [same]),
    ]
    output = tmp_path / "f.json"
    stats = filter_generations(shards, output, FilterConfig(strategy="all", verifier="numeric", dedupe=True), 42, 16)
    by_category = json.loads((tmp_path / "f_by_category.json").read_text())
    assert by_category == {
        "too_hard": ["s00"],
        "challenging": ["s02", "s01", "s03"],
        "learning_zone": ["s04", "s06", "s08", "s10", "s05", "s07", "s09", "s11", "dup"],
        "almost_mastered": ["s12", "s14", "s13"],
        "mastered": ["s16", "s15"],
    }, "ids in the order read, shard after shard"
    assert json.loads((tmp_path / "f_no_correct.json").read_text()) == ["s00"]
    # 2 of 3 correct (learning zone), the two identical correct responses kept once.
    assert [s["id"] for s in json.loads(output.read_text()) if s["original_id"] == "dup"] == ["dup_sol0"]
    assert stats["correct_count_histogram"]["2"] == 2 and stats["correct_rate_buckets"]["100%"] == 1


def test_long_responses_numeric_truths_and_user_verifiers(tmp_path: Path) -> None:
    reasoning = "Let me add these up carefully, one step at a time. " * 20  # > 512 characters, no </think>
    records = [
        {"id": 1, "question": "Sum?", "ground_truth": 72, "candidates": [
            {"raw_output": f"{reasoning}\n#### 72"}, {"raw_output": f"{reasoning}\n#### 27"}, {"raw_output": f"{reasoning}\nSo 72."},
        ]},
        {"id": 2, "question": "Sum?", "ground_truth": "0.5", "candidates": [{"raw_output": "<think>half</think>\nANSWER: 1/2"}]},
    ]
    shard = write_shard(tmp_path / "g.jsonl", records)
    stats = filter_generations([shard], tmp_path / "f.json", FilterConfig(verifier="numeric", strategy="all"), 42, 3)
    assert stats["total_correct"] == 3 and stats["problems_per_category"]["learning_zone"] == 1
    samples = json.loads((tmp_path / "f.json").read_text())
    assert [(s["id"], s["answer"], s["answer_prediction"]) for s in samples] == [
        ("1_sol0", 72, "So 72."), ("1_sol1", 72, "72"), ("2_sol0", "0.5", "1/2"),
    ], "shortest first; the truth as the data set wrote it; the last line when no rule matches"
    exact_only = filter_generations([shard], tmp_path / "e.json", FilterConfig(verifier="exact", strategy="all"), 42, 3)
    assert exact_only["total_correct"] == 1, "only '#### 72' extracts to exactly '72'"


def test_failed_generations_are_left_out_and_counted_not_judged_too_hard(tmp_path: Path) -> None:
    failed = {**seed_record("s99", 0, k=2), "error": "APIConnectionError: server gone", "num_candidates": 2}
    records = [seed_record("s00", 8), failed, seed_record("s01", 16)]
    shard = write_shard(tmp_path / "g.jsonl", records)
    stats = filter_generations([shard], tmp_path / "f.json", FilterConfig(), 42, 16, expected=3)
    assert stats["failed_items"] == 1 and stats["total_problems"] == 2
    assert stats["categories"]["too_hard"] == 0, "a failed request is not a problem the model cannot solve"
    assert "s99" not in (tmp_path / "f.json").read_text()


def test_worker_processes_give_the_same_outputs_as_one(tmp_path: Path) -> None:
    shards = [write_shard(tmp_path / f"g{s}.jsonl", [seed_record(f"s{s}_{c:02d}", c) for c in range(17)]) for s in range(4)]
    outputs = {}
    for workers in (1, 3):
        out = tmp_path / f"out{workers}"
        stats = filter_generations(shards, out / "f.json", FilterConfig(include_mastered=True), 42, 16, expected=68,
                                   workers=workers)
        outputs[workers] = ({p.name: p.read_bytes() for p in sorted(out.iterdir())}, stats.pop("seconds"), stats)
    assert outputs[1][0] == outputs[3][0], "byte for byte, every file"
    assert outputs[1][2] == {**outputs[3][2], "candidates_per_s": outputs[1][2]["candidates_per_s"]}
    assert json.loads((tmp_path / "out3" / "f.json").read_bytes())[0]["original_id"] == "s0_01", "in shard order"


def test_a_duplicate_id_across_shards_is_found_by_parallel_workers(tmp_path: Path) -> None:
    first = write_shard(tmp_path / "a.jsonl", [seed_record("p1", 3), seed_record("p2", 5)])
    second = write_shard(tmp_path / "b.jsonl", [seed_record("p3", 3), seed_record("p2", 7)])
    with pytest.raises(InputError, match=r"duplicate problem id 'p2': .*a.jsonl:2 and .*b.jsonl:2"):
        filter_generations([first, second], tmp_path / "out" / "f.json", FilterConfig(), 42, 16, workers=2)
    assert not (tmp_path / "out" / "f.json").exists()


def test_a_verifier_failing_in_a_worker_fails_the_filter_instead_of_hanging(tmp_path: Path) -> None:
    shards = [write_shard(tmp_path / f"g{s}.jsonl", [seed_record(f"s{s}_{c:02d}", c) for c in range(17)]) for s in range(6)]
    # As inside a job: reporting() makes SIGTERM only set a flag, and the workers are forked from it.
    script = """
import signal, sys
from pathlib import Path
from jobs.scoring.filtering import filter_generations
from jobs.scoring.config import FilterConfig
signal.signal(signal.SIGTERM, lambda *_: None)
paths = [Path(p) for p in sys.argv[1:]]
filter_generations(paths, paths[0].parent / "out" / "f.json", FilterConfig(verifier="json:loads"), 42, 16, workers=2)
"""
    result = run_cli("-c", script, *map(str, shards), timeout=120)
    assert result.returncode == 1 and "TypeError" in result.stderr, result.stderr
    assert not (tmp_path / "out" / "f.json").exists()


REWARD_DATA = Path(__file__).parent / "data" / "rewards"
# tests/data/rewards/expected.yaml's seed004 totals: a1 3, 2, 1; a2 0.5, 0.75, 1; a3 3, 3; a4 2, 0, 1.
SEED004_REWARDS = [
    RewardConfig("correctness", 2.0), RewardConfig("format", 0.5, {"tags": ["reasoning", "answer"]}),
    RewardConfig("tag_count", 1.0, {"tags": ["reasoning", "answer"]}),
]


def test_reward_judged_filtering_and_category_weights(tmp_path: Path) -> None:
    config = FilterConfig(strategy="all", verifier="numeric", reward=RewardFilterConfig(SEED004_REWARDS, threshold=1.0),
                          category_weights={"mastered": 0.1})
    stats = filter_generations([REWARD_DATA / "seed004.jsonl"], tmp_path / "f.json", config, 42, 3)
    samples = json.loads((tmp_path / "f.json").read_text())
    # Totals of at least 1 count as correct, whatever the verifier says: a1's third answer (6) and
    # a2's third (6, truth 7) are wrong but reach 1.0; highest totals first.
    assert [(s["id"], s["reward"], s["category"], s["weight"]) for s in samples] == [
        ("a1_sol0", 3.0, "mastered", 0.1), ("a1_sol1", 2.0, "mastered", 0.1), ("a1_sol2", 1.0, "mastered", 0.1),
        ("a2_sol0", 1.0, "learning_zone", 1.0),
        ("a3_sol0", 3.0, "mastered", 0.1), ("a3_sol1", 3.0, "mastered", 0.1),
        ("a4_sol0", 2.0, "learning_zone", 1.0), ("a4_sol1", 1.0, "learning_zone", 1.0),
    ], "a category not in category_weights weighs 1.0"
    assert samples[2]["rewards"] == {"correctness": 0.0, "format": 1.0, "tag_count": 0.5}
    assert samples[2]["response"].endswith("<answer>6</answer>") and samples[2]["answer_prediction"] == "6"
    assert stats["total_correct"] == 8 and stats["reward_failures"] == {
        name: {"failed": 0, "first_error": None} for name in ("correctness", "format", "tag_count")}
    filter_generations([REWARD_DATA / "seed004.jsonl"], tmp_path / "g.json", FilterConfig(strategy="all", verifier="numeric"), 42, 3)
    judged = json.loads((tmp_path / "g.json").read_text())
    assert [(s["id"], s["answer_prediction"]) for s in judged] == [
        ("a1_sol0", "5"), ("a1_sol1", "5"), ("a3_sol0", "4"), ("a3_sol1", "4"), ("a4_sol0", "- so 12"),
    ], "the verifier's verdicts, shortest first"
    assert all("weight" not in s and "reward" not in s for s in judged), "both are off by default"


def unscored_x(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]:
    """A user's reward (tests.test_filter:unscored_x) that cannot score problems whose id starts with x."""
    pid = columns["id"][0]
    if str(pid).startswith("x"):
        raise RuntimeError(f"no score for {pid}")
    return [1.0] * len(completions)


def test_reward_failures_add_up_across_worker_processes(tmp_path: Path) -> None:
    shards = [
        write_shard(tmp_path / "a.jsonl", [seed_record("x1", 1, k=2), seed_record("g1", 1, k=2)]),
        write_shard(tmp_path / "b.jsonl", [seed_record("g2", 1, k=3), seed_record("x2", 1, k=3)]),
    ]
    reward = RewardFilterConfig([RewardConfig("tests.test_filter:unscored_x"), RewardConfig("tag_count", 0.5)], threshold=1.0)
    stats = filter_generations(shards, tmp_path / "out" / "f.json", FilterConfig(strategy="all", reward=reward), 42, 3, workers=2)
    expected = {"unscored_x": {"failed": 5, "first_error": "RuntimeError: no score for x1"},
                "tag_count": {"failed": 0, "first_error": None}}
    assert stats["reward_failures"] == expected, "summed over both shards, the first error of the first shard"
    assert json.loads((tmp_path / "out" / "f_stats.json").read_text())["reward_failures"] == expected
    # x1 and x2 score 0.5 (tag_count's <think> pair only): below the threshold, never kept.
    assert {s["original_id"] for s in json.loads((tmp_path / "out" / "f.json").read_text())} == {"g1", "g2"}


def test_a_bad_reward_fails_before_any_shard_is_read(tmp_path: Path) -> None:
    reward = RewardFilterConfig([RewardConfig("tag_count", params={"tags": "think"})])
    with pytest.raises(ValueError, match="parameter 'tags' of reward 'tag_count'"):
        filter_generations([tmp_path / "missing.jsonl"], tmp_path / "f.json", FilterConfig(reward=reward), 42, 3)
