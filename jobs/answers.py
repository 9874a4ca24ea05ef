"""Answer extraction and verification, following the ReST seed's filter.py rules.

A response looks like ``<think>reasoning</think>\nANSWER: 3 sounds``. Extraction splits off the
reasoning, then takes the ``ANSWER:`` line, the configured pattern (``<answer>...</answer>``),
an "answer is ..." phrase, or the last line. Verifiers are small pure functions
``(prediction, ground_truth) -> bool`` chosen by name or import path.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

Verifier = Callable[[str, str], bool]

_THINK_CLOSE = "</think>"
_ANSWER_LINE = re.compile(r"ANSWER\s*:\s*(.+)", re.IGNORECASE)
_ANSWER_IS = re.compile(r"answer is\s*:?\s*(.+)", re.IGNORECASE)
_OPTION_PREFIX = re.compile(r"^\(?([A-Z])\)?(?:[.:)]\s+|\s+|$)")
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+")


@dataclass(frozen=True)
class Extracted:
    thinking_prediction: str
    answer_text: str
    answer_prediction: str


def extract(raw_output: str, answer_pattern: str = r"<answer>(.*?)</answer>") -> Extracted:
    thinking, _, rest = raw_output.rpartition(_THINK_CLOSE)
    if thinking:
        thinking = thinking.split("<think>", 1)[-1].strip()
    answer_text = rest.strip()
    return Extracted(thinking, answer_text, _answer_from(answer_text, answer_pattern))


def _answer_from(text: str, answer_pattern: str) -> str:
    for pattern in (_ANSWER_LINE, re.compile(answer_pattern, re.IGNORECASE | re.DOTALL), _ANSWER_IS):
        matches = pattern.findall(text)
        if matches:
            return matches[-1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def normalize(text: str) -> str:
    text = text.strip().lower()
    text = re.sub(r"[\s]+", " ", text)
    return text.strip(" .,:;!?\"'`")


def _split_option(text: str) -> tuple[str | None, str]:
    """``"(B) Piano"`` -> ``("B", "piano")``; ``"piano"`` -> ``(None, "piano")``."""
    stripped = text.strip()
    match = _OPTION_PREFIX.match(stripped)
    if match and (len(stripped) == 1 or stripped[0] == "(" or stripped[1:2] in ".:)"):
        return match.group(1), normalize(stripped[match.end():])
    return None, normalize(stripped)


def multiple_choice(prediction: str, ground_truth: str) -> bool:
    truth_letter, truth_text = _split_option(ground_truth)
    pred_letter, pred_text = _split_option(prediction)
    if pred_letter and truth_letter:
        return pred_letter == truth_letter
    if not pred_text:
        return False
    if pred_text == truth_text:
        return True
    # The seed's containment rule: "3 sounds" matches "(A) 3 sounds", "piano" matches "Piano".
    return bool(truth_text) and (truth_text in pred_text or pred_text in truth_text)


def parse_number(text: str) -> Fraction | None:
    """The last number in ``text`` (after ``####`` when present), thousands separators dropped."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    try:
        return Fraction(numbers[-1].replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def numeric(prediction: str, ground_truth: str) -> bool:
    truth = parse_number(ground_truth)
    return truth is not None and parse_number(prediction) == truth


def exact(prediction: str, ground_truth: str) -> bool:
    return normalize(prediction) == normalize(ground_truth)


VERIFIERS: dict[str, Verifier] = {"multiple_choice": multiple_choice, "numeric": numeric, "exact": exact}


def get_verifier(name: str) -> Verifier:
    """A verifier by name, or a user's function given as ``package.module:function``."""
    if name in VERIFIERS:
        return VERIFIERS[name]
    module_name, sep, attr = name.partition(":")
    if not sep:
        raise ValueError(f"unknown verifier {name!r}: use one of {sorted(VERIFIERS)} or 'module:function'")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import verifier {name!r}: {error}") from None
    if callable(function):
        return function
    raise ValueError(f"verifier {name!r} is not callable")
