"""Answer extraction, following the ReST seed's generate.py / filter.py rules.

A response looks like ``<think>reasoning</think>\\nANSWER: 3 sounds``. Extraction splits off the
reasoning (a response whose ``<think>`` never closed ran out of tokens and has no answer), then
takes, from what follows, the first of these that is there, each at its last occurrence:
the configured pattern(s) (``filter.answer_pattern``, by default ``<answer>...</answer>``), an
``ANSWER:`` line, ``\\boxed{...}``, ``#### ...``, an "answer is ..." phrase, else the last line.
Verifiers (jobs.verifiers) then judge the extracted answer; the numeric one takes its last number.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["THINK_CLOSE", "THINK_OPEN", "Extracted", "Rules", "answer_from", "answer_part", "answer_rules", "extract", "split_thinking"]

DEFAULT_PATTERN = r"<answer>(.*?)</answer>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# None stands for \boxed{...}: nested braces need a scanner (_last_boxed), not a regex.
Rules = tuple[re.Pattern[str] | None, ...]
_BUILTIN_RULES: Rules = (
    re.compile(r"\banswer\s*\**\s*:\s*\**[ \t]*(.+)", re.IGNORECASE),
    None,
    re.compile(r"####\s*(.+)"),
    # "The answer is 3.5." -> "3.5": stops at a sentence end, not at a decimal point.
    re.compile(r"answer is\s*:?\s*(.+?)(?=\.\s|\.?$)", re.IGNORECASE | re.MULTILINE),
)
_BOXED = ("\\boxed{", "\\fbox{")
_BRACE_DEPTH = {"{": 1, "}": -1}


@dataclass(frozen=True)
class Extracted:
    thinking_prediction: str
    answer_text: str
    answer_prediction: str


def split_thinking(raw_output: str) -> tuple[str, str]:
    """``"<think>r</think> a"`` -> ``("r", "a")``; the opening tag may be in the prompt instead."""
    end = raw_output.rfind(THINK_CLOSE)
    start = raw_output.find(THINK_OPEN, 0, end if end >= 0 else len(raw_output))
    begin = start + len(THINK_OPEN) if start >= 0 else 0
    if end >= 0:
        return raw_output[begin:end].strip(), raw_output[end + len(THINK_CLOSE):].strip()
    if start >= 0:
        return raw_output[begin:].strip(), ""
    return "", raw_output.strip()


def answer_part(raw_output: str) -> str:
    """``split_thinking(raw_output)[1]`` without copying the reasoning: the filter's step per candidate."""
    end = raw_output.rfind(THINK_CLOSE)
    if end >= 0:
        return raw_output[end + len(THINK_CLOSE):].strip()
    return "" if THINK_OPEN in raw_output else raw_output.strip()


def _last_boxed(text: str) -> str | None:
    opening = max(_BOXED, key=text.rfind)
    start = text.rfind(opening)
    if start < 0:
        return None
    start += len(opening)
    depth = 1
    for index in range(start, len(text)):
        depth += _BRACE_DEPTH.get(text[index], 0)
        if depth == 0:
            return text[start:index].strip()
    return None


def _last_match(pattern: re.Pattern[str], text: str) -> str | None:
    matches = pattern.findall(text)
    if not matches:
        return None
    last = matches[-1]
    # A pattern with several groups yields tuples: its answer is the group that matched.
    return (next((g for g in last if g), "") if isinstance(last, tuple) else last).strip()


def answer_rules(answer_pattern: str | Sequence[str] = DEFAULT_PATTERN) -> Rules:
    """The configured pattern(s), then the built-in rules, in the order they are tried."""
    configured = [answer_pattern] if isinstance(answer_pattern, str) else answer_pattern
    compiled = []
    for pattern in configured:
        try:
            compiled.append(re.compile(pattern, re.IGNORECASE | re.DOTALL))
        except re.error as error:
            raise ValueError(f"answer pattern {pattern!r} is not a valid regular expression: {error}") from None
    return (*compiled, *_BUILTIN_RULES)


def answer_from(answer_text: str, rules: Rules) -> str:
    """The answer in the text after the reasoning: the first rule that finds one, else the last line."""
    for rule in rules:
        found = _last_boxed(answer_text) if rule is None else _last_match(rule, answer_text)
        if found is not None:
            # "ANSWER: $\boxed{12}$" -> "12".
            return (_last_boxed(found) or found) if "box" in found else found
    return answer_text.rstrip().rsplit("\n", 1)[-1].strip()


def extract(raw_output: str, answer_pattern: str | Sequence[str] = DEFAULT_PATTERN) -> Extracted:
    thinking, answer_text = split_thinking(raw_output)
    return Extracted(thinking, answer_text, answer_from(answer_text, answer_rules(answer_pattern)))
