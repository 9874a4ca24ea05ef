"""Shared fixtures: a tiny random Qwen2 model with the demo task's data, and CLI helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random-init tiny model + addition problems (no warm start: tests need speed, not skill)."""
    from tools.demo import build

    out = tmp_path_factory.mktemp("assets")
    build(out, base="random")
    return out


@pytest.fixture(scope="session")
def reward_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random listener and classifier (tools.demo build-reward-models), and seed 002's games."""
    from tools.demo import build_reward_models

    out = tmp_path_factory.mktemp("reward_models")
    build_reward_models(out)
    return out


@pytest.fixture(scope="session")
def vision_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Qwen2-VL (tools.demo), for media in training and the listener that looks at images."""
    from tools.demo import build_vision_model

    out = tmp_path_factory.mktemp("vision_model")
    build_vision_model(out)
    return out


def small_config(assets: Path, runs_dir: Path, **sections: Any) -> dict[str, Any]:
    """A config that runs each stage in seconds; ``sections`` update it key by key."""
    train = runs_dir.parent / "train_small.jsonl"
    heldout = runs_dir.parent / "heldout_small.jsonl"
    if not train.exists():
        train.write_text("".join((assets / "train.jsonl").read_text().splitlines(keepends=True)[:24]))
        heldout.write_text("".join((assets / "heldout.jsonl").read_text().splitlines(keepends=True)[:8]))
    config: dict[str, Any] = {
        "run_name": "small",
        "runs_dir": str(runs_dir),
        # Beside the runs, never in the checkout (the default, models/, is relative to where it runs).
        "export_dir": str(runs_dir.parent / "models"),
        "num_iterations": 2,
        "model": {"path": str(assets / "random_init")},
        "data": {"train": str(train), "heldout": str(heldout)},
        "generate": {"num_samples": 2, "max_tokens": 12, "batch_size": 4, "num_shards": 3},
        "filter": {"verifier": "numeric", "strategy": "all"},
        "train": {
            # LoRA without 4-bit loading: no GPU here (QLoRA asks SLURM for one).
            "method": "lora", "load_in_4bit": False, "lora_r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
            "max_steps": 2, "batch_size": 4, "gradient_accumulation_steps": 1, "gradient_checkpointing": False,
            "replay_data": str(assets / "warmstart.jsonl"), "logging_steps": 1, "learning_rates": [1e-3, 5e-4],
        },
        "eval": {"max_tokens": 12, "batch_size": 8},
        "executor": {"cluster": "local", "poll_interval_s": 0.3, "max_poll_interval_s": 1.0, "generate": {"cpus_per_task": 1}},
    }
    if "learning_rates" in sections:  # ReST's, one per iteration: a key of train
        config["train"]["learning_rates"] = sections.pop("learning_rates")
    for section, values in sections.items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def tree_snapshot(folder: Path) -> dict[str, bytes]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def ledger_record(run_dir: Path, key: str) -> dict[str, Any]:
    """A record of a run's ledger, as the driver reads it ({} while there is none)."""
    from state import Ledger

    return Ledger(run_dir).read(key)


def slurm_queue() -> str:
    """What a test that waited in vain needs to say: each queued job's state and reason."""
    if "SLURM_CONF" not in os.environ:
        return "no cluster"
    try:
        result = subprocess.run(["squeue", "-h", "-o", "%i %j %T %r %M"], capture_output=True, text=True, check=False,
                                timeout=60)
    except subprocess.TimeoutExpired:
        return "squeue did not answer"
    return "; ".join((result.stdout or result.stderr).strip().splitlines()) or "empty"


def wait_for_lines(path: Path, count: int, running: Callable[[], bool], timeout_s: float = 300) -> None:
    """Until ``path`` (a shard's partial output) holds ``count`` items, while ``running()`` says the writer runs."""
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and path.read_text().count("\n") >= count):
        assert running() and time.monotonic() < deadline, f"{path} never got {count} items"
        time.sleep(0.05)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[str]:
    """A real single-node SLURM cluster (tools/local_slurm.sh); SLURM_CONF points the clients at it.

    Where it cannot start (not root, not Debian) the SLURM tests are skipped, except under CI,
    where that is a failure: CI must run them for real.
    """
    script = str(ROOT / "tools" / "local_slurm.sh")
    # A cluster already up belongs to someone else (another test session, another checkout): use it
    # and leave it running, since stopping it cancels their jobs.
    ours = subprocess.run(["bash", script, "status"], capture_output=True, check=False).returncode != 0
    start = subprocess.run(["bash", script, "start"], capture_output=True, text=True, check=False)
    if start.returncode != 0:
        reason = (start.stderr.strip().splitlines() or ["no output"])[-1]
        if os.environ.get("CI") == "true":
            pytest.fail(f"the local SLURM cluster did not start under CI: {reason}")
        pytest.skip(f"no local SLURM cluster here: {reason}")
    conf = start.stdout.strip().split("=", 1)[1]
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    if ours:
        subprocess.run(["bash", script, "stop"], capture_output=True, check=False)
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous


@pytest.fixture(scope="session")
def two_node_cluster() -> Iterator[str]:
    """A real SLURM cluster of two nodes on this machine (``tools/local_slurm.sh start --nodes 2``):
    n1 and n2, each a network namespace with its own address on a private bridge, its own host
    name and /etc/hosts. Returns its SLURM_CONF, and leaves the environment's alone (the rest of the
    suite runs on the single-node cluster): tests point their commands at it themselves.

    Where network namespaces or a bridge cannot be made (exit 4: no CAP_NET_ADMIN / CAP_SYS_ADMIN)
    its tests are skipped with the reason; any other failure to start fails them under CI, as
    ``slurm_cluster`` does.
    """
    script = str(ROOT / "tools" / "local_slurm.sh")
    ours = subprocess.run(["bash", script, "status", "--nodes", "2"], capture_output=True, check=False).returncode != 0
    start = subprocess.run(["bash", script, "start", "--nodes", "2"], capture_output=True, text=True, check=False)
    if start.returncode != 0:
        reason = (start.stderr.strip().splitlines() or ["no output"])[-1]
        if start.returncode != 4 and os.environ.get("CI") == "true":
            pytest.fail(f"the local two-node SLURM cluster did not start under CI: {reason}")
        pytest.skip(f"no local two-node SLURM cluster here: {reason}")
    yield start.stdout.strip().split("=", 1)[1]
    if ours:
        subprocess.run(["bash", script, "stop", "--nodes", "2"], capture_output=True, check=False)
