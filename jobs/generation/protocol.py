"""What a generation backend takes and gives: requests of K samples, their outcomes, and the Backend protocol."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class Sampling:
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    # Keep each sample's completion token ids and the sampler's log-probability of each of them.
    logprobs: bool = False


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int
    # With Sampling.logprobs: the tokens generated (the end-of-sequence token included) and the
    # log-probability of each, after temperature (what GRPO's trainer computes for the same token).
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None


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
