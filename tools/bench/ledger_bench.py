"""Ledger benchmark: concurrent writers, fsync cost and reads of a 10,000-shard stage, today's ledger beside the new one.

    python tools/bench/ledger_bench.py                          # 16 and 256 writers, 100 updates each; 10,000 shards
    python tools/bench/ledger_bench.py --writers 16,256,1000 --updates 20    # 1,000 writers, fewer updates each
    python tools/bench/ledger_bench.py --shards 2000 --no-slow-fs   # a quick run

Today's ledger is ``state/ledger.py`` as of commit BASELINE_REV (one FileLock per run, no fsync),
loaded from git (``--baseline-rev``); the new one is this checkout's ``state``. Both run in the same
invocation, on the same folder (``--dir``, default the system's temporary folder).

1. Writers: N processes (fork) wait for one start, then each makes ``--updates`` read-modify-write
   updates (a counter +1) either to a record of its own (``different``) or all to one record
   (``same``), records that exist already (made by one batch before, as the driver's submission
   makes a stage's shard records). Updates/s = N x updates / seconds from the first writer's start
   to the last one's last update (100 updates each by default: a forked writer's first update takes
   ~4x the others, copying ~100 pages of the parent that it touches, which real jobs do not, and
   with 20 a round's start and tail weigh more: measured, the new ledger 4,900/s with 20 and 8,300/s
   with 100, a bare append + fdatasync 9,300/s and 23,000/s); CPU ms per update = the writers' CPU
   time (user + system) / N x updates, a figure that other load on the machine disturbs less.
   ``--rounds`` rounds of both ledgers, in alternating order (one round swings by 2x on a shared
   VM): the medians are shown, and for new/today the median of the rounds' ratios with the lowest
   and highest. Afterwards every counter must equal its number of updates (else the benchmark fails:
   an update was lost). A round still running after ``--limit-s`` is stopped (its writers killed)
   and its rate is what was done by then, marked "stopped". The new ledger also runs ``different``
   with fsync turned off in the writers (the difference is what durability costs), and with its
   marker's folder fsynced after every update (what syncing the markers' renames would cost: see
   state/ledger.py's docstring). And the same processes replace files of their own in one folder
   with a bare temporary file and rename (no lock, no fsync, no JSON): the ceiling of a ledger that
   replaces one file per record in one folder; and each appends to a file of its own, opened once,
   and fdatasyncs it (no lock, no read, no JSON): the ceiling of durable updates here, which no
   ledger whose writers each make their own update durable passes.
2. One process, one update after the other: latency per update with and without fsync.
3. Reads of a synthetic run of ``--shards`` generation shards (written by each ledger's own
   update_many: submitted, job ids, done with metrics): one driver poll (today: ``read(key)`` per
   shard, as pipeline/loop/driver.py's run_stage; new: ``read_many(keys)``) and the status summary
   (pipeline/loop/summary.py ``summarize``, through each ledger; it also builds the run's plan). The new
   ledger's figures without a snapshot (a run written by today's ledger, or one whose shards all
   changed since the last read), with the snapshot up to date, and after 100 shards (20 on the
   slow filesystem) were updated one by one by their jobs; each first after the page cache was
   dropped (root only), so that the records come from the disk, then again.
4. The same reads through a FUSE passthrough with ``--delay-ms`` per metadata operation
   (tools/bench/loopfs.py, whose listings carry their entries' attributes as NFS's READDIRPLUS
   does), where FUSE can be mounted here. Today's ledger reads every record
   there, so its figures come from ``--slow-sample`` records and are scaled to all of them
   (marked "x N").

Targets (issue 13): different records at 256 writers >= 10x today's updates/s; status summary
<= 1 s and one driver poll <= 0.5 s here, both within 10 s at 5 ms per metadata operation.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import state.ledger as new_ledger
from pipeline.loop import summary as status
from tools.bench.loopfs import drop_page_cache, fuse_unavailable, mounted

BASELINE_REV = "8dda9fb"  # the last commit whose ledger took one lock per run
STAGE = "iter_001/generate"
IMPLEMENTATIONS: dict[str, types.ModuleType] = {"new": new_ledger}


def load_today(rev: str) -> types.ModuleType:
    """``state/ledger.py`` of commit ``rev``, as a module of its own."""
    shown = subprocess.run(["git", "show", f"{rev}:state/ledger.py"], cwd=ROOT, capture_output=True, text=True, check=False)
    if shown.returncode != 0:
        sys.exit(f"--baseline-rev {rev}: git show failed: {shown.stderr.strip()}")
    module = types.ModuleType("ledger_today")
    sys.modules[module.__name__] = module
    exec(compile(shown.stdout, f"{rev}:state/ledger.py", "exec"), module.__dict__)  # noqa: S102 (our own history)
    return module


def bump(record: dict[str, Any]) -> None:
    record["n"] = record.get("n", 0) + 1


class Round:
    """What ``count`` writer processes did: updates/s, CPU ms per update, and each one's updates done."""

    def __init__(self, rate: float, cpu_ms: float | None, done: list[int], finished: bool):
        self.rate, self.cpu_ms, self.done, self.finished = rate, cpu_ms, done, finished

    def rate_text(self) -> str:
        return f"{self.rate:.0f}" if self.finished else f"{self.rate:.0f} (stopped: {sum(self.done)} done)"


def child(work: Callable[[int], Iterator[None]], worker: int, gate: tuple[int, int, int], starts: Any, ends: Any, cpu: Any, done: Any) -> None:
    ready, go, go_parent = gate
    os.close(go_parent)  # the parent's end, inherited: the pipe ends when no process holds it
    os.write(ready, b".")
    os.read(go, 1)  # returns when the parent closes its end: every writer at once
    starts[worker] = time.perf_counter()
    used = time.process_time()
    for _ in work(worker):
        done[worker] += 1
    cpu[worker] = time.process_time() - used
    ends[worker] = time.perf_counter()


def race(count: int, updates: int, work: Callable[[int], Iterator[None]], limit_s: float) -> Round:
    """``count`` processes run ``work(worker)`` (``updates`` each, one yield per update) from one start.

    The start is the end of a pipe that all of them read, which the kernel wakes at once (a
    multiprocessing.Barrier wakes its waiters one after the other, each acknowledging: with 256 on
    2 cores the first had finished before the last began). Timed in the processes, from the first
    one's start to the last one's last update (not its exit). Writers still running after
    ``limit_s`` are killed; the rate is then what was done by then."""
    context = multiprocessing.get_context("fork")
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    starts, ends, cpu = (context.Array("d", count, lock=False) for _ in range(3))
    done = context.Array("i", count, lock=False)
    processes = [context.Process(target=child, args=(work, w, (ready_w, go_r, go_w), starts, ends, cpu, done)) for w in range(count)]
    for p in processes:
        p.start()
    waiting = 0
    while waiting < count:
        waiting += len(os.read(ready_r, count - waiting))
    os.close(go_w)
    start = time.perf_counter()
    for p in processes:
        p.join(max(0.0, start + limit_s - time.perf_counter()))
    for fd in (ready_r, ready_w, go_r):
        os.close(fd)
    finished = all(p.exitcode is not None for p in processes)
    for p in processes:
        if p.exitcode is None:
            p.kill()
            p.join()
    if finished and any(p.exitcode for p in processes):
        sys.exit("a writer failed")
    if not finished:
        return Round(sum(done) / limit_s, None, list(done), False)
    return Round(count * updates / (max(ends) - min(starts)), sum(cpu) / (count * updates) * 1000, list(done), True)


def writers_round(
    name: str, folder: Path, count: int, updates: int, same: bool, limit_s: float, fsync: bool = True, sync_folder: bool = False
) -> Round:
    """``count`` writer processes on ``name``'s ledger; fails if an update was lost. ``sync_folder``:
    each update also fsyncs the folder of its record's marker, which makes the marker's rename
    durable at once (state/ledger.py's docstring says why the ledger does not)."""
    run_dir = tempfile.mkdtemp(dir=folder)
    # The records exist before their jobs update them: the driver made them when it submitted the array.
    keys = [STAGE] if same else [f"{STAGE}/shard_{worker:05d}" for worker in range(count)]
    IMPLEMENTATIONS[name].Ledger(run_dir).update_many({key: {"status": "running"} for key in keys})

    def work(worker: int) -> Iterator[None]:
        if not fsync:
            os.fsync = os.fdatasync = lambda fd: None
        ledger = IMPLEMENTATIONS[name].Ledger(run_dir)
        key = STAGE if same else f"{STAGE}/shard_{worker:05d}"
        bucket = new_ledger.marker_bucket(f"{run_dir}/ledger/{STAGE}", key.rpartition("/")[2])
        for _ in range(updates):
            ledger.update(key, mutate=bump)
            if sync_folder:
                new_ledger._fsync_folder(bucket)
            yield

    figures = race(count, updates, work, limit_s)
    ledger = IMPLEMENTATIONS[name].Ledger(run_dir)
    # A writer killed at the time limit may have made its last update without counting it.
    slack = 0 if figures.finished else 1
    if same:
        n, done = ledger.read(STAGE).get("n", 0), sum(figures.done)
        lost = not done <= n <= done + slack * count
    else:
        shards = ledger.children(STAGE)
        lost = any(not d <= shards.get(f"shard_{w:05d}", {}).get("n", 0) <= d + slack for w, d in enumerate(figures.done))
    if lost:
        sys.exit(f"{name}, {count} writers, {'same' if same else 'different'} record(s): an update was lost")
    return figures


def ceiling(folder: Path, count: int, updates: int, limit_s: float) -> Round:
    """Files replaced per second by ``count`` processes, each its own, in one folder: temporary file
    and rename, no lock, no fsync, no JSON. No ledger of one file per record does more there."""
    run_dir = Path(tempfile.mkdtemp(dir=folder))

    def work(worker: int) -> Iterator[None]:
        for _ in range(updates):
            fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".shard_{worker:05d}.")
            os.write(fd, b"{}" * 150)
            os.close(fd)
            os.replace(tmp, run_dir / f"shard_{worker:05d}.json")
            yield

    return race(count, updates, work, limit_s)


def durable_ceiling(folder: Path, count: int, updates: int, limit_s: float) -> Round:
    """Durable updates per second by ``count`` processes that do nothing else: each appends a line to
    a file of its own, opened once, and fdatasyncs it (no lock, no read, no JSON, no folder change).
    Any ledger whose writers each make their own update durable does less here."""
    run_dir = Path(tempfile.mkdtemp(dir=folder))

    def work(worker: int) -> Iterator[None]:
        fd = os.open(run_dir / f"shard_{worker:05d}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for _ in range(updates):
            os.write(fd, b"{}" * 150 + b"\n")
            os.fdatasync(fd)
            yield
        os.close(fd)

    return race(count, updates, work, limit_s)


def latency_ms(name: str, folder: Path, updates: int, fsync: bool) -> float:
    ledger = IMPLEMENTATIONS[name].Ledger(tempfile.mkdtemp(dir=folder))
    real = os.fsync, os.fdatasync
    if not fsync:
        os.fsync = os.fdatasync = lambda fd: None
    try:
        start = time.perf_counter()
        for i in range(updates):
            ledger.update(f"{STAGE}/shard_{i % 10:05d}", mutate=bump)  # ten records, each updated again and again
        return (time.perf_counter() - start) / updates * 1000
    finally:
        os.fsync, os.fdatasync = real


def synthetic_run(name: str, run_dir: Path, shards: int) -> list[str]:
    """A run with one iteration whose generation stage has ``shards`` shards, all done; their keys."""
    run_dir.mkdir(parents=True)
    config = {"run_name": "bench", "model": {"path": "/nonexistent"}, "data": {"train": "/nonexistent"},
              "num_iterations": 1, "train": {"learning_rates": [1e-5]}, "generate": {"num_shards": shards}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    ledger = IMPLEMENTATIONS[name].Ledger(run_dir)
    ledger.update("run", {"run_name": "bench", "num_train": shards, "num_iterations": 1, "status": "running"})
    keys = [t.key for stage in status.run_planner(run_dir).iteration(1) if stage.is_array for t in stage.tasks]
    ledger.update(STAGE, {"status": "running", "num_tasks": len(keys)})

    def next_attempt(record: dict[str, Any]) -> None:
        record["attempts"] = record.get("attempts", 0) + 1

    ledger.update_many({k: {"status": "submitted", "submission": "20261201-000000-abcdef12"} for k in keys}, next_attempt)
    ledger.update_many({k: {"job_id": f"1000_{i}", "job_ids": [f"1000_{i}"], "log": f"{run_dir}/submitit/{STAGE}/1000_{i}_0_log.err"}
                        for i, k in enumerate(keys)})
    ledger.update_many({k: {"status": "done", "executions": 1, "host": "node001", "pid": 4242, "started_at": "2026-12-01T00:00:00+00:00",
                            "ended_at": "2026-12-01T00:10:00+00:00", "error": None,
                            "metrics": {"problems": 100, "generated_tokens": 51200, "failed_items": 0, "tokens_per_s": 85.3}}
                        for k in keys})
    return keys


@contextlib.contextmanager
def ledger_class(name: str) -> Iterator[None]:
    """pipeline/loop/summary.py reading through ``name``'s ledger."""
    previous = status.Ledger
    status.Ledger = IMPLEMENTATIONS[name].Ledger
    try:
        yield
    finally:
        status.Ledger = previous


def timed(function: Callable[[], Any]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def read_figures(run_dirs: dict[str, Path], keys: list[str], slow_sample: int | None, changed: int) -> list[tuple[str, str, str]]:
    """(ledger, what, seconds) for driver polls and status summaries of each run."""
    rows: list[tuple[str, str, str]] = []
    today, new = IMPLEMENTATIONS["today"].Ledger(run_dirs["today"]), new_ledger.Ledger(run_dirs["new"])
    sample = keys if slow_sample is None else keys[:slow_sample]
    scale = len(keys) / len(sample)
    mark = "" if scale == 1 else f" (x {scale:g} from {len(sample)})"
    snapshot = run_dirs["new"] / "ledger" / STAGE / new_ledger.SNAPSHOT

    def row(name: str, what: str, function: Callable[[], Any], factor: float = 1.0) -> None:
        rows.append((name, what, f"{timed(function) * factor:.3f}"))

    def poll_today() -> None:
        [today.read(k) for k in sample]

    def poll_new() -> None:
        new.read_many(keys)

    # Each poll first with the page cache dropped (the records come from the disk), then again.
    dropped = ", page cache dropped" if drop_page_cache() else ", page cache NOT dropped (needs root)"
    row("today", f"driver poll: read() per shard{mark}{dropped}", poll_today, scale)
    row("today", f"driver poll: read() per shard{mark}", poll_today, scale)
    if slow_sample is None:
        with ledger_class("today"):
            row("today", "status summary", lambda: status.summarize(run_dirs["today"]))
    for kind in ("no snapshot (a run of today's ledger, or all shards changed)", "snapshot up to date"):
        if kind.startswith("no snapshot"):
            snapshot.unlink(missing_ok=True)
        drop_page_cache()
        row("new", f"driver poll: read_many(), {kind}{dropped}", poll_new)
        if kind.startswith("no snapshot"):
            snapshot.unlink(missing_ok=True)
        row("new", f"driver poll: read_many(), {kind}", poll_new)
    with ledger_class("new"):
        # As the polls: the records from the disk, then from the page cache.
        for cache in (dropped, ""):
            snapshot.unlink(missing_ok=True)
            if cache:
                drop_page_cache()
            row("new", f"status summary, no snapshot{cache}", lambda: status.summarize(run_dirs["new"]))
        row("new", "status summary, snapshot up to date", lambda: status.summarize(run_dirs["new"]))
    for key in keys[:changed]:
        new.update(key, {"note": "touched by its job"})
    row("new", f"driver poll after {changed} shards changed one by one", poll_new)
    with ledger_class("new"):
        row("new", "status summary after that", lambda: status.summarize(run_dirs["new"]))
    return rows


def print_rows(title: str, header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  " + "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/bench/ledger_bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--writers", default="16,256", help="numbers of writer processes, comma-separated (up to 1000)")
    parser.add_argument("--updates", type=int, default=100, help="updates per writer")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both ledgers' writers; medians are shown")
    parser.add_argument("--limit-s", type=float, default=300.0, help="time limit of one round of writers")
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--delay-ms", type=float, default=5.0, help="the slow filesystem's delay per metadata operation")
    parser.add_argument("--slow-sample", type=int, default=500, help="records today's ledger reads on the slow filesystem")
    parser.add_argument("--no-slow-fs", action="store_true")
    parser.add_argument("--baseline-rev", default=BASELINE_REV)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.writers.split(",")]
    if not all(1 <= n <= 1000 for n in counts):
        parser.error("--writers: each between 1 and 1000")
    IMPLEMENTATIONS["today"] = load_today(args.baseline_rev)
    folder = Path(tempfile.mkdtemp(dir=args.dir, prefix="ledger_bench."))
    print(f"today's ledger: {args.baseline_rev}:state/ledger.py; new: {Path(new_ledger.__file__).relative_to(ROOT)}; in {folder}")

    rows = []

    def cpu(figures: Round) -> str:
        return "-" if figures.cpu_ms is None else f"{figures.cpu_ms:.2f}"

    def median(rounds: list[Round]) -> Round:
        return sorted(rounds, key=lambda figures: figures.rate)[len(rounds) // 2]

    for count in counts:
        for same in (False, True):
            # Side by side, in alternating order: one round of either ledger swings by 2x here.
            rounds = [{name: writers_round(name, folder, count, args.updates, same, args.limit_s)
                       for name in (("today", "new") if i % 2 == 0 else ("new", "today"))} for i in range(args.rounds)]
            ratios = sorted(r["new"].rate / r["today"].rate for r in rounds)
            today, new = (median([r[name] for r in rounds]) for name in ("today", "new"))
            spread = f" ({ratios[0]:.1f}-{ratios[-1]:.1f})" if len(ratios) > 1 else ""
            rows.append((count, "same" if same else "different", today.rate_text(), new.rate_text(),
                         f"{statistics.median(ratios):.1f}x{spread}", cpu(today), cpu(new)))
        for what, figures in (("different, new without fsync", writers_round("new", folder, count, args.updates, False, args.limit_s, fsync=False)),
                              ("different, new + marker's folder fsync per update", writers_round("new", folder, count, args.updates, False, args.limit_s, sync_folder=True)),
                              ("different, bare temp file + rename", ceiling(folder, count, args.updates, args.limit_s)),
                              ("different, bare append + fdatasync", durable_ceiling(folder, count, args.updates, args.limit_s))):
            rows.append((count, what, "", figures.rate_text(), "", "", cpu(figures)))
    print_rows(f"updates/s, {args.updates} per writer, none lost, median of {args.rounds} rounds (new/today: median, lowest-highest);"
               " CPU ms per update (user + system, all writers)",
               ("writers", "records", "today", "new", "new/today", "today CPU", "new CPU"), rows)

    latency = [(name, f"{latency_ms(name, folder, 200, True):.2f}", f"{latency_ms(name, folder, 200, False):.2f}") for name in ("today", "new")]
    print_rows("one writer, ms per update", ("ledger", "as it runs", "fsync off"), latency)

    run_dirs = {name: folder / f"run_{name}" for name in ("today", "new")}
    keys = [synthetic_run(name, run_dir, args.shards) for name, run_dir in run_dirs.items()][-1]
    rows = read_figures(run_dirs, keys, None, changed=100)
    print_rows(f"reads of {args.shards} shard records, local disk (seconds)", ("ledger", "what", "s"), rows)

    if args.no_slow_fs:
        return 0
    if why := fuse_unavailable():
        print(f"\nslow filesystem: not measured ({why})")
        return 0
    mount = Path(tempfile.mkdtemp(dir=args.dir, prefix="ledger_bench_mount."))
    try:
        with mounted(folder, mount, delay_ms=args.delay_ms):
            slow_dirs = {name: mount / path.name for name, path in run_dirs.items()}
            rows = read_figures(slow_dirs, keys, args.slow_sample, changed=20)
    except RuntimeError as error:
        print(f"\nslow filesystem: not measured ({error})")
        return 0
    title = f"reads of {args.shards} shard records, FUSE with {args.delay_ms:g} ms per metadata operation (seconds)"
    print_rows(title, ("ledger", "what", "s"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
