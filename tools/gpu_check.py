"""The helper of tools/gpu_check.sh (read its header first): GPU checks of the training jobs.

Subcommands:
  prepare  (here, with registry access) download the wheels the GPU machine lacks into a folder
           (cp312 manylinux by default: that machine's Python), build DeepSpeed's wheel from its
           sdist (DS_BUILD_OPS=0: no CUDA needed to build; ops would be JIT-built, none are used),
           keep only the CUDA 13 libraries of bitsandbytes, and print the sizes.
  install  (there, offline) pip-install into a target folder, --no-deps, the carried wheels whose
           package the machine lacks or has in a version the training code cannot use.
  run      run the checks, each in a process of its own, and print one line per check:
           PASS / FAIL / SKIP with loss, seconds and peak GPU memory.
  check    one check (what ``run`` starts).

The checks go through the project's own code paths: jobs.training.sft.run(TrainSpec) and
jobs.training.grpo.run(GrpoSpec), on a small Qwen2 built here offline with tools.demo's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# name: (label, what it checks, modules it needs, needs CUDA with no CPU fallback)
CHECKS: dict[str, tuple[str, str, tuple[str, ...], bool]] = {
    "sft": ("sft_lora_bf16", "bf16 LoRA SFT step", ("pydantic", "orjson", "datasets", "trl", "peft"), False),
    "qlora": ("qlora_nf4_paged8bit", "QLoRA step: 4-bit NF4 base, paged 8-bit AdamW",
              ("pydantic", "orjson", "datasets", "trl", "peft", "bitsandbytes"), False),
    "zero2": ("deepspeed_zero2", "DeepSpeed ZeRO-2 step (bf16, full fine-tuning, 1 process)",
              ("pydantic", "orjson", "datasets", "trl", "deepspeed"), True),
    "grpo": ("grpo_lora_bf16", "bf16 GRPO step with LoRA (transformers rollouts)",
             ("pydantic", "orjson", "datasets", "trl", "peft", "submitit"), False),
    # GRPO over the arrays: a round's samples generated and scored by the jobs' own code, then trained on.
    "arrays": ("grpo_arrays_lora_bf16", "bf16 GRPO step with LoRA on a round's stored rollouts",
               ("pydantic", "orjson", "datasets", "trl", "peft", "submitit"), False),
    "arrays_qlora": ("grpo_arrays_qlora_nf4", "GRPO step on stored rollouts, QLoRA: 4-bit NF4 base, paged 8-bit AdamW",
                     ("pydantic", "orjson", "datasets", "trl", "peft", "submitit", "bitsandbytes"), False),
    "arrays_zero2": ("grpo_arrays_zero2", "GRPO step on stored rollouts, DeepSpeed ZeRO-2 (bf16, full fine-tuning, 1 process)",
                     ("pydantic", "orjson", "datasets", "trl", "submitit", "deepspeed"), True),
}
GROUPS = {"all": ["sft", "qlora", "zero2", "grpo", "arrays", "arrays_qlora", "arrays_zero2"],
          "sft_grpo_zero2": ["sft", "zero2", "grpo", "arrays", "arrays_zero2"], "qlora": ["qlora", "arrays_qlora"],
          "arrays": ["arrays", "arrays_qlora", "arrays_zero2"]}

# ---------------------------------------------------------------------------------------------
# prepare / install

# Wheels carried in the versions this checkout's environment has (what the tests here run with).
FROM_ENV = ("trl", "datasets", "dill", "multiprocess", "submitit", "pydantic", "pydantic-core", "annotated-types",
            "typing-inspection", "typing-extensions", "orjson", "peft", "fsspec", "pyarrow")
# Not in this environment (CPU): pinned. None: the newest (carried for a machine that lacks them).
PINNED: dict[str, str | None] = {"bitsandbytes": "0.50.2", "hjson": "3.1.0", "einops": None, "msgpack": None,
                                 "ninja": None, "py-cpuinfo": None}
DEEPSPEED = "0.19.8"
# install: a carried wheel is left out when the machine already has a version in this range
# (default: the carried version or newer; "" for any version). datasets 5.2 needs pyarrow >= 24
# and fsspec <= 2026.9.0; setup.cfg asks peft >= 0.21; deepspeed's own needs, any version.
KEEP_MACHINES = {"pyarrow": ">=24.0.0", "fsspec": ">=2023.1.0,<=2026.9.0", "peft": ">=0.21", "einops": "", "msgpack": "",
                 "ninja": "", "py-cpuinfo": ""}
# Each wheel goes into the folder of the check that needs it (default: common, on every check's
# path): a broken DeepSpeed or bitsandbytes then fails its own check only. accelerate imports
# DeepSpeed whenever it can, in every trainer.
FOLDER = {"bitsandbytes": "bitsandbytes", "deepspeed": "deepspeed", "hjson": "deepspeed", "einops": "deepspeed",
          "msgpack": "deepspeed", "ninja": "deepspeed", "py-cpuinfo": "deepspeed"}
EXTRA_FOLDERS = {"qlora": ["bitsandbytes"], "zero2": ["deepspeed"], "arrays_qlora": ["bitsandbytes"], "arrays_zero2": ["deepspeed"]}
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64",
             "manylinux1_x86_64"]
LIMIT_MIB = 64


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def strip_bitsandbytes(wheel: Path, out_dir: Path, keep_cuda: list[str]) -> Path:
    """The wheel without the GPU libraries of other CUDA / ROCm / XPU versions (the CPU one stays)."""
    def dropped(name: str) -> bool:
        match = re.fullmatch(r"bitsandbytes/libbitsandbytes_(\w+?)\.(so|dll|dylib)", name)
        return bool(match) and match.group(1) != "cpu" and match.group(1) not in {f"cuda{v}" for v in keep_cuda}

    target = out_dir / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if dropped(item.filename):
                continue
            data = src.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not dropped(line.split(",", 1)[0])).encode()
            dst.writestr(item, data)
    return target


def tree_size() -> int:
    """What the device tool sends besides carried paths: tracked and untracked-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    return sum((ROOT / p).stat().st_size for p in listed if p and (ROOT / p).is_file())


def build_deepspeed(pip: list[str], wheels: Path) -> None:
    """DeepSpeed's wheel, built from PyPI's sdist (there is no wheel) with no op compiled."""
    print(f"building deepspeed {DEEPSPEED}'s wheel from its sdist (DS_BUILD_OPS=0)", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([*pip, "download", "-q", "--no-deps", "--no-binary=:all:", "-d", scratch,
                        f"deepspeed=={DEEPSPEED}"], check=True)
        sdist = next(Path(scratch).glob("deepspeed-*"))
        # No build isolation: its setup.py imports torch (this environment's CPU build will do: no op is built).
        subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(sdist)],
                       check=True, env={**os.environ, "DS_BUILD_OPS": "0"})


def prepare(args: argparse.Namespace) -> int:
    import importlib.metadata as md

    wheels = (ROOT / args.wheels).resolve()
    if wheels.exists():
        shutil.rmtree(wheels)
    wheels.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip"]
    checks = [n for item in args.checks for n in GROUPS.get(item, [item])]
    if set(checks) - set(CHECKS):
        print(f"unknown check(s) {sorted(set(checks) - set(CHECKS))}: choose from {list(CHECKS)} or {list(GROUPS)}")
        return 2
    leave_out = set() if args.with_pyarrow else {"pyarrow"}
    pins = {name: md.version(name) for name in FROM_ENV if name not in leave_out}
    pins.update(PINNED)
    if not {"qlora", "arrays_qlora"} & set(checks):
        pins.pop("bitsandbytes")
    if not {"zero2", "arrays_zero2"} & set(checks):
        for name in [n for n, folder in FOLDER.items() if folder == "deepspeed"]:
            pins.pop(name, None)
    platform = [f"--platform={p}" for p in PLATFORMS]
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        print(f"downloading {len(pins)} wheels for CPython {args.python_version} (manylinux x86_64)", flush=True)
        subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", f"--python-version={args.python_version}",
                        "--implementation=cp", *platform, "-d", str(tmp / "dl"), *(f"{n}=={v}" if v else n for n, v in pins.items())],
                       check=True)
        for wheel in sorted((tmp / "dl").glob("*.whl")):
            if canonical(wheel.name.split("-")[0]) == "bitsandbytes":
                stripped = strip_bitsandbytes(wheel, wheels, args.bnb_cuda.split(","))
                print(f"bitsandbytes: {mib(wheel.stat().st_size)} -> {mib(stripped.stat().st_size)} (kept CUDA"
                      f" {args.bnb_cuda} and the CPU library)")
            else:
                shutil.copy2(wheel, wheels)
    if {"zero2", "arrays_zero2"} & set(checks):
        build_deepspeed(pip, wheels)
    total = 0
    for wheel in sorted(wheels.glob("*.whl")):
        total += wheel.stat().st_size
        print(f"  {mib(wheel.stat().st_size):>10}  {wheel.name}")
    tree = tree_size()
    print(f"wheels: {mib(total)}; working tree that travels: {mib(tree)}; together {mib(total + tree)}"
          f" of the device tool's {LIMIT_MIB} MiB")
    if total + tree > LIMIT_MIB * 2**20:
        print("too big for one call: prepare and run the groups one by one (prepare --checks sft_grpo_zero2, then"
              " --checks qlora), or leave pyarrow out")
        return 1
    return 0


def install(args: argparse.Namespace) -> int:
    """Installs under ``--target`` (one folder per FOLDER) the carried wheels that this interpreter can
    use and whose package it lacks, or has in a version outside KEEP_MACHINES' range (default: older
    than the carried one); then says which needs of the installed ones neither has."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.tags import sys_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version

    supported = set(sys_tags())
    chosen: dict[str, list[Path]] = {}
    carried: dict[str, str] = {}
    kept, unusable = [], []
    for wheel in sorted(Path(args.wheels).glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(wheel.name)
        if not tags & supported:
            unusable.append(wheel.name)
            continue
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            have = None
        wanted = SpecifierSet(KEEP_MACHINES.get(name, f">={version}"))
        if have is not None and Version(have) in wanted:
            kept.append(f"{name} {have}")
        else:
            chosen.setdefault(FOLDER.get(name, "common"), []).append(wheel)
            carried[name] = str(version)
    if unusable:
        print(f"INFO not for this Python ({sys.version.split()[0]}), left out: {', '.join(unusable)}")
    print(f"INFO the machine's own, kept: {', '.join(kept) or 'none'}")
    target = Path(args.target)
    shutil.rmtree(target, ignore_errors=True)
    status = 0
    for folder, wheels in sorted(chosen.items()):
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                               "--no-cache-dir", "--disable-pip-version-check", "--target", str(target / folder),
                               "--find-links", str(args.wheels), *map(str, wheels)], check=False)
        names = ", ".join("-".join(w.name.split("-")[:2]) for w in wheels)
        print(f"INFO installed into {target / folder}: {names}" if done.returncode == 0
              else f"FAIL install into {target / folder}: pip exited {done.returncode}")
        status = status or done.returncode
    # --no-deps: say what an installed wheel needs that is neither here nor carried (or in another version).
    for wheel in (w for wheels in chosen.values() for w in wheels):
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            requires = [line.split(":", 1)[1].strip() for line in z.read(meta).decode().splitlines()
                        if line.startswith("Requires-Dist:")]
        for text in requires:
            need = Requirement(text)
            if need.marker and not need.marker.evaluate({"extra": ""}):
                continue
            name = canonicalize_name(need.name)
            try:
                have = carried.get(name) or md.version(name)
            except md.PackageNotFoundError:
                have = None
            if have is None or not need.specifier.contains(have, prereleases=True):
                print(f"WARN {wheel.name.split('-')[0]} needs {need.name}{need.specifier}: "
                      f"{'missing' if have is None else f'found {have}'}")
    return status


# ---------------------------------------------------------------------------------------------
# the checks


def build_model(out: Path, hidden: int, layers: int) -> Path:
    """A Qwen2 of ``hidden`` x ``layers`` with tools.demo's byte-level tokenizer and chat template."""
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    # Imported here, not at the top: on the GPU machine they load only after the carried wheels are on sys.path.
    from tools.demo import build_tokenizer, qwen2_config

    tokenizer = build_tokenizer(out)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(qwen2_config(tokenizer, hidden_size=hidden, num_layers=layers))
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(str(out))
    return out


def write_data(work: Path) -> tuple[Path, Path]:
    import random

    # Imported here, not at the top: on the GPU machine they load only after the carried wheels are on sys.path.
    from tools.demo import make_problems

    sft = make_problems(random.Random(0), 32, "sft", worked=True)
    filtered = work / "filtered.json"
    filtered.write_text(json.dumps([{"id": p["id"], "question": p["question"], "response": p["answer"]} for p in sft]))
    problems = work / "problems.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in make_problems(random.Random(1), 16, "grpo")))
    return filtered, problems


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stored_round(work: Path, model: Path, problems: Path, grpo_config: Any, pattern: str) -> str:
    """A GRPO round over the arrays before its training step, through the jobs' own code: one
    generation shard samples the problems with their log-probabilities (transformers backend), the
    score job keeps the groups with a signal; returns the scored file the training job reads."""
    # Imported here, not at the top: on the GPU machine they load only after the carried wheels are on sys.path.
    from jobs.generation import generate

    # (as above)
    from jobs.generation.config import GenerateConfig

    # (as above)
    from jobs.scoring import rounds

    # (as above)
    from jobs.specs import GenerateShardSpec, JobTarget, RoundScoreSpec

    count = sum(1 for _ in problems.open())
    run_dir = str(work / "run")
    shard = str(work / "round" / "shard_00000.jsonl")
    generate.run(GenerateShardSpec(
        target=JobTarget(run_dir, "round/generate"), problems_path=str(problems), start=0, stop=count, model_path=str(model),
        output_path=shard, generate=grpo_config.sampling(GenerateConfig(batch_size=16)), seed=0, api_key_path="", rollouts_of=0,
    ))
    rounds.run(RoundScoreSpec(
        target=JobTarget(run_dir, "round/score"), iteration=1, shard_paths=[shard], problems_path=str(problems),
        output_dir=str(work / "round"), grpo=grpo_config, system_prompt=None, verifier="numeric", answer_pattern=pattern,
    ))
    return str(work / "round" / rounds.SCORED_FILE)


def capture_trainer() -> dict[str, Any]:
    """The trainer the job builds, kept when it starts training (to look at its model and optimizer)."""
    import transformers

    seen: dict[str, Any] = {}
    original = transformers.Trainer.train

    def train(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen["trainer"] = self
        return original(self, *args, **kwargs)

    transformers.Trainer.train = train
    return seen


def optimizer_of(trainer: Any) -> tuple[str, Any]:
    inner = trainer.optimizer
    while hasattr(inner, "optimizer") and inner.optimizer is not inner:
        inner = inner.optimizer
    return f"{type(inner).__module__.split('.')[0]}.{type(inner).__name__}", inner


def run_check(name: str, work: Path, cpu: bool) -> dict[str, Any]:
    """One check; returns {status, reason, figures...}. Raises on failure (the caller reports it)."""
    import importlib

    _, _, modules, cuda_only = CHECKS[name]
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not cpu:
        return {"status": "SKIP", "reason": "no GPU (--cpu runs the CPU fallbacks)"}
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            return {"status": "SKIP", "reason": f"missing package {error.name} (needed: {module})"}
    if not on_gpu and cuda_only:
        return {"status": "SKIP", "reason": f"no GPU (and no CPU fallback); {', '.join(modules)} import"}
    if not on_gpu:
        torch.set_num_threads(int(os.environ.get("GPU_CHECK_THREADS", "2")))
    if name == "zero2":
        # One process of a distributed job, as torchrun would describe it.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    # Imported here, not at the top: on the GPU machine they load only after the carried wheels are on sys.path.
    from jobs.scoring.config import RewardConfig

    # (as above)
    from jobs.specs import GrpoSpec, JobTarget, TrainSpec

    # (as above)
    from jobs.training import grpo, sft

    # (as above)
    from jobs.training.config import GrpoConfig, TrainConfig

    arrays = name.startswith("arrays")
    # Stored rollouts need groups whose samples differ in reward: the demo's weak addition model, not a random one.
    hidden, layers = (None, None) if arrays else (512, 4) if on_gpu else (128, 2)
    model = shutil.copytree(ROOT / "tools" / "demo_model", work / "model") if arrays else build_model(work / "model", hidden, layers)
    filtered, problems = write_data(work)
    seen = capture_trainer()
    target = JobTarget(str(work / "run"), f"gpu_check/{name}")
    output = str(work / "run" / name)
    steps = 2
    common: dict[str, Any] = {"max_steps": steps, "batch_size": 4, "gradient_accumulation_steps": 1, "warmup_ratio": 0.0,
                              "max_length": 256, "logging_steps": 1, "save_steps": 1000, "save_total_limit": 1,
                              "lora_r": 8, "lora_alpha": 16}
    # What the step trains with: LoRA in bf16, QLoRA, or ZeRO-2 full fine-tuning.
    kind = "qlora" if name.endswith("qlora") else "zero2" if name.endswith("zero2") else "lora"
    config = {
        "lora": lambda: TrainConfig(method="lora", optim="adamw_torch", bf16=True, load_in_4bit=False, **common),
        "qlora": lambda: TrainConfig(method="lora", optim="paged_adamw_8bit", bf16=True, load_in_4bit=True, **common),
        "zero2": lambda: TrainConfig(method="full", optim="adamw_torch", bf16=True, load_in_4bit=False, strategy="zero2", **common),
    }[kind]()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    if name == "grpo" or arrays:
        grpo_config = GrpoConfig(
            rewards=[RewardConfig(name="correctness"), RewardConfig(name="length"), RewardConfig(name="tag_count")],
            num_generations=4, batch_size=8, steps_per_generation=1, max_steps=steps, logging_steps=1, save_steps=1000,
            **({"rollouts": "arrays", "temperature": 1.0, "max_completion_length": 80} if arrays else {"max_completion_length": 32}),
        )
        pattern = r"<answer>(.*?)</answer>" if arrays else r"ANSWER:\s*(\S+)"  # the demo model's answers
        spec = GrpoSpec(
            target=target, problems_path=str(problems), init_model=str(model), base_model=str(model), iteration=1,
            output_dir=output, learning_rate=1e-5, grpo=grpo_config,
            train=config, system_prompt=None, verifier="numeric", answer_pattern=pattern, services={}, seed=0,
            scored_path=stored_round(work, model, problems, grpo_config, pattern) if arrays else None,
        )
        metrics = grpo.run(spec)
    else:
        spec = TrainSpec(target, str(filtered), str(model), str(model), 1, output, 1e-4 if config.method == "lora" else 1e-5,
                         config, None, 0)
        metrics = sft.run(spec)
    seconds = time.monotonic() - started
    step_log = metrics.get("step_log") or []
    losses = [s["loss"] for s in step_log if s.get("loss") is not None]
    result: dict[str, Any] = {
        "loss": losses[-1] if losses else metrics.get("train_loss"), "steps": metrics.get("steps"),
        "train_s": metrics.get("seconds"), "job_s": round(seconds, 2),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if on_gpu else None,
    }
    trainer = seen.get("trainer")
    problems_found = []
    if metrics.get("steps") != steps:
        problems_found.append(f"{metrics.get('steps')} steps instead of {steps}")
    if result["loss"] is None or not math.isfinite(result["loss"]):
        problems_found.append(f"loss {result['loss']}")
    notes = ["the demo model" if arrays else f"model {hidden}x{layers}", f"dtype {next(trainer.model.parameters()).dtype}".replace("torch.", "")
             if trainer is not None else "no trainer seen"]
    if trainer is not None:
        optim_name, optim = optimizer_of(trainer)
        notes.append(f"optimizer {optim_name}")
        if kind == "qlora" and on_gpu:
            import bitsandbytes as bnb

            four_bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
            bits, paged = getattr(getattr(optim, "args", None), "optim_bits", None), getattr(optim, "is_paged", False)
            notes.append(f"{four_bit} Linear4bit layers, optim_bits {bits}, paged {paged}")
            if not four_bit:
                problems_found.append("no 4-bit layer in the model")
            if not (optim_name.startswith("bitsandbytes.") and bits == 8 and paged):
                problems_found.append(f"optimizer {optim_name} (bits {bits}, paged {paged}), not paged 8-bit AdamW")
        if kind == "zero2":
            engine = trainer.model_wrapped
            stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None
            notes.append(f"{type(engine).__name__}, ZeRO stage {stage}")
            if not trainer.is_deepspeed_enabled or stage != 2:
                problems_found.append(f"not ZeRO-2 (deepspeed enabled: {trainer.is_deepspeed_enabled}, stage {stage})")
    if name == "grpo" or arrays:
        rewards = [s.get("reward") for s in step_log]
        notes.append(f"reward {fmt(rewards[-1]) if rewards else None}")
    if arrays:
        # Trained on the stored samples, weighed by the ratio of the trainer's probabilities to the sampler's.
        gaps = [s.get("sampling/sampling_logp_difference/mean") for s in step_log]
        notes.append(f"sampler/trainer log-prob gap {fmt(gaps[0]) if gaps else None}")
        if not gaps or gaps[0] is None:
            problems_found.append("no importance-sampling metrics: the stored log-probabilities were not used")
    if not on_gpu:
        notes.append("CPU smoke run, not the GPU check")
    if kind == "qlora" and not on_gpu:
        result.update(status="SKIP", reason="no GPU; the job's CPU fallback step ran (fp32, unquantized, adamw_torch)"
                      + (f" but: {'; '.join(problems_found)}" if problems_found else ""))
    else:
        result["status"] = "FAIL" if problems_found else "PASS"
        if problems_found:
            result["reason"] = "; ".join(problems_found)
    result["notes"] = ", ".join(notes)
    return result


def check(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run_check(args.name, work, args.cpu)
    except BaseException as error:  # noqa: BLE001 - any failure (a job's SystemExit too) is this check's FAIL
        traceback.print_exc()
        result = {"status": "FAIL", "reason": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]}
    Path(args.result).write_text(json.dumps(result))
    return 0


def versions() -> str:
    import importlib.metadata as md

    parts = [f"python {sys.version.split()[0]}"]
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "pyarrow", "bitsandbytes", "deepspeed"):
        try:
            parts.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            parts.append(f"{name} -")
    return ", ".join(parts)


def gpu_line() -> str:
    code = ("import torch; print(torch.cuda.get_device_name(0) + ', CUDA ' + str(torch.version.cuda)"
            " if torch.cuda.is_available() else 'no GPU (torch ' + torch.__version__ + ')')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    return done.stdout.strip() or done.stderr.strip().splitlines()[-1]


def fmt(value: Any, unit: str = "", digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}{unit}" if isinstance(value, float) else f"{value}{unit}"


def line(name: str, result: dict[str, Any]) -> str:
    label = CHECKS[name][0]
    text = f"{result['status']:<4} {label:<20}"
    if result["status"] == "PASS" or "loss" in result:
        text += (f" loss {fmt(result.get('loss'))}, {fmt(result.get('steps'))} steps, train {fmt(result.get('train_s'), ' s')}"
                 f", job {fmt(result.get('job_s'), ' s')}, process {fmt(result.get('wall_s'), ' s')}"
                 f", peak GPU memory {fmt(result.get('peak_gpu_mib'), ' MiB')}")
    if result.get("reason"):
        text += f" -- {result['reason']}"
    if result.get("notes"):
        text += f" [{result['notes']}]"
    return text


def run(args: argparse.Namespace) -> int:
    names: list[str] = []
    for item in args.checks or ["all"]:
        names += GROUPS.get(item, [item])
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        print(f"unknown check(s) {unknown}: choose from {list(CHECKS)} or {list(GROUPS)}")
        return 2
    logs = Path(args.logs) if args.logs else None
    deadline = time.monotonic() + args.budget_s
    site = Path(args.site) if args.site else None

    def python_path(*folders: str) -> list[str]:
        return [str(site / f) for f in folders if site and (site / f).is_dir()]

    sys.path[:0] = python_path("common", *(f for extra in EXTRA_FOLDERS.values() for f in extra))
    print(f"INFO {gpu_line()}; {versions()}", flush=True)
    lines, failed = [], 0
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        for name in names:
            label = CHECKS[name][0]
            log_path = (logs or Path(scratch)) / f"gpu_check_{label}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            result_path = Path(scratch) / f"{name}.json"
            left = deadline - time.monotonic()
            if left < 20:
                result = {"status": "SKIP", "reason": f"out of time (--budget-s {args.budget_s})"}
            else:
                command = [sys.executable, str(Path(__file__).resolve()), "check", name, "--work", str(Path(scratch) / name),
                           "--result", str(result_path)] + (["--cpu"] if args.cpu else [])
                started = time.monotonic()
                with open(log_path, "w") as log:
                    try:
                        path = python_path(*EXTRA_FOLDERS.get(name, []), "common") + [os.environ.get("PYTHONPATH", "")]
                        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(p for p in path if p)}
                        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=min(args.timeout_s, left),
                                       env=env, check=False)
                        result = json.loads(result_path.read_text()) if result_path.exists() else {
                            "status": "FAIL", "reason": "the check process ended without a result (crashed?)"}
                        result["wall_s"] = round(time.monotonic() - started, 1)
                    except subprocess.TimeoutExpired:
                        result = {"status": "FAIL", "reason": f"timed out after {time.monotonic() - started:.0f} s"}
            text = line(name, result)
            print(text, flush=True)
            lines.append(text)
            if result["status"] == "FAIL":
                failed += 1
                tail = log_path.read_text(errors="replace").splitlines()[-args.tail:] if log_path.exists() else []
                print("\n".join(f"    | {t}" for t in tail), flush=True)
    passed = sum(t.startswith("PASS") for t in lines)
    skipped = sum(t.startswith("SKIP") for t in lines)
    print("==== gpu_check summary ====")
    print("\n".join(lines))
    print(f"gpu_check: {passed} passed, {failed} failed, {skipped} skipped" + (f" (logs in {logs})" if logs else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--wheels", default="gpu_wheels")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    p.add_argument("--bnb-cuda", default="130", help="bitsandbytes CUDA libraries to keep, e.g. 130,132 (torch there: cu130)")
    p.add_argument("--with-pyarrow", action="store_true",
                   help="carry pyarrow too (52 MiB: only with one group of checks); the machine's is used otherwise")
    p.add_argument("checks", nargs="*", default=["all"], help=f"the checks to carry wheels for: {list(CHECKS)} or {list(GROUPS)}")
    p = sub.add_parser("install")
    p.add_argument("--wheels", default="gpu_wheels")
    p.add_argument("--target", required=True)
    p = sub.add_parser("run")
    p.add_argument("checks", nargs="*", help=f"checks {list(CHECKS)} or groups {list(GROUPS)} (default: all)")
    p.add_argument("--cpu", action="store_true", help="without a GPU, run the steps the jobs can run on CPU (fp32)")
    p.add_argument("--timeout-s", type=float, default=150, help="per check")
    p.add_argument("--budget-s", type=float, default=420, help="for all checks together")
    p.add_argument("--logs", default=os.environ.get("OUT"), help="folder for each check's log (default: $OUT)")
    p.add_argument("--site", help="what install wrote: <site>/common on every check's path, <site>/<folder> on its own")
    p.add_argument("--tail", type=int, default=25, help="log lines shown for a failed check")
    p = sub.add_parser("check")
    p.add_argument("name", choices=list(CHECKS))
    p.add_argument("--work", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--cpu", action="store_true")
    args = parser.parse_args(argv)
    return {"prepare": prepare, "install": install, "run": run, "check": check}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
