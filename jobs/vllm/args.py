"""vLLM's command line: which executable, and the ``vllm serve`` arguments of a run's settings.

The executable is the python of vLLM's own environment running ``jobs/vllm/launcher.py``
(tools/setup_vllm.sh makes it), or a command of the user's. LoRA: a model that training saved
beside its adapter is served as that adapter over its base model.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from jobs.generation.config import GenerateConfig
from jobs.services.process import ServerError
from jobs.vllm.config import VllmConfig

LAUNCHER = Path(__file__).resolve().with_name("launcher.py")
# What tools/setup_vllm.sh installs: vLLM in an environment of its own, beside the project's.
CHECKOUT_VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
# vLLM accepts only these values for --max-lora-rank.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_python(config: VllmConfig) -> str:
    """The configured python, else this checkout's .venv-vllm's (tools/setup_vllm.sh), else the job's."""
    return config.python or (str(CHECKOUT_VLLM_PYTHON) if CHECKOUT_VLLM_PYTHON.exists() else sys.executable)


def vllm_command(config: VllmConfig) -> list[str]:
    command = list(config.command) if config.command else [vllm_python(config), str(LAUNCHER)]
    if shutil.which(command[0]) is None:
        raise ServerError(
            f"generate.vllm: {command[0]} not found; install vLLM with tools/setup_vllm.sh or set generate.vllm.python"
        )
    return command


def model_arguments(model_path: str, config: VllmConfig, name: str) -> list[str]:
    """``serve`` arguments for the model that requests call ``name``.

    With ``lora``, a model that training saved beside its LoRA adapter (``<train>/model`` and
    ``<train>/adapter``) is served as that adapter over the adapter's base model.
    """
    adapter = Path(model_path).parent / "adapter"
    if not (config.lora and (adapter / "adapter_config.json").is_file()):
        return [model_path, "--served-model-name", name]
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    rank = min((r for r in VLLM_LORA_RANKS if r >= adapter_config["r"]), default=adapter_config["r"])
    return [
        adapter_config["base_model_name_or_path"], "--served-model-name", f"{name}-base",
        "--enable-lora", "--lora-modules", f"{name}={adapter}", "--max-lora-rank", str(rank),
    ]


def serve_arguments(model_path: str, generate: GenerateConfig, name: str) -> list[str]:
    config = generate.vllm
    args = ["serve", *model_arguments(model_path, config, name)]
    args += ["--host", config.host, "--tensor-parallel-size", str(config.tensor_parallel_size), "--dtype", config.dtype]
    args += ["--gpu-memory-utilization", str(config.gpu_memory_utilization), "--disable-uvicorn-access-log"]
    # A request that asks for log-probabilities (GRPO's rollouts) gets those it was sampled from.
    args += ["--logprobs-mode", "processed_logprobs"]
    if config.max_model_len:
        args += ["--max-model-len", str(config.max_model_len)]
    if config.max_num_seqs:
        args += ["--max-num-seqs", str(config.max_num_seqs)]
    if generate.media_dir:
        args += ["--allowed-local-media-path", str(Path(generate.media_dir).resolve())]
    return args + list(config.extra_args)
