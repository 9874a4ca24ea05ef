"""vLLM servers of one model as a service of the run: what its job serves (``VllmServing``), and the
servers it keeps up until it is stopped (``VllmService``)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

from jobs.specs import VllmServing
from jobs.vllm.server import ServerFiles, start_servers


class VllmService:
    """vLLM servers of one model as a service of the run (its service job runs this): started, watched
    until ``stop()`` or SIGTERM, then stopped."""

    CHECK_INTERVAL_S = 5.0

    def __init__(self, serving: VllmServing, files: ServerFiles, host: str):
        self.serving, self.files, self.host = serving, files, host
        self._stop = threading.Event()

    def run(self, on_ready: Callable[..., None]) -> None:
        generate = dataclasses.replace(self.serving.generate, vllm=dataclasses.replace(self.serving.generate.vllm, host=self.host))
        fleet = start_servers(self.serving.model, generate, self.files)
        try:
            on_ready(*(endpoint.base_url.removesuffix("/v1") for endpoint in fleet.endpoints))
            while not self._stop.wait(self.CHECK_INTERVAL_S):
                if fleet.stopped_by:  # SIGTERM: the job ends, and the servers with it
                    return
                fleet.check()
        finally:
            fleet.stop()

    def stop(self) -> None:
        self._stop.set()
