"""The service job: a server of the run (a reward model, seed 002's listener; or vLLM servers of one
model) for the stages that need it.

The driver submits it before the first stage that needs it and waits until its ledger record says
``serving``. The job listens on loopback on the embedded default and on its node's address on
SLURM (consumers may run on other nodes), on a port found free by binding, with the run's API key.
Once the model answers, it writes where it listens to the endpoint file (atomically; a restarted
service rewrites it, and clients re-read it when their server goes away) and records ``serving``
with its endpoint and node. It serves until the stages it serves are done (it stops by itself,
for detached runs that have no driver to cancel it), until SIGTERM (scancel; the driver cancels it
when its last consumer ends), or until the pre-timeout signal (the driver resubmits it if it is
still needed).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any, Protocol

from jobs.runtime import log, reporting, stop_requested
from jobs.services.process import node_address, run_api_key
from jobs.specs import ServiceSpec, VllmServing
from jobs.vllm.server import JobSignalled, ServerFiles
from jobs.vllm.service import VllmService
from state import Ledger, Status, atomic_write_json
from state.ledger import now

# How often the job looks at its consumers' records and for a stop signal.
STOP_CHECK_INTERVAL_S = 2.0
CONSUMERS_DONE = "the stages it serves are done"


class ServiceStopped(RuntimeError):
    """The service was stopped while stages still needed it."""


class Server(Protocol):
    def run(self, on_ready: Callable[..., None]) -> None:
        """Serve until ``stop()`` or SIGTERM; call ``on_ready(url, ...)`` once it answers."""
        ...

    def stop(self) -> None: ...


def make_server(spec: ServiceSpec) -> Server:
    api_key_file = Path(spec.api_key_file)
    if isinstance(spec.config, VllmServing):
        return VllmService(spec.config, ServerFiles.of_job(Path(spec.folder), spec.api_key_file, spec.compile_cache_dir), "127.0.0.1" if spec.loopback else node_address())
    # Imported here for import cost: the reward server loads FastAPI and torch, which a vLLM service does not need.
    from jobs.services.reward_server import RewardServer

    host = spec.config.host or ("127.0.0.1" if spec.loopback else node_address())
    # Port 0: uvicorn binds a free port itself, so no other process can take it between a check and the bind.
    return RewardServer(spec.config, run_api_key(api_key_file), host, 0, spec.media_dir)


def serve(spec: ServiceSpec, metrics: dict[str, Any]) -> None:
    ledger = Ledger(spec.target.run_dir)
    server = make_server(spec)
    kind = getattr(spec.config, "kind", "vllm")
    endpoint_file = Path(spec.endpoint_file)
    finished = threading.Event()
    endpoint: dict[str, Any] = {}

    def why_stop() -> str | None:
        signum = stop_requested()
        if signum:
            return f"stop signal {signum}"
        if spec.consumers and all(ledger.read(key).get("status") == str(Status.DONE) for key in spec.consumers):
            return CONSUMERS_DONE
        return None

    def stop_when_asked() -> None:
        while not finished.wait(STOP_CHECK_INTERVAL_S):
            reason = why_stop()
            if reason:
                log.info("service %s stops: %s", spec.name, reason)
                metrics["stopped"] = reason
                server.stop()
                return

    def on_ready(url: str, *more: str) -> None:
        endpoint.update(url=url, urls=[url, *more], kind=kind, node=socket.gethostname(), since=now(),
                        job_id=ledger.read(spec.target.ledger_key).get("job_id"))
        atomic_write_json(endpoint_file, endpoint)
        ledger.update(spec.target.ledger_key, {"status": str(Status.SERVING), "endpoint": url, "node": endpoint["node"],
                                               "serving_since": endpoint["since"]})
        log.info("service %s (%s, %s) serving at %s", spec.name, kind, spec.config.model, ", ".join(endpoint["urls"]))
        threading.Thread(target=stop_when_asked, name="service-stop", daemon=True).start()

    try:
        server.run(on_ready)
    except JobSignalled:  # SIGTERM stopped vLLM's servers: the way a service ends
        metrics["stopped"] = "SIGTERM"
    finally:
        finished.set()
        # Only its own endpoint: a newer start of the service may have written the file since.
        with suppress(FileNotFoundError, json.JSONDecodeError):
            if endpoint and json.loads(endpoint_file.read_text()).get("url") == endpoint["url"]:
                endpoint_file.unlink()
    stopped = metrics.setdefault("stopped", "SIGTERM")
    metrics.update(endpoint=endpoint.get("url"), node=endpoint.get("node"))
    # Expected ends: its stages are done, the driver released it (its record says done before the
    # cancel), or nothing depends on it (a service run by hand ends with its job). Any other stop
    # (scancel from outside, the time limit) is a failure the driver answers by starting it again.
    released = ledger.read(spec.target.ledger_key).get("status") == str(Status.DONE)
    if spec.consumers and not released and stopped != CONSUMERS_DONE:
        raise ServiceStopped(f"stopped ({stopped}) while the stages it serves still need it")


def run(spec: ServiceSpec) -> dict[str, Any]:
    with reporting(spec.target) as metrics:
        serve(spec, metrics)
    return metrics
