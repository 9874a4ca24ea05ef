"""SFT of a model that takes audio, images or video (one with a processor beside its tokenizer).

The examples are prompt / completion chats whose prompt has ``audio`` / ``image`` / ``video`` parts
where the problem's tags were (jobs.problems.prompts.template_messages), and the files in that order. A
collator reads the files as vLLM's server reads them (jobs.problems.media) and hands them with the chat
template's text to the model's processor, so training sees the prompt that generation saw:

- images only: TRL's DataCollatorForVisionLanguageModeling, given the decoded images (``images``);
- audio or video, alone or with images (TRL 1.16 has no collator for either): ``MediaCollator``,
  which does for them what TRL's does for images: prompt and completion rendered by TRL's
  apply_chat_template, processed apart and joined, loss on the completion only, cut at
  ``max_length`` from the end.

Qwen2-VL and Qwen2.5-VL train with the 3-D positions their original code and vLLM give them
(``vllm_rope_index``): transformers 5 places the text after a long video elsewhere, and training would
compute another model than the one that generated.

LoRA adapters go on the language model only: the modules of train.target_modules inside it, not
the encoders' modules of the same names. train.freeze_encoders freezes the audio / vision encoders
of a full fine-tune but not the projector that feeds their output to the language model (seed
003's fix_vit: "freeze ViT, only train merger").
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import MethodType
from typing import Any

import torch
from transformers.video_utils import VideoMetadata
from trl.data_utils import apply_chat_template
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling
from trl.trainer.utils import flush_left

from jobs.problems.media import SAMPLE_RATE, Video, read_image, read_sound, read_video
from jobs.runtime import log
from jobs.training.config import TrainConfig

# Frames per second that vLLM samples from a video for Qwen2-VL's video processor.
VIDEO_FPS = 2
# Per-token inputs some processors add for the prompt (Qwen2.5-VL's mm_token_type_ids).
PER_TOKEN = ("token_type_ids", "mm_token_type_ids")
AUDIO_COUNT = "num_audio_tokens"  # the processor's count of audio tokens, not a model input
MEDIA = "media"  # column: (field, path) of each media part of the prompt, in order
IMAGES = "images"  # column of TRL's collator: image paths, decoded just before it
# Modules outside the language model that map an encoder's output into it: they keep training
# when the encoders are frozen (Qwen2-Audio's multi_modal_projector, Qwen2-VL's visual.merger).
PROJECTORS = ("projector", "merger")


def language_model_targets(model: torch.nn.Module, names: list[str]) -> list[str]:
    """Full names of the language model's modules called one of ``names`` (q_proj, ...): the
    encoders have modules of the same names, which LoRA must leave alone."""
    language_model = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is language_model)
    targets = [f"{prefix}.{name}" for name, _ in language_model.named_modules() if name.rsplit(".", 1)[-1] in names]
    if not targets:
        raise ValueError(f"train.target_modules: none of {names} is a module of the language model of {type(model).__name__}")
    return targets


def encoder_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The audio / vision encoders' parameters: outside the language model and the output layer,
    and not a projector into the language model."""
    language_model = {id(p) for p in model.get_decoder().parameters()}
    output = {id(p) for p in model.get_output_embeddings().parameters()}
    return {name: p for name, p in model.named_parameters()
            if id(p) not in language_model | output and not any(word in name for word in PROJECTORS)}


def freeze_encoders(model: torch.nn.Module) -> int:
    """Freeze the encoders (train.freeze_encoders); the number of parameters frozen."""
    frozen = encoder_parameters(model)
    for parameter in frozen.values():
        parameter.requires_grad_(False)
    return sum(p.numel() for p in frozen.values())


# Models whose transformers 5 positions after a video differ from the model's original M-RoPE, which
# vLLM serves (match_vllm_positions).
MROPE_MODELS = ("qwen2_vl", "qwen2_5_vl")


def vllm_rope_index(self: Any, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                    video_grid_thw: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                    second_per_grid_ts: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL's and Qwen2.5-VL's 3-D positions as the models' original code and vLLM compute them
    (vLLM's Qwen2VLForConditionalGeneration.get_mrope_input_positions): text after an image or video
    goes on from the largest position of its grid, the temporal one included. transformers 5 goes on
    from the largest of height and width alone, so a video with more temporal patches than merged rows
    and columns moved every later token (training's log-probabilities of vLLM's samples were several
    nats off). The same signature as the models' get_rope_index, whose place it takes."""
    merge = self.config.vision_config.spatial_merge_size
    per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
    grids = {1: iter(image_grid_thw.tolist() if image_grid_thw is not None else []),
             2: iter(video_grid_thw.tolist() if video_grid_thw is not None else [])}
    seconds = iter(second_per_grid_ts.tolist() if second_per_grid_ts is not None else [])
    batch, length = input_ids.shape
    position_ids = torch.ones(3, batch, length, dtype=input_ids.dtype, device=input_ids.device)
    deltas = []
    for row in range(batch):
        kept = attention_mask[row].bool() if attention_mask is not None else torch.ones(length, dtype=torch.bool, device=input_ids.device)
        kinds = mm_token_type_ids[row][kept].tolist()
        pieces, start, index = [], 0, 0
        while index < len(kinds):
            end = index
            while end < len(kinds) and kinds[end] == kinds[index]:
                end += 1
            if kinds[index] == 0:
                pieces.append(torch.arange(start, start + end - index).expand(3, -1))
            else:
                t, h, w = next(grids[kinds[index]])
                step = per_second * next(seconds, 1.0) if kinds[index] == 2 else 1.0
                temporal = (torch.arange(t) * step).long()
                grid = torch.stack(torch.meshgrid(temporal, torch.arange(h // merge), torch.arange(w // merge), indexing="ij"))
                pieces.append(grid.reshape(3, -1) + start)
            start = int(pieces[-1].max()) + 1
            index = end
        positions = torch.cat(pieces, dim=1).to(position_ids)
        position_ids[:, row, kept] = positions
        deltas.append(int(positions.max()) + 1 - length)
    return position_ids, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


def match_vllm_positions(model: torch.nn.Module) -> None:
    """Give a Qwen2-VL / Qwen2.5-VL model the positions vLLM serves it with (``vllm_rope_index``), so
    that training computes the model that generated the samples. Other models are left as they are."""
    for module in model.modules():
        if getattr(getattr(module, "config", None), "model_type", None) in MROPE_MODELS and hasattr(module, "get_rope_index"):
            module.get_rope_index = MethodType(vllm_rope_index, module)


def prepare_model(model: torch.nn.Module, config: TrainConfig) -> list[str]:
    """A multimodal model made ready to train as ``config`` says, for SFT and GRPO alike: the
    positions vLLM serves it with (``match_vllm_positions``), the encoders frozen
    (train.freeze_encoders, full fine-tuning); the LoRA target modules, the language model's only."""
    match_vllm_positions(model)
    if config.method == "lora":
        return language_model_targets(model, config.target_modules)
    if config.freeze_encoders:
        log.info("froze %d encoder parameters (train.freeze_encoders)", freeze_encoders(model))
    return config.target_modules


def video_sampling(processor: Any) -> Callable[[Video], list[int]] | None:
    """The frames vLLM decodes for this processor's videos (None: its default loader's). For
    Qwen2-VL's video processor (Qwen2-VL, Qwen2.5-VL) vLLM's "qwen2_vl" loader ports the processor's
    own sample_frames at 2 frames per second, and hands the frames over as they are."""
    video_processor = getattr(processor, "video_processor", None)
    if type(video_processor).__name__ != "Qwen2VLVideoProcessor":
        return None
    # It reads the video's total_num_frames and fps.
    return lambda video: video_processor.sample_frames(video, fps=VIDEO_FPS).tolist()


def media_inputs(processor: Any, media: list[tuple[str, str]]) -> dict[str, Any]:
    """The processor's media arguments for ``media`` ((field, path) in the prompts' order), the
    files read as vLLM's server reads them."""
    found: dict[str, list[Any]] = {"audio": [], "images": [], "videos": [], "video_metadata": []}
    frames = video_sampling(processor)
    for field, path in media:
        if field == "sound":
            found["audio"].append(read_sound(Path(path)))
        elif field == "image":
            found["images"].append(read_image(Path(path)))
        else:
            video = read_video(Path(path), sample=frames)
            found["videos"].append(video.frames)
            found["video_metadata"].append(VideoMetadata(
                total_num_frames=video.total_num_frames, fps=video.fps, width=video.width, height=video.height,
                duration=video.total_num_frames / video.fps if video.fps > 0 else 0.0, video_backend="opencv",
                frames_indices=video.frames_indices))
    kwargs: dict[str, Any] = {key: value for key, value in found.items() if value}
    if "audio" in kwargs:
        kwargs["sampling_rate"] = SAMPLE_RATE
    if "videos" in kwargs:
        kwargs["do_sample_frames"] = False  # sampled as they were read, as vLLM does
    return kwargs


def prompt_features(processor: Any, prompt: list[dict[str, Any]], media: list[tuple[str, str]]) -> tuple[list[int], dict[str, torch.Tensor]]:
    """One chat prompt with its media as the model takes them: its token ids (each media tag
    expanded to the processor's placeholder tokens, as vLLM expands it) and the encoders' inputs
    (``input_features``, ``pixel_values``, ``image_grid_thw``, ...; per-token ones such as
    ``mm_token_type_ids`` over the prompt's tokens)."""
    text = apply_chat_template({"prompt": prompt}, processor)["prompt"]
    inputs = processor(text=[text], return_tensors="pt", add_special_tokens=False, **media_inputs(processor, media))
    inputs.pop(AUDIO_COUNT, None)
    inputs.pop("attention_mask")
    ids = inputs.pop("input_ids")[0].tolist()
    return ids, {key: value[0] if key in PER_TOKEN else value for key, value in inputs.items()}


def batch_features(rows: list[dict[str, torch.Tensor]], prompt_length: int, length: int) -> dict[str, torch.Tensor]:
    """The encoders' inputs of ``rows`` (``prompt_features``) for a batch of left-padded prompts of
    ``prompt_length`` tokens followed by completions (``length`` tokens in all): each media input
    joined along its first dimension, as the processor joins a batch's; per-token inputs placed
    under their prompt's tokens, zero elsewhere."""
    batch: dict[str, torch.Tensor] = {}
    for key in dict.fromkeys(key for row in rows for key in row):  # a row with a video only has no image inputs
        present = [(index, row[key]) for index, row in enumerate(rows) if key in row]
        if key in PER_TOKEN:
            batch[key] = torch.zeros(len(rows), length, dtype=present[0][1].dtype)
            for index, values in present:
                batch[key][index, prompt_length - len(values):prompt_length] = values
        else:
            batch[key] = torch.cat([values for _, values in present])
    return batch


def collator_for(processor: Any, examples: list[dict[str, Any]], max_length: int | None) -> tuple[Any, list[dict[str, Any]]]:
    """TRL's collator where all media are images (the examples get TRL's ``images`` column), else ours."""
    fields = {field for example in examples for field, _ in example[MEDIA]}
    if fields == {"image"}:
        images = [{**{k: v for k, v in e.items() if k != MEDIA}, IMAGES: [path for _, path in e[MEDIA]]} for e in examples]
        return DecodedImages(processor, max_length), images
    return MediaCollator(processor, max_length), examples


class DecodedImages:
    """TRL's vision-language collator, with the examples' image paths read as vLLM reads them."""

    def __init__(self, processor: Any, max_length: int | None):
        self.collate = DataCollatorForVisionLanguageModeling(processor, max_length=max_length, completion_only_loss=True)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return self.collate([{**e, IMAGES: [read_image(Path(p)) for p in e[IMAGES]]} for e in examples])


class MediaCollator:
    """Prompt / completion chats with audio, images and video -> model inputs, as TRL's collator
    makes them for images: prompts (with their media) left-padded, completions right-padded, joined
    and flushed left; labels on the completion only."""

    def __init__(self, processor: Any, max_length: int | None):
        self.processor, self.max_length = processor, max_length

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        texts = [apply_chat_template({"prompt": e["prompt"], "completion": e["completion"]}, self.processor) for e in examples]
        kwargs = media_inputs(self.processor, [part for example in examples for part in example[MEDIA]])
        prompts = self.processor(text=[t["prompt"] for t in texts], padding=True, padding_side="left",
                                 return_tensors="pt", add_special_tokens=False, **kwargs)
        completions = self.processor.tokenizer([t["completion"] for t in texts], padding=True, padding_side="right",
                                               return_tensors="pt", add_special_tokens=False)
        input_ids = torch.cat((prompts["input_ids"], completions["input_ids"]), dim=1)
        attention_mask = torch.cat((prompts["attention_mask"], completions["attention_mask"]), dim=1)
        completion_mask = torch.cat((torch.zeros_like(prompts["attention_mask"]), completions["attention_mask"]), dim=1)
        # Per-token inputs some processors add for the prompt (Qwen2.5-VL's mm_token_type_ids): zero on the completion.
        per_token = [key for key in PER_TOKEN if key in prompts]
        extra = [torch.cat((prompts[key], torch.zeros_like(completions["input_ids"])), dim=1) for key in per_token]
        attention_mask, input_ids, completion_mask, *extra = flush_left(attention_mask, input_ids, completion_mask, *extra)
        batch = dict(prompts)
        batch.pop(AUDIO_COUNT, None)
        batch.update(zip(per_token, extra, strict=True))
        batch.update(input_ids=input_ids, attention_mask=attention_mask)
        if self.max_length is not None:
            for key in ["input_ids", "attention_mask", *per_token]:
                batch[key] = batch[key][:, : self.max_length]
            completion_mask = completion_mask[:, : self.max_length]
        labels = batch["input_ids"].clone()
        labels[(batch["attention_mask"] == 0) | (completion_mask == 0)] = -100
        batch["labels"] = labels
        return batch
