"""Bad config, bad data, bad overrides: one clear line, exit 2, no traceback, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli, small_config, write_config


def assert_refused(result, *expected: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for text in expected:
        assert text in lines[0], lines[0]


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
    assert_refused(run_cli("-m", "pipeline.run", str(tmp_path / "nope.yaml")), "nope.yaml: config file not found")


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
]


@pytest.mark.parametrize(("name", "text", "where", "why"), DATA_CASES)
def test_bad_data(tiny_assets: Path, tmp_path: Path, name: str, text: str, where: str, why: str) -> None:
    data = tmp_path / name
    data.write_text(text)
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "c.yaml", small_config(tiny_assets, runs, data={"train": str(data)}))
    assert_refused(run_cli("-m", "pipeline.run", str(config)), f"{data}{where}", why)
    assert not runs.exists()


@pytest.mark.parametrize(("sound", "why"), [("../secret.wav", "is outside generate.media_dir"), ("missing.wav", "not found")])
def test_media_outside_the_media_folder_or_missing(tiny_assets: Path, tmp_path: Path, sound: str, why: str) -> None:
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.wav").write_bytes(b"RIFF")
    (tmp_path / "secret.wav").write_bytes(b"RIFF")
    data = tmp_path / "audio.jsonl"
    data.write_text("\n".join([_problem(1, sound="a.wav"), _problem(2, sound=sound)]) + "\n")
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "c.yaml", small_config(tiny_assets, runs, data={"train": str(data)},
                                                            generate={"backend": "vllm", "media_dir": str(media)}))
    assert_refused(run_cli("-m", "pipeline.run", str(config)), f"{data}: problem 'p2': sound", why)
    assert not runs.exists()


@pytest.mark.parametrize(("split", "generate", "key"), [
    ("train", {}, "generate.backend is transformers"),
    ("heldout", {"backend": "vllm", "media_dir": True}, "eval.backend is transformers"),
    ("train", {"backend": "vllm"}, "set generate.media_dir"),
])
def test_media_where_the_backend_cannot_take_them(tiny_assets: Path, tmp_path: Path, split: str, generate: dict, key: str) -> None:
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.wav").write_bytes(b"RIFF")
    data = tmp_path / "audio.jsonl"
    data.write_text("\n".join([_problem(1), _problem(2, sound="a.wav")]) + "\n")
    if generate.get("media_dir"):
        generate = {**generate, "media_dir": str(media)}
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "c.yaml", small_config(tiny_assets, runs, data={split: str(data)}, generate=generate))
    assert_refused(run_cli("-m", "pipeline.run", str(config)), f"{data}: problem 'p2' has media", key)
    assert not runs.exists()


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


def test_slurm_run_where_there_is_no_slurm(tiny_assets: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "slurm.yaml", small_config(tiny_assets, runs, executor={"cluster": "slurm"}))
    # A machine without SLURM's commands: none on PATH.
    without_slurm = {**os.environ, "PATH": str(tmp_path)}
    for extra in ([], ["--dry-run"]):
        result = subprocess.run([sys.executable, "-m", "pipeline.run", str(config), *extra], cwd=ROOT, env=without_slurm,
                                capture_output=True, text=True, check=False)
        assert_refused(result, "executor.cluster: slurm, but sbatch, srun, sacct not found", "executor.cluster=local")
    assert not runs.exists()
