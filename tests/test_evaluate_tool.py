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
    (["NOT_A_MODEL", "DATA"], "MODEL_DIR: {tmp}/data.jsonl is a file"),
    (["EMPTY_FOLDER", "DATA"], "MODEL_DIR: {tmp}/empty is an empty folder"),
    (["NO_WEIGHTS", "DATA"], "MODEL_DIR: {tmp}/no_weights has no weights"),
    (["MODEL", "DATA", "--verifier", "nope"], "--verifier: "),
    (["MODEL", "DATA", "--config", "EMPTY_FOLDER"], "--config: {tmp}/empty: not a run directory"),
    (["MODEL", "DATA", "--max-tokens", "0"], "--max-tokens: must be at least 1"),
    (["MODEL", "DATA", "--output", "DATA"], "--output: {tmp}/data.jsonl is a file; give a folder"),
    (["MODEL", "DATA", "--output", "UNDER_A_FILE"], "--output: {tmp}/data.jsonl is a file, so"),
    (["MODEL", "DATA", "--rewards", "no.such.module:reward"], "cannot import reward 'no.such.module:reward'"),
])
def test_evaluate_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    model, no_weights = tmp_path / "model", tmp_path / "no_weights"
    for folder in (model, no_weights, tmp_path / "empty"):
        folder.mkdir()
    for folder in (model, no_weights):
        (folder / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    data = tmp_path / "data.jsonl"
    write_jsonl(data, [{"id": "q", "question": "1+1=?", "answer": "2"}])
    paths = {"MODEL": model, "DATA": data, "NOT_A_MODEL": data, "EMPTY_FOLDER": tmp_path / "empty", "NO_WEIGHTS": no_weights,
             "UNDER_A_FILE": data / "out"}
    assert evaluate.main([str(paths.get(arg, arg)) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(tmp=tmp_path) in err, err
