"""vLLM rollouts of a GRPO job on a server of its own (``grpo.vllm_mode: server``), GPUs only.

The server is ``trl vllm-serve``'s: TRL's ``build_command`` (vLLM's ``serve`` with the NCCL weight
transfer the trainer pushes its weights through, processed logprobs, dev-mode endpoints), started
and stopped as the generation shards' servers are (jobs.vllm.server: a port bound by the
server itself, retried if lost, health wait with the log's tail, a process group stopped with the
job and killed by the kernel if the job dies). Its log is ``<output>/rollout_server/server_0.log``.

Two layouts, as open-r1's ``slurm/train.slurm``:

- one node: rank 0 starts the server on loopback, on the ``grpo.vllm_gpus`` GPUs after the ones
  the training processes take (local ranks 0..n-1 train on visible GPUs 0..n-1);
- several nodes: the job's last node serves, with all its GPUs as data-parallel engines, and the
  other nodes train. Its first task starts the server, writes ``rollout_server/endpoint.json``
  (host, port, job id, restart count) and serves while this job's training runs (the ledger record
  is claimed by this job and still running); its other tasks have nothing to do. The training tasks
  form a world without it (tasks are dealt to nodes in blocks, SLURM's default, so they are the
  first ranks), and rank 0 waits for the endpoint of this very job before it trains.

Only rank 0 talks to the server (TRL's client lives in the main process). The weight-sync group's
rendezvous is on rank 0's node, on a port found free there by a real bind.

Never run here (no GPU, no GPU build of vLLM on this machine): what is above is reasoned from
TRL 1.16's source, not observed.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.runtime import job_identity, log
from jobs.services.process import ServerError, free_port
from jobs.specs import GrpoSpec
from jobs.vllm.server import ServerFleet, VllmServer, visible_gpus
from state import Ledger, Status, atomic_write_json

POLL_S = 5.0


class RolloutServer(VllmServer):
    """A vLLM server as ``trl vllm-serve`` runs it: no API key, since TRL's client sends none."""

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base_url + path, timeout=10) as response:
            body = response.read()
        return json.loads(body) if path.startswith("/v1") else body


@dataclass(frozen=True)
class Layout:
    """Where this task of a server-mode job stands."""

    serves: bool  # on the server's node, not training
    training_tasks: int  # the training world's size
    multi_node: bool


def layout(num_nodes: int, node: int, num_tasks: int) -> Layout:
    if num_nodes == 1:
        return Layout(serves=False, training_tasks=num_tasks, multi_node=False)
    per_node = num_tasks // num_nodes
    return Layout(serves=node == num_nodes - 1, training_tasks=num_tasks - per_node, multi_node=True)


def job_layout() -> Layout:
    """This task's place, from the SLURM job (one node when run by hand or by torchrun)."""
    import submitit

    try:
        job = submitit.JobEnvironment()
    except RuntimeError:
        return layout(1, 0, int(os.environ.get("WORLD_SIZE", "1")))
    return layout(job.num_nodes, job.node, job.num_tasks)


def _start(model: str, gpus: list[str], host: str, folder: Path, timeout_s: float) -> ServerFleet:
    from trl.scripts.vllm_serve import ScriptArguments, build_command

    folder.mkdir(parents=True, exist_ok=True)
    # TRL's command line names a port of its own; the one VllmServer appends after it, found free
    # by a bind, wins (the last of a repeated option does).
    argv = build_command(ScriptArguments(model=model, host=host, data_parallel_size=len(gpus)))
    env = {
        **os.environ,
        "VLLM_SERVER_DEV_MODE": "1",  # the weight-transfer endpoints, as trl vllm-serve sets it
        "CUDA_VISIBLE_DEVICES": ",".join(gpus),
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CACHE_ROOT": str(folder / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(folder / "torchinductor"),
        "TRITON_CACHE_DIR": str(folder / "triton"),
    }
    env.pop("VLLM_API_KEY", None)  # vLLM would demand it of TRL's client
    fleet = ServerFleet([RolloutServer(0, argv, env, host, folder, model)], api_key="", timeout_s=timeout_s, on_gpus=True)
    fleet.start()
    return fleet


@contextmanager
def local_server(spec: GrpoSpec, local_training_tasks: int) -> Iterator[tuple[str, int]]:
    """One node: the server on the GPUs after the training processes' ones, on loopback; yields (host, port)."""
    gpus = visible_gpus()
    spare = gpus[local_training_tasks:local_training_tasks + spec.grpo.vllm_gpus]
    if spec.grpo.vllm_gpus < 1 or len(spare) < spec.grpo.vllm_gpus:
        raise ValueError(f"grpo.vllm_gpus: the vLLM server needs {max(spec.grpo.vllm_gpus, 1)} GPU(s) of its own, and this"
                         f" node has {len(gpus)} for {local_training_tasks} training process(es)")
    fleet = _start(spec.init_model, spare, "127.0.0.1", Path(spec.output_dir) / "rollout_server", spec.grpo.stall_timeout_s)
    try:
        yield "127.0.0.1", fleet.servers[0].port
    finally:
        fleet.stop()


def _endpoint_file(spec: GrpoSpec) -> Path:
    return Path(spec.output_dir) / "rollout_server" / "endpoint.json"


def _this_job() -> dict[str, Any]:
    identity = job_identity()
    return {"job_id": identity["job_id"], "restart_count": identity["restart_count"]}


def serve_for_job(spec: GrpoSpec, first_task_of_node: bool) -> None:
    """Several nodes, on the last one: serve while this job's training runs."""
    if not first_task_of_node:
        return
    ledger, job = Ledger(spec.target.run_dir), _this_job()
    fleet = _start(spec.init_model, visible_gpus(), "0.0.0.0", _endpoint_file(spec).parent, spec.grpo.stall_timeout_s)
    try:
        atomic_write_json(_endpoint_file(spec), {"host": socket.gethostname(), "port": fleet.servers[0].port, **job})
        claimed_by = time.monotonic() + spec.grpo.stall_timeout_s
        while True:
            fleet.check()
            record = ledger.read(spec.target.ledger_key)
            ours = all(record.get(key) == value for key, value in job.items())
            if ours and record.get("status") != str(Status.RUNNING):
                return  # done, failed or requeued: rank 0 has reported
            if not ours and time.monotonic() > claimed_by:
                raise ServerError(f"the training ranks of job {job['job_id']} never claimed {spec.target.ledger_key}")
            time.sleep(POLL_S)
    finally:
        fleet.stop()


def remote_server(spec: GrpoSpec) -> tuple[str, int]:
    """Several nodes, on rank 0: where this job's server listens, once it has said so."""
    deadline, job = time.monotonic() + spec.grpo.stall_timeout_s, _this_job()
    while time.monotonic() < deadline:
        path = _endpoint_file(spec)
        if path.exists():
            endpoint = json.loads(path.read_text())
            if all(endpoint.get(key) == value for key, value in job.items()):
                log.info("rollouts from the vLLM server at %s:%d", endpoint["host"], endpoint["port"])
                return endpoint["host"], endpoint["port"]
        time.sleep(POLL_S)
    raise ServerError(f"the vLLM server on the job's last node did not start within {spec.grpo.stall_timeout_s:.0f} s"
                      f" (grpo.stall_timeout_s); its log is in {_endpoint_file(spec).parent}")


def weight_sync_port() -> int:
    """A port for the weight-sync rendezvous, which TRL's trainer opens on its own node."""
    return free_port("0.0.0.0")
