"""Generation backends behind one small interface (the vLLM-server backend plugs in here too)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from jobs.specs import MEDIA_FIELDS

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


class Backend(Protocol):
    def generate(self, conversations: list[Messages], sampling: Sampling) -> list[list[Completion]]:
        """``sampling.n`` completions for each conversation, in order."""
        ...

    def close(self) -> None: ...


def messages_for(problem: dict[str, Any], system_prompt: str | None) -> Messages:
    messages: Messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": problem["question"]})
    return messages


def pick_device() -> tuple[str, Any]:
    """The device and dtype to run on: bf16 on a GPU that has it, float32 on CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", torch.float32


class TransformersBackend:
    """In-process ``model.generate`` (the seed's generate_hf.py), batched, text only."""

    def __init__(self, model_path: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device, dtype = pick_device()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        # Left padding keeps every prompt's end next to its generated tokens.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()

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

    def close(self) -> None:
        del self.model


def make_backend(name: str, model_path: str, problems: list[dict[str, Any]]) -> Backend:
    if name == "transformers":
        with_media = [p["id"] for p in problems if any(f in p for f in MEDIA_FIELDS)]
        if with_media:
            raise ValueError(
                f"the transformers backend is text-only, but problem {with_media[0]!r} has media;"
                " use a server backend for sound / image / video"
            )
        return TransformersBackend(model_path)
    raise ValueError(f"unknown generation backend {name!r}")
