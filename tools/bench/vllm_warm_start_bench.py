"""Cold and warm starts of a vLLM server, side by side: the run's compile cache at work.

    python tools/bench/vllm_warm_start_bench.py [--model DIR] [--rounds 3] [--env KEY=VALUE ...]

Each round starts a server the way a generation shard does (``start_servers`` with a run's
compile-cache folder) twice, stopping it in between:
  - cold: a new run folder, nothing published yet; the start publishes its compile cache;
  - warm: another shard's folder of the same run, which starts from a copy of that cache.
Prints each start's seconds to a healthy server (ready for requests) and the warm/cold ratio per
round, then the median ratio (target: <= 0.6). Without --model it builds the demo's tiny random
model (offline). --env adds server environment, e.g. VLLM_USE_AOT_COMPILE=1 to see why the CPU
default turns vLLM's AOT cache off.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from jobs.generation.config import GenerateConfig
from jobs.vllm.config import VllmConfig
from jobs.vllm.server import ServerFiles, start_servers
from tools.demo import build


def start_seconds(model: str, config: GenerateConfig, files: ServerFiles) -> tuple[float, str | None]:
    started = time.monotonic()
    fleet = start_servers(model, config, files)
    seconds = time.monotonic() - started
    fleet.stop()
    return seconds, fleet.compile_cache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/bench/vllm_warm_start_bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the demo's tiny random model, built offline)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--env", nargs="*", default=[], help="more server environment, KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")

    with tempfile.TemporaryDirectory(prefix="vllm_warm_bench_") as scratch:
        folder = Path(scratch)
        if args.model is None:
            build(folder / "assets", with_warm_start=False)
            args.model = str(folder / "assets" / "random_init")
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", **dict(item.split("=", 1) for item in args.env)}
        config = GenerateConfig(backend="vllm", vllm=VllmConfig(env=env))
        ratios = []
        for number in range(1, args.rounds + 1):
            run = folder / f"run_{number}"
            caches = run / "compile_cache"
            cold, cold_kind = start_seconds(args.model, config, ServerFiles(run / "shard_0", run / "api_key", caches))
            warm, warm_kind = start_seconds(args.model, config, ServerFiles(run / "shard_1", run / "api_key", caches))
            assert (cold_kind, warm_kind) == ("cold", "warm"), (cold_kind, warm_kind)
            ratios.append(warm / cold)
            print(f"round {number}: cold start {cold:.1f} s, warm start {warm:.1f} s, warm/cold {warm / cold:.2f}", flush=True)
        print(f"median warm/cold over {args.rounds} rounds: {statistics.median(ratios):.2f} (target <= 0.6)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
