"""vLLM OpenAI-compatible servers that a generation shard starts on its own node, and stops.

Per server: a port found free by a real bind (a start that still loses it to another process is
retried on a new port), bound to 127.0.0.1 unless configured otherwise, the run's API key passed
through the environment (never on a command line, never logged), compile and cache folders of its
own (torch.compile caches shared by servers starting at once on a shared filesystem get corrupted),
and its log appended to ``<shard>/server_<i>.log`` in the run directory. The servers are stopped
however the job ends: normally, on an error (the shard's ``finally``), at once on SIGTERM (SLURM's
end of a job, scancel), within half a second of the pre-timeout SIGUSR2 (the client's watchdog
stops the shard at a safe point, see jobs.runtime), and, through the kernel's parent-death signal,
when the job is killed outright.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from jobs.specs import GenerateConfig, VllmConfig

log = logging.getLogger("selftrain")

LAUNCHER = Path(__file__).resolve().with_name("vllm_launcher.py")
# What tools/setup_vllm.sh installs: vLLM in an environment of its own, beside the project's.
CHECKOUT_VLLM_PYTHON = Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"
# vLLM accepts only these values for --max-lora-rank.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
PORT_ATTEMPTS = 5
STOP_GRACE_S = 30.0
LOG_TAIL_LINES = 25
PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """A server did not start, or exited while the shard still needed it."""


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


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # ends in /v1
    api_key: str
    model: str
    # Requests carry their seed. Not to vLLM on CPU: a seeded request whose prompt is prefilled in
    # chunks kills its engine there ("CPU Generator does not use offset", vLLM 0.32), so on CPU
    # samples are not reproducible item by item.
    seeded: bool = True


def run_api_key(path: Path) -> str:
    """The run's API key: made once, readable by its owner only; every later shard reads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        if not path.exists():
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                f.write(secrets.token_urlsafe(32))
        return path.read_text().strip()


def free_port(host: str) -> int:
    """A port that a real bind on ``host`` just got from the kernel."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def visible_gpus() -> list[str]:
    """The GPUs this job may use: CUDA_VISIBLE_DEVICES (SLURM sets it), else all nvidia-smi lists."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    return [str(i) for i, line in enumerate(line for line in listing.splitlines() if line.startswith("GPU "))]


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Fields after the parenthesized command: state, ppid, pgrp, ...
            state, _, pgrp = stat.read_text().rpartition(")")[2].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
        text = f.read().decode(errors="replace")
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def describe_exit(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def vllm_python(config: VllmConfig) -> str:
    """The configured python, else this checkout's .venv-vllm's (tools/setup_vllm.sh), else the job's."""
    return config.python or (str(CHECKOUT_VLLM_PYTHON) if CHECKOUT_VLLM_PYTHON.exists() else sys.executable)


def vllm_command(config: VllmConfig) -> list[str]:
    command = list(config.command) if config.command else [vllm_python(config), str(LAUNCHER)]
    if shutil.which(command[0]) is None:
        raise ServerError(
            f"generate.vllm: {command[0]} not found; install vLLM with tools/setup_vllm.sh or set generate.vllm.python"
        )
    return command


def model_arguments(model_path: str, config: VllmConfig, name: str) -> list[str]:
    """``serve`` arguments for the model that requests call ``name``.

    With ``lora``, a model that training saved beside its LoRA adapter (``<train>/model`` and
    ``<train>/adapter``) is served as that adapter over the adapter's base model.
    """
    adapter = Path(model_path).parent / "adapter"
    if not (config.lora and (adapter / "adapter_config.json").is_file()):
        return [model_path, "--served-model-name", name]
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    rank = min((r for r in VLLM_LORA_RANKS if r >= adapter_config["r"]), default=adapter_config["r"])
    return [
        adapter_config["base_model_name_or_path"], "--served-model-name", f"{name}-base",
        "--enable-lora", "--lora-modules", f"{name}={adapter}", "--max-lora-rank", str(rank),
    ]


def serve_arguments(model_path: str, generate: GenerateConfig, name: str) -> list[str]:
    config = generate.vllm
    args = ["serve", *model_arguments(model_path, config, name)]
    args += ["--host", config.host, "--tensor-parallel-size", str(config.tensor_parallel_size), "--dtype", config.dtype]
    args += ["--gpu-memory-utilization", str(config.gpu_memory_utilization), "--disable-uvicorn-access-log"]
    if config.max_model_len:
        args += ["--max-model-len", str(config.max_model_len)]
    if config.max_num_seqs:
        args += ["--max-num-seqs", str(config.max_num_seqs)]
    if generate.media_dir:
        args += ["--allowed-local-media-path", str(Path(generate.media_dir).resolve())]
    return args + list(config.extra_args)


# Loaded here, not in the forked child: loading a library between fork and exec can deadlock.
_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """Runs in the server process before exec: the kernel sends it SIGTERM if the job dies."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


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
                preexec_fn=_die_with_parent if _LIBC else None,  # noqa: PLW1509
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
        return {"servers": servers, "server_start_s": self.start_seconds}

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
    # A name of its own per server: a server that answers on our port but is not ours lists another.
    name = f"policy-{secrets.token_hex(4)}"
    servers = []
    for index in range(count):
        caches = files.folder / f"server_{index}"
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
    return fleet
