"""``service_score``: a reward served by a model of the run's reward service, and the client that asks it.

The service (jobs.services.reward_server) is a job of the run; its endpoint file (rewritten when the
driver resubmits a service that died) says where it listens, and the run's API key file how to
get in. ``RewardContext.services[service]`` gives both, with the client's settings
(``services.reward``). The client, as seed 002's:

- sends ``chunk_size`` requests per call to /batch_score, ``chunk_delay_s`` apart, each call with
  ``timeout_s``;
- retries a call ``max_retries`` times on 503 (no inference slot free), any other 5xx, timeouts
  and refused or dropped connections, sleeping as urllib3's Retry does (whose implementation it
  is): nothing before the first retry, then ``backoff_factor`` x 2^(n-1) before the n-th;
- asks the service only once for a request it has seen in this process (a cache of the service's
  answers keyed by the request, so by the (prompt, completion) pair and its columns);
- when the service is down (its calls fail and /health does not answer), re-reads the endpoint
  file and polls /health until a server answers again, for up to ``wait_s``, then goes on. A server
  that answers /health but fails the calls is not waited for.

Scores still missing after that are None (``PartialScores`` carries the values it has and the first
error): a failed call is never a made-up score.

Kinds (``services.reward.kind``):

- ``yes_probability`` (seed 002's listener and accuracy reward): per sample the request is
  ``{"candidates": <candidate_texts column>, "question": <question with the description>, "topk": 1}``
  (``candidate_paths`` instead when the samples have that column); the reward is 1.0 when the
  service's ``predicted_index`` is the sample's ``target_index`` column, else 0.0. The description
  is the text inside ``<tag>...</tag>`` of the completion when ``tag`` is set (seed 002: ``detailed``),
  the whole completion otherwise; a completion without that tag describes nothing and gets 0.0
  without asking the service.
- ``classifier``: ``{"prompt": <prompt>, "completion": <completion>}``; the reward is the score.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import urllib3
from urllib3.util import Retry

from jobs.scoring.reward_functions import column, completion_text, tag_content
from jobs.scoring.rewards import PartialScores, RewardContext, ServiceName, reward
from jobs.specs import ServiceRef

log = logging.getLogger("selftrain")

DEFAULT_SERVICE = ServiceName("reward")
# The listener's question, about the speaker's description.
DEFAULT_QUESTION = "Is this {description}?"
HEALTH_POLL_S = 0.5
HEALTH_TIMEOUT_S = 5.0
CACHE_SIZE = 100_000


class ServiceError(RuntimeError):
    """The service failed some calls (an error answer, or still failing after the retries)."""


class ServiceDown(ServiceError):
    """No healthy server at the service's endpoint for ``wait_s``."""


class _Cache:
    """A service's answers by request, the newest ``size`` kept; shared by a process's threads."""

    def __init__(self, size: int):
        self._items: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
            return self._items.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            if len(self._items) > self._size:
                self._items.popitem(last=False)


class ServiceClient:
    """Client of one service of the run (see the module's docstring for what it does on failures)."""

    def __init__(self, ref: ServiceRef):
        self.ref, self.config = ref, ref.config
        self._headers = {"Authorization": f"Bearer {Path(ref.api_key_file).read_text().strip()}"}
        retry = Retry(total=self.config.max_retries, backoff_factor=self.config.backoff_factor,
                      status_forcelist=range(500, 600), allowed_methods=None)  # scoring is idempotent: POST too
        self._http = urllib3.PoolManager(retries=retry, timeout=urllib3.Timeout(total=self.config.timeout_s))
        self._url: str | None = None
        self._cache = _Cache(CACHE_SIZE)

    def results(self, requests: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any] | None], str | None]:
        """The service's answer to each request (None where it gave none), and the first error."""
        keys = [json.dumps(r, sort_keys=True) for r in requests]
        answers = {k: a for k in keys if (a := self._cache.get(k)) is not None}
        to_send = {k: r for k, r in zip(keys, requests, strict=True) if k not in answers}
        chunks = [list(to_send)[i:i + self.config.chunk_size] for i in range(0, len(to_send), self.config.chunk_size)]
        error = None
        for number, chunk in enumerate(chunks):
            if number and self.config.chunk_delay_s:
                time.sleep(self.config.chunk_delay_s)
            try:
                got = self._call([to_send[k] for k in chunk])
            except ServiceError as failure:
                error = error or str(failure)
                if isinstance(failure, ServiceDown):
                    break  # waited wait_s already: the rest of this call would wait again for nothing
                continue
            for key, answer in zip(chunk, got, strict=True):
                answers[key] = answer
                self._cache.put(key, answer)
        return [answers.get(k) for k in keys], error

    def _call(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One /batch_score call, retried; across a restart of the service when it is down."""
        while True:
            url = self._url = self._url or self._read_endpoint() or self._wait_for_service("no endpoint file yet")
            try:
                response = self._http.request("POST", f"{url}/batch_score", json={"batch": batch}, headers=self._headers)
            except urllib3.exceptions.HTTPError as failure:
                reason = str(getattr(failure, "reason", None) or failure)
                current = self._read_endpoint()
                if current is not None and current != url:
                    self._url = current  # restarted elsewhere: try there at once
                    continue
                if self._healthy(url):
                    raise ServiceError(f"{url}/batch_score still failing after {self.config.max_retries} retries: {reason}") from None
                self._url = None
                self._wait_for_service(reason)
                continue
            if response.status != 200:
                raise ServiceError(f"{url}/batch_score answered {response.status}: {response.data.decode(errors='replace')[:300]}")
            try:
                results = response.json()["results"]
            except (ValueError, KeyError, TypeError):
                results = None
            if not isinstance(results, list) or len(results) != len(batch):
                raise ServiceError(f"{url}/batch_score answered {response.data[:200]!r}, not {len(batch)} results")
            return results

    def _read_endpoint(self) -> str | None:
        try:
            return str(json.loads(Path(self.ref.endpoint_file).read_text())["url"]).rstrip("/")
        except (OSError, ValueError, KeyError, TypeError):
            return None  # not written yet, or being replaced

    def _healthy(self, url: str) -> bool:
        try:
            answer = self._http.request("GET", f"{url}/health", retries=False, timeout=min(self.config.timeout_s, HEALTH_TIMEOUT_S))
        except urllib3.exceptions.HTTPError:
            return False
        return answer.status == 200

    def _wait_for_service(self, reason: str) -> str:
        """The URL of a healthy server, re-reading the endpoint file until one answers (up to wait_s)."""
        name, wait_s = self.ref.name, self.config.wait_s
        log.warning("service %r is down (%s): waiting up to %g s for it to come back", name, reason, wait_s)
        start = time.monotonic()
        while time.monotonic() - start < wait_s:
            url = self._read_endpoint()
            if url is not None and self._healthy(url):
                log.info("service %r is up at %s after %.1f s", name, url, time.monotonic() - start)
                self._url = url
                return url
            time.sleep(HEALTH_POLL_S)
        raise ServiceDown(f"service {name!r} down for {wait_s:g} s ({reason}); endpoint file {self.ref.endpoint_file}")


_CLIENTS: dict[tuple[str, str], ServiceClient] = {}
_CLIENTS_LOCK = threading.Lock()


def client_for(ref: ServiceRef) -> ServiceClient:
    """This process's client of ``ref``: its connections, where the service is and its cache last
    across calls."""
    with _CLIENTS_LOCK:
        key = (ref.name, ref.endpoint_file)
        if key not in _CLIENTS:
            _CLIENTS[key] = ServiceClient(ref)
        return _CLIENTS[key]


def _prompt(prompt: Any) -> str | list[dict[str, str]]:
    """A prompt as text, or TRL's conversational messages with their text contents."""
    if isinstance(prompt, str):
        return prompt
    return [{"role": m["role"], "content": completion_text([m])} for m in prompt]


def _listener_requests(completions: Sequence[Any], question: str, tag: str | None, columns: dict[str, Any]) -> list[dict[str, Any] | None]:
    """Per sample, the listener's request (None: the completion describes nothing)."""
    if "{description}" not in question:
        raise ValueError(f"question: must contain {{description}} (got {question!r})")
    # The data's column, and the request's field: images by path, or text objects.
    field, key = ("candidate_paths", "candidate_paths") if "candidate_paths" in columns else ("candidate_texts", "candidates")
    requests: list[dict[str, Any] | None] = []
    for completion, candidates in zip(completions, column(columns, field, len(completions)), strict=True):
        text = completion_text(completion)
        description = ((tag_content(text, tag) or "") if tag else text).strip()
        requests.append({key: list(candidates), "question": question.replace("{description}", description), "topk": 1} if description else None)
    return requests


@reward("service_score")
def service_score(
    prompts: Sequence[Any], completions: Sequence[Any], *, context: RewardContext, service: ServiceName = DEFAULT_SERVICE,
    question: str = DEFAULT_QUESTION, tag: str | None = None, **columns: Any,
) -> list[float | None]:
    """The run's reward service's score of each completion (see the module's docstring).

    ``question`` (yes_probability: the listener's question, with ``{description}``) and ``tag``
    (the completion's tag holding the description) do not apply to a classifier.
    """
    ref = context.services.get(service)
    if ref is None:
        raise ValueError(f"service_score: the run has no service {service!r} (configure services.{service})")
    client = client_for(ref)
    if ref.config.kind == "classifier":
        results, error = client.results([{"prompt": _prompt(p), "completion": completion_text(c)} for p, c in zip(prompts, completions, strict=True)])
        values = [None if r is None else float(r["score"]) for r in results]
    else:
        requests = _listener_requests(completions, question, tag, columns)
        sent = [r for r in requests if r is not None]
        answers, error = client.results(sent)
        by_sample = iter(answers)
        values = []
        for request, target in zip(requests, column(columns, "target_index", len(completions)), strict=True):
            if request is None:
                values.append(0.0)
                continue
            answer = next(by_sample)
            values.append(None if answer is None else float(answer["predicted_index"] == int(target)))
    if error is not None:
        raise PartialScores(values, error)
    return values
