"""The README's demo command builds its assets: data, a random model, and a warm-started base model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_demo_build_warm_starts_a_base_model(tmp_path: Path) -> None:
    assets = tmp_path / "demo_assets"
    result = run_cli("-m", "tools.demo", "build", str(assets))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warm-started base model" in result.stdout + result.stderr
    for name in ("train.jsonl", "heldout.jsonl", "base_model/config.json", "base_model/model.safetensors"):
        assert (assets / name).is_file(), name
