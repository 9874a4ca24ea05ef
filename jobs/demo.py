"""Builds the demo's assets offline: a tiny Qwen2 model, its tokenizer, and an addition task; and
tiny reward models for the reward service.

The task: add two numbers of 10-999, worked digit by digit with carries inside <think>, then
``ANSWER: n``. The base model is warm-started on a small set of worked solutions until its
greedy accuracy on a dev split reaches a target (10 %), so that it is weak but not hopeless.

The reward models (``build-reward-models``), random and tiny (0.1 M parameters, CPU is plenty):
``listener``, a Qwen2 causal LM for a ``yes_probability`` service, and ``classifier``, a
Qwen2ForSequenceClassification with one label, for a ``classifier`` service; both on the demo's
byte-level tokenizer, so "yes" is three tokens. They exercise the service, not a skill: a few
minutes of CPU training did not teach a model this small to pick described objects better than
chance. ``games.jsonl`` holds seed 002's referential game with text objects, for a speaker:
``candidate_texts`` ("red circle", ...), ``target_index``, and as ``answer`` a description that fits
the target alone.

    python -m jobs.demo build demo_assets [--no-warm-start]
    python -m jobs.demo build-reward-models reward_assets
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import sys
from pathlib import Path
from typing import Any

from filelock import FileLock

from jobs.data import write_jsonl
from jobs.runtime import log
from jobs.specs import (
    EvalConfig,
    EvalSpec,
    FilterConfig,
    GenerateConfig,
    JobTarget,
    TrainConfig,
    TrainSpec,
)

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def worked_solution(a: int, b: int) -> str:
    """``<think>`` one line per digit, right to left, with the carry; then the answer."""
    steps, carry = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total} c{total // 10}")
        carry = total // 10
    return "<think>\n" + "\n".join(steps) + f"\n</think>\nANSWER: {a + b}"


def make_problems(rng: random.Random, count: int, prefix: str, worked: bool = False) -> list[dict[str, Any]]:
    problems = []
    for i in range(count):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        answer = worked_solution(a, b) if worked else str(a + b)
        problems.append({"id": f"{prefix}_{i:05d}", "question": f"{a}+{b}=?", "answer": answer})
    return problems


def build_tokenizer(out: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE without merges: one token per byte, the same pipeline Qwen2Tokenizer uses, so
    # transformers (which loads any qwen2 checkpoint's tokenizer as Qwen2Tokenizer) and vLLM agree.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=IM_END, pad_token=PAD, additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
    )
    # Tag tokens stay visible in decoded text (not special) but cost one token each.
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.save_pretrained(str(out))
    return tokenizer


def qwen2_config(tokenizer: Any, hidden_size: int = 128, num_layers: int = 4, **extra: Any) -> Any:
    """A small Qwen2 for ``tokenizer``: head_dim 32 (so vLLM's CPU attention can serve it too), MLP
    4 x hidden, one key/value head per two query heads, tied embeddings."""
    from transformers import Qwen2Config

    heads = hidden_size // 32
    return Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=32, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tokenizer.convert_tokens_to_ids(IM_START),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra,
    )


def build_model(out: Path, seed: int = 0) -> None:
    """A 1 M-parameter Qwen2."""
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    tokenizer = build_tokenizer(out)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen2_config(tokenizer))
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_new_tokens=80
    )
    model.save_pretrained(str(out))


def warm_start(out: Path, seed: int, target: float, steps: int = 300, every: int = 10) -> float:
    """Train on the worked solutions, then keep the first checkpoint whose greedy dev accuracy
    reaches ``target``.

    Where a run crosses "weak but not hopeless" depends on the machine's arithmetic down to
    thread scheduling, so the build measures it instead of hard-coding a step count. Returns the
    dev accuracy of the model written to ``out/base_model``.
    """
    from jobs.generation.evaluate import evaluate
    from jobs.training.sft import train_model

    config = TrainConfig(
        method="full", max_steps=steps, batch_size=32, gradient_accumulation_steps=1, warmup_ratio=0.05,
        gradient_checkpointing=False, replay_data=str(out / "warmstart.jsonl"), logging_steps=every,
        save_steps=every, save_total_limit=None, keep_checkpoints=True,
    )
    folder = out / "warm_start"
    train_model(
        TrainSpec(target=JobTarget(str(out), "warm_start"), data_path=None, init_model=str(out / "random_init"),
                  base_model=str(out / "random_init"), iteration=0, output_dir=str(folder), learning_rate=2e-3,
                  train=config, system_prompt=None, seed=seed),
        {},
    )
    checkpoints = sorted((folder / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))

    def dev_accuracy(checkpoint: Path) -> float:
        metrics: dict[str, Any] = {}
        evaluate(
            EvalSpec(JobTarget(str(out), "warm_start"), str(out / "dev.jsonl"), str(checkpoint), str(checkpoint),
                     EvalConfig(max_tokens=80, batch_size=100), FilterConfig(verifier="numeric"), GenerateConfig(), seed,
                     str(out / "api_key")),
            metrics,
        )
        log.info("warm start: %s, dev accuracy %.1f%%", checkpoint.name, 100 * metrics["heldout_accuracy"])
        return metrics["heldout_accuracy"]

    # Accuracy rises with training, so a binary search finds the first checkpoint at the target
    # in a handful of evaluations.
    low, high, chosen, accuracy = 0, len(checkpoints) - 1, folder / "model", 0.0
    while low <= high:
        middle = (low + high) // 2
        measured = dev_accuracy(checkpoints[middle])
        if measured >= target:
            chosen, accuracy, high = checkpoints[middle], measured, middle - 1
        else:
            low = middle + 1
    shutil.copytree(chosen, out / "base_model", ignore=shutil.ignore_patterns("optimizer.pt", "scheduler.pt", "rng_state*", "trainer_state.json", "training_args.bin", "predictions.jsonl"))
    shutil.rmtree(folder)
    return accuracy


def build(out: Path, with_warm_start: bool, seed: int = 0, num_warm: int = 160, target: float = 0.1) -> None:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", make_problems(rng, 1000, "train"))
    write_jsonl(out / "heldout.jsonl", make_problems(rng, 500, "heldout"))
    write_jsonl(out / "dev.jsonl", make_problems(rng, 200, "dev"))
    write_jsonl(out / "warmstart.jsonl", make_problems(rng, num_warm, "warm", worked=True))
    build_model(out / "random_init", seed)
    if with_warm_start:
        accuracy = warm_start(out, seed, target)
        print(f"{out / 'base_model'}: warm-started base model, {accuracy:.1%} greedy accuracy on the dev split")


# Seed 002's referential game with text objects: a description names the target's color, its
# shape or both, in words that tell it apart from the other candidates.
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white")
SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond")
DESCRIPTIONS = {"both": "a {color} {shape}", "color": "something {color}", "shape": "a {shape}"}


def fits(candidate: tuple[str, str], target: tuple[str, str], form: str) -> bool:
    """Whether the description of ``target`` in ``form`` fits ``candidate`` too."""
    return (form == "shape" or candidate[0] == target[0]) and (form == "color" or candidate[1] == target[1])


def referential_games(rng: random.Random, count: int, num_candidates: int = 3) -> list[dict[str, Any]]:
    """Games for a speaker: ``candidate_texts``, ``target_index``, and as ``answer`` a description that fits
    the target alone."""
    objects = [(c, s) for c in COLORS for s in SHAPES]
    games = []
    for i in range(count):
        candidates = rng.sample(objects, num_candidates)
        target = rng.randrange(num_candidates)
        forms = [f for f in DESCRIPTIONS if sum(fits(c, candidates[target], f) for c in candidates) == 1]
        names = [" ".join(c) for c in candidates]
        games.append({
            "id": f"game_{i:05d}",
            "question": f"Candidates: {', '.join(names)}. Describe candidate {target + 1} so that a listener can pick it.",
            "answer": DESCRIPTIONS[rng.choice(forms)].format(color=candidates[target][0], shape=candidates[target][1]),
            "candidate_texts": names,
            "target_index": target,
        })
    return games


def build_reward_models(out: Path, seed: int = 0) -> None:
    """``out/listener`` and ``out/classifier``, random tiny Qwen2s on the demo's tokenizer, and
    ``out/games.jsonl``."""
    import torch
    from transformers import Qwen2ForCausalLM, Qwen2ForSequenceClassification

    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "games.jsonl", referential_games(random.Random(seed), 1000))
    torch.manual_seed(seed)
    listener = Qwen2ForCausalLM(qwen2_config(build_tokenizer(out / "listener"), hidden_size=64, num_layers=2))
    classifier = Qwen2ForSequenceClassification(qwen2_config(build_tokenizer(out / "classifier"), hidden_size=64, num_layers=2, num_labels=1))
    classifier.save_pretrained(str(out / "classifier"))
    # Last: the listener's config.json says the build is complete.
    listener.save_pretrained(str(out / "listener"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build", "build-reward-models"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--no-warm-start", dest="warm_start", action="store_false")
    parser.add_argument("--num-warm", type=int, default=160)
    parser.add_argument("--target", type=float, default=0.1, help="dev accuracy at which the warm start stops")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.command == "build-reward-models":
        with FileLock(f"{args.out}.lock"):
            if (args.out / "listener" / "config.json").exists():
                print(f"{args.out}: reward models already built")
                return 0
            build_reward_models(args.out, args.seed)
        print(f"{args.out}: reward models built (random: listener/ for yes_probability, classifier/ for classifier) and games.jsonl")
        return 0
    done = args.out / ("base_model" if args.warm_start else "random_init") / "config.json"
    # Concurrent builds (two terminals, parallel tests) wait for each other instead of mixing files.
    with FileLock(f"{args.out}.lock"):
        if done.exists():
            print(f"{args.out}: demo assets already built")
            return 0
        build(args.out, args.warm_start, args.seed, args.num_warm, args.target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
