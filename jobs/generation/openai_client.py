"""Generation through OpenAI-compatible servers (vLLM): async, n samples per request, retried.

One chat request per problem asks for all K samples (``n``), so the server shares the prompt's
prefix among them. ``batch_size`` requests per server are in flight at once, spread over the
servers. Requests go out through aiohttp, as vLLM's own ``bench serve`` sends them: the OpenAI
SDK's async client kept only a fraction of them in flight here (a vLLM server ran 3-5 times more
engine steps for the same tokens: tools/bench/vllm_bench.py). Connection errors, timeouts, 429
and 5xx are retried with exponential back-off; a request the server still refuses becomes a
failed item, while a server that cannot be reached at all (or whose process exited: the watchdog
checks every half second) fails the shard.
The watchdog also stops the shard within half a second of the pre-timeout signal (jobs.runtime):
the items written are whole, the requests in flight are left to the requeued job.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import aiohttp
import openai
from orjson import loads as json_loads

from jobs.generation.config import GenerateConfig
from jobs.generation.protocol import Completion, Outcome, Request
from jobs.runtime import stop_if_preempted
from jobs.vllm.server import Endpoint

log = logging.getLogger("selftrain")
# The OpenAI SDK (check_endpoint) logs every request at INFO.
logging.getLogger("httpx2").setLevel(logging.WARNING)

WATCH_INTERVAL_S = 0.5


class EndpointError(RuntimeError):
    """An endpoint that cannot be used: unreachable, refusing the key, or not serving the model."""


class Supervisor(Protocol):
    """The servers behind the endpoints, when this job started them."""

    def check(self) -> None:
        """Raise if a server is gone."""
        ...

    def stop(self) -> None: ...

    def metrics(self) -> dict[str, Any]: ...


def api_base(url: str) -> str:
    """``http://host:port`` or ``http://host:port/v1`` -> the latter."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def check_endpoint(url: str, api_key: str | None, model: str | None = None, timeout_s: float = 60.0) -> tuple[Endpoint, list[str], str]:
    """The endpoint for ``model`` (default: the one it serves), the models it lists, and its reply to
    one chat request; EndpointError naming the cause when any of it fails."""
    base = api_base(url)
    client = openai.OpenAI(base_url=base, api_key=api_key or "none", max_retries=0, timeout=timeout_s)
    try:
        models = [m.id for m in client.models.list()]
        if model is None:
            if len(models) != 1:
                raise EndpointError(f"{base} serves {len(models)} models {models}; name one (generate.endpoint_model / --model)")
            model = models[0]
        if model not in models:
            raise EndpointError(f"{base} does not serve model {model!r}; it serves {models}")
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0
        )
    except openai.AuthenticationError:
        raise EndpointError(
            f"{base} refused the API key (401): pass the key the server was started with (--api-key / VLLM_API_KEY)"
        ) from None
    except openai.APIConnectionError as error:
        raise EndpointError(f"{base} cannot be reached ({error.__cause__ or error}): is a server running there?") from None
    except openai.APIStatusError as error:
        raise EndpointError(f"{base} answered {error.status_code}: {error.message}") from None
    finally:
        client.close()
    return Endpoint(base, api_key or "none", model), models, reply.choices[0].message.content or ""


def connect_endpoints(config: GenerateConfig) -> list[Endpoint]:
    """``generate.endpoints``, each checked before any problem is sent."""
    api_key = os.environ.get(config.endpoint_api_key_env)
    endpoints = []
    for url in config.endpoints:
        endpoint, _, _ = check_endpoint(url, api_key, config.endpoint_model)
        log.info("endpoint %s serves %s", endpoint.base_url, endpoint.model)
        endpoints.append(endpoint)
    return endpoints


def _completions(response: dict[str, Any], n: int, logprobs: bool) -> list[Completion]:
    """The samples of one answer; with ``logprobs``, each token's (ValueError when the server gave none)."""
    choices = sorted(response["choices"], key=lambda c: c["index"])
    if len(choices) != n:
        raise ValueError(f"asked for {n} samples, got {len(choices)}")
    completions = []
    for choice in choices:
        # vLLM returns each sample's token ids when asked (return_token_ids); a server that does not
        # leaves the counts to be shared out from the request's usage.
        token_ids = choice.get("token_ids")
        num_tokens = len(token_ids) if token_ids is not None else round(response["usage"]["completion_tokens"] / n)
        text = choice["message"].get("content") or ""
        if not logprobs:
            completions.append(Completion(text, num_tokens))
            continue
        values = [entry["logprob"] for entry in (choice.get("logprobs") or {}).get("content") or []]
        if token_ids is None or len(values) != len(token_ids):
            raise ValueError(f"asked for each token's log-probability, got {len(values)} for {num_tokens} tokens")
        completions.append(Completion(text, num_tokens, token_ids, values))
    return completions


def _refusal(status: int, body: str) -> str:
    """What the server said when it refused a request: vLLM's error type and message where it gives them."""
    try:
        error = json_loads(body)
        error = error.get("error", error)
        return f"{error.get('type', 'HTTP error')} ({status}): {error.get('message', body)}"
    except (ValueError, AttributeError):
        return f"HTTP {status}: {body[:500]}"


def retried(status: int) -> bool:
    """Worth asking again: the server timed out, was busy or failed (as the OpenAI SDK decides)."""
    return status in (408, 409, 429) or status >= 500


def backoff_s(attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, ...): doubling from 0.5 s up to 8 s, jittered
    so that the requests of a shard do not come back all at once."""
    return min(0.5 * 2 ** (attempt - 1), 8.0) * random.uniform(0.75, 1.0)


class OpenAIBackend:
    def __init__(self, endpoints: list[Endpoint], config: GenerateConfig, servers: Supervisor | None = None,
                 banned: Sequence[int] = ()):
        """``banned``: tokens no sample may contain (jobs.generation.backends.placeholder_tokens)."""
        self.endpoints, self.config, self.servers = endpoints, config, servers
        self.logit_bias = {**config.extra_body.get("logit_bias", {}), **{str(token): -100 for token in banned}}

    def run(self, requests: list[Request], on_outcome: Callable[[Outcome], None]) -> None:
        try:
            asyncio.run(self._run(requests, on_outcome))
        except BaseExceptionGroup as group:
            # The first failure is the cause (a server exit); the others are its echoes.
            raise group.exceptions[0] from None

    def metrics(self) -> dict[str, Any]:
        if self.servers is not None:
            return self.servers.metrics()
        return {"endpoints": [e.base_url for e in self.endpoints]}

    def close(self) -> None:
        if self.servers is not None:
            self.servers.stop()

    async def _run(self, requests: list[Request], on_outcome: Callable[[Outcome], None]) -> None:
        pending = iter(enumerate(requests))
        # No connection limit of its own: the workers bound what is in flight.
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session, asyncio.TaskGroup() as group:
            watchdog = group.create_task(self._watch())
            workers = [
                group.create_task(self._work(session, endpoint, pending, on_outcome))
                for endpoint in self.endpoints
                for _ in range(self.config.batch_size)
            ]
            await asyncio.gather(*workers)
            watchdog.cancel()

    async def _watch(self) -> None:
        while True:
            stop_if_preempted()
            if self.servers:
                self.servers.check()
            await asyncio.sleep(WATCH_INTERVAL_S)

    async def _work(
        self, session: aiohttp.ClientSession, endpoint: Endpoint, pending: Iterator[tuple[int, Request]],
        on_outcome: Callable[[Outcome], None],
    ) -> None:
        """One request in flight at a time, taking the next from ``pending`` shared by all workers."""
        for index, request in pending:
            on_outcome(await self._complete(session, endpoint, index, request))

    async def _complete(self, session: aiohttp.ClientSession, endpoint: Endpoint, index: int, request: Request) -> Outcome:
        sampling = request.sampling
        payload: dict[str, Any] = {
            # The sampling settings win over extra_body's: an evaluation stays greedy.
            **self.config.extra_body, "model": endpoint.model, "messages": request.messages, "n": sampling.n,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": sampling.max_tokens,
            "return_token_ids": True,
        }
        if self.logit_bias:
            payload["logit_bias"] = self.logit_bias
        if sampling.logprobs:
            # The sampled token's only: after temperature and top-p (the servers' --logprobs-mode).
            payload.update(logprobs=True, top_logprobs=0)
        if endpoint.seeded:
            payload["seed"] = sampling.seed
        headers = {"Authorization": f"Bearer {endpoint.api_key}"}
        error = ""
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                await asyncio.sleep(backoff_s(attempt))
            try:
                async with session.post(f"{endpoint.base_url}/chat/completions", json=payload, headers=headers) as response:
                    body = await response.text()
            except TimeoutError:  # before ClientError: aiohttp's read timeouts are both
                error = f"no answer within {self.config.request_timeout_s:g} s (generate.request_timeout_s)"
                continue
            except aiohttp.ClientError as cause:  # refused, dropped, or cut off in the middle of the answer
                error = f"{type(cause).__name__}: {cause}"
                if attempt == self.config.max_retries:
                    if self.servers:
                        self.servers.check()  # a server that died explains the failure better
                    raise EndpointError(f"{endpoint.base_url} unreachable after {self.config.max_retries} retries: {error}") from None
                continue
            if response.status == 200:
                try:
                    return Outcome(index, _completions(json_loads(body), sampling.n, sampling.logprobs))
                except (ValueError, KeyError, TypeError, AttributeError) as cause:
                    error = f"unexpected answer ({type(cause).__name__}: {cause}): {body[:500]}"
                    break
            error = _refusal(response.status, body)
            if not retried(response.status):
                break
        if self.servers:
            self.servers.check()
        # Still refused after the retries: this item fails, the shard goes on.
        log.warning("request %d failed: %s", index, error)
        return Outcome(index, [], error=error)
