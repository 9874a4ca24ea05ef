"""The ``generate`` and ``eval`` sections: how generation shards sample and how the held-out evaluation runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Le

from jobs.sections import REJECT_UNKNOWN_KEYS, PositiveInt
from jobs.vllm.config import VllmConfig


@dataclass
class GenerateConfig:
    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    backend: Literal["transformers", "vllm"] = "transformers"
    num_samples: PositiveInt = 16
    temperature: Annotated[float, Ge(0)] = 0.9
    top_p: Annotated[float, Gt(0), Le(1)] = 0.95
    max_tokens: PositiveInt = 2048
    # Problems per forward batch (transformers) or concurrent requests per server (vllm).
    batch_size: PositiveInt = 8
    num_shards: PositiveInt = 4
    system_prompt: str | None = None
    # Folder that problems' sound / image / video paths are relative to; the only folder vLLM may
    # read media from.
    media_dir: str | None = None
    # vllm backend: OpenAI-compatible servers already running (``http://host:port``); no server is
    # started then. Their model name (default: the one model they serve), and the environment
    # variable holding their API key (unset: no key).
    endpoints: list[str] = field(default_factory=list)
    endpoint_model: str | None = None
    endpoint_api_key_env: str = "VLLM_API_KEY"
    # Sent with every request of the vllm backend, e.g. {top_k: 20, min_p: 0.05}.
    extra_body: dict[str, Any] = field(default_factory=dict)
    # Per request, with back-off, on connection errors, timeouts, 429 and 5xx.
    max_retries: Annotated[int, Ge(0)] = 5
    request_timeout_s: Annotated[float, Gt(0)] = 1800
    # tools/status.py and tools/report.py warn when a larger share of the completions of a generation
    # stage or of an evaluation hit max_tokens (metrics "truncated", "truncated_fraction"): their
    # answers are cut off and judged wrong.
    warn_truncated: Annotated[float, Ge(0), Le(1)] = 0.2
    vllm: VllmConfig = field(default_factory=VllmConfig)


@dataclass
class EvalConfig:
    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    # vllm: the eval job starts vLLM servers of the model it evaluates, with generate.vllm's
    # settings (never generate.endpoints: those serve another model).
    backend: Literal["transformers", "vllm"] = "transformers"
    max_tokens: PositiveInt = 2048
    # Problems per forward batch (transformers) or requests in flight per server (vllm).
    batch_size: PositiveInt = 64
