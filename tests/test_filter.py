"""Answer extraction, the seed's learning-zone table, strategies, and re-filtering seed files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.answers import extract, multiple_choice, numeric
from jobs.filter import (
    categorize,
    category_ranges,
    filter_generations,
    keep_count,
    main,
)
from jobs.specs import FilterConfig
from state import InputError

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


@pytest.mark.parametrize(
    ("raw", "thinking", "answer"),
    [
        ("<think>I hear...</think>\nANSWER: 3 sounds", "I hear...", "3 sounds"),
        ("<think>a\nb</think>\n<answer>(B) Piano</answer>", "a\nb", "(B) Piano"),
        ("no tags, the answer is 42.", "", "42."),
        ("<think>x</think>\nfirst line\nlast line", "x", "last line"),
        ("<think>unfinished reasoning", "", "<think>unfinished reasoning"),
    ],
)
def test_extraction(raw: str, thinking: str, answer: str) -> None:
    extracted = extract(raw)
    assert (extracted.thinking_prediction, extracted.answer_prediction) == (thinking, answer)


@pytest.mark.parametrize(
    ("prediction", "truth", "ok"),
    [
        ("3 sounds", "(A) 3 sounds", True), ("A", "(A) 3 sounds", True), ("(B) Piano", "(B) Piano", True),
        ("piano", "(B) Piano", True), ("B", "(A) 3 sounds", False), ("(C) Violin", "(B) Piano", False),
        ("", "(A) 3 sounds", False), ("guitar", "(B) Piano", False),
    ],
)
def test_multiple_choice(prediction: str, truth: str, ok: bool) -> None:
    assert multiple_choice(prediction, truth) is ok


@pytest.mark.parametrize(
    ("prediction", "truth", "ok"),
    [("933", "933", True), ("1,234", "1234", True), ("-5", "#### -5", True), ("93", "933", False), ("", "1", False), ("0.5", "1/2", True)],
)
def test_numeric(prediction: str, truth: str, ok: bool) -> None:
    assert numeric(prediction, truth) is ok


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


def test_truncated_shard_and_duplicate_ids_are_errors(tmp_path: Path) -> None:
    good = json.dumps(seed_record("a", 3)) + "\n"
    torn = tmp_path / "torn.jsonl"
    torn.write_text(good + json.dumps(seed_record("b", 3))[:50])
    with pytest.raises(InputError, match=r"torn.jsonl:2: truncated last line"):
        filter_generations([torn], tmp_path / "f.json", FilterConfig(), 42, 16)
    dup = tmp_path / "dup.jsonl"
    dup.write_text(good)
    with pytest.raises(InputError, match="duplicate problem id 'a'"):
        filter_generations([dup, dup], tmp_path / "f.json", FilterConfig(), 42, 16)
    assert not (tmp_path / "f.json").exists(), "a failed filter writes no output"


def test_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--generations", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "f.json")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing.jsonl'}: file not found"
