"""The reward model service (seed 002's listener service): FastAPI + uvicorn over a local model folder.

Endpoints, in the seed's shapes::

    GET  /health        no key: {"status": "ok", "kind", "model", "served", "refused_busy"}
    POST /score         one request                      -> one result
    POST /batch_score   {"batch": [request, ...]}        -> {"results": [result, ...], "took": seconds}

Both POSTs need ``Authorization: Bearer <the run's API key>`` (401 otherwise). ``served`` counts the
requests scored, ``refused_busy`` the calls answered 503; ``took`` is the seconds the server spent
on the call, the wait for an inference slot included.

kind ``yes_probability`` (the listener)::

    request  {"candidates": [text, ...], "question": str, "topk": 1}
    result   {"yes_probabilities": [p, ...], "predicted_index": i, "topk_indices": [i, ...]}

Each candidate's p is the probability that the model's answer to the user turn ``"<candidate>\\n<question>"``
(the assistant turn of its chat template) starts with "yes" or "Yes": per spelling, the product of
the conditional probabilities of the tokens the tokenizer gives that text after the prompt, summed
over the two spellings (disjoint events). Exact for any tokenizer, whether "yes" is one token or
three bytes. ``predicted_index`` is the likeliest candidate (the first of equals), ``topk_indices``
the ``topk`` likeliest.

A vision-language listener (a model folder whose config has a ``vision_config``: seed 002's) looks
at images instead::

    request  {"candidate_paths": [path, ...], "question": str, "topk": 1}

each image in the user turn before the question (its chat template's image part), p as above; the
paths are relative to the service's media folder (the run's ``generate.media_dir``) or absolute
under it, and a path outside it, or no file, is refused with 422 before the model is asked. A text
listener refuses ``candidate_paths`` and an image listener ``candidates``, with 422.

kind ``classifier`` (a sequence-classification reward model, AutoModelForSequenceClassification)::

    request  {"prompt": str or [{"role", "content"}, ...], "completion": str}
    result   {"score": s}

The model reads the conversation [prompt as the user turn (or the messages given), completion as the
assistant turn] through its tokenizer's chat template; a tokenizer without one (BERT-style reward
models) reads (prompt, completion) as a text pair. s is the logit of a model with one label, the
probability of label 1 of a model with two; other label counts are refused when the model loads.

At most ``concurrency`` inferences run at once (the seed's INFERENCE_CONCURRENCY); a call that waits
longer than ``acquire_timeout_s`` for a slot is answered 503, which clients retry with back-off.
Inference runs in ``concurrency`` worker threads, so /health answers while the model works; the
model sees at most ``batch_size`` sequences per forward pass. The model loads from a local folder
only, bf16 on a GPU, float32 on CPU.

The service job (jobs.services.runner) drives ``RewardServer``; by hand::

    python -m jobs.services.reward_server --model MODEL --kind yes_probability --api-key-file KEY [--port 9000]
"""

# No ``from __future__ import annotations``: FastAPI reads the route signatures, whose request type
# depends on the service's kind, at definition time.

import argparse
import asyncio
import logging
import math
import secrets
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar

import uvicorn
from fastapi import Depends, FastAPI, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobs.runtime import loading, pick_device
from jobs.sections import add_options, section_from_options
from jobs.services.config import RewardServiceConfig
from jobs.services.process import run_api_key
from state import InputError

log = logging.getLogger("selftrain")

# The answers that count as "yes" (disjoint: they differ in their first letter).
YES_SPELLINGS = ("yes", "Yes")


class YesProbabilityRequest(BaseModel):
    """The listener's request: candidate texts, or candidate image paths for a listener that looks at
    images (which of the two its model takes, the scorer's ``check`` says)."""

    model_config = ConfigDict(extra="forbid")

    candidates: list[str] | None = Field(None, min_length=1)
    candidate_paths: list[str] | None = Field(None, min_length=1)
    question: str
    topk: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _one_kind(self) -> "YesProbabilityRequest":
        if (self.candidates is None) == (self.candidate_paths is None):
            raise ValueError("candidates (texts) or candidate_paths (images): give one of the two")
        return self

    @property
    def count(self) -> int:
        return len(self.candidates or self.candidate_paths or [])


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str
    content: str


class ClassifierRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | list[Message]
    completion: str


R = TypeVar("R", YesProbabilityRequest, ClassifierRequest)


class Refused(ValueError):
    """A request the service will not score as it is (422): what is wrong with it."""


class Batch(BaseModel, Generic[R]):
    model_config = ConfigDict(extra="forbid")

    batch: list[R] = Field(min_length=1)


def _batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


class Scorer(ABC):
    """A model and its tokenizer, scoring requests of one kind; shared by the service and by
    in-process scoring (tests, the benchmark), so both compute the same numbers."""

    kind: str
    request_type: type[BaseModel]

    def __init__(self, model: Any, tokenizer: Any, batch_size: int, name: str):
        self.model, self.tokenizer, self.batch_size, self.name = model, tokenizer, batch_size, name
        # Fast tokenizers are not safe to call from several threads at once (concurrency > 1).
        self._tokenizer_lock = threading.Lock()

    @abstractmethod
    def score(self, requests: list[Any]) -> list[dict[str, Any]]:
        """One result per request, in order."""

    def check(self, requests: list[Any]) -> None:
        """Raises Refused for a request it cannot score (before it waits for an inference slot)."""


def listener_prompt(tokenizer: Any, candidate: str, question: str) -> str:
    """What the listener reads: the user turn "<candidate>\n<question>", then the start of its answer."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{candidate}\n{question}"}], add_generation_prompt=True, tokenize=False
    )


def answer_tokens(tokenizer: Any, prompt: str, spelling: str) -> tuple[list[int], list[int]]:
    """The tokens of ``prompt + spelling``, and those of them that are the answer: what follows the
    prompt's own tokens (a tokenizer that merged across the boundary would shorten the shared part,
    never lose the answer)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + spelling, add_special_tokens=False)["input_ids"]
    shared = next((i for i, (a, b) in enumerate(zip(prompt_ids, full, strict=False)) if a != b), min(len(prompt_ids), len(full)))
    return full, full[shared:]


def ranked_results(requests: list[Any], p_yes: list[float]) -> list[dict[str, Any]]:
    """Each request's probabilities (its candidates' in order, ``p_yes`` of all requests side by side),
    the likeliest candidate (the first of equals) and its ``topk``."""
    results, start = [], 0
    for request in requests:
        probabilities = p_yes[start:start + request.count]
        start += len(probabilities)
        ranked = sorted(range(len(probabilities)), key=lambda i: (-probabilities[i], i))
        results.append({"yes_probabilities": probabilities, "predicted_index": ranked[0], "topk_indices": ranked[:request.topk]})
    return results


def summed_spellings(logprobs: list[float]) -> list[float]:
    """P(yes): each candidate's probability of every spelling (its log-probabilities side by side), summed."""
    spellings = len(YES_SPELLINGS)
    return [math.fsum(math.exp(lp) for lp in logprobs[i:i + spellings]) for i in range(0, len(logprobs), spellings)]


class YesProbabilityScorer(Scorer):
    kind = "yes_probability"
    request_type = YesProbabilityRequest

    def check(self, requests: list[YesProbabilityRequest]) -> None:
        if any(r.candidate_paths is not None for r in requests):
            raise Refused("candidate_paths: this service's listener is a text-only model; send candidates (text) instead")

    def _sequences(self, candidate: str, question: str) -> list[tuple[list[int], list[int]]]:
        """Per spelling of "yes": the model's input and the answer tokens it must predict."""
        prompt = listener_prompt(self.tokenizer, candidate, question)
        return [(full[:-1], answer) for full, answer in (answer_tokens(self.tokenizer, prompt, s) for s in YES_SPELLINGS)]

    def score(self, requests: list[YesProbabilityRequest]) -> list[dict[str, Any]]:
        import torch

        pairs = [(r, c) for r in requests for c in r.candidates or []]
        with self._tokenizer_lock:
            sequences = [s for request, candidate in pairs for s in self._sequences(candidate, request.question)]
        # Log-probability of each (pair, spelling) answer.
        logprobs: list[float] = []
        device = self.model.device
        for batch in _batches(sequences, self.batch_size):
            padded = self.tokenizer.pad({"input_ids": [inputs for inputs, _ in batch]}, padding_side="left", return_tensors="pt")
            mask = padded["attention_mask"].to(device)
            # Left padding puts every answer at the end of its row; positions must skip the pads.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            keep = max(len(answer) for _, answer in batch)
            with torch.inference_mode():
                logits = self.model(input_ids=padded["input_ids"].to(device), attention_mask=mask,
                                    position_ids=positions, logits_to_keep=keep).logits
            scores = logits.float().log_softmax(-1)
            for row, (_, answer) in enumerate(batch):
                # The prediction of answer token j sits at position -len(answer) + j of the row.
                window = scores[row, keep - len(answer):]
                logprobs.append(float(window.gather(-1, torch.tensor(answer, device=device)[:, None]).sum()))
        return ranked_results(requests, summed_spellings(logprobs))


class ImageYesProbabilityScorer(Scorer):
    """The listener that looks at images (seed 002's): a vision-language model and its processor
    (``tokenizer`` here), reading images only under ``media_dir``."""

    kind = "yes_probability"
    request_type = YesProbabilityRequest

    def __init__(self, model: Any, processor: Any, batch_size: int, name: str, media_dir: Path):
        super().__init__(model, processor, batch_size, name)
        self.media_dir = media_dir.resolve()

    def image_path(self, path: str) -> Path:
        """The file a candidate path names, under the media folder; Refused otherwise."""
        full = (self.media_dir / path).resolve()
        if not full.is_relative_to(self.media_dir):
            raise Refused(f"candidate_paths: {path} is outside the service's media folder {self.media_dir}")
        if not full.is_file():
            raise Refused(f"candidate_paths: {path}: no such file under {self.media_dir}")
        return full

    def check(self, requests: list[YesProbabilityRequest]) -> None:
        for request in requests:
            if request.candidates is not None:
                raise Refused("candidates: this service's listener looks at images; send candidate_paths (image files) instead")
            for path in request.candidate_paths or []:
                self.image_path(path)

    def score(self, requests: list[YesProbabilityRequest]) -> list[dict[str, Any]]:
        import torch
        from PIL import Image

        # Per (candidate, spelling): the text with its image placeholder, the image, and the answer's tokens.
        items = []
        with self._tokenizer_lock:
            for request in requests:
                messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request.question}]}]
                prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                answers = [answer_tokens(self.tokenizer.tokenizer, prompt, spelling)[1] for spelling in YES_SPELLINGS]
                for path in request.candidate_paths or []:
                    image = Image.open(self.image_path(path)).convert("RGB")
                    items += [(prompt + spelling, image, answer) for spelling, answer in zip(YES_SPELLINGS, answers, strict=True)]
        logprobs: list[float] = []
        device = self.model.device
        for batch in _batches(items, self.batch_size):
            with self._tokenizer_lock:
                inputs = self.tokenizer(text=[text for text, _, _ in batch], images=[image for _, image, _ in batch], padding=True,
                                        return_tensors="pt").to(device)
            with torch.inference_mode():
                scores = self.model(**inputs).logits.float().log_softmax(-1)
            lengths = inputs["attention_mask"].sum(-1).tolist()  # right-padded: each row's answer ends at its length
            for row, (_, _, answer) in enumerate(batch):
                end = lengths[row]
                window = scores[row, end - len(answer) - 1:end - 1]  # the predictions of the answer's tokens
                logprobs.append(float(window.gather(-1, torch.tensor(answer, device=device)[:, None]).sum()))
        return ranked_results(requests, summed_spellings(logprobs))


class ClassifierScorer(Scorer):
    kind = "classifier"
    request_type = ClassifierRequest

    def _text(self, request: ClassifierRequest) -> str | tuple[str, str]:
        messages = [{"role": "user", "content": request.prompt}] if isinstance(request.prompt, str) else [m.model_dump() for m in request.prompt]
        if self.tokenizer.chat_template is None:
            return "\n".join(m["content"] for m in messages), request.completion
        return self.tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": request.completion}], tokenize=False)

    def score(self, requests: list[ClassifierRequest]) -> list[dict[str, Any]]:
        import torch

        results = []
        for batch in _batches(requests, self.batch_size):
            texts = [self._text(r) for r in batch]
            with self._tokenizer_lock:
                # The chat template already holds the special tokens.
                inputs = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=self.tokenizer.chat_template is None)
            with torch.inference_mode():
                logits = self.model(**inputs.to(self.model.device)).logits.float()
            values = logits[:, 0] if logits.shape[-1] == 1 else logits.softmax(-1)[:, 1]
            results += [{"score": float(v)} for v in values]
        return results


def load_scorer(config: RewardServiceConfig, media_dir: str | None = None) -> Scorer:
    """The service's model from its local folder; ValueError naming ``services.reward.model`` otherwise.
    A vision-language listener reads its images under ``media_dir`` (the run's generate.media_dir)."""
    import json

    path = Path(config.model)
    if not (path / "config.json").is_file():
        raise ValueError(f"services.reward.model: {path} is not a model folder (no config.json there)")
    looks = config.kind == "yes_probability" and "vision_config" in json.loads((path / "config.json").read_text())
    if looks and media_dir is None:
        raise ValueError(f"services.reward.model: {path} is a listener that looks at images; set generate.media_dir, the folder"
                         " its requests' candidate_paths are read from (--media-dir by hand)")
    # After the checks: a bad folder is one line, without the warnings transformers' import may print.
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoModelForSequenceClassification,
        AutoProcessor,
        AutoTokenizer,
    )

    device, dtype = pick_device()
    # A folder that does not load (or a model unfit for the kind) fails for good, not retried.
    with loading(str(path)):
        if looks:
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            processor.tokenizer.padding_side = "right"
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True)
            scorer: Scorer = ImageYesProbabilityScorer(model.to(device).eval(), processor, config.batch_size, str(path), Path(str(media_dir)))
            log.info("reward service: %s listener %s (images under %s) loaded on %s", config.kind, path, media_dir, device)
            return scorer
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if config.kind == "yes_probability":
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token  # pads are masked out: any token will do
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
            scorer = YesProbabilityScorer(model.to(device).eval(), tokenizer, config.batch_size, str(path))
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, local_files_only=True)
            if model.config.num_labels not in (1, 2):
                raise ValueError(f"services.reward.model: {path} has {model.config.num_labels} labels; a classifier reward needs 1 (its logit is the score) or 2 (the probability of label 1)")
            if tokenizer.pad_token is None:
                raise ValueError(f"services.reward.model: {path}'s tokenizer has no pad token, needed to score in batches")
            model.config.pad_token_id = tokenizer.pad_token_id
            scorer = ClassifierScorer(model.to(device).eval(), tokenizer, config.batch_size, str(path))
    log.info("reward service: %s model %s loaded on %s (%s)", config.kind, path, device, str(dtype).removeprefix("torch."))
    return scorer


def create_app(scorer: Scorer, api_key: str, concurrency: int, acquire_timeout_s: float) -> FastAPI:
    # As many inference threads as slots, the same ones every call: torch's CPU thread pool is per
    # calling thread, and asyncio's shared executor would hand the model to a changing set of them
    # (which cost the service a third of its throughput in tools/bench/reward_service_bench.py).
    workers = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="inference")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        workers.shutdown(wait=False)

    app = FastAPI(title="selftrain reward service", docs_url=None, redoc_url=None, lifespan=lifespan)
    slots = asyncio.Semaphore(concurrency)
    counts = {"served": 0, "refused_busy": 0}
    bearer = HTTPBearer(auto_error=False)

    def authorized(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise HTTPException(401, "a valid API key is needed: Authorization: Bearer <the run's API key>",
                                headers={"WWW-Authenticate": "Bearer"})

    async def infer(requests: list[Any]) -> list[dict[str, Any]]:
        try:
            scorer.check(requests)
        except Refused as refused:
            raise HTTPException(422, str(refused)) from None
        try:
            await asyncio.wait_for(slots.acquire(), acquire_timeout_s)
        except TimeoutError:
            counts["refused_busy"] += 1
            log.warning("reward service: 503, no inference slot free within %g s (%d refused so far)", acquire_timeout_s, counts["refused_busy"])
            raise HTTPException(503, f"busy: no inference slot free within {acquire_timeout_s:g} s; retry later") from None
        try:
            results = await asyncio.get_running_loop().run_in_executor(workers, scorer.score, requests)
        finally:
            slots.release()
        counts["served"] += len(requests)
        return results

    request_type = scorer.request_type

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "kind": scorer.kind, "model": scorer.name, **counts}

    @app.post("/score", dependencies=[Depends(authorized)])
    async def score(request: request_type) -> dict[str, Any]:  # type: ignore[valid-type]
        return (await infer([request]))[0]

    @app.post("/batch_score", dependencies=[Depends(authorized)])
    async def batch_score(body: Batch[request_type]) -> dict[str, Any]:  # type: ignore[valid-type]
        start = time.perf_counter()
        results = await infer(body.batch)
        return {"results": results, "took": round(time.perf_counter() - start, 4)}

    return app


class _Server(uvicorn.Server):
    """uvicorn's server, telling its owner where it listens once it accepts connections."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[str], None]):
        super().__init__(config)
        self.on_ready = on_ready

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.on_ready(f"http://{f'[{host}]' if ':' in host else host}:{port}")


class RewardServer:
    """The service, for the job that runs it: ``run`` loads the model, serves until ``stop`` (from
    any thread) or SIGTERM / SIGINT when run in the main thread (uvicorn's own handling: it finishes
    the calls in flight, then raises the signal again for the job's own handler), and returns.
    ``on_ready(url)`` is called once, when the server accepts connections; port 0 takes a free port
    from the kernel, and the URL says which."""

    def __init__(self, config: RewardServiceConfig, api_key: str, host: str, port: int = 0, media_dir: str | None = None):
        self.config, self.api_key, self.host, self.port, self.media_dir = config, api_key, host, port, media_dir
        self._lock = threading.Lock()
        self._stopped = False
        self._server: _Server | None = None

    def run(self, on_ready: Callable[[str], None]) -> None:
        scorer = load_scorer(self.config, self.media_dir)
        app = create_app(scorer, self.api_key, self.config.concurrency, self.config.acquire_timeout_s)
        # log_config None: uvicorn logs through the job's own logging set-up; one line per
        # request would flood a service's log (503s are logged by the app).
        server = _Server(uvicorn.Config(app, host=self.host, port=self.port, log_config=None, access_log=False), on_ready)
        with self._lock:
            if self._stopped:
                return
            self._server = server
        server.run()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._server is not None:
                self._server.should_exit = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.services.reward_server", description=__doc__.splitlines()[0])
    parser.add_argument("--api-key-file", type=Path, required=True, help="the API key clients must send (made, 0600, if missing)")
    parser.add_argument("--port", type=int, default=0, help="default: a free port (the URL is printed)")
    parser.add_argument("--model", required=True, help="a local Hugging Face model folder")
    parser.add_argument("--kind", required=True, choices=["yes_probability", "classifier"])
    parser.add_argument("--media-dir", help="where a listener that looks at images reads its candidate_paths")
    add_options(parser, RewardServiceConfig, skip=("model", "kind"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        config = section_from_options(RewardServiceConfig, args)
        server = RewardServer(config, run_api_key(args.api_key_file), config.host or "127.0.0.1", args.port, args.media_dir)
        server.run(lambda url: print(f"serving at {url}", flush=True))
    except (InputError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
