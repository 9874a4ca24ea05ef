"""The pipeline on a real SLURM cluster of two nodes (``tools/local_slurm.sh start --nodes 2``).

n1 and n2 are network namespaces of this machine, each with its own address on a private bridge
and its own host name: what crosses between them crosses a network, as between two machines.
Training runs one rank on each node (DDP over gloo, rendezvous on the first node), and generation
shards on both nodes start their vLLM servers on their own node's address, where the other node
reaches them with the run's API key, and only with it.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from jobs.services.process import group_members
from state import Ledger
from tests.conftest import read_json, run_cli, small_config, write_config
from tests.test_pipeline import assert_each_problem_once
from tests.test_slurm import SLURM_EXECUTOR, problems_file
from tests.test_vllm import vllm_generate, vllm_installed  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def on_two_nodes(two_node_cluster: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This module's commands (the driver, sbatch, sacct) go to the two-node cluster."""
    monkeypatch.setenv("SLURM_CONF", two_node_cluster)
    yield


def node_addresses() -> dict[str, str]:
    """``{"n1": "10.77.0.2", ...}``, as the cluster knows its nodes."""
    out = subprocess.run(["scontrol", "show", "nodes", "--oneliner"], capture_output=True, text=True, check=True).stdout
    fields = [dict(item.split("=", 1) for item in line.split() if "=" in item) for line in out.splitlines()]
    return {f["NodeName"]: f["NodeAddr"] for f in fields}


def ended(job_id: str, fields: str) -> str:
    """sacct's ``State|<fields>`` of a job once it has ended (the driver may return while its last
    job is still exiting)."""
    deadline = time.monotonic() + 60
    while True:
        row = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, f"--format=State,{fields}"],
                             capture_output=True, text=True, check=True).stdout.strip()
        if row.split("|")[0] not in ("", "PENDING", "RUNNING", "COMPLETING") or time.monotonic() > deadline:
            return row
        time.sleep(0.5)


def test_training_runs_one_rank_on_each_node_and_meets_on_the_first(tiny_assets: Path, tmp_path: Path) -> None:
    addresses = node_addresses()
    assert sorted(addresses) == ["n1", "n2"] and len(set(addresses.values())) == 2, addresses
    runs = tmp_path / "runs"
    executor = {**SLURM_EXECUTOR, "train": {"timeout_min": 10, "nodes": 2, "tasks_per_node": 1, "cpus_per_task": 1}}
    config = write_config(tmp_path / "two_nodes.yaml", small_config(
        tiny_assets, runs, num_iterations=1, learning_rates=[1e-3], data={"heldout": None},
        generate={"num_shards": 2}, train={"max_steps": 4}, executor=executor))

    result = run_cli("-m", "pipeline.run", str(config))

    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = runs / "small"
    record = Ledger(run_dir).read("iter_001/train")
    assert record["status"] == "done" and record["host"] == "n1", "rank 0 runs on the job's first node"
    assert record["metrics"]["world_size"] == 2 and record["metrics"]["steps"] == 4
    job_id = record["job_id"]
    assert ended(job_id, "NNodes,NodeList") == "COMPLETED|2|n[1-2]"
    # Each rank's log: which node it ran on, and where it met the other (the first node's name, as
    # that node's address; resolved on each node by its own /etc/hosts).
    logs = {rank: next(run_dir.rglob(f"{job_id}_{rank}_log.err")).read_text() for rank in (0, 1)}
    said = {rank: next(line for line in text.splitlines() if f"rank {rank} of 2 on " in line) for rank, text in logs.items()}
    hosts = {rank: line.split(" on ", 1)[1].split(";")[0] for rank, line in said.items()}
    assert hosts == {0: "n1", 1: "n2"}, said
    meeting = {line.split("rendezvous ", 1)[1] for line in said.values()}
    assert len(meeting) == 1 and meeting.pop().startswith("n1:") and f"({addresses['n1']})" in said[1], said
    # Both ranks dealt their own batches of one order, and trained one model together.
    orders = [read_json(run_dir / "iter_001" / "train" / "data_order" / f"rank_{rank}.json") for rank in (0, 1)]
    assert [(o["rank"], o["world_size"]) for o in orders] == [(0, 2), (1, 2)]
    model = run_dir / "iter_001" / "train" / "model"
    assert (model / "config.json").is_file() and list(model.glob("*.safetensors"))
    assert read_json(run_dir / "iter_001" / "train" / "model_card.json")["world_size"] == 2


# Runs as a job on one node: finds the generation shard running on another node and its vLLM
# server's address (the header the shard writes into the server's log), and as soon as the server
# answers (before the shard itself notices, a second at most after) asks it for its models with the
# run's API key, without a key, and with a wrong one. Prints one JSON line.
PROBE = r'''
import json, re, socket, sys, time, urllib.error, urllib.request
from pathlib import Path

run_dir, deadline = Path(sys.argv[1]), time.monotonic() + float(sys.argv[2])
me = socket.gethostname()
started = re.compile(r"===== selftrain: server 0 started .*?, port (\d+): .* --host (\S+)")


def server_on_another_node():
    for path in sorted((run_dir / "ledger" / "iter_001" / "generate").glob("shard_*.jsonl")):
        try:  # a record file's last line is the record (a torn one is passed over at the next look)
            record = json.loads(path.read_text().splitlines()[-1])
        except (OSError, ValueError, IndexError):
            continue
        if record.get("status") != "running" or record.get("host") in (None, me):
            continue
        log = run_dir / "iter_001" / "generate" / "servers" / path.stem / "server_0.log"
        starts = list(started.finditer(log.read_text(errors="replace") if log.exists() else ""))
        if starts:
            port, host = starts[-1].groups()
            url = f"http://{host}:{port}"
            if get(url + "/health", None)[0] == 200:  # vLLM answers /health without a key
                return path.stem, record["host"], url
    return None


def get(url, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as answer:
            body = answer.read()
            return answer.status, [m["id"] for m in json.loads(body)["data"]] if url.endswith("/v1/models") else None
    except urllib.error.HTTPError as error:
        return error.code, None
    except OSError as error:  # not listening (yet, or any more)
        return None, str(error)


while (found := server_on_another_node()) is None and time.monotonic() < deadline:
    time.sleep(0.1)
if found is None:
    print(json.dumps({"host": me, "error": "no running shard of another node with a started server"}))
    sys.exit(1)
shard, shard_host, url = found
key = (run_dir / "vllm_api_key").read_text().strip()
models = url + "/v1/models"
print(json.dumps({"host": me, "shard": shard, "shard_host": shard_host, "url": url, "with_key": get(models, key),
                  "without_key": get(models, None), "wrong_key": get(models, "not-the-run-key")}))
'''


def test_generation_shards_serve_on_their_own_node_and_the_other_node_needs_the_run_key(
    vllm_installed: None, tiny_assets: Path, tmp_path: Path  # noqa: F811
) -> None:
    addresses = node_addresses()
    runs = tmp_path / "runs"
    run_dir = runs / "small"
    server = vllm_generate().vllm
    # One request at a time and enough of them that each shard is still generating for a while
    # after its server has started, while the probe from the other node asks it.
    problems = 48
    generate = {"backend": "vllm", "num_shards": 2, "num_samples": 4, "max_tokens": 32, "batch_size": 1,
                "vllm": {"host": "node", "max_model_len": server.max_model_len, "extra_args": server.extra_args,
                         "env": server.env}}
    executor = {**SLURM_EXECUTOR, "generate": {"cpus_per_task": 1, "timeout_min": 15}}
    config = write_config(tmp_path / "vllm_two_nodes.yaml", small_config(
        tiny_assets, runs, num_iterations=1, learning_rates=[1e-3],
        data={"train": str(problems_file(tiny_assets, tmp_path / "problems.jsonl", problems)), "heldout": None},
        generate=generate, executor=executor))

    # A probe on each node, queued first: it holds one of its node's two CPUs, so the array's two
    # shards land one on each node (the partition also schedules on the least loaded node).
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    probes = {}
    for node in ("n1", "n2"):
        command = f"exec {shlex.quote(sys.executable)} {shlex.quote(str(probe))} {shlex.quote(str(run_dir))} 600"
        probes[node] = subprocess.run(
            ["sbatch", "--parsable", "-w", node, "-c", "1", "-t", "15", "-J", f"probe-{node}",
             f"--output={tmp_path}/probe-{node}.out", "--wrap", command],
            cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()

    try:
        result = run_cli("-m", "pipeline.run", str(config), timeout=900)
    finally:
        deadline = time.monotonic() + 30
        while subprocess.run(["squeue", "-h", "-j", ",".join(probes.values())], capture_output=True, text=True,
                             check=False).stdout.strip() and time.monotonic() < deadline:
            time.sleep(1)
        subprocess.run(["scancel", *probes.values()], check=False)
    assert result.returncode == 0, result.stdout + result.stderr

    ledger = Ledger(run_dir)
    shards = {f"shard_{i:05d}": ledger.read(f"iter_001/generate/shard_{i:05d}") for i in range(2)}
    assert {s["host"] for s in shards.values()} == {"n1", "n2"}, "one shard on each node"
    for shard in shards.values():
        (started,) = shard["metrics"]["servers"]
        assert urlparse(started["url"]).hostname == addresses[shard["host"]], "the server listened on its node's address"
        assert group_members(started["pid"]) == [], "no server outlives its array task"
    assert_each_problem_once(run_dir, 1, problems)

    for node, job_id in probes.items():
        output = (tmp_path / f"probe-{node}.out").read_text()
        answer = json.loads(output.strip().splitlines()[-1])
        assert "error" not in answer, output
        other = shards[answer["shard"]]
        assert answer["host"] == node != answer["shard_host"] == other["host"]
        assert answer["url"] == other["metrics"]["servers"][0]["url"]
        status, served = answer["with_key"]
        assert status == 200 and len(served) == 1 and served[0].startswith("policy-"), answer
        assert answer["without_key"] == [401, None] and answer["wrong_key"] == [401, None], answer
        assert ended(job_id, "NodeList") == f"COMPLETED|{node}"
