"""Chat messages of a problem, and where its media files are: shared by generation, evaluation and training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.specs import MEDIA_FIELDS
from state import InputError

Messages = list[dict[str, Any]]

# OpenAI chat content part of each media field (``audio_url`` is vLLM's, for local files).
MEDIA_PARTS = {"sound": "audio_url", "image": "image_url", "video": "video_url"}


def media_url(problem: dict[str, Any], field: str, media_dir: str) -> str:
    """``file://`` URL of a problem's media file, which must lie inside ``media_dir``."""
    where = f"problem {problem['id']!r}: {field} {problem[field]!r}"
    root = Path(media_dir).resolve()
    path = (root / problem[field]).resolve()
    if not path.is_relative_to(root):
        raise InputError(f"{where} is outside generate.media_dir ({root})")
    if not path.is_file():
        raise InputError(f"{where}: {path} not found")
    return path.as_uri()


def check_backend_takes(problems: list[dict[str, Any]], backend: str, media_dir: str | None, source: str, key: str) -> None:
    """Problems (read from ``source``) with media need the vllm backend (``key``) and a media folder:
    checked before submitting, and again by the job."""
    with_media = next((p["id"] for p in problems if any(f in p for f in MEDIA_FIELDS)), None)
    if with_media is None:
        return
    if backend == "transformers":
        raise InputError(
            f"{source}: problem {with_media!r} has media, but {key} is transformers, which is text-only;"
            " use vllm for sound / image / video"
        )
    if media_dir is None:
        raise InputError(f"{source}: problem {with_media!r} has media: set generate.media_dir to the folder its files are in")


def check_media(problems: list[dict[str, Any]], media_dir: str, source: str) -> None:
    """Every media file of ``problems`` (read from ``source``) exists inside ``media_dir``: checked
    before submitting (the job finds each one again as it builds the problem's request)."""
    for problem in problems:
        for field in MEDIA_FIELDS:
            if field in problem:
                try:
                    media_url(problem, field, media_dir)
                except InputError as error:
                    raise InputError(f"{source}: {error}") from None


def messages_for(problem: dict[str, Any], system_prompt: str | None, media_dir: str | None = None) -> Messages:
    """Chat messages of a problem. With ``media_dir``, its media go first as content parts and their
    ``<sound>``-style tags leave the text; without, the text alone (for text-only models)."""
    messages: Messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    media = [f for f in MEDIA_FIELDS if f in problem]
    if not media or media_dir is None:
        messages.append({"role": "user", "content": problem["question"]})
        return messages
    text = problem["question"]
    parts: list[dict[str, Any]] = []
    for field in media:
        part = MEDIA_PARTS[field]
        parts.append({"type": part, part: {"url": media_url(problem, field, media_dir)}})
        text = text.replace(f"<{field}>", "")
    parts.append({"type": "text", "text": text.strip()})
    messages.append({"role": "user", "content": parts})
    return messages
