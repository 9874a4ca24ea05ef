"""The filter benchmark at a tiny size: it runs, checks the filter's count, and prints its figures."""

from __future__ import annotations

import re
from pathlib import Path

from jobs.scoring.answers import extract
from jobs.scoring.filtering import read_generations
from jobs.scoring.verifiers import multiple_choice
from tests.conftest import run_cli
from tools.bench.filter_bench import write_shards


def test_synthetic_shards_are_generations_with_known_correct_counts(tmp_path: Path) -> None:
    paths, total_correct = write_shards(tmp_path, 64, 16, 1000, 2)
    records = [record for path in paths for _, record in read_generations(path)]
    assert [r["id"] for r in records] == ["p0000000", "p0000001", "p0000002", "p0000003"]
    assert {len(r["candidates"]) for r in records} == {16}
    assert all(900 <= len(c["raw_output"]) <= 1000 for r in records for c in r["candidates"])
    judged = sum(multiple_choice(extract(c["raw_output"]).answer_prediction, r["ground_truth"]) for r in records for c in r["candidates"])
    assert judged == total_correct, "every synthetic right answer is right and every wrong one wrong"


def test_tiny_benchmark_run() -> None:
    result = run_cli("tools/bench/filter_bench.py", "--candidates", "320", "640", "--repeat", "1")
    # Exit 0 also means the filter found exactly the correct candidates the shards hold.
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if re.match(r"\s+(320|640) ", line)]
    assert len(rows) == 4, result.stdout  # wall and CPU rows per size
    assert "target filter peak RSS < 1 GiB: met" in result.stdout
    assert re.search(r"verifier math\s+[\d.]+ µs", result.stdout)
