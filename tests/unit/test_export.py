"""Which iteration a run exports (export.iteration), and the export job on that choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from jobs.specs import ExportSpec, JobTarget
from jobs.training import export
from pipeline.config import RunConfig
from pipeline.planning.export import choose

pytestmark = pytest.mark.unit


def test_the_earliest_of_tied_best_iterations_is_chosen() -> None:
    assert choose("best", {0: 0.1, 1: 0.3, 2: 0.3, 3: 0.2}, 3, "dev_accuracy").iteration == 1


def test_without_an_evaluation_the_last_iteration_is_exported_saying_why() -> None:
    choice = choose("best", {}, 3, None)
    assert (choice.iteration, choice.line) == (3, "iteration 3, the last: no evaluation to choose the best on (data.dev or data.heldout)")


def test_last_says_when_no_iteration_beat_the_base_model() -> None:
    choice = choose("last", {0: 0.5, 1: 0.2, 2: 0.4}, 2, "heldout_accuracy")
    assert choice.iteration == 2
    assert choice.line == ("iteration 2, the last (export.iteration: last); no iteration beat the base model"
                           " (held-out accuracy 50.0%; best: iteration 2, 40.0%)")


def spec(tmp_path: Path, iteration: int, model: Path) -> ExportSpec:
    return ExportSpec(target=JobTarget(str(tmp_path / "run"), "export"), model_path=str(model), export_dir=str(tmp_path / "models"),
                      method="rest", model_name="m", run_dir=str(tmp_path / "run"), iteration=iteration, choice="why")


def test_the_export_job_copies_the_chosen_iteration_and_nothing_when_it_is_the_base_model(tmp_path: Path) -> None:
    model = tmp_path / "iter_002" / "train" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")

    metrics: dict = {}
    export.export(spec(tmp_path, 0, tmp_path / "base"), metrics)
    assert metrics == {"exported_iteration": 0, "export": None, "choice": "why"}
    assert not (tmp_path / "models").exists()

    export.export(spec(tmp_path, 2, model), metrics)
    folder = Path(metrics["export"])
    assert (folder / "config.json").is_file() and metrics["choice"] == f"why; exported to {folder}"
    assert json.loads((folder / "export.json").read_text())["iteration"] == 2


def test_a_dev_set_without_a_heldout_set_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="data.dev: evaluated beside the held-out set; give data.heldout too"):
        TypeAdapter(RunConfig).validate_python({"model": {"path": "m"}, "data": {"train": "t.jsonl", "dev": "d.jsonl"}})
