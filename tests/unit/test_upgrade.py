"""Upgrading selftrain under a run: a run started before some defaults changed (CHANGED_DEFAULTS)
resumes with the same config and keeps the values it was started with, and Driver.open (tools/requeue.py,
a detached run's advance job) does not refuse its stored config for rules added since."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from pipeline.config import RunConfig, dump_yaml, load_config, read_run_config
from pipeline.loop.driver import Driver
from pipeline.rules import check_config, check_run
from pipeline.run import check_resumable
from state import InputError
from tests.conftest import small_config, write_config

pytestmark = pytest.mark.unit

# The values a run started before issue 27 runs with where its config does not set them.
OLD = ("multiple_choice", "last", None)


@pytest.fixture
def assets(tmp_path: Path) -> Path:
    """The files a small config names (a model folder of empty files: no model loads here)."""
    folder = tmp_path / "assets"
    (folder / "random_init").mkdir(parents=True)
    for name in ("config.json", "pytorch_model.bin"):
        (folder / "random_init" / name).touch()
    for number, name in enumerate(("train.jsonl", "heldout.jsonl", "warmstart.jsonl"), start=1):
        (folder / name).write_text(f'{{"id": "p1", "question": "{number}+1=?", "answer": "{number + 1}"}}\n')
    return folder


def user_config(tmp_path: Path, assets: Path, **change: Any) -> Path:
    """The user's config, with filter.verifier and the export section left to their defaults."""
    config = small_config(assets, tmp_path / "runs", **change)
    del config["filter"]["verifier"]
    return write_config(tmp_path / "run.yaml", config)


def store_as_before_the_change(config: RunConfig) -> Path:
    """The run's stored config as the version before issue 27 wrote it: every key, filter.verifier
    at its default then, no export section."""
    stored = yaml.safe_load(dump_yaml(config))
    stored["filter"]["verifier"] = "multiple_choice"
    del stored["export"]
    path = config.run_dir / "config.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(stored, sort_keys=False))
    return path


def values(config: RunConfig) -> tuple[str, str, float | None]:
    return config.filter.verifier, config.export.iteration, config.export.collapse_margin


def test_a_run_started_before_the_defaults_changed_resumes_with_its_old_values(
    tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = user_config(tmp_path, assets)
    new_run = load_config(path, check=check_run)
    assert values(new_run) == ("auto", "best", 0.05)
    stored = store_as_before_the_change(new_run)

    config = load_config(path, check=check_run)
    assert values(config) == OLD
    assert "keeps the ones it was started with" in capsys.readouterr().err
    assert check_resumable(config, str(path)) is True
    assert values(read_run_config(stored)) == OLD
    assert values(load_config(stored, stored=True)) == OLD
    # A key the user sets is theirs: a change from what the run was started with is still refused.
    with pytest.raises(InputError, match=r"filter.verifier: 'multiple_choice' -> 'auto'"):
        check_resumable(load_config(path, ["filter.verifier=auto"]), str(path))
    with pytest.raises(InputError, match=r"export.iteration: 'last' -> 'best'"):
        check_resumable(load_config(path, ["export.iteration=best"]), str(path))
    # A run started by this version keeps this version's defaults.
    stored.write_text(dump_yaml(new_run))
    assert values(load_config(path)) == values(read_run_config(stored)) == ("auto", "best", 0.05)


def test_driver_open_advances_an_old_run_that_rules_added_since_would_refuse(tmp_path: Path, assets: Path) -> None:
    """Held-out = training set, more learning rates than iterations, a model folder without weights: a
    new run is refused; the run's stored config, read to requeue or advance it, is not."""
    (assets / "random_init" / "pytorch_model.bin").unlink()
    path = user_config(tmp_path, assets, learning_rates=[1e-3, 1e-3, 1e-3])
    config = load_config(path, check=check_config)
    config.data.heldout = config.data.train
    stored = store_as_before_the_change(config)
    with pytest.raises(InputError, match="train.learning_rates: has 3 entries but num_iterations is 2"):
        load_config(stored, check=check_run, stored=True)
    driver = Driver.open(config.run_dir, Console(file=io.StringIO()))
    assert values(driver.config) == OLD
