"""Reward service throughput: scores/s through the service against scoring the same pairs with the
same model in-process, at the same inner batch size, side by side in one run.

Each round scores new requests (the client's cache would answer those of an earlier round) three
ways, in an order that rotates from round to round so that drifts of a shared machine hit every
arm alike:

- ``in-process``: ``Scorer.score`` over all the round's requests, in batches of ``--batch-size``;
- ``service``: the ``service_score`` reward through a server process (``python -m
  jobs.services.reward_server``), with the client's settings as configured by default (seed 002's:
  chunks of 4, 0.05 s apart);
- ``service, no delay``: the same with ``chunk_delay_s: 0`` (a client of its own, so a cache of its own). The seed's pause between chunks costs
  0.05 s per chunk by construction, whatever the server does: this arm shows what the service
  itself costs, the first what the seed's settings cost on top.

The model is a random Qwen2 built offline (the demo's tokenizer), large enough that a chunk's
inference takes a good part of a second on CPU, as a real listener's does on its GPU: the question
is what HTTP, JSON and the client add to that, not how fast a toy answers.

    .venv/bin/python tools/bench/reward_service_bench.py [--rounds 9] [--requests 16] [--hidden 384 --layers 6]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from jobs.scoring.rewards import RewardContext
from jobs.scoring.service_reward import DEFAULT_QUESTION, service_score
from jobs.services.config import RewardServiceConfig
from jobs.services.process import DIE_WITH_PARENT
from jobs.services.reward_server import YesProbabilityRequest, load_scorer
from jobs.specs import ServiceRef
from state import atomic_write_json
from tools.demo import COLORS, SHAPES, build_tokenizer, qwen2_config

ROOT = Path(__file__).resolve().parents[2]


def build_listener(folder: Path, hidden: int, layers: int) -> None:
    import torch
    from transformers import Qwen2ForCausalLM

    tokenizer = build_tokenizer(folder)
    torch.manual_seed(0)
    Qwen2ForCausalLM(qwen2_config(tokenizer, hidden_size=hidden, num_layers=layers)).save_pretrained(str(folder))


def samples(round_number: int, count: int, candidates: int) -> tuple[list[str], dict[str, list[Any]]]:
    """Speaker completions and their columns; the round number keeps every round's pairs new."""
    objects = [f"{c} {s}" for c in COLORS for s in SHAPES]
    completions, columns = [], {"candidate_texts": [], "target_index": []}
    for i in range(count):
        picked = [objects[(7 * i + 5 * j + round_number) % len(objects)] for j in range(candidates)]
        completions.append(f"<detailed>a {picked[0]} seen in round {round_number}, sample {i}</detailed>")
        columns["candidate_texts"].append(picked)
        columns["target_index"].append(0)
    return completions, columns


def start_server(config: RewardServiceConfig, key_file: Path, log: Path) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "jobs.services.reward_server", "--api-key-file", str(key_file), "--model", config.model,
               "--kind", config.kind, "--batch-size", str(config.batch_size), "--concurrency", str(config.concurrency)]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, preexec_fn=DIE_WITH_PARENT)  # noqa: PLW1509 - it only calls prctl
    assert server.stdout is not None
    for line in server.stdout:
        if line.startswith("serving at "):
            return server, line.split()[-1]
    raise SystemExit(f"the server exited before serving; its log: {log}")


def measure(args: argparse.Namespace, work: Path) -> dict[str, list[float]]:
    """Scores/s of each arm, one figure per round."""
    model = args.model or work / "listener"
    if args.model is None:
        build_listener(model, args.hidden, args.layers)
    key_file = work / "api_key"
    key_file.write_text("bench-key")
    config = RewardServiceConfig(model=str(model), kind="yes_probability", batch_size=args.batch_size, wait_s=60.0)
    scorer = load_scorer(config)
    server, url = start_server(config, key_file, work / "server.log")
    atomic_write_json(work / "endpoint.json", {"url": url, "kind": config.kind, "job_id": "bench", "node": "localhost"})
    contexts = {
        name: RewardContext(services={"reward": ServiceRef(name, str(work / "endpoint.json"), str(key_file), replace(config, chunk_delay_s=delay))})
        for name, delay in (("service", config.chunk_delay_s), ("service, no delay", 0.0))
    }

    def in_process(completions: list[str], columns: dict[str, list[Any]]) -> list[float]:
        requests = [YesProbabilityRequest(candidates=c, question=DEFAULT_QUESTION.replace("{description}", t.removeprefix("<detailed>").removesuffix("</detailed>")))
                    for t, c in zip(completions, columns["candidate_texts"], strict=True)]
        return [float(r["predicted_index"] == t) for r, t in zip(scorer.score(requests), columns["target_index"], strict=True)]

    def through(name: str) -> Any:
        return lambda completions, columns: service_score([""] * len(completions), completions, context=contexts[name], tag="detailed", **columns)

    arms = {"in-process": in_process, "service": through("service"), "service, no delay": through("service, no delay")}
    print(f"model: {model} ({sum(p.numel() for p in scorer.model.parameters()) / 1e6:.1f} M parameters), {args.requests} requests"
          f" of {args.candidates} candidates per round and arm, inner batch {args.batch_size} sequences;"
          f" client chunks of {config.chunk_size}, delay {config.chunk_delay_s} s (seed 002's) or 0")
    rates: dict[str, list[float]] = {name: [] for name in arms}
    try:
        in_process(*samples(-1, args.batch_size, args.candidates))  # warm-up, not counted
        for round_number in range(args.rounds):
            order = list(arms)[round_number % 3:] + list(arms)[:round_number % 3]
            completions, columns = samples(round_number, args.requests, args.candidates)
            results = {}
            for name in order:
                start = time.perf_counter()
                results[name] = arms[name](completions, columns)
                rates[name].append(args.requests / (time.perf_counter() - start))
            assert all(values == results["in-process"] for values in results.values()), "the service scored differently"
            print(f"round {round_number + 1}: " + ", ".join(f"{name} {rates[name][-1]:.2f}/s" for name in arms)
                  + ", ratios " + ", ".join(f"{name} {rates[name][-1] / rates['in-process'][-1]:.3f}" for name in arms if name != "in-process"))
    finally:
        server.terminate()
        server.wait()
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--requests", type=int, default=16, help="speaker samples scored per round and arm (4 chunks)")
    parser.add_argument("--candidates", type=int, default=3, help="listener candidates per request")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=5, help="sequences per forward pass, both ways (the seed's 5)")
    parser.add_argument("--model", type=Path, help="a listener folder to use instead of building one")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="reward_bench_") as folder:
        rates = measure(args, Path(folder))
    for name in ("service", "service, no delay"):
        ratios = [s / i for s, i in zip(rates[name], rates["in-process"], strict=True)]
        print(f"median ratio {name} / in-process: {statistics.median(ratios):.3f}"
              f" (median {statistics.median(rates[name]):.2f} vs {statistics.median(rates['in-process']):.2f} scores/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
