"""``python -m pipeline.serve CONFIG [key=value ...] [--model PATH]``: a run's vLLM servers as a job of their own.

The seeds' "start the vLLM server" step, on a cluster node (sbatch/vllm_server.sbatch runs this):
the servers start exactly as generation shards start theirs (``generate.vllm``: executable,
arguments, caches, one per GPU group), listen on ``generate.vllm.host`` (0.0.0.0 to serve other
nodes), and stay up until the job ends (time limit, scancel), then stop. Where they listen goes to
``<run_dir>/servers/<job>/endpoints.json``, for ``generate.endpoints``; the API key stays in
``<run_dir>/servers/api_key`` (0600), which generation jobs read through ``VLLM_API_KEY``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from jobs.services.vllm_server import ServerError, ServerFiles, start_servers
from pipeline.config import load_config
from state import InputError, atomic_write_bytes

log = logging.getLogger("selftrain")
CHECK_INTERVAL_S = 5.0
ANY_ADDRESS = ("0.0.0.0", "::")


def reachable_url(base_url: str, host: str) -> str:
    """The URL other nodes use: a server listening on every address is reached by this node's name."""
    return base_url.replace(host if ":" not in host else f"[{host}]", socket.getfqdn(), 1) if host in ANY_ADDRESS else base_url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.serve", description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. generate.vllm.host=0.0.0.0")
    parser.add_argument("--model", help="the model to serve (default: the config's model.path)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = load_config(args.config, args.overrides)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return InputError.exit_code
    model = args.model or config.model.path
    if not Path(model).exists():
        print(f"error: {args.model and '--model' or f'{args.config}: model.path'}: {model} does not exist", file=sys.stderr)
        return InputError.exit_code
    job = os.environ.get("SLURM_JOB_ID") or f"local-{os.getpid()}"
    servers_dir = config.run_dir / "servers"
    files = ServerFiles(servers_dir / job, servers_dir / "api_key")
    try:
        fleet = start_servers(str(Path(model).resolve()), config.generate, files)
    except ServerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    host = config.generate.vllm.host
    endpoints = [{"url": reachable_url(e.base_url, host), "model": e.model} for e in fleet.endpoints]
    atomic_write_bytes(files.folder / "endpoints.json", json.dumps(endpoints, indent=1).encode())
    for endpoint in endpoints:
        log.info("serving %s as model %s (API key in %s)", endpoint["url"], endpoint["model"], files.api_key)
    # Serve until the job ends: SIGTERM (scancel, the time limit) stops the servers and exits.
    try:
        while True:
            fleet.check()
            time.sleep(CHECK_INTERVAL_S)
    except ServerError as error:
        fleet.stop()
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
