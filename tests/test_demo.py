"""The README's demo command builds its assets: data and the shipped base model; ``--warm-start``
trains one afresh, the way the shipped one was made."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli
from tools.demo import DEMO_MODEL

pytestmark = pytest.mark.slow


def test_demo_build_copies_the_shipped_base_model_and_warm_starts_one_on_request(tmp_path: Path) -> None:
    shipped = tmp_path / "demo_assets"
    result = run_cli("-m", "tools.demo", "build", str(shipped))
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("train.jsonl", "heldout.jsonl", "dev.jsonl"):
        assert (shipped / name).is_file(), name
    # Every machine starts the demo from the same weights.
    assert (shipped / "base_model" / "model.safetensors").read_bytes() == (DEMO_MODEL / "model.safetensors").read_bytes()

    trained = tmp_path / "warm"
    result = run_cli("-m", "tools.demo", "build", str(trained), "--warm-start")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warm-started base model" in result.stdout + result.stderr
    assert (trained / "base_model" / "model.safetensors").is_file()
    assert (trained / "train.jsonl").read_bytes() == (shipped / "train.jsonl").read_bytes()
