"""Bad config, bad data, bad overrides: one clear line, exit 2, no traceback, nothing written."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from jobs.scoring import filter_cli, score_cli
from pipeline import run
from tests.conftest import run_cli, small_config, tree_snapshot, write_config


def assert_refused(result, *expected: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for text in expected:
        assert text in lines[0], lines[0]


def run_in_process(main: Callable[[list[str]], int], argv: list[str], capsys: pytest.CaptureFixture[str],
                   unchanged: Path) -> subprocess.CompletedProcess[str]:
    """``main(argv)`` reported as run_cli reports a command, without starting an interpreter (a
    traceback fails the test); nothing under ``unchanged`` may have been written."""
    before = tree_snapshot(unchanged)
    code = main(argv)
    captured = capsys.readouterr()
    assert tree_snapshot(unchanged) == before, "nothing may be written for bad input"
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


def run_config(assets: Path, folder: Path, change: dict[str, Any], name: str = "c.yaml") -> Path:
    """The small config with ``change`` (section by section), "{tmp}" in its values standing for ``folder``."""
    config = small_config(assets, folder / "runs")
    for key, value in json.loads(json.dumps(change).replace("{tmp}", str(folder))).items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    return write_config(folder / name, config)


# Through the command line, one case of each kind: the schema, a section's own rule, a rule spanning
# sections, the command line. Every rule has its case in tests/unit/test_config.py (in process).
CONFIG_CASES = [
    ({"generate": {"num_sampels": 8}}, [], ["generate.num_sampels: unknown key", "generate.num_samples"]),
    ({"filter": {"answer_pattern": "ANSWER: ([0-9]+"}}, [], ["filter.answer_pattern", "not a valid regular expression"]),
    ({"method": "grpo", "grpo": {"num_generations": 4, "batch_size": 3}}, [],
     ["grpo.batch_size: the generation batch", "= 3) must be a multiple of grpo.num_generations (4)"]),
    ({}, ["generate.no_such_key=1"], ["command line", "generate.no_such_key: unknown key"]),
]


@pytest.mark.parametrize(("change", "overrides", "expected"), CONFIG_CASES)
def test_bad_config(tiny_assets: Path, tmp_path: Path, change, overrides, expected) -> None:
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "bad.yaml", small_config(tiny_assets, runs, **change))
    result = run_cli("-m", "pipeline.run", str(config), *overrides)
    file_expected = [] if overrides else [str(config)]
    assert_refused(result, *expected, *file_expected)
    assert not runs.exists(), "nothing may be written for a bad config"


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("run_name: x\ngenerate:\n  num_samples: [1, 2\n")
    assert_refused(run_cli("-m", "pipeline.run", str(config)), f"{config}:", "invalid YAML")


def test_missing_config_file(tmp_path: Path) -> None:
    assert_refused(run_cli("-m", "pipeline.run", str(tmp_path / "nope.yaml")), "nope.yaml: file not found")


# In process: (change to the small config, extra arguments, words of the one line); "{tmp}" is the
# test's folder (the small config's data files are in it). Nothing may be printed before the line.
RUN_CASES = [
    pytest.param({"data": {"train": "{tmp}"}}, [], ["data.train: {tmp} is a folder"], id="data.train a folder"),
    pytest.param({"data": {"heldout": "{tmp}"}}, [], ["data.heldout: {tmp} is a folder"], id="data.heldout a folder"),
    pytest.param({"data": {"heldout": "{tmp}/train_small.jsonl"}}, [],
                 ["data.heldout: {tmp}/train_small.jsonl holds the same problems as data.train"], id="held-out is train"),
    pytest.param({"runs_dir": "{tmp}/train_small.jsonl"}, [], ["runs_dir: {tmp}/train_small.jsonl is a file"], id="runs_dir a file"),
    pytest.param({"runs_dir": "{tmp}/train_small.jsonl/runs"}, ["--dry-run"],
                 ["runs_dir: {tmp}/train_small.jsonl is a file, so {tmp}/train_small.jsonl/runs/small cannot be made"],
                 id="runs_dir under a file, dry run"),
    pytest.param({"train": {"learning_rates": [1e-3, 1e-3, 1e-3]}}, [],
                 ["train.learning_rates: has 3 entries but num_iterations is 2"], id="more learning rates than iterations"),
    pytest.param({"train": {"max_steps": -5}}, [], ["train.max_steps: is -5"], id="negative max_steps"),
    pytest.param({"method": "grpo", "grpo": {"rollouts": "arrays", "max_staleness": 1}, "executor": {"cluster": "slurm"}}, ["--detach"],
                 ["grpo.max_staleness: 1 overlaps rounds", "without --detach"], id="overlapping rounds detached"),
    pytest.param({}, ["train.learning_rates=[1e-3,", "2e-3]"],
                 ["command line: 'train.learning_rates=[1e-3,': not a YAML value", "quote the whole argument"],
                 id="a list the shell split"),
    pytest.param({}, ['run_name="small'], ["command line: 'run_name=\"small': not a YAML value"], id="an unbalanced quote"),
    pytest.param({}, ["train.learning_rates=[1e-3, x]"], ["command line: train.learning_rates[1]"], id="an override's list item"),
]


@pytest.mark.parametrize(("change", "arguments", "expected"), RUN_CASES)
def test_bad_run_input(tiny_assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, Any],
                       arguments: list[str], expected: list[str]) -> None:
    config = run_config(tiny_assets, tmp_path, change)
    result = run_in_process(run.main, [str(config), *arguments], capsys, tmp_path)
    assert_refused(result, *(text.replace("{tmp}", str(tmp_path)) for text in expected),
                   *([] if any("=" in a for a in arguments) else [str(config)]))
    assert result.stdout == ""


def test_a_config_path_that_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_refused(run_in_process(run.main, [str(tmp_path)], capsys, tmp_path), f"{tmp_path}: is a folder")


@pytest.mark.parametrize(("section", "added", "key"), [("\ngenerate:\n", "\ngenerate:\n  max_tokens: 5\ngenerate:\n", "generate"),
                                                       ("\nfilter:\n", "\nfilter:\n  top_k: 2\n  top_k: 3\n", "  top_k")])
def test_yaml_keys_given_twice(tiny_assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], section: str, added: str,
                               key: str) -> None:
    """A second ``generate:`` section would replace the first (yaml.safe_load keeps the last)."""
    config = run_config(tiny_assets, tmp_path, {})
    text = config.read_text().replace(section, added, 1)
    config.write_text(text)
    first, second = [number for number, line in enumerate(text.splitlines(), start=1) if line.startswith(f"{key}:")]
    assert_refused(run_in_process(run.main, [str(config)], capsys, tmp_path), f"{config}:{second}:",
                   f"{key.strip()!r} is given twice, on lines {first} and {second}")


def test_a_damaged_config_in_an_existing_run(tiny_assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = run_config(tiny_assets, tmp_path, {})
    stored = tmp_path / "runs" / "small" / "config.yaml"
    stored.parent.mkdir(parents=True)
    stored.write_text("run_name: small\nmodel: {path: [\n")
    assert_refused(run_in_process(run.main, [str(config)], capsys, tmp_path), f"{stored}:3: invalid YAML",
                   "the run's stored config is damaged: restore it, or start a new run with run_name=NEW_NAME")


@pytest.fixture
def generations(tmp_path: Path) -> Path:
    path = tmp_path / "generations.jsonl"
    candidates = [{"raw_output": "ANSWER: 2"}, {"raw_output": "ANSWER: 3"}]
    path.write_text(json.dumps({"id": "p1", "question": "1+1=?", "ground_truth": "2", "candidates": candidates}) + "\n")
    return path


@pytest.mark.parametrize(("main", "arguments", "expected"), [
    (score_cli.main, ["--rewards", "correctness", "--output", "{tmp}"], "--output: {tmp} is a folder"),
    (score_cli.main, ["--rewards", "correctness", "--output", "{tmp}/generations.jsonl/scored.jsonl"],
     "--output: {tmp}/generations.jsonl is a file"),
    (score_cli.main, ["--rewards", "correctness:heavy", "--output", "{tmp}/scored.jsonl"],
     "--rewards: 'correctness:heavy': a weight is a number, as in correctness:2 (got 'heavy')"),
    (filter_cli.main, ["--output", "{tmp}"], "--output: {tmp} is a folder"),
], ids=["score --output a folder", "score --output under a file", "score --rewards weight", "filter --output a folder"])
def test_bad_scoring_options(tmp_path: Path, capsys: pytest.CaptureFixture[str], generations: Path, main: Callable[[list[str]], int],
                             arguments: list[str], expected: str) -> None:
    argv = ["--generations", str(generations), *(a.replace("{tmp}", str(tmp_path)) for a in arguments)]
    assert_refused(run_in_process(main, argv, capsys, tmp_path), expected.replace("{tmp}", str(tmp_path)))


def _problem(i: int, **extra) -> str:
    # A problem with a clip says where it goes (jobs.problems.data refuses a sound without its <sound> tag).
    tag = "<sound> " if "sound" in extra else ""
    return json.dumps({"id": f"p{i}", "question": f"{tag}{i}+1=?", "answer": str(i + 1), **extra})


DATA_CASES = [
    ("bad.jsonl", "\n".join([_problem(1), "{not json", _problem(3)]), ":2:", "malformed JSON"),
    ("missing.jsonl", "\n".join([_problem(1), json.dumps({"id": "p2", "question": "q"})]), ":2:", "missing field 'answer'"),
    ("dup.jsonl", "\n".join([_problem(1), _problem(2), _problem(1)]), ":3:", "duplicate id 'p1' (first on line 1)"),
    ("array.json", "[\n" + ",\n".join([_problem(1), '{"id": "p2", "answer": "3"}']) + "\n]", ":3:", "missing field 'question'"),
    ("conv.json", json.dumps([{"conversations": [{"from": "human", "value": "q"}]}]), ":1:", "no turn from 'gpt'"),
    ("type.jsonl", json.dumps({"id": "p1", "question": 5, "answer": "1"}), ":1:", "'question' must be a string"),
    ("noq.jsonl", "\n".join([_problem(1), json.dumps({"id": "p2", "question": " ", "answer": "3"})]), ":2:",
     "field 'question' is empty; give the problem's question or remove the problem"),
    ("noa.json", json.dumps([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}]), ":1:",
     "field 'answer' is empty"),
]


@pytest.mark.parametrize(("name", "text", "where", "why"), DATA_CASES)
def test_bad_data(tiny_assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, where: str,
                  why: str) -> None:
    data = tmp_path / name
    data.write_text(text)
    config = run_config(tiny_assets, tmp_path, {"data": {"train": str(data)}})
    assert_refused(run_in_process(run.main, [str(config)], capsys, tmp_path), f"{data}{where}", why)


@pytest.mark.parametrize(("sound", "why"), [("../secret.wav", "is outside generate.media_dir"), ("missing.wav", "not found")])
def test_media_outside_the_media_folder_or_missing(tiny_assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   sound: str, why: str) -> None:
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.wav").write_bytes(b"RIFF")
    (tmp_path / "secret.wav").write_bytes(b"RIFF")
    data = tmp_path / "audio.jsonl"
    data.write_text("\n".join([_problem(1, sound="a.wav"), _problem(2, sound=sound)]) + "\n")
    config = run_config(tiny_assets, tmp_path, {"data": {"train": str(data)}, "generate": {"backend": "vllm", "media_dir": str(media)}})
    assert_refused(run_in_process(run.main, [str(config)], capsys, tmp_path), f"{data}: problem 'p2': sound", why)


@pytest.mark.parametrize(("split", "generate", "key"), [
    ("train", {}, "generate.backend is transformers"),
    ("heldout", {"backend": "vllm", "media_dir": True}, "eval.backend is transformers"),
    ("train", {"backend": "vllm"}, "set generate.media_dir"),
])
def test_media_where_the_backend_cannot_take_them(tiny_assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], split: str,
                                                  generate: dict, key: str) -> None:
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.wav").write_bytes(b"RIFF")
    data = tmp_path / "audio.jsonl"
    data.write_text("\n".join([_problem(1), _problem(2, sound="a.wav")]) + "\n")
    if generate.get("media_dir"):
        generate = {**generate, "media_dir": str(media)}
    config = run_config(tiny_assets, tmp_path, {"data": {split: str(data)}, "generate": generate})
    assert_refused(run_in_process(run.main, [str(config)], capsys, tmp_path), f"{data}: problem 'p2' has media", key)


def test_seed_formats_load(tmp_path: Path) -> None:
    from jobs.problems.data import load_problems

    path = tmp_path / "mixed.json"
    path.write_text(
        json.dumps(
            [
                {"id": "sample_001", "sound": "a.wav", "question": "<sound> How many?", "answer": "(A) 3 sounds"},
                {"sound": "b.wav", "conversations": [{"from": "human", "value": "<sound> What?"}, {"from": "gpt", "value": "(B) Piano"}]},
            ],
            indent=2,
        )
    )
    problems = load_problems(path)
    assert problems[0] == {"id": "sample_001", "sound": "a.wav", "question": "<sound> How many?", "answer": "(A) 3 sounds"}
    assert problems[1] == {"id": "mixed_1", "sound": "b.wav", "question": "<sound> What?", "answer": "(B) Piano"}


def test_unicode_line_separators_inside_strings_do_not_end_a_jsonl_line(tmp_path: Path) -> None:
    from jobs.problems.data import load_problems

    path = tmp_path / "scraped.jsonl"
    # ensure_ascii=False writes U+2028, U+0085 and U+001C... as they are; only "\n" ends a JSONL line.
    lines = [json.dumps({"id": f"p{i}", "question": f"a\u2028b\x85c\x1cd {i}", "answer": "1"}, ensure_ascii=False) for i in range(3)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    problems = load_problems(path)
    assert [p["id"] for p in problems] == ["p0", "p1", "p2"] and problems[2]["question"] == "a\u2028b\x85c\x1cd 2"


def test_slurm_run_where_there_is_no_slurm(tiny_assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused; the dry run previews the scripts and says what it could not ask the cluster."""
    config = run_config(tiny_assets, tmp_path, {"executor": {"cluster": "slurm"}})
    # A machine without SLURM's commands: none on PATH.
    monkeypatch.setenv("PATH", str(tmp_path))
    assert_refused(run_in_process(run.main, [str(config)], capsys, tmp_path),
                   "executor.cluster: slurm, but sbatch, srun, sacct not found", "executor.cluster=local")
    preview = run_in_process(run.main, [str(config), "--dry-run"], capsys, tmp_path)
    assert preview.returncode == 0 and "not found on this machine" in preview.stdout and "dry run: nothing submitted" in preview.stdout
