"""Generation backends behind one interface (jobs.generation.protocol): in-process transformers, or
OpenAI-compatible servers (vLLM) that the job starts or that already run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.generation.config import GenerateConfig
from jobs.generation.protocol import (
    Backend,
    Completion,
    Messages,
    Outcome,
    Request,
    Sampling,
)
from jobs.problems.prompts import check_backend_takes
from jobs.runtime import loading, pick_device

if TYPE_CHECKING:
    from jobs.vllm.server import ServerFiles


class SampledLogprobs:
    """A logits processor for ``model.generate`` that applies the sampling temperature itself (in place of
    transformers' temperature warper, which runs after the processors a caller adds) and keeps the
    log-probability of each token sampled, under the distribution it was drawn from: one step's
    distribution at a time, where ``output_scores`` would keep every step's."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous: Any = None
        self.taken: list[Any] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self._take(input_ids[:, -1])
        scores = scores / self.temperature
        self.previous = scores.log_softmax(-1)
        return scores

    def _take(self, tokens: Any) -> None:
        if self.previous is not None:
            self.taken.append(self.previous.gather(-1, tokens[:, None])[:, 0])

    def logprobs(self, sequences: Any) -> Any:
        """(rows, generated tokens): the log-probability of each generated token of ``sequences``."""
        import torch

        self._take(sequences[:, -1])
        return torch.stack(self.taken, dim=1)


class TransformersBackend:
    """In-process ``model.generate`` (the seed's generate_hf.py), batched, text only."""

    def __init__(self, model_path: str, batch_size: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device, dtype = pick_device()
        with loading(model_path):
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        # Left padding keeps every prompt's end next to its generated tokens.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size

    def generate(self, conversations: list[Messages], sampling: Sampling) -> list[list[Completion]]:
        import torch

        prompts = [
            self.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in conversations
        ]
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        torch.manual_seed(sampling.seed)
        sample = sampling.temperature > 0
        recorder = SampledLogprobs(sampling.temperature) if sampling.logprobs and sample else None
        with torch.inference_mode():
            output = self.model.generate(
                **batch,
                do_sample=sample,
                temperature=(1.0 if recorder else sampling.temperature) if sample else None,
                top_p=sampling.top_p if sample else None,
                top_k=None,
                max_new_tokens=sampling.max_tokens,
                num_return_sequences=sampling.n,
                pad_token_id=self.tokenizer.pad_token_id,
                logits_processor=[recorder] if recorder else None,
            )
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        lengths = (new_tokens != self.tokenizer.pad_token_id).sum(dim=1).tolist()
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        if recorder:
            # A sample ends at its first end-of-sequence token.
            logprobs = recorder.logprobs(output)
            eos = self.model.generation_config.eos_token_id
            ends = set(eos if isinstance(eos, list) else [eos])
            completions = []
            for index, (row, text) in enumerate(zip(new_tokens.tolist(), texts, strict=True)):
                size = next((i + 1 for i, token in enumerate(row) if token in ends), len(row))
                completions.append(Completion(text, size, row[:size], logprobs[index, :size].tolist()))
        else:
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


def truncation(completions: int, truncated: int) -> dict[str, Any]:
    """Metrics of completions cut at max_tokens (``truncated``: those whose ``num_tokens`` reached it;
    both backends count the tokens they generated, so a completion that ended by itself stays below)."""
    return {"completions": completions, "truncated": truncated, "truncated_fraction": round(truncated / completions, 4) if completions else 0.0}


def make_backend(
    config: GenerateConfig, model_path: str, problems: list[dict[str, Any]], files: ServerFiles | None = None
) -> Backend:
    """The configured backend, ready to generate; ``files``: where a vllm backend's servers keep theirs."""
    check_backend_takes(problems, config.backend, config.media_dir, "the job's problems", "its backend")
    if config.backend == "transformers":
        return TransformersBackend(model_path, config.batch_size)
    # Imported here for import cost: only the vllm backend needs the HTTP client and servers.
    from jobs.generation.openai_client import OpenAIBackend, connect_endpoints

    # (as above)
    from jobs.vllm.server import start_servers

    banned = placeholder_tokens(model_path)
    if config.endpoints:
        return OpenAIBackend(connect_endpoints(config), config, banned=banned)
    if files is None:
        raise ValueError("the vllm backend needs a folder for its servers' logs and caches")
    servers = start_servers(model_path, config, files)
    return OpenAIBackend(servers.endpoints, config, servers, banned=banned)


# The config keys of a multimodal model's placeholder tokens (Qwen2-Audio's audio_token_index, ...).
PLACEHOLDER_KEYS = ("audio_token_id", "audio_token_index", "image_token_id", "image_token_index", "video_token_id", "video_token_index")


def placeholder_tokens(model_path: str) -> list[int]:
    """The tokens that stand for audio, images or video in a multimodal model's prompts (its folder's
    config.json, and its thinker's for Qwen3-Omni), which its samples must not contain: a sample with
    one cannot be trained on (the training forward finds more placeholders than media), as TRL keeps
    its own sampler from drawing image tokens. None for a text-only model or a model not in a folder."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        return []
    config = json.loads(path.read_text(encoding="utf-8"))
    sections = [config, config.get("thinker_config") or {}]
    return sorted({section[key] for section in sections for key in PLACEHOLDER_KEYS if isinstance(section.get(key), int)})
