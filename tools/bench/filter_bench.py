"""Filter stage benchmark on synthetic shards: throughput against the read-and-parse floor, peak memory.

    python tools/bench/filter_bench.py                        # 0.4 M and 1.6 M candidates (K = 16)
    python tools/bench/filter_bench.py --candidates 3200      # a quick run

For each size it writes generations.jsonl shards (the project's own record format, ~1 KB of raw
output per candidate, option-letter answers, uniform correct counts) into a temporary folder, then
runs each of these in a child process, ``--repeat`` times, keeping the fastest:

- the floor: read every shard line by line (1 MiB buffer, as the filter) and JSON-parse it
  (orjson), nothing else;
- the filter: ``python -m jobs.scoring.filter_cli`` on the same shards, writing all its outputs, with one
  worker per CPU (``--workers``); its count of correct candidates must equal the shards' (else the
  benchmark fails).

Times are wall-clock and CPU seconds (user + system, workers included) of the child from start
to exit. The floor is one process; the filter uses ``--workers`` (default: this machine's CPUs),
so its wall-clock ratio shows what a filter job with that many CPUs gets, and its CPU-seconds
ratio the work per candidate (which other jobs on a shared machine do not distort). Peak
resident memory is the sum of the VmHWM of the child and its workers (polled in /proc every
5 ms). Ratio = filter candidates/s / floor candidates/s. Targets: ratio >= 0.5; filter peak RSS
< 1 GiB and not growing with the data set. Last, the cost of extraction and of each verifier per
call, in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from jobs.generation.generate import generation_record
from jobs.generation.protocol import Completion
from jobs.scoring.answers import answer_from, answer_part, answer_rules
from jobs.scoring.filtering import available_cpus, read_generations
from jobs.scoring.verifiers import get_verifier
from pipeline.planning.stage import shard_ranges

GIB = 1 << 30
WORDS = ["so", "the", "next", "sound", "is", "louder", "than", "the", "previous", "one", "and", "then", "a", "pause", "then", "two", "more", "quick", "beats"]
LETTERS = "ABCD"


def option_answers(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """A problem's truth, and how its candidates write a right or a wrong answer."""
    count = rng.randint(1, 9)
    letter = rng.choice(LETTERS)
    wrong_letter = rng.choice(LETTERS.replace(letter, ""))
    right = [f"({letter}) {count} sounds", letter, f"{count} sounds"]
    wrong = [f"({wrong_letter}) {count + 1} sounds", wrong_letter, f"{count + 2} sounds"]
    return f"({letter}) {count} sounds", right, wrong


# Per verifier: the i-th (prediction, ground truth) pair; every call gets new strings, so no cache helps.
VERIFIER_CASES: dict[str, Callable[[int], tuple[str, str]]] = {
    "multiple_choice": lambda i: (f"({LETTERS[i % 4]}) {i} sounds", f"(A) {i} sounds"),
    "numeric": lambda i: (f"The total is {i:,} apples.", f"#### {i + i % 2}"),
    "exact": lambda i: (f"Paris {i}", f"paris {i + i % 2}"),
    "regex": lambda i: (f"three {i}", rf"(3|three) {i + i % 2}"),
    "math": lambda i: (f"\\frac{{{2 * i}}}{{{4 + i % 2}}}", f"\\frac{{{i}}}{{2}}"),
}


def write_shards(folder: Path, num_candidates: int, k: int, text_bytes: int, num_shards: int, seed: int = 0) -> tuple[list[Path], int]:
    """The shards, and how many of their candidates are right (what the filter must find)."""
    rng = random.Random(seed)
    filler = " ".join(rng.choice(WORDS) for _ in range(200_000))
    paths, total_correct = [], 0
    for shard, (start, stop) in enumerate(shard_ranges(max(1, num_candidates // k), num_shards)):
        paths.append(folder / f"shard_{shard:05d}.jsonl")
        with open(paths[-1], "wb") as f:
            for index in range(start, stop):
                truth, right, wrong = option_answers(rng)
                problem = {"id": f"p{index:07d}", "question": "How many sounds do you hear?", "answer": truth}
                # Uniform correct counts: every learning-zone category is exercised.
                num_correct = rng.randint(0, k)
                total_correct += num_correct
                texts = []
                for candidate in range(k):
                    answer = rng.choice(right if candidate < num_correct else wrong)
                    tail = f"</think>\nANSWER: {answer}"
                    offset = rng.randrange(len(filler) - text_bytes)
                    texts.append(Completion(f"<think>{filler[offset:offset + text_bytes - len(tail) - 7]}{tail}", text_bytes // 4))
                f.write(orjson.dumps(generation_record(problem, texts)) + b"\n")
    return paths, total_correct


# The floor: what any filter must do at least, in a child that imports nothing else.
PARSE_ONLY = """
import sys, orjson
for path in sys.argv[1:]:
    with open(path, "rb", buffering=1 << 20) as f:
        for line in f:
            orjson.loads(line)
"""


def run_child(args: list[str]) -> dict[str, float]:
    """Wall-clock and CPU seconds and peak resident bytes of ``python args``, its workers included.

    CPU seconds are the child's and those of the workers it waited for (wait4 counts them). The
    peak is the sum of each process's VmHWM, polled (an upper bound: the workers' peaks need not
    coincide); ru_maxrss would count this (larger) process's memory that the child shared between
    fork and exec.
    """
    with tempfile.TemporaryFile() as errors:
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=errors)
        peaks: dict[int, int] = {}
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            for member in _process_tree(child.pid):
                peaks[member] = max(peaks.get(member, 0), _high_water_mark(member))
            time.sleep(0.005)
        wall = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status):
            errors.seek(0)
            raise SystemExit(f"child {' '.join(args[:2])} failed: {errors.read().decode()[-2000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": sum(peaks.values())}


def _process_tree(pid: int) -> list[int]:
    tree = [pid]
    for member in tree:
        try:
            tree += [int(c) for c in Path(f"/proc/{member}/task/{member}/children").read_text().split()]
        except FileNotFoundError:
            pass
    return tree


def _high_water_mark(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


def fastest(runs: list[dict[str, float]]) -> dict[str, float]:
    """Other jobs on the machine only ever slow a run down: the fastest run counts, the largest peak."""
    return {"wall": min(r["wall"] for r in runs), "cpu": min(r["cpu"] for r in runs), "rss": max(r["rss"] for r in runs)}


def measure(num_candidates: int, k: int, text_bytes: int, num_shards: int, repeat: int, workers: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="filter_bench.") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        paths, total_correct = write_shards(folder, num_candidates, k, text_bytes, num_shards)
        written = time.perf_counter() - started
        shard_args = [str(p) for p in paths]
        floor_runs, filter_runs = [], []
        # Alternated, so that a busy spell on the machine does not hit only one of them.
        for _ in range(repeat):
            floor_runs.append(run_child(["-c", PARSE_ONLY, *shard_args]))
            out = folder / "out"  # a fresh folder each run, as each iteration of a run has
            filter_runs.append(
                run_child(["-m", "jobs.scoring.filter_cli", "--generations", *shard_args, "--output", str(out / "filtered.json"),
                           "--verifier", "multiple_choice", "--num-samples", str(k), "--workers", str(workers)])
            )
            stats = json.loads((out / "filtered_stats.json").read_text())
            if stats["total_correct"] != total_correct:
                raise SystemExit(f"the filter found {stats['total_correct']} correct candidates, the shards hold {total_correct}")
            shutil.rmtree(out)
        return {
            "candidates": stats["total_candidates"], "shard_bytes": sum(p.stat().st_size for p in paths),
            "write_s": written, "floor": fastest(floor_runs), "filter": fastest(filter_runs), "workers": workers,
        }


def per_call_us(verifier: Callable[[str, str], bool], case: Callable[[int], tuple[str, str]], calls: int) -> float:
    verifier(*case(-1))  # first-call setup (imports) is not the per-call cost
    cases = [case(i) for i in range(calls)]
    started = time.perf_counter()
    for prediction, truth in cases:
        verifier(prediction, truth)
    return (time.perf_counter() - started) / calls * 1e6


def component_costs(k: int, text_bytes: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="filter_bench.") as tmp:
        (path,), _ = write_shards(Path(tmp), 2000 * k, k, text_bytes, 1)
        raws = [c["raw_output"] for _, r in read_generations(path) for c in r["candidates"]]
    rules = answer_rules()
    started = time.perf_counter()
    for raw in raws:
        answer_from(answer_part(raw), rules)
    costs = {"extraction (1 KB response)": (time.perf_counter() - started) / len(raws) * 1e6}
    for name, case in VERIFIER_CASES.items():
        costs[f"verifier {name}"] = per_call_us(get_verifier(name), case, 300 if name == "math" else 20_000)
    return costs


def report(results: list[dict[str, Any]], costs: dict[str, float]) -> None:
    print(
        f"{'candidates':>11} {'shards MB':>10} │ {'floor s':>8} {'floor cand/s':>13} │ {'filter s':>9} {'filter cand/s':>14} │"
        f" {'ratio':>6} │ {'filter peak RSS':>15} {'floor peak RSS':>15}"
    )
    for r in results:
        for clock in ("wall", "cpu"):
            floor_rate, filter_rate = r["candidates"] / r["floor"][clock], r["candidates"] / r["filter"][clock]
            print(
                f"{r['candidates']:>11,} {r['shard_bytes'] / 1e6:>10,.0f} │ {r['floor'][clock]:>8.2f} {floor_rate:>13,.0f} │"
                f" {r['filter'][clock]:>9.2f} {filter_rate:>14,.0f} │ {filter_rate / floor_rate:>6.2f} │"
                f" {r['filter']['rss'] / 2**20:>11,.0f} MiB {r['floor']['rss'] / 2**20:>11,.0f} MiB   ({clock} seconds)"
            )
    ratios = {clock: min(r["floor"][clock] / r["filter"][clock] for r in results) for clock in ("wall", "cpu")}
    peak = max(r["filter"]["rss"] for r in results)
    print(
        f"target ratio >= 0.5: wall-clock {'met' if ratios['wall'] >= 0.5 else 'MISSED'} (lowest {ratios['wall']:.2f},"
        f" filter with {results[0]['workers']} worker(s), floor with 1 process);"
        f" per CPU second {'met' if ratios['cpu'] >= 0.5 else 'MISSED'} (lowest {ratios['cpu']:.2f})"
    )
    print(f"target filter peak RSS < 1 GiB: {'met' if peak < GIB else 'MISSED'} (highest {peak / 2**20:,.0f} MiB)")
    if len(results) > 1:
        growth = results[-1]["filter"]["rss"] - results[0]["filter"]["rss"]
        print(f"filter peak RSS from {results[0]['candidates']:,} to {results[-1]['candidates']:,} candidates: {growth / 2**20:+,.1f} MiB")
    print("cost per call, in this process, every input new (the filter extracts each distinct answer ending and verifies")
    print("each distinct (answer, truth) pair once; these are the costs when nothing repeats):")
    for name, us in costs.items():
        print(f"  {name:<28} {us:>9.2f} µs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/bench/filter_bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, nargs="+", default=[400_000, 1_600_000], help="sizes to run")
    parser.add_argument("--k", type=int, default=16, help="candidates per problem")
    parser.add_argument("--text-bytes", type=int, default=1000, help="raw output length per candidate")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each child; the fastest counts")
    parser.add_argument("--workers", type=int, default=available_cpus(), help="the filter's worker processes (default: %(default)s)")
    args = parser.parse_args(argv)
    results = []
    for size in args.candidates:
        results.append(measure(size, args.k, args.text_bytes, args.shards, args.repeat, args.workers))
        print(f"... {size:,} candidates measured (shards written in {results[-1]['write_s']:.0f} s)", file=sys.stderr)
    report(results, component_costs(args.k, args.text_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
