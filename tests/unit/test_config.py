"""The config's rules, in process: each section's own rules, the rules spanning sections
(pipeline.rules), renamed keys and the normalization of a run's stored config."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobs.scoring.config import FilterConfig
from jobs.training.config import GrpoConfig, TrainConfig
from pipeline.config import (
    RunConfig,
    differences,
    dump_yaml,
    load_config,
    read_run_config,
    with_defaults,
)
from pipeline.planning.stages import stage_resources
from pipeline.rules import check_config, check_run, check_vllm_installed, used_sections
from state import InputError
from tests.conftest import small_config

pytestmark = pytest.mark.unit


@pytest.fixture
def assets(tmp_path: Path) -> Path:
    """The files a small config names (their contents are never read by the rules)."""
    folder = tmp_path / "assets"
    (folder / "random_init").mkdir(parents=True)
    for number, name in enumerate(("train.jsonl", "heldout.jsonl", "warmstart.jsonl"), start=1):
        (folder / name).write_text(f'{{"id": "p1", "question": "{number}+1=?", "answer": "{number + 1}"}}\n')
    return folder


def load(tmp_path: Path, assets: Path, overrides: list[str] = (), check: Callable[[RunConfig], None] = check_config, **change: Any):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(small_config(assets, tmp_path / "runs", **change)))
    return path, load_config(path, list(overrides), check=check)


# (change to the config, override args, expected words in the error line)
CASES = [
    ({"generate": {"num_sampels": 8}}, [], ["generate.num_sampels: unknown key", "generate.num_samples"]),
    ({"generate": {"num_samples": "lots"}}, [], ["generate.num_samples", "valid integer", "'lots'"]),
    ({"filter": {"top_k": 0}}, [], ["filter.top_k", "greater than or equal to 1"]),
    ({"generate": {"temperature": -0.5}}, [], ["generate.temperature", "greater than or equal to 0"]),
    ({"learning_rates": [1e-3]}, [], ["train.learning_rates: has 1 entries but ReST iteration 2 needs one", "num_iterations is 2"]),
    ({"filter": {"strategy": "best_of"}}, [], ["filter.strategy", "'best_of'"]),
    ({"model": {"path": "/nonexistent/model"}}, [], ["model.path", "/nonexistent/model"]),
    ({"filter": {"verifier": "nosuchmodule:fn"}}, [], ["filter.verifier", "nosuchmodule"]),
    ({"filter": {"answer_pattern": "ANSWER: ([0-9]+"}}, [], ["filter.answer_pattern", "not a valid regular expression"]),
    ({"filter": {"zone_bounds": [0.5, 0.25, 0.9]}}, [], ["filter.zone_bounds: must rise within (0, 1]", "[0.5, 0.25, 0.9]"]),
    # Values reach #SBATCH lines and paths: nothing may smuggle in a shell command.
    ({"executor": {"generate": {"partition": "gpu\ntouch /tmp/pwned"}}}, [], ["executor.generate.partition", "line breaks"]),
    ({"executor": {"train": {"extra_sbatch": {"x\necho": "1"}}}}, [], ["executor.train.extra_sbatch", "sbatch option name"]),
    ({"run_name": "demo$(touch /tmp/pwned)"}, [], ["run_name: may hold only letters"]),
    ({"generate": {"backend": "vllm", "media_dir": "/nonexistent/media"}}, [], ["generate.media_dir: /nonexistent/media is not a folder"]),
    ({"generate": {"endpoints": ["http://127.0.0.1:8000"]}}, [], ["generate.endpoints: used by generate.backend: vllm only"]),
    ({"generate": {"backend": "vllm", "vllm": {"lora": True}}, "train": {"method": "full"}}, [],
     ["generate.vllm.lora: serves each iteration's LoRA adapter, but train.method is full"]),
    # Training combinations that cannot work (the small config trains with QLoRA settings, no GPU).
    ({"train": {"strategy": "zero3", "load_in_4bit": True}}, [], ["train.strategy: zero3 shards the weights", "QLoRA", "load_in_4bit: false"]),
    ({"train": {"strategy": "zero2"}}, [], ["train.strategy: zero2 (DeepSpeed) needs a GPU per process", "gpus_per_task"]),
    ({"train": {"strategy": "zero2"}, "executor": {"train": {"gpus_per_task": 1}}}, [],
     ["train.strategy: zero2 needs DeepSpeed, which is not installed"]),
    ({"train": {"strategy": "fsdp"}}, [], ["train.strategy", "'fsdp'"]),
    ({"train": {"deepspeed_config": "configs/deepspeed/zero2.json"}}, [], ["train.deepspeed_config: only read with a DeepSpeed strategy"]),
    ({"train": {"strategy": "zero2", "deepspeed_config": "README.md"}}, [], ["train.deepspeed_config: README.md:1: not valid JSON"]),
    ({"train": {"report_to": ["wandb"]}}, [], ["train.report_to: wandb is not installed here (pip install wandb)"]),
    ({"train": {"save_merged": False}}, [], ["train.save_merged", "train.method: lora"]),
    # Rewards and services.
    ({"filter": {"reward": {"rewards": [{"name": "nosuch"}]}}}, [],
     ["filter.reward.rewards[0]: unknown reward 'nosuch'", "correctness", "tag_count", "package.module:function"]),
    ({"filter": {"reward": {"rewards": [{"name": "correctness", "weight": "heavy"}]}}}, [],
     ["filter.reward.rewards[0].weight", "valid number", "'heavy'"]),
    ({"filter": {"reward": {"rewards": [{"name": "tag_count", "tags": 5}]}}}, [],
     ["filter.reward.rewards[0]: parameter 'tags' of reward 'tag_count'", "(got 5)"]),
    ({"filter": {"reward": {"rewards": [{"name": "tag_count", "tag": ["a"]}]}}}, [],
     ["filter.reward.rewards[0]: reward 'tag_count' has no parameter 'tag'", "tags"]),
    ({"filter": {"reward": {"rewards": [{"name": "service_score"}]}}}, [],
     ["filter.reward.rewards[0]: reward 'service_score' calls the service 'reward', but services.reward is not configured"]),
    ({"services": {"reward": {"model": "/nonexistent/listener", "kind": "yes_probability"}}}, [],
     ["services.reward.model: /nonexistent/listener is not a folder"]),
    ({"services": {"reward": {"model": "m", "kind": "judge"}}}, [], ["services.reward.kind", "'judge'"]),
    ({"filter": {"category_weights": {"learning_zon": 1.5}}}, [], ["filter.category_weights", "learning_zon"]),
    ({"executor": {"genrate": {"cpus_per_task": 2}}}, [], ["executor.genrate: no stage or service of that name", "executor.generate"]),
    # GRPO.
    ({"method": "grpo", "grpo": {"num_generations": 1}}, [], ["grpo.num_generations", "greater than or equal to 2"]),
    ({"method": "grpo", "grpo": {"num_generations": 4, "batch_size": 3}}, [],
     ["grpo.batch_size: the generation batch", "= 3) must be a multiple of grpo.num_generations (4)"]),
    ({"method": "grpo", "grpo": {"beta": -0.1}}, [], ["grpo.beta", "greater than or equal to 0"]),
    ({"method": "grpo", "grpo": {"rewards": [{"name": "corectness"}]}}, [], ["grpo.rewards[0]", "corectness", "correctness"]),
    ({"method": "grpo", "grpo": {"vllm_mode": "server"}, "executor": {"train": {"gpus_per_task": 1}}}, [],
     ["grpo.vllm_mode: server on a one-node job", "none is left to train on"]),
    ({"method": "grpo", "grpo": {"pass_rate_band": [0.2, 1.5]}}, [], ["grpo.pass_rate_band", "1.5"]),
    ({"method": "grpo", "grpo": {"rollouts": "arrays"}, "generate": {"backend": "vllm", "endpoints": ["http://h:8000"]}}, [],
     ["grpo.rollouts: arrays", "generate.endpoints", "log-probabilities"]),
    ({"method": "grpo", "grpo": {"rollouts": "arrays", "pass_rate_band": [0.1, 0.9]}}, [], ["grpo.rollouts: arrays", "grpo.pass_rate_band"]),
    ({"method": "grpo", "grpo": {"rollouts": "arrays"}, "train": {"init_from": "base"}}, [], ["grpo.rollouts: arrays", "train.init_from: base"]),
    ({"method": "grpo", "grpo": {"pass_rate_band": [0.8, 0.2]}}, [], ["grpo.pass_rate_band: the low bound is above the high one"]),
    ({"method": "grpo", "grpo": {"rollouts": "arrays", "problems_per_round": 8, "oversample": 0.5}}, [],
     ["grpo.oversample", "greater than or equal to 1"]),
    ({"method": "grpo", "grpo": {"rollouts": "arrays", "oversample": 2}}, [], ["grpo.oversample: 2", "grpo.problems_per_round"]),
    ({"method": "grpo", "grpo": {"rollouts": "arrays", "problems_per_round": 1, "batch_size": 8}}, [],
     ["grpo.problems_per_round: a round of 1 problems x 4 samples", "one generation batch (8"]),
    ({"method": "grpo", "grpo": {"loss_type": "cispo"}}, [], ["grpo.loss_type", "'cispo'", "'dapo'"]),
    ({"method": "grpo", "grpo": {"rollouts": "arrays", "max_staleness": -1}}, [], ["grpo.max_staleness", "greater than or equal to 0"]),
    ({"method": "grpo", "grpo": {"max_staleness": 1}}, [], ["grpo.max_staleness: 1", "grpo.rollouts: arrays"]),
    ({"schedule": ["rest", "ppo"]}, [], ["schedule", "'ppo'"]),
    ({"schedule": ["rest"]}, [], ["schedule: has 1 entries but num_iterations is 2"]),
    ({}, ["generate.num_samples=-1"], ["command line", "generate.num_samples"]),
    ({}, ["generate.no_such_key=1"], ["command line", "generate.no_such_key: unknown key"]),
    ({}, ["num_iterations"], ["command line", "key.sub_key=value"]),
    # Counts and lists that cannot mean what they say.
    ({"train": {"max_steps": -5}}, [], ["train.max_steps: is -5", "or -1 to train train.num_epochs epochs"]),
    ({"train": {"max_steps": 0}}, [], ["train.max_steps: is 0"]),
    # Paths that cannot be what they name (relative ones resolve against the checkout, where the tests run).
    ({}, ["runs_dir=README.md"], ["runs_dir: ", "README.md is a file", "README.md/small cannot be made under it"]),
    # The command line: a value the shell split or left unquoted is blamed on its argument.
    ({}, ["train.learning_rates=[1e-3,", "2e-3]"], ["command line: 'train.learning_rates=[1e-3,': not a YAML value",
                                                   "quote the whole argument"]),
    ({}, ['run_name="small'], ["command line: 'run_name=\"small': not a YAML value"]),
    ({}, ["generate={num_samples: 2, num_samples: 3}"], ["command line: 'generate={num_samples: 2, num_samples: 3}'",
                                                         "'num_samples' is given twice"]),
    ({}, ["train.learning_rates=[1e-3, x]"], ["command line: train.learning_rates[1]", "(got 'x')"]),
    ({}, ["generate={num_samples: 0}"], ["command line: generate.num_samples", "greater than or equal to 1"]),
    ({}, ["train.max_steps=-5"], ["command line: train.max_steps: is -5"]),
]


@pytest.mark.parametrize(("change", "overrides", "expected"), CASES)
def test_a_bad_config_is_one_line_naming_the_file_or_command_line_and_the_key(
    tmp_path: Path, assets: Path, change: dict[str, Any], overrides: list[str], expected: list[str]
) -> None:
    with pytest.raises(InputError) as refused:
        load(tmp_path, assets, overrides, **change)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("command line: " if overrides else f"{tmp_path / 'run.yaml'}: "), message
    for words in expected:
        assert words in message, message


# Rules added since runs were started: a run started or rerun from the command line (check_run) is
# refused for them; a run's stored config read again to requeue or advance it (check_config) is not.
RUN_CASES = [
    ({"learning_rates": [1e-3, 1e-3, 1e-3]}, ["train.learning_rates: has 3 entries but num_iterations is 2"]),
    ({"data": {"train": "tests"}}, ["data.train: tests is a folder; give a file of problems"]),
    ({"data": {"heldout": "tests"}}, ["data.heldout: tests is a folder"]),
    ({"train": {"load_in_4bit": True}, "executor": {"cluster": "slurm"}}, ["train.load_in_4bit: QLoRA", "asks SLURM for none"]),
]


@pytest.mark.parametrize(("change", "expected"), RUN_CASES)
def test_rules_added_since_runs_started_refuse_a_run_from_the_command_line_only(
    tmp_path: Path, assets: Path, change: dict[str, Any], expected: list[str]
) -> None:
    with pytest.raises(InputError) as refused:
        load(tmp_path, assets, check=check_run, **change)
    for words in expected:
        assert words in str(refused.value), refused.value
    load(tmp_path, assets, **change)  # check_config, as Driver.open applies it


def test_a_held_out_set_that_is_the_training_set_is_refused(tmp_path: Path, assets: Path) -> None:
    """The same file, or another with the same problems: held-out accuracy would measure the training problems."""
    train = tmp_path / "train_small.jsonl"
    copy = tmp_path / "copy.jsonl"
    load(tmp_path, assets)  # writes train_small.jsonl
    copy.write_bytes(train.read_bytes())
    for heldout in (train, copy):
        with pytest.raises(InputError, match=rf"data.heldout: {heldout} holds the same problems as data.train \({train}\)"):
            load(tmp_path, assets, check=check_run, data={"heldout": str(heldout)})
        load(tmp_path, assets, data={"heldout": str(heldout)})


def test_a_python_that_does_not_say_whether_it_has_vllm_is_one_line(tmp_path: Path, assets: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A python that hangs (a stalled network file system) is refused in one line, not a traceback."""
    _, config = load(tmp_path, assets, generate={"backend": "vllm", "vllm": {"python": sys.executable}})

    def hang(command: list[str], **options: Any) -> None:
        raise subprocess.TimeoutExpired(command, options["timeout"])

    monkeypatch.setattr(subprocess, "run", hang)
    with pytest.raises(ValueError, match=rf"^generate.vllm.python: {sys.executable} did not say within 120 s whether it has vLLM"):
        check_vllm_installed(config, used_sections(config))


def test_a_runs_dir_that_cannot_be_written_is_refused(tmp_path: Path, assets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run as root here, where every folder is writable: the permission is taken away in the check's view."""
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked)
    with pytest.raises(InputError, match=rf"runs_dir: cannot write in {locked} \(permission denied\)"):
        load(tmp_path, assets, [f"runs_dir={locked / 'runs'}"])


def test_yaml_keys_given_twice_are_refused_naming_both_lines(tmp_path: Path, assets: Path) -> None:
    """yaml.safe_load keeps the last of two ``generate:`` sections; a config never loses one silently."""
    config = tmp_path / "twice.yaml"
    base = yaml.safe_dump(small_config(assets, tmp_path / "runs"))
    config.write_text(base + "generate:\n  max_tokens: 5\n")
    first = base.splitlines().index("generate:") + 1
    twice = len(base.splitlines()) + 1
    with pytest.raises(InputError, match=rf"^{config}:{twice}: .*'generate' is given twice, on lines {first} and {twice}"):
        load_config(config)
    config.write_text(base.replace("\ngenerate:\n", "\ngenerate:\n  temperature: 0.5\n  temperature: 0.6\n", 1))
    with pytest.raises(InputError, match=rf"^{config}:{first + 2}: .*'temperature' is given twice, on lines {first + 1} and {first + 2}"):
        load_config(config)
    # A merge ("<<: *anchor") may set again what it merged.
    config.write_text(base.replace("\ngenerate:\n", "\ngenerate:\n  <<: {num_samples: 4, max_tokens: 6}\n", 1))
    assert load_config(config).generate.max_tokens == 12


def test_a_config_path_that_is_a_folder_or_unreadable_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=rf"^{tmp_path}: is a folder, not a YAML config file$"):
        load_config(tmp_path)
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(b"\x80\xff")
    with pytest.raises(InputError, match=rf"^{binary}: not UTF-8 text"):
        load_config(binary)


def test_a_damaged_stored_config_is_one_line_saying_what_to_do(tmp_path: Path, assets: Path) -> None:
    stored = tmp_path / "config.yaml"
    stored.write_text("model: [\n")
    with pytest.raises(InputError, match=rf"^{stored}:2: invalid YAML .*stored config is damaged: restore it, or start a new run"):
        read_run_config(stored)
    stored.write_text("run_name: x\n")
    with pytest.raises(InputError, match=rf"^{stored}: model: required key is missing; the run's stored config is damaged"):
        read_run_config(stored)


def test_the_rules_of_a_method_apply_only_to_runs_that_use_it(tmp_path: Path, assets: Path) -> None:
    """A ReST-only run with GRPO settings that GRPO could not run is not refused for them."""
    _, config = load(tmp_path, assets, grpo={"num_generations": 4, "batch_size": 3})
    assert config.grpo.batch_size == 3
    with pytest.raises(InputError, match="grpo.batch_size"):
        load(tmp_path, assets, schedule=["rest", "grpo"], grpo={"num_generations": 4, "batch_size": 3})
    # ReST's learning rates, two here, are not read by a GRPO run (of one iteration).
    assert load(tmp_path, assets, method="grpo", num_iterations=1)[1].train.learning_rates == [1e-3, 5e-4]


def test_sections_refuse_bad_values_however_they_are_made() -> None:
    """A section's own rules run when code builds it too, not only when a YAML file is read."""
    with pytest.raises(ValueError, match=r"filter.zone_bounds: must rise"):
        FilterConfig(zone_bounds=(0.9, 0.5, 0.95))
    with pytest.raises(ValueError, match=r"grpo.pass_rate_band: the low bound is above the high one"):
        GrpoConfig(pass_rate_band=(0.8, 0.2))
    with pytest.raises(ValueError, match=r"train.strategy: zero3 .*train.load_in_4bit"):
        TrainConfig(strategy="zero3")


def test_renamed_keys_are_read_with_one_line_saying_so(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = small_config(assets, tmp_path / "runs", method="grpo", grpo={"num_iterations": 2, "learning_rates": [1e-4]})
    config["learning_rates"] = config["train"].pop("learning_rates")
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_config(path, check=check_config)
    assert loaded.train.learning_rates == [1e-3, 5e-4]
    assert loaded.grpo.passes_per_generation == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"warning: {path}: learning_rates is now train.learning_rates; read as that (rename it in the config)",
                     f"warning: {path}: grpo.num_iterations is now grpo.passes_per_generation; read as that (rename it in the config)"]


def test_an_old_and_a_new_name_together_are_refused_naming_both(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InputError, match=r"^command line: learning_rates: renamed to train.learning_rates, and both are given"):
        load(tmp_path, assets, ["learning_rates=[1e-3, 1e-3]"])
    config = small_config(assets, tmp_path / "runs")
    config["learning_rates"] = [1e-3, 1e-3]
    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(InputError, match=rf"^{path}: learning_rates: renamed to train.learning_rates, and both are given"):
        load_config(path)


def test_an_old_name_on_the_command_line_is_said_to_come_from_there(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = small_config(assets, tmp_path / "runs", method="grpo")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert load_config(path, ["grpo.num_iterations=3"], check=check_config).grpo.passes_per_generation == 3
    assert capsys.readouterr().err == "warning: command line: grpo.num_iterations is now grpo.passes_per_generation; read as that\n"
    with pytest.raises(InputError, match="^command line: grpo.passes_per_generation"):
        load_config(path, ["grpo.num_iterations=0"])


def test_a_runs_stored_config_is_read_under_new_names_without_a_word(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = small_config(assets, tmp_path / "runs")
    config["learning_rates"] = config["train"].pop("learning_rates")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert load_config(path, stored=True).train.learning_rates == [1e-3, 5e-4]
    assert capsys.readouterr().err == ""


def test_a_run_stored_with_old_key_names_is_not_changed_for_the_same_config(tmp_path: Path, assets: Path) -> None:
    """A run started before a rename resumes: its stored config, normalized, equals today's."""
    _, config = load(tmp_path, assets, method="grpo", grpo={"passes_per_generation": 2})
    stored = yaml.safe_load(dump_yaml(config))
    stored["learning_rates"] = stored["train"].pop("learning_rates")
    stored["grpo"]["num_iterations"] = stored["grpo"].pop("passes_per_generation")
    assert differences(with_defaults(stored), yaml.safe_load(dump_yaml(config))) == []
    stored_file = tmp_path / "stored.yaml"
    stored_file.write_text(yaml.safe_dump(stored))
    assert read_run_config(stored_file).grpo.passes_per_generation == 2
    # A real change is still seen.
    _, changed = load(tmp_path, assets, method="grpo", grpo={"passes_per_generation": 3})
    assert differences(with_defaults(stored), yaml.safe_load(dump_yaml(changed))) == ["grpo.passes_per_generation: 2 -> 3"]


def test_a_stage_given_some_resources_keeps_its_other_defaults_when_the_run_is_read_again(tmp_path: Path, assets: Path) -> None:
    """``executor.filter.partition`` alone keeps the filter's 60 minutes, in the run and in its stored
    config (which a resumed or detached driver reads); a config stored with every key, as earlier
    versions wrote it, keeps the resources it had."""
    _, config = load(tmp_path, assets, executor={"cluster": "local", "filter": {"partition": "cpu"}})
    assert (stage_resources(config, "filter").partition, stage_resources(config, "filter").timeout_min) == ("cpu", 60)
    stored = tmp_path / "stored.yaml"
    stored.write_text(dump_yaml(config))
    assert yaml.safe_load(stored.read_text())["executor"]["filter"] == {"partition": "cpu"}
    again = read_run_config(stored)
    assert stage_resources(again, "filter") == stage_resources(config, "filter")
    every_key = yaml.safe_load(stored.read_text())
    every_key["executor"]["filter"] = {"timeout_min": 240, "partition": "cpu"}
    stored.write_text(yaml.safe_dump(every_key))
    assert stage_resources(read_run_config(stored), "filter").timeout_min == 240
