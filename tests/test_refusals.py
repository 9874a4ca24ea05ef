"""Refused before anything is written or submitted (the model folder, LoRA's target modules, export_dir,
GRPO with media, vLLM not installed, GPUs this machine lacks, QLoRA asking SLURM for no GPU), the SLURM
dry run on a machine without SLURM, the line about SLURM jobs that ask for no GPU, and job errors that
are permanent (not retried) or transient (retried). In process: ``pipeline.run.main`` with argv."""

from __future__ import annotations

import errno
import io
import json
import multiprocessing
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from safetensors.numpy import save_file

from jobs.generation.backends import TransformersBackend
from jobs.runtime import loading, reporting
from jobs.specs import JobTarget
from jobs.training.config import GrpoConfig
from jobs.training.grpo import rollout_options
from pipeline.config import load_config
from pipeline.loop.driver import Driver
from pipeline.planning.planner import Planner
from pipeline.planning.stage import StageFailed
from pipeline.run import main
from state import InputError, Ledger, PermanentJobError
from tests.conftest import small_config, tree_snapshot, write_config
from tests.unit.test_driver import SHARDS, failing, make_driver

MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj", "input_layernorm")


@pytest.fixture
def assets(tmp_path: Path) -> Path:
    """The files a small config names: problems, and a model folder whose safetensors header names a
    Qwen2 layer's modules (no model loads here)."""
    folder = tmp_path / "assets"
    model = folder / "random_init"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    save_file({f"model.layers.0.{m}.weight": np.zeros((2, 2), np.float32) for m in MODULES}
              | {"model.embed_tokens.weight": np.zeros((4, 2), np.float32)}, str(model / "model.safetensors"))
    for name, first in (("train.jsonl", 1), ("heldout.jsonl", 50), ("warmstart.jsonl", 90)):
        (folder / name).write_text("".join(json.dumps({"id": f"p{i}", "question": f"{i}+1=?", "answer": str(i + 1)}) + "\n"
                                           for i in range(first, first + 4)))
    return folder


def run(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str], *extra: str, **change: Any) -> tuple[int, str, str]:
    """``python -m pipeline.run`` of a small config changed by ``change``: (exit code, stdout, stderr);
    nothing may be written under the runs folder either way."""
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "run.yaml", small_config(assets, runs, **change))
    code = main([str(config), *extra])
    out, err = capsys.readouterr()
    assert tree_snapshot(runs) == {}, "nothing written"
    return code, out, err


def assert_refused(result: tuple[int, str, str], *expected: str) -> None:
    code, _, err = result
    assert code == InputError.exit_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for words in expected:
        assert words in lines[0], lines[0]


# -- refused before anything is written ----------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(("make", "expected"), [
    (lambda model: (model / "model.safetensors"), ["is a file", "config.json and weights"]),
    (lambda model: model.parent / "empty", ["is an empty folder"]),
    (lambda model: (model / "config.json").unlink() or model, ["has no config.json"]),
    (lambda model: (model / "model.safetensors").unlink() or model, ["has no weights (*.safetensors or *.bin)"]),
])
def test_a_model_path_that_is_no_model_folder(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str],
                                               make, expected: list[str]) -> None:
    (assets / "empty").mkdir()
    path = make(assets / "random_init")
    assert_refused(run(tmp_path, assets, capsys, model={"path": str(path)}), f"model.path: {path}", *expected)


@pytest.mark.unit
@pytest.mark.parametrize(("targets", "expected"), [
    (["q_proj", "qv_proj"], "'qv_proj' is not a module of the model in"),
    (["c_attn"], "(its modules: down_proj, embed_tokens, gate_proj, input_layernorm, k_proj, lm_head"),
])
def test_lora_target_modules_the_model_does_not_have(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str],
                                                     targets: list[str], expected: str) -> None:
    result = run(tmp_path, assets, capsys, train={"target_modules": targets})
    assert_refused(result, "train.target_modules:", expected)
    # Suffixes of module names count, as PEFT matches them; full fine-tuning has no target modules.
    assert run(tmp_path, assets, capsys, "--dry-run", train={"target_modules": ["self_attn.q_proj", "down_proj"]})[0] == 0
    assert run(tmp_path, assets, capsys, "--dry-run", train={"target_modules": targets, "method": "full"})[0] == 0


@pytest.mark.unit
def test_an_export_dir_that_is_a_file(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exported = tmp_path / "models"
    exported.write_text("")
    assert_refused(run(tmp_path, assets, capsys, export_dir=str(exported)), f"export_dir: {exported} is a file")


@pytest.mark.unit
def test_grpo_of_the_trainers_own_loop_with_video_data(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "videos.jsonl"
    data.write_text(json.dumps({"id": "v1", "question": "<video> How many?", "answer": "3", "video": "a.mp4"}) + "\n")
    result = run(tmp_path, assets, capsys, method="grpo", data={"train": str(data)},
                 grpo={"num_generations": 2, "batch_size": 2})
    assert_refused(result, f"{data}: problem 'v1' has a video", "grpo.rollouts: trainer", "set grpo.rollouts: arrays")


@pytest.mark.unit
@pytest.mark.parametrize(("vllm", "expected"), [
    ({"python": sys.executable}, "has no vLLM"),  # the project's own environment: no vLLM in it
    ({"python": "/nonexistent/bin/python"}, "does not exist"),
])
def test_the_vllm_backend_without_vllm(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str],
                                       vllm: dict[str, str], expected: str) -> None:
    result = run(tmp_path, assets, capsys, generate={"backend": "vllm", "vllm": vllm})
    assert_refused(result, "generate.backend: vllm starts vLLM servers with", expected, "bash tools/setup_vllm.sh",
                   "generate.vllm.python")


@pytest.mark.unit
def test_gpus_asked_of_the_local_executor_on_a_machine_without_any(
    tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, whatever this machine has
    result = run(tmp_path, assets, capsys, executor={"train": {"gpus_per_task": 1}})
    assert_refused(result, "executor.train.gpus_per_task: a job of executor.train asks the local executor for 1 GPU(s)",
                   "this machine has none", "executor.train.gpus_per_task: 0")


@pytest.mark.unit
def test_qlora_asking_slurm_for_no_gpu(tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run(tmp_path, assets, capsys, "--dry-run", "executor.cluster=slurm", train={"load_in_4bit": True})
    assert_refused(result, "train.load_in_4bit: QLoRA", "executor.train asks SLURM for none",
                   "executor.train.gpus_per_task: 1")


# -- SLURM's dry run anywhere, and the line about jobs asking SLURM for no GPU ---------------------------


@pytest.mark.unit
def test_slurm_dry_run_on_a_machine_without_slurm_prints_the_scripts(
    tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # none of SLURM's commands
    # vLLM generation and training that ask for no GPU; the vLLM install is not checked here.
    code, out, err = run(tmp_path, assets, capsys, "--dry-run", executor={"cluster": "slurm"},
                         generate={"backend": "vllm", "vllm": {"python": "/on/the/cluster/python"}})
    assert code == 0 and err == "", err
    assert out.count("#SBATCH --array") == 2, "the generation arrays' scripts (one per iteration)"
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warnings == [(
        "warning: executor.cluster: slurm, and executor.generate (vLLM generation) and executor.train (training) ask for"
        " no GPU: those jobs run on the nodes' CPUs; set executor.generate.gpus_per_task: 1 (and a partition with GPUs)"
        " to run them on GPUs")]
    assert [line for line in out.splitlines() if "not found on this machine" in line] == [(
        "sbatch, srun, sacct not found on this machine: the scripts are as sbatch would get them, but the cluster was not"
        " asked whether it takes them (partitions, GPUs, limits), nor was vLLM's install checked; submit from a login"
        " node of the cluster")]
    # Without --dry-run the run is refused; with GPUs asked for, no warning.
    assert_refused(run(tmp_path, assets, capsys, executor={"cluster": "slurm"}), "executor.cluster: slurm, but sbatch")
    gpus = {"cluster": "slurm", "train": {"gpus_per_task": 1}, "generate": {"gpus_per_task": 1}}
    assert "warning:" not in run(tmp_path, assets, capsys, "--dry-run", executor=gpus, generate={"backend": "vllm"})[1]


# -- permanent job errors are not retried, transient ones are ---------------------------------------------


@pytest.mark.unit
def test_a_permanent_job_error_is_not_retried_and_a_transient_one_is(tmp_path: Path) -> None:
    permanent = {"error": "PermanentJobError: nothing to train on", "permanent": True}
    driver, submitter = make_driver(tmp_path / "a", failing([SHARDS[1]], times=99, error=permanent["error"]),
                                    executor={"max_attempts": 3})
    submitter.outcome = lambda key, attempt, outcome=submitter.outcome: {**outcome(key, attempt),
                                                                          **(permanent if key == SHARDS[1] else {})}
    with pytest.raises(StageFailed, match=r"shard_00001 failed after 1 attempt\(s\) \(not retried: the error is permanent\)"):
        driver.run_stage(driver.planner.stage("iter_001/generate"))
    assert submitter.submitted() == [SHARDS], "submitted once"

    # A lost node, a time limit, a server that did not come up: retried, and done.
    driver, submitter = make_driver(tmp_path / "b", failing([SHARDS[1]], times=2, error="job 12 ended (NODE_FAIL)"),
                                    executor={"max_attempts": 3})
    driver.run_stage(driver.planner.stage("iter_001/generate"))
    assert submitter.submitted() == [SHARDS, [SHARDS[1]], [SHARDS[1]]]
    assert driver.ledger.read("iter_001/generate")["status"] == "done"


def _fail_in_a_job(run_dir: str, key: str, error: BaseException) -> None:
    with reporting(JobTarget(run_dir, key)):
        raise error


@pytest.mark.unit
@pytest.mark.parametrize(("error", "permanent"), [
    (PermanentJobError("nothing to train on"), True),
    (InputError("train.jsonl:3: malformed JSON"), True),
    (RuntimeError("CUDA error: an illegal memory access"), None),
    (TimeoutError("the vLLM server did not answer /health"), None),
])
def test_a_job_records_whether_its_error_is_permanent(tmp_path: Path, error: BaseException, permanent: bool | None) -> None:
    # In a process of its own, as a job: reporting() takes over the signal handlers.
    process = multiprocessing.get_context("fork").Process(target=_fail_in_a_job, args=(str(tmp_path), "iter_001/train", error))
    process.start()
    process.join(timeout=60)
    record = Ledger(tmp_path).read("iter_001/train")
    assert process.exitcode == 1 and record["status"] == "failed"
    assert record.get("permanent") is permanent and record["error"] == f"{type(error).__name__}: {error}"


def test_nothing_to_train_on_fails_the_stage_after_one_job(tiny_assets: Path, tmp_path: Path) -> None:
    """The real training job, submitted by the real submitter (the debug executor runs it in this
    process: 5 s here, 17 s as a local job): no correct candidate and no replay data."""
    config = load_config(write_config(tmp_path / "run.yaml", small_config(
        tiny_assets, tmp_path / "runs", train={"replay_data": None}, executor={"cluster": "debug", "max_attempts": 3})))
    planner = Planner(config, config.run_dir, num_train=24)
    filtered = planner.layout.stage_dir(1, "filter") / "filtered.json"
    filtered.parent.mkdir(parents=True)
    filtered.write_text("[]")
    driver = Driver(config, planner, Console(file=io.StringIO()))
    with pytest.raises(StageFailed, match=r"iter_001/train failed after 1 attempt\(s\) \(not retried: the error is"
                                          r" permanent\): PermanentJobError: nothing to train on"):
        driver.run_stage(planner.stage("iter_001/train"))
    assert driver.ledger.read("iter_001/train")["attempts"] == 1


@pytest.mark.unit
@pytest.mark.parametrize(("error", "permanent"), [
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "model/config.json"), True),
    (ValueError("Unrecognized model in model. Should have a `model_type` key in its config.json."), True),
    (KeyError("model_type"), True),
    (OSError("model does not appear to have a file named config.json. Checkout 'https://huggingface.co/model'"), True),
    (OSError(errno.EIO, "Input/output error", "model/model.safetensors"), False),
    (OSError(errno.ESTALE, "Stale file handle", "model/config.json"), False),
    (OSError(errno.EMFILE, "Too many open files"), False),
    (ConnectionResetError("connection reset by peer"), False),
])
def test_a_wrong_model_folder_fails_for_good_a_file_system_error_does_not(error: Exception, permanent: bool) -> None:
    with pytest.raises(PermanentJobError if permanent else type(error)) as raised, loading("model"):
        raise error
    if permanent:
        assert str(raised.value).startswith("model model does not load: ") and raised.value.__cause__ is error
    else:
        assert raised.value is error, "a transient error passes unchanged: the driver retries the job"


@pytest.mark.unit
def test_grpo_on_a_node_whose_gpus_did_not_come_up_is_retried() -> None:
    # pipeline.rules refuses vllm_mode without GPUs asked for: a job that gets here has a node whose CUDA failed.
    with pytest.raises(RuntimeError, match="needs GPUs, and torch sees none on this node") as raised:
        rollout_options(GrpoConfig(vllm_mode="colocate"), on_gpu=False, server=None)
    assert not isinstance(raised.value, PermanentJobError)


@pytest.mark.unit
def test_a_service_is_not_started_again_after_a_permanent_error(tmp_path: Path) -> None:
    driver, submitter = make_driver(tmp_path, executor={"max_attempts": 3})
    stage = driver.planner.stage("baseline/eval")
    driver.ledger.update("services/reward", {"status": "failed", "attempts": 1, "job_id": "7", "permanent": True,
                                             "error": "PermanentJobError: model rm does not load: ..."})
    with pytest.raises(StageFailed, match=r"service reward failed after 1 start\(s\) \(not started again: the error is"
                                          r" permanent\): PermanentJobError: model rm"):
        driver.services.start("reward", stage)
    assert submitter.calls == []


def broken_models(root: Path, model: Path) -> dict[str, Path]:
    """Folders that pass the run's check of the model folder (a config.json and weights) and do not load,
    and a path that does not exist."""
    folders = {"config.json not JSON": "{not json", "an unknown architecture": json.dumps({"model_type": "qwen9"})}
    broken = {"missing": root / "missing"}
    for name, config in folders.items():
        broken[name] = folder = root / name.replace(" ", "_")
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(config)
        (folder / "model.safetensors").symlink_to(model / "model.safetensors")
    return broken


def test_transformers_errors_for_a_model_that_does_not_load_are_permanent(tiny_assets: Path, tmp_path: Path) -> None:
    """transformers' own errors (its messages are what tells a wrong folder from a file system's error)."""
    for folder in broken_models(tmp_path, tiny_assets / "random_init").values():
        with pytest.raises(PermanentJobError, match=f"model {folder} does not load: "):
            TransformersBackend(str(folder), batch_size=1)


def test_a_model_that_does_not_load_fails_the_baseline_eval_after_one_job(tiny_assets: Path, tmp_path: Path) -> None:
    """The real eval job (the first to load the model), submitted by the real submitter in this process."""
    broken = broken_models(tmp_path / "models", tiny_assets / "random_init")["config.json not JSON"]
    config = load_config(write_config(tmp_path / "run.yaml", small_config(
        tiny_assets, tmp_path / "runs", model={"path": str(broken)}, executor={"cluster": "debug", "max_attempts": 3})))
    planner = Planner(config, config.run_dir, num_train=24)
    planner.layout.heldout_problems.parent.mkdir(parents=True)
    shutil.copy(config.data.heldout, planner.layout.heldout_problems)
    driver = Driver(config, planner, Console(file=io.StringIO()))
    with pytest.raises(StageFailed, match=r"baseline/eval failed after 1 attempt\(s\) \(not retried: the error is"
                                          rf" permanent\): PermanentJobError: model {broken} does not load: .* is not a valid"
                                          " JSON file"):
        driver.run_stage(planner.stage("baseline/eval"))
    assert driver.ledger.read("baseline/eval")["attempts"] == 1
