"""The ``generate.vllm`` section (the servers a shard or the evaluation starts) and ``services.vllm``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from annotated_types import Gt, Le

from jobs.sections import REJECT_UNKNOWN_KEYS, PositiveInt


@dataclass
class VllmConfig:
    """The vLLM servers each generation shard starts on its node (``generate.backend: vllm``)."""

    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    # The python of vLLM's own environment; it runs jobs/vllm/launcher.py. Default: this checkout's
    # .venv-vllm/bin/python (tools/setup_vllm.sh) if there is one, else the job's own python.
    python: str | None = None
    # Or a whole command that takes ``serve MODEL ...``, e.g. ["vllm"]; replaces python + launcher.
    command: list[str] | None = None
    # Added to the servers' environment, e.g. {VLLM_CPU_KVCACHE_SPACE: "4"}.
    env: dict[str, str] = field(default_factory=dict)
    # Where the servers listen; "node": the address of the node the shard runs on (its host name's),
    # which other nodes reach.
    host: str = "127.0.0.1"
    tensor_parallel_size: PositiveInt = 1
    # Data-parallel servers per node; default: the node's GPUs / tensor_parallel_size (1 without GPUs).
    num_servers: PositiveInt | None = None
    dtype: str = "auto"
    max_model_len: PositiveInt | None = None
    gpu_memory_utilization: Annotated[float, Gt(0), Le(1)] = 0.9
    max_num_seqs: PositiveInt | None = None
    # Serve the previous iteration's LoRA adapter on its base model (--enable-lora) instead of the
    # merged model; the first iteration serves the base model either way.
    lora: bool = False
    # Appended last to ``vllm serve``, so they override the arguments above, e.g. ["--enforce-eager"].
    extra_args: list[str] = field(default_factory=list)
    startup_timeout_s: Annotated[float, Gt(0)] = 1200


@dataclass
class VllmServiceConfig:
    """vLLM servers of one model as a job of the run (the seeds' "start the vLLM server" step), with
    ``generate.vllm``'s settings; ``python -m pipeline.serve`` and sbatch/vllm_server.sbatch run it."""

    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    # A local model folder; default: model.path.
    model: str | None = None
