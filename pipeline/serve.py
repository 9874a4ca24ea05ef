"""``python -m pipeline.serve CONFIG [key=value ...] [--model PATH]``: the run's vLLM servers as a service of the run, here.

The seeds' "start the vLLM server" step, on a cluster node (sbatch/vllm_server.sbatch runs this):
the service ``services.vllm`` of the run (default: model.path, with ``generate.vllm``'s settings)
runs in this process as the driver's service jobs run: recorded in the run's ledger as
``services/vllm`` (``serving``, node, endpoint; tools/status.py shows it), its endpoint written to
``<run_dir>/services/vllm/endpoint.json`` (listening on this node's address under SLURM, on
loopback elsewhere), the run's API key in ``<run_dir>/vllm_api_key`` (0600). It serves until the
job ends (time limit, scancel), then stops its servers. Point generation at it with
``generate.endpoints`` and ``VLLM_API_KEY``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from jobs.vllm.config import VllmServiceConfig
from pipeline.config import load_config
from pipeline.loop.services import service_plan
from pipeline.planning.stage import RunContext
from pipeline.rules import check_config
from state import InputError

SERVICE = "vllm"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.serve", description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. generate.vllm.tensor_parallel_size=4")
    parser.add_argument("--model", help="the model to serve (default: services.vllm.model, else model.path)")
    args = parser.parse_intermixed_args(argv)
    overrides = [*args.overrides, *([f"services.{SERVICE}.model={args.model}"] if args.model else [])]
    try:
        config = load_config(args.config, overrides, check=check_config)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return InputError.exit_code
    if config.services.vllm is None:
        config.services.vllm = VllmServiceConfig()
    (task,) = service_plan(RunContext(config, config.run_dir, num_train=0), SERVICE, consumers=[]).tasks
    # Under SLURM the servers listen on the node's address, for generation shards on other nodes.
    task.function(dataclasses.replace(task.spec, loopback="SLURM_JOB_ID" not in os.environ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
