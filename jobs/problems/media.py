"""A problem's media files read the way vLLM's server reads them, for the data checks and for training.

Generation sends file URLs and vLLM decodes the files itself; training decodes them here and hands
them to the model's processor. To give the model the same inputs both ways, each reader follows
what vLLM 0.32 does with a local file:

- ``sound``: soundfile, channels averaged to mono, float32. 16 kHz only: vLLM resamples other rates
  with torchaudio, which has no build for CPU torch 2.13, and the Qwen audio models take 16 kHz, so
  a clip at another rate is refused (convert it: ``sox in.wav -r 16000 out.wav``).
- ``image``: PIL, converted to RGB (transparent pixels on white, as vLLM does).
- ``video``: OpenCV, RGB frames, only those that vLLM's video loader for the model's processor
  picks: for Qwen2-VL's video processor (Qwen2-VL, Qwen2.5-VL) the processor's own sampling at
  2 frames per second (vLLM ports it exactly), else ``VIDEO_FRAMES`` spread evenly (vLLM's
  default loader). The processor then takes them as they are.

Each reader raises ``ValueError`` with why a file cannot be used.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 16_000
VIDEO_FRAMES = 32


def read_sound(path: Path) -> np.ndarray:
    import soundfile

    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as error:
        raise ValueError(f"not a readable audio file ({error})") from None
    if rate != SAMPLE_RATE:
        raise ValueError(f"audio at {rate} Hz; the models take {SAMPLE_RATE} Hz (convert it, e.g. sox IN -r {SAMPLE_RATE} OUT)")
    if not len(samples):
        raise ValueError("audio file without samples")
    return samples.mean(axis=1)


def read_image(path: Path) -> Any:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)  # vLLM turns photos upright by their EXIF orientation
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"not a readable image ({error})") from None
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


@dataclass
class Video:
    """Decoded frames (T, H, W, 3) RGB uint8, which frames of the file they are, and the file's own
    frame count and rate (what transformers' VideoMetadata, and its frame sampling, read)."""

    total_num_frames: int
    fps: float
    width: int
    height: int
    frames_indices: list[int] = field(default_factory=list)
    frames: np.ndarray | None = None


def read_video(path: Path, sample: Callable[[Video], list[int]] | None = None) -> Video:
    """The frames ``sample`` picks given the whole video (default: at most ``VIDEO_FRAMES`` spread
    evenly, np.linspace(..., dtype=int) as vLLM's default loader), decoded in one pass as vLLM's
    OpenCV decoder does."""
    import cv2

    # FFmpeg's and OpenCV's own complaints about a broken file would reach stderr beside our one-line error.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    finally:
        cv2.utils.logging.setLogLevel(level)
    try:
        video = Video(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), float(capture.get(cv2.CAP_PROP_FPS)),
                      int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        total = video.total_num_frames
        if not capture.isOpened() or total < 1:
            raise ValueError("not a readable video (OpenCV finds no frames)")
        if sample is None:
            indices = np.linspace(0, total - 1, min(total, VIDEO_FRAMES), dtype=int).tolist()
        else:
            indices = [min(int(i), total - 1) for i in sample(video)]
        wanted, frames = set(indices), {}
        for index in range(max(indices) + 1):
            if not capture.grab():
                break
            if index in wanted:
                ok, frame = capture.retrieve()
                if ok:
                    frames[index] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        capture.release()
    if len(frames) < len(wanted):
        raise ValueError(f"video decodes to {len(frames)} of the {len(wanted)} frames sampled from it")
    video.frames_indices, video.frames = indices, np.stack([frames[i] for i in indices])
    return video


def check_video(path: Path) -> Video:
    """A video opens and its first frame decodes (decoding all of a long video would take long)."""
    return read_video(path, sample=lambda video: [0])


# The data checks' reader of each media field.
READERS: dict[str, Callable[[Path], Any]] = {"sound": read_sound, "image": read_image, "video": check_video}
