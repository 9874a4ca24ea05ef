"""Generation backends behind one small interface (the vLLM-server backend plugs in here too)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from jobs.specs import MEDIA_FIELDS, GenerateConfig
from state import InputError

if TYPE_CHECKING:
    from jobs.vllm_server import ServerFiles

log = logging.getLogger("selftrain")

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class Sampling:
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int


@dataclass(frozen=True)
class Request:
    messages: Messages
    sampling: Sampling


@dataclass(frozen=True)
class Outcome:
    """The completions of ``requests[index]``, or why there are none."""

    index: int
    completions: list[Completion]
    error: str | None = None


class Backend(Protocol):
    def run(self, requests: list[Request], on_outcome: Callable[[Outcome], None]) -> None:
        """Hand each request's outcome to ``on_outcome`` as soon as it is there, in any order."""
        ...

    def metrics(self) -> dict[str, Any]:
        """What the job's ledger record should know about the backend (servers, logs)."""
        ...

    def close(self) -> None: ...


# OpenAI chat content part of each media field (``audio_url`` is vLLM's, for local files).
MEDIA_PARTS = {"sound": "audio_url", "image": "image_url", "video": "video_url"}


def media_url(problem: dict[str, Any], field: str, media_dir: str) -> str:
    """``file://`` URL of a problem's media file, which must lie inside ``media_dir``."""
    where = f"problem {problem['id']!r}: {field} {problem[field]!r}"
    root = Path(media_dir).resolve()
    path = (root / problem[field]).resolve()
    if not path.is_relative_to(root):
        raise InputError(f"{where} is outside generate.media_dir ({root})")
    if not path.is_file():
        raise InputError(f"{where}: {path} not found")
    return path.as_uri()


def check_backend_takes(problems: list[dict[str, Any]], backend: str, media_dir: str | None, source: str, key: str) -> None:
    """Problems (read from ``source``) with media need the vllm backend (``key``) and a media folder:
    checked before submitting, and again by the job."""
    with_media = next((p["id"] for p in problems if any(f in p for f in MEDIA_FIELDS)), None)
    if with_media is None:
        return
    if backend == "transformers":
        raise InputError(
            f"{source}: problem {with_media!r} has media, but {key} is transformers, which is text-only;"
            " use vllm for sound / image / video"
        )
    if media_dir is None:
        raise InputError(f"{source}: problem {with_media!r} has media: set generate.media_dir to the folder its files are in")


def check_media(problems: list[dict[str, Any]], media_dir: str, source: str) -> None:
    """Every media file of ``problems`` (read from ``source``) exists inside ``media_dir``: checked
    before submitting (the job finds each one again as it builds the problem's request)."""
    for problem in problems:
        for field in MEDIA_FIELDS:
            if field in problem:
                try:
                    media_url(problem, field, media_dir)
                except InputError as error:
                    raise InputError(f"{source}: {error}") from None


def messages_for(problem: dict[str, Any], system_prompt: str | None, media_dir: str | None = None) -> Messages:
    """Chat messages of a problem. With ``media_dir``, its media go first as content parts and their
    ``<sound>``-style tags leave the text; without, the text alone (for text-only models)."""
    messages: Messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    media = [f for f in MEDIA_FIELDS if f in problem]
    if not media or media_dir is None:
        messages.append({"role": "user", "content": problem["question"]})
        return messages
    text = problem["question"]
    parts: list[dict[str, Any]] = []
    for field in media:
        part = MEDIA_PARTS[field]
        parts.append({"type": part, part: {"url": media_url(problem, field, media_dir)}})
        text = text.replace(f"<{field}>", "")
    parts.append({"type": "text", "text": text.strip()})
    messages.append({"role": "user", "content": parts})
    return messages


def pick_device() -> tuple[str, Any]:
    """The device and dtype to run on: bf16 on a GPU that has it, float32 on CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", torch.float32


class TransformersBackend:
    """In-process ``model.generate`` (the seed's generate_hf.py), batched, text only."""

    def __init__(self, model_path: str, batch_size: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device, dtype = pick_device()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        # Left padding keeps every prompt's end next to its generated tokens.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()
        self.batch_size = batch_size

    def generate(self, conversations: list[Messages], sampling: Sampling) -> list[list[Completion]]:
        import torch

        prompts = [
            self.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in conversations
        ]
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        torch.manual_seed(sampling.seed)
        sample = sampling.temperature > 0
        with torch.inference_mode():
            output = self.model.generate(
                **batch,
                do_sample=sample,
                temperature=sampling.temperature if sample else None,
                top_p=sampling.top_p if sample else None,
                top_k=None,
                max_new_tokens=sampling.max_tokens,
                num_return_sequences=sampling.n,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        lengths = (new_tokens != self.tokenizer.pad_token_id).sum(dim=1).tolist()
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        completions = [Completion(t, n) for t, n in zip(texts, lengths, strict=True)]
        return [completions[i * sampling.n:(i + 1) * sampling.n] for i in range(len(conversations))]

    def run(self, requests: list[Request], on_outcome: Callable[[Outcome], None]) -> None:
        for first in range(0, len(requests), self.batch_size):
            batch = requests[first:first + self.batch_size]
            # One seed per generate call: a batch samples with its first request's.
            outputs = self.generate([r.messages for r in batch], batch[0].sampling)
            for offset, completions in enumerate(outputs):
                on_outcome(Outcome(first + offset, completions))

    def metrics(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        del self.model


def make_backend(
    config: GenerateConfig, model_path: str, problems: list[dict[str, Any]], files: ServerFiles | None = None
) -> Backend:
    """The configured backend, ready to generate; ``files``: where a vllm backend's servers keep theirs."""
    check_backend_takes(problems, config.backend, config.media_dir, "the job's problems", "its backend")
    if config.backend == "transformers":
        return TransformersBackend(model_path, config.batch_size)
    from jobs.openai_client import OpenAIBackend, connect_endpoints
    from jobs.vllm_server import start_servers

    if config.endpoints:
        return OpenAIBackend(connect_endpoints(config), config)
    if files is None:
        raise ValueError("the vllm backend needs a folder for its servers' logs and caches")
    servers = start_servers(model_path, config, files)
    return OpenAIBackend(servers.endpoints, config, servers)
