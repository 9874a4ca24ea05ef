"""The seeds' reward functions, registered by name (jobs.scoring.rewards has the registry).

Each has TRL's shape ``f(prompts, completions, **columns) -> list[float | None]``; its parameters
are its keyword-only arguments (set from YAML next to the reward's name), and every other field of
the problem arrives as a column, one value per completion (``answer`` is the ground truth, ``id``
the problem's id). A completion is a string or TRL's conversational list of messages, whose
contents are read joined. A reward that cannot score raises: the registry counts it as a failure
of those samples, never as a zero.

    correctness        seed 004: 1 if the run's verifier accepts the extracted answer, else 0
    format             seed 003 (fullmatch of the tag layout) / seed 002 (every tag present and closed) /
                       TRL's think_format_reward (prefix: the blocks first, free text after)
    tag_count          seed 004: 0.5 / (number of tag strings) for each tag string used exactly once
    length             seed 004 (Kimi 1.5 via open-r1): lambda = 0.5 - (len - min) / (max - min) over the
                       problem's K samples; lambda if correct, min(0, lambda) if wrong
    reasoning_steps    seed 004 (open-r1): min(1, markers of steps / 3)
    refuse_iou         seed 003: IoU x start accuracy x end accuracy, or the refusal table
    explain_correction seed 003: refusal score + max(0, best Sentence-BERT cosine - threshold) for refusable ones
    one_sentence       seed 002: 0.1 if exactly one sentence
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from functools import cache
from typing import Annotated, Any, Literal

from annotated_types import Len
from pydantic import DirectoryPath

from jobs.scoring.answers import extract
from jobs.scoring.rewards import RewardContext, reward
from jobs.scoring.verifiers import get_verifier

# Seed 003's test for an answer that gives a time span: "12.5 to 30.0".
TIMESTAMP = re.compile(r"(\d+\.\d+)\s+to\s+(\d+\.\d+)")
# open-r1's reasoning_steps_reward pattern, used as open-r1 does (no flags: "^\d+\." matches only
# at the very start of the completion).
STEP_MARKERS = re.compile(r"(Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,)")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# Tag names, e.g. [think, answer] for <think>...</think><answer>...</answer>.
Tags = Annotated[tuple[str, ...], Len(min_length=1)]


def completion_text(completion: Any) -> str:
    """A completion as text: a string as it is, TRL's conversational messages by their contents joined."""
    if isinstance(completion, str):
        return completion
    return "".join(message["content"] for message in completion if isinstance(message.get("content"), str))


def column(columns: dict[str, Any], name: str, count: int) -> Sequence[Any]:
    """The problem field ``name``, one value per completion; a clear error when the data has no such field."""
    if name not in columns:
        given = ", ".join(sorted(k for k in columns if k not in ("trainer_state", "completion_ids"))) or "none"
        raise ValueError(f"needs the problem field {name!r} (fields given: {given})")
    values = columns[name]
    if len(values) != count:
        raise ValueError(f"field {name!r} has {len(values)} values for {count} completions")
    return values


def tag_content(text: str, tag: str) -> str | None:
    """What the first ``<tag>...</tag>`` of ``text`` holds; None when there is none."""
    found = re.search(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, re.DOTALL)
    return found.group(1) if found else None


def _truth(value: Any) -> str:
    # A data set's numeric truths (72, not "72") are judged as their JSON text, as the filter does.
    return value if isinstance(value, str) else json.dumps(value)


def _verdicts(
    completions: Sequence[Any], columns: dict[str, Any], context: RewardContext,
    verifier: str | None, answer_pattern: str | list[str] | None,
) -> list[bool | None]:
    """Per completion: the verifier's judgement, None where it cannot judge (a gold answer it cannot read)."""
    judge = get_verifier(verifier or context.verifier)
    pattern = answer_pattern if answer_pattern is not None else context.answer_pattern
    truths = column(columns, "answer", len(completions))
    verdicts = (judge(extract(completion_text(c), pattern).answer_prediction, _truth(truth))
                for c, truth in zip(completions, truths, strict=True))
    return [None if verdict is None else bool(verdict) for verdict in verdicts]


@reward("correctness")
def correctness(
    prompts: Sequence[Any], completions: Sequence[Any], *, context: RewardContext,
    verifier: str | None = None, answer_pattern: str | list[str] | None = None, **columns: Any,
) -> list[float | None]:
    """1.0 when the run's verifier (or ``verifier``) accepts the answer extracted with the run's
    answer pattern (or ``answer_pattern``), else 0.0 (seed 004's correctness, weight 2 there); None
    (no score, as TRL's accuracy_reward) where the verifier cannot judge."""
    return [None if ok is None else float(ok) for ok in _verdicts(completions, columns, context, verifier, answer_pattern)]


@reward("format")
def format_reward(
    prompts: Sequence[Any], completions: Sequence[Any], *, tags: Tags = ("think", "answer"),
    layout: Literal["fullmatch", "prefix", "present"] = "fullmatch", multiline: bool = True, **columns: Any,
) -> list[float]:
    """1.0 when the response has the tag layout, else 0.0.

    fullmatch (seed 003): the whole response is ``<t1>.*?</t1>\\s*<t2>.*?</t2>...`` in this order,
    nothing before or after (``re.fullmatch``). prefix (TRL's think_format_reward with ``tags:
    [think]``): the response starts with those blocks, each tag opens only once, free text may
    follow. present (seed 002's speaker): every tag opens and closes somewhere, in any order. With
    ``multiline`` (the default) a tag's content may span lines (re.DOTALL), as reasoning does;
    ``multiline: false`` is seed 003's regex without flags.
    """
    flags = re.DOTALL if multiline else 0
    spans = [rf"<{re.escape(t)}>.*?</{re.escape(t)}>" for t in tags]
    texts = [completion_text(c) for c in completions]
    if layout == "present":
        each = [re.compile(span, flags) for span in spans]
        return [float(all(p.search(text) for p in each)) for text in texts]
    blocks = re.compile(r"\s*".join(spans), flags)
    if layout == "fullmatch":
        return [float(blocks.fullmatch(text) is not None) for text in texts]
    return [float(blocks.match(text) is not None and all(text.count(f"<{t}>") == 1 for t in tags)) for text in texts]


@reward("tag_count")
def tag_count(
    prompts: Sequence[Any], completions: Sequence[Any], *, tags: Tags = ("think", "answer"),
    **columns: Any,
) -> list[float]:
    """0.5 / (2 x len(tags)) for each of ``<t>`` and ``</t>`` that occurs exactly once (seed 004:
    reasoning and answer, 4 tag strings, 0.125 each; at most 0.5)."""
    strings = [s for t in tags for s in (f"<{t}>", f"</{t}>")]
    share = 0.5 / len(strings)
    return [share * sum(text.count(s) == 1 for s in strings) for text in map(completion_text, completions)]


def _gathered(pairs: list[tuple[Any, int]]) -> list[tuple[Any, int]]:
    """``pairs`` of every process of a distributed job (TRL scores a slice of the batch per
    process, so a problem's K samples may be spread over several); this process's alone otherwise."""
    # Only a process that imported torch can be part of a distributed job: the filter does not pay
    # torch's import for this check.
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return pairs
    world = torch.distributed.get_world_size()
    if world == 1:
        return pairs
    everyone: list[list[tuple[Any, int]] | None] = [None] * world
    torch.distributed.all_gather_object(everyone, pairs)
    return [pair for part in everyone for pair in part or ()]


@reward("length")
def length(
    prompts: Sequence[Any], completions: Sequence[Any], *, context: RewardContext,
    verifier: str | None = None, answer_pattern: str | list[str] | None = None, **columns: Any,
) -> list[float | None]:
    """Kimi 1.5's length reward (seed 004, open-r1's ``len_reward``): lambda = 0.5 - (len - min_len) /
    (max_len - min_len), lengths in characters, min and max over the samples of the same problem
    (``id``; without one the call is one problem); lambda when correct, min(0, lambda) when wrong,
    None where the verifier cannot judge (open-r1 counts those correct). A problem whose samples are
    all as long gets 0.0 for each, as open-r1 does."""
    lengths = [len(completion_text(c)) for c in completions]
    ids = columns.get("id")
    if ids is None:
        ids = [None] * len(completions)
    pairs = list(zip(ids, lengths, strict=True))
    # Gathered before anything that could raise: every process must reach this collective.
    everyone = _gathered(pairs)
    if len(everyone) != len(pairs) and "id" not in columns:
        raise ValueError("needs the problem field 'id' to find a problem's samples across processes")
    bounds: dict[Any, tuple[int, int]] = {}
    for key, n in everyone:
        low, high = bounds.get(key, (n, n))
        bounds[key] = (min(low, n), max(high, n))
    correct = _verdicts(completions, columns, context, verifier, answer_pattern)
    scores: list[float | None] = []
    for (key, n), ok in zip(pairs, correct, strict=True):
        low, high = bounds[key]
        lam = 0.5 - (n - low) / (high - low) if high > low else 0.0
        scores.append(None if ok is None else lam if ok else min(0.0, lam))
    return scores


@reward("reasoning_steps")
def reasoning_steps(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
    """open-r1's ``reasoning_steps_reward``: min(1, markers / 3), markers being "Step N:", "N." at the
    start, a line starting with "-" or "*", and "First," "Second," "Next," "Finally,"."""
    return [min(1.0, len(STEP_MARKERS.findall(completion_text(c))) / 3) for c in completions]


def _prediction(text: str) -> str:
    """Seed 003's prediction: the <answer> content, or the whole response without one."""
    answer = tag_content(text, "answer")
    return text if answer is None else answer


def _task_types(columns: dict[str, Any], count: int) -> list[str]:
    types = column(columns, "task_type", count)
    for value in types:
        if value not in ("answerable", "refusable"):
            raise ValueError(f"task_type must be 'answerable' or 'refusable', got {value!r}")
    return types


@reward("refuse_iou")
def refuse_iou(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
    """Seed 003's Refuse-IoU table on the <answer> content: answerable with a "S to E" time span ->
    IoU x start accuracy x end accuracy (times over ``duration``, accuracy = 1 - |truth - prediction|);
    answerable without -> 0; refusable with -> 0; refusable without -> 1. ``timestamps`` is the
    truth's [start, end] in seconds."""
    count = len(completions)
    types = _task_types(columns, count)
    scores: list[float] = []
    for index, (completion, task_type) in enumerate(zip(completions, types, strict=True)):
        span = TIMESTAMP.search(_prediction(completion_text(completion)))
        if task_type == "refusable" or span is None:
            scores.append(float(task_type == "refusable" and span is None))
            continue
        # Read only here: a refusable problem has no true span (or duration) to give.
        duration = float(column(columns, "duration", count)[index])
        true_start, true_end = (float(t) for t in column(columns, "timestamps", count)[index])
        start, end = float(span.group(1)), float(span.group(2))
        intersection = max(0.0, min(end, true_end) - max(start, true_start))
        union = max(end, true_end) - min(start, true_start)
        iou = intersection / union if union > 0 else 0.0
        start_accuracy = 1 - abs(true_start / duration - start / duration)
        end_accuracy = 1 - abs(true_end / duration - end / duration)
        scores.append(iou * start_accuracy * end_accuracy)
    return scores


@cache
def sentence_model(folder: str) -> Any:
    """A Sentence-BERT model from a local folder, loaded once per process, on this process's GPU if any."""
    import torch
    from sentence_transformers import SentenceTransformer

    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return SentenceTransformer(folder, device=device, local_files_only=True)


@reward("explain_correction")
def explain_correction(
    prompts: Sequence[Any], completions: Sequence[Any], *, model: DirectoryPath, threshold: float = 0.5,
    **columns: Any,
) -> list[float]:
    """Seed 003's explain + correction reward: the refusal score (answerable: 1 with a "S to E" span
    in the answer, else 0; refusable: 0 with one, else 1) plus, for refusable ones, max(0, best cosine
    - ``threshold``) between the <correction> content and the ``references`` queries, embedded by the
    Sentence-BERT model in the local folder ``model``. No correction (or an empty one) adds nothing."""
    count = len(completions)
    types = _task_types(columns, count)
    references = column(columns, "references", count) if "refusable" in types else []
    scores: list[float] = []
    pending: list[tuple[int, str, list[str]]] = []  # (sample, correction, its references) to embed
    for index, (completion, task_type) in enumerate(zip(completions, types, strict=True)):
        text = completion_text(completion)
        has_timestamp = TIMESTAMP.search(_prediction(text)) is not None
        scores.append(float(has_timestamp == (task_type == "answerable")))
        correction = (tag_content(text, "correction") or "").strip()
        if task_type == "refusable" and correction:
            queries = [references[index]] if isinstance(references[index], str) else list(references[index])
            if queries:
                pending.append((index, correction, queries))
    if pending:
        from sentence_transformers.util import cos_sim

        encoder = sentence_model(str(model))
        sentences = [s for _, correction, queries in pending for s in (correction, *queries)]
        embeddings = encoder.encode(sentences, convert_to_tensor=True)
        position = 0
        for index, _, queries in pending:
            similarity = cos_sim(embeddings[position], embeddings[position + 1:position + 1 + len(queries)])
            position += 1 + len(queries)
            scores[index] += max(0.0, float(similarity.max()) - threshold)
    return scores


def sentence_count(text: str) -> int:
    """Sentences of ``text``: pieces between a ".", "!" or "?" and the whitespace after it."""
    return sum(1 for piece in SENTENCE_END.split(text.strip()) if piece)


@reward("one_sentence")
def one_sentence(
    prompts: Sequence[Any], completions: Sequence[Any], *, tag: str | None = None, **columns: Any,
) -> list[float]:
    """Seed 002's length reward: 0.1 when the ``tag`` content (e.g. detailed; default the whole
    completion) is exactly one sentence, else 0.0 (a missing tag is no sentence)."""
    scores: list[float] = []
    for completion in completions:
        text = completion_text(completion)
        content = text if tag is None else tag_content(text, tag)
        scores.append(0.1 if content is not None and sentence_count(content) == 1 else 0.0)
    return scores

