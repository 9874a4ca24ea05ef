"""tools/evaluate.py: any model folder on any data file, judged by a config's verifier and rewards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.problems.data import write_jsonl
from tests.conftest import small_config, write_config
from tools import evaluate


def test_evaluate_judges_with_the_configs_verifier_and_scores_its_rewards(tiny_assets: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # The regex verifier takes the truth as a pattern: "(?s).*" accepts any answer, "(?!)" none, so a
    # random model scores exactly 50 %, and the correctness reward (the config's verifier) agrees.
    data = tmp_path / "data.jsonl"
    write_jsonl(data, [{"id": f"q{i}", "question": f"{i}+1=?", "answer": "(?s).*" if i % 2 else "(?!)"} for i in range(4)])
    config = write_config(tmp_path / "config.yaml", small_config(
        tiny_assets, tmp_path / "runs", filter={"verifier": "regex"}, grpo={"rewards": [{"name": "correctness"}]}, method="grpo"))
    output = tmp_path / "out"
    argv = [str(tiny_assets / "random_init"), str(data), "--config", str(config), "--max-tokens", "4", "--output", str(output), "--json"]
    assert evaluate.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    (model,) = result["models"]
    assert result["verifier"] == "regex"
    assert (model["accuracy"], model["correct"], model["problems"]) == (0.5, 2, 4)
    assert model["rewards"] == {"correctness": {"mean": 0.5, "scored": 4}}
    predictions = [json.loads(line) for line in Path(model["predictions"]).read_text().splitlines()]
    assert [p["correct"] for p in predictions] == [False, True, False, True]


@pytest.mark.unit
@pytest.mark.parametrize(("argv", "message"), [
    (["MODEL", "missing.jsonl"], "missing.jsonl"),
    (["NOT_A_MODEL", "DATA"], "not a model folder (no config.json in it)"),
    (["MODEL", "DATA", "--verifier", "nope"], "--verifier: "),
    (["MODEL", "DATA", "--config", "NOT_A_MODEL"], "--config: "),
    (["MODEL", "DATA", "--max-tokens", "0"], "--max-tokens: must be at least 1"),
])
def test_evaluate_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    write_jsonl(tmp_path / "data.jsonl", [{"id": "q", "question": "1+1=?", "answer": "2"}])
    paths = {"MODEL": str(model), "DATA": str(tmp_path / "data.jsonl"), "NOT_A_MODEL": str(tmp_path)}
    assert evaluate.main([paths.get(arg, arg) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
