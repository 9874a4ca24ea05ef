"""The ``services.reward`` section: a reward model served by a job of the run, and how its clients use it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from annotated_types import Ge

from jobs.sections import REJECT_UNKNOWN_KEYS, PositiveFloat, PositiveInt


@dataclass
class RewardServiceConfig:
    """A reward model served by a job of the run (seed 002's listener service), and how clients use it."""

    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    # A local Hugging Face model folder (no hub is contacted).
    model: str
    # yes_probability: the probability of "yes" for each candidate (the seed's listener, which
    # picks the likeliest); classifier: a sequence-classification reward model's score.
    kind: Literal["yes_probability", "classifier"]
    # Server: inferences at once (the seed's INFERENCE_CONCURRENCY), how long a request waits for
    # one before it is answered 503 (INFERENCE_ACQUIRE_TIMEOUT), pairs per model call
    # (LISTENER_BATCH_SIZE).
    concurrency: PositiveInt = 1
    acquire_timeout_s: PositiveFloat = 300.0
    batch_size: PositiveInt = 5
    # Where it listens: default 127.0.0.1 on the embedded default, the node's address on SLURM.
    host: str | None = None
    startup_timeout_s: PositiveFloat = 600.0
    # Clients (the service_score reward): requests per call (LISTENER_CHUNK_SIZE), the pause
    # between calls (LISTENER_CHUNK_DELAY), per-call timeout, retries with back-off on 503, 5xx,
    # timeouts and dropped connections (LISTENER_MAX_RETRIES, LISTENER_BACKOFF_FACTOR), and how long
    # to wait for a service that is down (being resubmitted) before its scores count as failed.
    chunk_size: PositiveInt = 4
    chunk_delay_s: Annotated[float, Ge(0)] = 0.05
    timeout_s: PositiveFloat = 60.0
    max_retries: Annotated[int, Ge(0)] = 3
    backoff_factor: Annotated[float, Ge(0)] = 1.0
    wait_s: PositiveFloat = 900.0
