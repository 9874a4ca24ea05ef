"""Problem sets in the seeds' formats, validated line by line before anything is submitted.

Accepted: a JSON array or JSONL of records, either ``{"id", "question", "answer"}`` (optional
``sound`` / ``image`` / ``video``) or the conversations format
``{"conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}`` (id optional there).
A media field holds a file (a path relative to generate.media_dir) or a list of them, and the
question holds one tag (``<sound>``, ``<image>``, ``<video>``) per file, where it goes.
Every other field of a problem is kept as it is (seed 003's task_type, duration, timestamps,
references ...): generation records carry them, and rewards get them as columns.
Errors name the file and line: ``data/train.jsonl:17: missing field 'answer'``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jobs.scoring.records import RECORD_KEYS
from state import InputError, atomic_write_bytes, read_user_text

# A problem's media, each a path (or a list of paths) relative to generate.media_dir.
MEDIA_FIELDS = ("sound", "image", "video")

Problem = dict[str, Any]

# Where a media file goes in a question: <sound>, <image>, <video>.
MEDIA_TAG = re.compile(r"<(" + "|".join(MEDIA_FIELDS) + r")>")


def media_files(problem: Problem, field: str) -> list[str]:
    """The files of a media field, in the order of its tags (a field holds one file or a list)."""
    value = problem.get(field, [])
    return [value] if isinstance(value, str) else value


def _check_media_fields(record: dict[str, Any], where: str) -> None:
    """Media fields are a file or a non-empty list of files, with one tag per file in the question."""
    for field in MEDIA_FIELDS:
        value = record.get(field)
        if field in record and not (isinstance(value, str) or (
                isinstance(value, list) and value and all(isinstance(v, str) for v in value))):
            raise InputError(f"{where}: field {field!r} must be a file name or a list of file names")
    tags = [match.group(1) for match in MEDIA_TAG.finditer(record["question"])]
    for field in MEDIA_FIELDS:
        files, count = media_files(record, field), tags.count(field)
        if count == len(files):
            continue
        problem = f"{where}: problem {record['id']!r}"
        if not files:
            raise InputError(f"{problem}: its question has <{field}> but the problem has no {field!r} field")
        if not count:
            raise InputError(f"{problem}: field {field!r} ({files[0]!r}) but no <{field}> in its question;"
                             f" put <{field}> where the {field} goes, e.g. '<{field}> {record['question']}'")
        raise InputError(f"{problem}: its question has {count} <{field}> for {len(files)} files in {field!r}")


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) for a JSON array or a JSONL file."""
    text = read_user_text(path, "a file of problems (.jsonl or .json)")
    if text.lstrip().startswith("["):
        yield from _array_records(path, text)
        return
    # Only "\n" ends a line: str.splitlines() would also split at U+2028, U+0085 and the like,
    # which JSON strings may hold unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{number}: malformed JSON ({error.msg} at column {error.colno})") from None


def _array_records(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Decode a JSON array element by element so each error can name the element's line."""
    decoder = json.JSONDecoder()
    position = text.index("[") + 1

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    position = skip(position)
    if position < len(text) and text[position] == "]":
        return
    while True:
        try:
            record, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{error.lineno}: malformed JSON ({error.msg} at column {error.colno})") from None
        yield line_of(position), record
        position = skip(end)
        if position < len(text) and text[position] == ",":
            position = skip(position + 1)
            continue
        if position < len(text) and text[position] == "]":
            if skip(position + 1) != len(text):
                raise InputError(f"{path}:{line_of(position + 1)}: unexpected text after the JSON array")
            return
        raise InputError(f"{path}:{line_of(position)}: malformed JSON (expected ',' or ']' between records)")


def _from_conversations(record: dict[str, Any], where: str) -> Problem:
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise InputError(f"{where}: 'conversations' must be a list of turns")
    by_role: dict[str, str] = {}
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise InputError(f"{where}: each turn of 'conversations' needs 'from' and a string 'value'")
        by_role.setdefault(turn["from"], turn["value"])
    for role in ("human", "gpt"):
        if role not in by_role:
            raise InputError(f"{where}: 'conversations' has no turn from {role!r}")
    problem = {k: v for k, v in record.items() if k != "conversations"}
    problem.update(question=by_role["human"], answer=by_role["gpt"])
    return problem


def _problem(record: Any, where: str, index: int, stem: str) -> Problem:
    if not isinstance(record, dict):
        raise InputError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    record = _from_conversations(record, where) if "conversations" in record else dict(record)
    # Records without an id (GSM8K's, seed 001's conversations) are named by their place in the file.
    record.setdefault("id", f"{stem}_{index}")
    for key in ("question", "answer"):
        if key not in record:
            raise InputError(f"{where}: missing field {key!r}")
    if not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool):
        raise InputError(f"{where}: field 'id' must be a string or an integer")
    answer = record["answer"]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        record["answer"] = str(answer)  # a numeric answer given as a number (72), as the verifiers read text
    for key in ("question", "answer"):
        if not isinstance(record[key], str):
            raise InputError(f"{where}: field {key!r} must be a string")
        # Seed 003's refusable problems have no answer to give: their rewards judge a refusal.
        if not record[key].strip() and not (key == "answer" and record.get("task_type") == "refusable"):
            raise InputError(f"{where}: field {key!r} is empty; give the problem's {key} or remove the problem")
    _check_media_fields(record, where)
    max_tokens = record.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise InputError(f"{where}: field 'max_tokens' must be a positive integer (this problem's own generate.max_tokens)")
    reserved = next((key for key in RECORD_KEYS if key in record), None)
    if reserved:
        raise InputError(f"{where}: field {reserved!r} is reserved for generation records: rename it")
    return {**record, "id": str(record["id"])}


def load_problems(path: Path | str) -> list[Problem]:
    """Every problem of ``path``: id (as text), question, answer, and its other fields as they are."""
    path = Path(path)
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    for index, (number, record) in enumerate(_records(path)):
        where = f"{path}:{number}"
        problem = _problem(record, where, index, path.stem)
        if problem["id"] in first_line:
            raise InputError(f"{where}: duplicate id {problem['id']!r} (first on line {first_line[problem['id']]})")
        first_line[problem["id"]] = number
        problems.append(problem)
    if not problems:
        raise InputError(f"{path}: no problems in file")
    return problems


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
