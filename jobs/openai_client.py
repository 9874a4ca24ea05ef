"""Generation through OpenAI-compatible servers (vLLM): async, n samples per request, retried.

One chat request per problem asks for all K samples (``n``), so the server shares the prompt's
prefix among them. ``batch_size`` requests per server are in flight at once, spread over the
servers. The OpenAI client retries connection errors, timeouts, 429 and 5xx with exponential
back-off; a request the server still refuses becomes a failed item, while a server that cannot
be reached at all (or whose process exited: the watchdog checks every half second) fails the shard.
The watchdog also stops the shard within half a second of the pre-timeout signal (jobs.runtime):
the items written are whole, the requests in flight are left to the requeued job.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import openai

from jobs.backends import Completion, Messages, Outcome, Request, Sampling
from jobs.runtime import stop_if_preempted
from jobs.specs import GenerateConfig
from jobs.vllm_server import Endpoint

log = logging.getLogger("selftrain")
# The OpenAI client's HTTP library logs every request at INFO: thousands of lines per shard.
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


def _completions(response: Any, n: int) -> list[Completion]:
    choices = sorted(response.choices, key=lambda c: c.index)
    if len(choices) != n:
        raise ValueError(f"asked for {n} samples, got {len(choices)}")
    completions = []
    for choice in choices:
        # vLLM returns each sample's token ids when asked (return_token_ids); a server that does not
        # leaves the counts to be shared out from the request's usage.
        token_ids = getattr(choice, "token_ids", None)
        num_tokens = len(token_ids) if token_ids is not None else round(response.usage.completion_tokens / n)
        completions.append(Completion(choice.message.content or "", num_tokens))
    return completions


class OpenAIBackend:
    def __init__(self, endpoints: list[Endpoint], config: GenerateConfig, servers: Supervisor | None = None):
        self.endpoints, self.config, self.servers = endpoints, config, servers

    def run(self, requests: list[Request], on_outcome: Callable[[Outcome], None]) -> None:
        try:
            asyncio.run(self._run(requests, on_outcome))
        except BaseExceptionGroup as group:
            # The first failure is the cause (a server exit); the others are its echoes.
            raise group.exceptions[0] from None

    def generate(self, conversations: list[Messages], sampling: Sampling) -> list[list[Completion]]:
        outcomes: list[Outcome] = []
        self.run([Request(m, sampling) for m in conversations], outcomes.append)
        failed = [o for o in outcomes if o.error]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(outcomes)} requests failed, e.g.: {failed[0].error}")
        return [o.completions for o in sorted(outcomes, key=lambda o: o.index)]

    def metrics(self) -> dict[str, Any]:
        if self.servers is not None:
            return self.servers.metrics()
        return {"endpoints": [e.base_url for e in self.endpoints]}

    def close(self) -> None:
        if self.servers is not None:
            self.servers.stop()

    async def _run(self, requests: list[Request], on_outcome: Callable[[Outcome], None]) -> None:
        pending = iter(enumerate(requests))
        clients = [
            openai.AsyncOpenAI(
                base_url=e.base_url, api_key=e.api_key, max_retries=self.config.max_retries,
                timeout=self.config.request_timeout_s,
            )
            for e in self.endpoints
        ]
        try:
            async with asyncio.TaskGroup() as group:
                watchdog = group.create_task(self._watch())
                workers = [
                    group.create_task(self._work(client, endpoint, pending, on_outcome))
                    for client, endpoint in zip(clients, self.endpoints, strict=True)
                    for _ in range(self.config.batch_size)
                ]
                await asyncio.gather(*workers)
                watchdog.cancel()
        finally:
            for client in clients:
                await client.close()

    async def _watch(self) -> None:
        while True:
            stop_if_preempted()
            if self.servers:
                self.servers.check()
            await asyncio.sleep(WATCH_INTERVAL_S)

    async def _work(
        self, client: openai.AsyncOpenAI, endpoint: Endpoint, pending: Iterator[tuple[int, Request]],
        on_outcome: Callable[[Outcome], None],
    ) -> None:
        """One request in flight at a time, taking the next from ``pending`` shared by all workers."""
        for index, request in pending:
            on_outcome(await self._complete(client, endpoint, index, request))

    async def _complete(self, client: openai.AsyncOpenAI, endpoint: Endpoint, index: int, request: Request) -> Outcome:
        sampling = request.sampling
        try:
            response = await client.chat.completions.create(
                model=endpoint.model, messages=request.messages, n=sampling.n, temperature=sampling.temperature,
                top_p=sampling.top_p, max_tokens=sampling.max_tokens, seed=sampling.seed if endpoint.seeded else None,
                extra_body={"return_token_ids": True, **self.config.extra_body},
            )
            return Outcome(index, _completions(response, sampling.n))
        except (openai.APIStatusError, openai.APITimeoutError, ValueError) as error:
            if self.servers:
                self.servers.check()  # a server that died explains the failure better
            # Still refused after the retries: this item fails, the shard goes on.
            log.warning("request %d failed: %s", index, error)
            return Outcome(index, [], error=f"{type(error).__name__}: {error}")
        except openai.APIConnectionError as error:
            if self.servers:
                self.servers.check()
            raise EndpointError(
                f"{endpoint.base_url} unreachable after {self.config.max_retries} retries: {error.__cause__ or error}"
            ) from None
