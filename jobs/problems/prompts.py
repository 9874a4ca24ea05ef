"""Chat messages of a problem, and where its media files are: shared by generation, evaluation and training.

A problem's media go where its question has their tags (``<sound>``, ``<image>``, ``<video>``; the
n-th tag of a kind takes the n-th file of that field). Generation sends them to vLLM as file URL
parts; vLLM turns each into an ``audio`` / ``image`` / ``video`` part of the model's chat template.
Training renders the same parts with the same template, so both see the same prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.problems.data import MEDIA_FIELDS, MEDIA_TAG, media_files
from state import InputError

Messages = list[dict[str, Any]]
# A question split at its media tags: text, and (field, file) where a tag was.
Segment = str | tuple[str, Path]

# OpenAI chat content part of each media field (``audio_url`` is vLLM's, for local files).
MEDIA_PARTS = {"sound": "audio_url", "image": "image_url", "video": "video_url"}
# The part a chat template renders as that media's placeholder; vLLM makes one of each URL part above.
TEMPLATE_PARTS = {"sound": "audio", "image": "image", "video": "video"}


def media_path(problem: dict[str, Any], field: str, name: str, media_dir: str) -> Path:
    """A media file of a problem, which must lie inside ``media_dir``."""
    where = f"problem {problem['id']!r}: {field} {name!r}"
    root = Path(media_dir).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise InputError(f"{where} is outside generate.media_dir ({root})")
    if not path.is_file():
        raise InputError(f"{where}: {path} not found")
    return path


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
    """Every media file of ``problems`` (read from ``source``) lies inside ``media_dir`` and can be read
    as the model will get it (jobs.problems.media): checked before submitting. Where every file is comes
    first, so that a wrong path is told before any file is opened; each file is read once."""
    # Imported here for import cost: the media readers (soundfile, OpenCV) load only when media are checked.
    from jobs.problems.media import READERS

    files: dict[tuple[str, Path], tuple[dict[str, Any], str]] = {}
    for problem in problems:
        for field in MEDIA_FIELDS:
            for name in media_files(problem, field):
                try:
                    path = media_path(problem, field, name, media_dir)
                except InputError as error:
                    raise InputError(f"{source}: {error}") from None
                files.setdefault((field, path), (problem, name))
    for (field, path), (problem, name) in files.items():
        try:
            READERS[field](path)
        except ValueError as error:
            raise InputError(f"{source}: problem {problem['id']!r}: {field} {name!r}: {error}") from None


def segments(problem: dict[str, Any], media_dir: str) -> list[Segment]:
    """The question cut at its media tags (jobs.problems.data checked one per file): the text between them,
    trimmed (the spaces around a tag only set it apart), empty pieces left out, and each tag's
    file, in order. A question without tags stays as it is."""
    files = {field: iter(media_files(problem, field)) for field in MEDIA_FIELDS}
    question = problem["question"]
    pieces: list[Segment] = []
    start = 0
    for match in MEDIA_TAG.finditer(question):
        field = match.group(1)
        pieces += [question[start:match.start()].strip(), (field, media_path(problem, field, next(files[field]), media_dir))]
        start = match.end()
    if not pieces:
        return [question]
    pieces.append(question[start:].strip())
    return [piece for piece in pieces if piece != ""]


def has_media(problem: dict[str, Any]) -> bool:
    return any(field in problem for field in MEDIA_FIELDS)


def messages_for(problem: dict[str, Any], system_prompt: str | None, media_dir: str | None = None) -> Messages:
    """Chat messages of a problem for an OpenAI-compatible server. With ``media_dir``, its media go
    as file URL parts where their tags were; without, the text alone (for text-only models)."""
    messages: Messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if not has_media(problem) or media_dir is None:
        messages.append({"role": "user", "content": problem["question"]})
        return messages
    parts: list[dict[str, Any]] = []
    for piece in segments(problem, media_dir):
        if isinstance(piece, str):
            parts.append({"type": "text", "text": piece})
        else:
            kind = MEDIA_PARTS[piece[0]]
            parts.append({"type": kind, kind: {"url": piece[1].as_uri()}})
    messages.append({"role": "user", "content": parts})
    return messages


def template_messages(problem: dict[str, Any], system_prompt: str | None, media_dir: str) -> tuple[Messages, list[tuple[str, str]]]:
    """The same prompt as ``messages_for``, as vLLM hands it to the model's chat template (an
    ``audio`` / ``image`` / ``video`` part where each URL part was), and the media files in that
    order as (field, path). Every content is a list of parts: a data set column needs one type."""
    messages: Messages = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt else []
    parts, media = [], []
    for piece in segments(problem, media_dir):
        if isinstance(piece, str):
            parts.append({"type": "text", "text": piece})
        else:
            parts.append({"type": TEMPLATE_PARTS[piece[0]]})
            media.append((piece[0], str(piece[1])))
    messages.append({"role": "user", "content": parts})
    return messages, media
