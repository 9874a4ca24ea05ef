"""The vllm backend's client against vLLM's own benchmark, on one server and the same prompts.

    python tools/bench/vllm_bench.py [--model DIR] [--prompts 64] [--samples 8] [--max-tokens 64]
                                     [--concurrency 8] [--rounds 5] [--out result.json]

Starts one vLLM server the way a generation shard does (generate.vllm settings: the CPU defaults
of this machine unless --extra-args says otherwise), then, in alternating rounds, sends the same
chat prompts with n samples each, at the same number of requests in flight, ignoring EOS so that
both generate exactly prompts x samples x max-tokens tokens:
  - through this project's client (jobs.openai_client, as a shard runs it);
  - through ``vllm bench serve`` (openai-chat backend, the prompts as a custom dataset).
Prints and writes each round's generated tokens/s, the ratio of the best of each, and the median
of the rounds' ratios. Each round also gives the server's engine steps (from its /metrics) that
each side took for the same tokens: fewer steps, fuller batches, more requests kept in flight
(``vllm bench serve``'s count includes its warm-up requests). Without --model it builds the
demo's tiny random model (offline).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from jobs.generation.config import GenerateConfig
from jobs.generation.openai_client import OpenAIBackend
from jobs.generation.protocol import Outcome, Request, Sampling
from jobs.problems.data import read_jsonl
from jobs.problems.prompts import messages_for
from jobs.vllm.args import vllm_command
from jobs.vllm.config import VllmConfig
from jobs.vllm.server import ServerFiles, start_servers
from tools.demo import build

log = logging.getLogger("selftrain")


def engine_steps(base_url: str, api_key: str) -> float:
    """The engine steps the server has run so far (its iteration_tokens_total histogram's count)."""
    request = urllib.request.Request(f"{base_url}/metrics", headers={"Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("vllm:iteration_tokens_total_count"))


def client_tokens_per_s(backend: OpenAIBackend, requests: list[Request]) -> float:
    tokens = 0

    def count(outcome: Outcome) -> None:
        nonlocal tokens
        if outcome.error:
            raise RuntimeError(f"request {outcome.index} failed: {outcome.error}")
        tokens += sum(c.num_tokens for c in outcome.completions)

    started = time.perf_counter()
    backend.run(requests, count)
    return tokens / (time.perf_counter() - started)


def vllm_bench_tokens_per_s(command: list[str], args: argparse.Namespace, model: str, base_url: str,
                            api_key: str, dataset: Path, folder: Path) -> float:
    result = folder / "vllm_bench_serve.json"
    result.unlink(missing_ok=True)
    subprocess.run(
        [
            *command, "bench", "serve", "--backend", "openai-chat", "--base-url", base_url,
            "--endpoint", "/v1/chat/completions", "--model", model, "--tokenizer", args.model,
            "--dataset-name", "custom", "--dataset-path", str(dataset), "--skip-chat-template",
            "--num-prompts", str(args.prompts), "--custom-output-len", str(args.max_tokens), "--ignore-eos",
            "--max-concurrency", str(args.concurrency), "--temperature", "0.9", "--top-p", "0.95",
            "--extra-body", json.dumps({"n": args.samples}), "--num-warmups", str(args.concurrency),
            "--disable-tqdm", "--save-result", "--result-dir", str(folder), "--result-filename", result.name,
        ],
        env={**os.environ, "OPENAI_API_KEY": api_key, "HF_HUB_OFFLINE": "1"}, check=True, stdout=subprocess.DEVNULL,
    )
    report = json.loads(result.read_text())
    if report["completed"] != args.prompts:
        raise RuntimeError(f"vllm bench serve completed {report['completed']} of {args.prompts} requests")
    return report["output_throughput"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/bench/vllm_bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the demo's tiny random model, built offline)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8, help="n: samples per request")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--extra-args", default="", help="more `vllm serve` arguments, e.g. '--enforce-eager'")
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    with tempfile.TemporaryDirectory(prefix="vllm_bench_") as scratch:
        folder = Path(scratch)
        if args.model is None:
            build(folder / "assets", with_warm_start=False)
            args.model = str(folder / "assets" / "random_init")
            problems = read_jsonl(folder / "assets" / "train.jsonl")
        else:
            problems = [{"id": str(i), "question": f"Count from 1 to {i + 10}."} for i in range(args.prompts)]
        problems = problems[: args.prompts]
        dataset = folder / "prompts.jsonl"
        dataset.write_text("".join(json.dumps({"prompt": p["question"]}) + "\n" for p in problems))

        vllm = VllmConfig(extra_args=args.extra_args.split(), env={"VLLM_CPU_KVCACHE_SPACE": "2"})
        config = GenerateConfig(
            backend="vllm", num_samples=args.samples, max_tokens=args.max_tokens, batch_size=args.concurrency,
            extra_body={"ignore_eos": True}, vllm=vllm,
        )
        requests = [
            Request(messages_for(p, None), Sampling(args.samples, 0.9, 0.95, args.max_tokens, seed=i))
            for i, p in enumerate(problems)
        ]
        servers = start_servers(args.model, config, ServerFiles(folder / "servers", folder / "api_key"))
        try:
            (endpoint,) = servers.endpoints
            backend = OpenAIBackend(servers.endpoints, config, servers)
            client_tokens_per_s(backend, requests[: args.concurrency])  # warm-up, as vllm bench serve's
            rounds = []
            server_url = endpoint.base_url.removesuffix("/v1")
            for number in range(1, args.rounds + 1):
                steps = [engine_steps(server_url, endpoint.api_key)]
                client = client_tokens_per_s(backend, requests)
                steps.append(engine_steps(server_url, endpoint.api_key))
                reference = vllm_bench_tokens_per_s(
                    vllm_command(vllm), args, endpoint.model, server_url, endpoint.api_key, dataset, folder,
                )
                steps.append(engine_steps(server_url, endpoint.api_key))
                rounds.append({
                    "client_tokens_per_s": round(client, 1), "vllm_bench_serve_tokens_per_s": round(reference, 1),
                    "client_engine_steps": steps[1] - steps[0], "vllm_bench_serve_engine_steps": steps[2] - steps[1],
                })
                log.info("round %d: client %.0f tok/s in %d engine steps, vllm bench serve %.0f tok/s in %d", number,
                         client, steps[1] - steps[0], reference, steps[2] - steps[1])
        finally:
            servers.stop()

    best_client = max(r["client_tokens_per_s"] for r in rounds)
    best_reference = max(r["vllm_bench_serve_tokens_per_s"] for r in rounds)
    # Each round measures both back to back; on a small shared machine one round's ratio swings
    # with what else the cores did, so the median of the rounds' ratios is the figure to quote.
    ratios = [r["client_tokens_per_s"] / r["vllm_bench_serve_tokens_per_s"] for r in rounds]
    result = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rounds": rounds,
        "client_tokens_per_s": best_client,
        "vllm_bench_serve_tokens_per_s": best_reference,
        "ratio_of_bests": round(best_client / best_reference, 3),
        "ratio_median_of_rounds": round(statistics.median(ratios), 3),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
