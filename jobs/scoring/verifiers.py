"""Verifiers: is an extracted answer right? Small pure functions ``(prediction, ground_truth) -> bool``.

A data set picks one by name in ``filter.verifier``:

- ``multiple_choice``: the seed's rules. Option letters decide ("B" = "(B) Piano"); without a letter
  the option text decides, case-insensitively, equal or contained as whole words ("piano", "It is a
  piano"). A prediction that names several options ("A or B", "(A) 3 (B) 4"), hedges ("piano or
  violin"), negates, or states other numbers than the option ("4 sounds") is wrong.
- ``numeric``: the last number (after ``####`` when present), thousands separators, signs, decimals,
  fractions, ``\\frac{a}{b}``, units and trailing text allowed; compared exactly as fractions.
- ``math``: math-verify (LaTeX, ``\\boxed{}``, equivalent forms such as ``\\frac12`` = ``0.5``).
- ``exact``: equal after trimming, case folding and collapsing whitespace.
- ``regex``: the ground truth is a regular expression the whole prediction must match.
- ``package.module:function``: a user's function with the same signature.
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable, Mapping
from fractions import Fraction
from functools import lru_cache
from typing import Any

Verifier = Callable[[str, str], bool]

# Markdown emphasis, quotes, math delimiters and end punctuation around an answer carry no meaning.
_EDGE_CHARS = " \t\n.,:;!?\"'`*$_"
_LATEX_TEXT = re.compile(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}")


def normalize(text: str) -> str:
    return " ".join(_strip_latex_text(text).lower().split()).strip(_EDGE_CHARS)


def _strip_latex_text(text: str) -> str:
    """``\\text{B}`` -> ``B``."""
    return _LATEX_TEXT.sub(r"\1", text) if "\\" in text else text


# --- multiple choice ---------------------------------------------------------------------------

# "B", "(b)", "[B].", "Option B": the whole answer is one letter.
_LETTER_ONLY = re.compile(r"(?:(?:option|choice)\s+)?[(\[]?([a-z])[)\]]?[.:]?", re.IGNORECASE)
# "(B) Piano", "B. Piano", "B) Piano", "B: Piano", "b) piano", "Option B: Piano": a letter, then text.
_LEADING_LETTER = re.compile(
    r"(?:(?i:option|choice)\s+)?(?:[(\[]([A-Za-z])[)\]]|([A-Z])[.:)]|([a-z])\))(?:\s+|$)(.*)", re.DOTALL
)
# Letters named inside the text: "(B)" (not "sound(s)"), "option B".
_INNER_LETTER = re.compile(r"(?<!\w)[(\[]([A-Za-z])[)\]]|\b(?i:option|choice)\s+([A-Za-z])\b")
_NUMBERS_IN_TEXT = re.compile(r"\d+(?:\.\d+)?")
# Words that turn "piano" into a different claim when added to it: "piano or violin", "not piano".
_HEDGES = frozenset({"or", "nor", "either", "neither", "not", "no", "never", "maybe", "perhaps"})
# Too common to identify an option when the prediction is only a part of the option's text.
_FILLER = frozenset({"a", "an", "the", "of", "in", "on", "at", "to", "and", "is", "it", "are"})
_WORD = re.compile(r"\w+")


@lru_cache(maxsize=8192)
def _parse_option(text: str) -> tuple[frozenset[str], str]:
    """The option letters ``text`` names and its option text: ``"(B) Piano"`` -> ``({"B"}, "piano")``.

    Cached: a problem's truth is parsed for each of its distinct answers, and answers repeat.
    """
    text = _strip_latex_text(text).strip().strip("*`$")
    whole = _LETTER_ONLY.fullmatch(text)
    if whole:
        return frozenset(whole.group(1).upper()), ""
    leading = _LEADING_LETTER.match(text)
    if leading:
        letter = next(g for g in leading.groups()[:3] if g)
        rest = leading.group(4)
        return frozenset({letter.upper(), *_inner_letters(rest)}), normalize(rest)
    inner = _inner_letters(text)
    # Free text that mentions an option ("I pick (B) because ...") is commentary, not option text.
    return inner, "" if inner else normalize(text)


def _inner_letters(text: str) -> frozenset[str]:
    return frozenset((a or b).upper() for a, b in _INNER_LETTER.findall(text))


def _contains_words(text: str, part: str) -> bool:
    """``part`` in ``text`` as whole words: in "3 sounds!", not in "13 sounds" (no regex to compile per part)."""
    start = text.find(part)
    while start >= 0:
        end = start + len(part)
        if not (start and _is_word_char(text[start - 1])) and not (end < len(text) and _is_word_char(text[end])):
            return True
        start = text.find(part, start + 1)
    return False


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


def same_option_text(prediction: str, truth: str) -> bool:
    """The seed's normalized containment, without its false positives (both already normalized)."""
    if not prediction or not truth:
        return False
    if prediction == truth:
        return True
    if set(_NUMBERS_IN_TEXT.findall(prediction)) != set(_NUMBERS_IN_TEXT.findall(truth)):
        return False
    predicted_words, truth_words = set(_WORD.findall(prediction)), set(_WORD.findall(truth))
    if (predicted_words - truth_words) & _HEDGES:
        return False
    if _contains_words(prediction, truth):
        return True
    return bool(predicted_words - _FILLER) and _contains_words(truth, prediction)


def multiple_choice(prediction: str, ground_truth: str) -> bool:
    truth_letters, truth_text = _parse_option(ground_truth)
    letters, text = _parse_option(prediction)
    if len(letters) > 1:
        return False
    if letters and truth_letters:
        # A letter with its option text must agree with both: "(A) 4 sounds" is not "(A) 3 sounds".
        return letters == truth_letters and (not text or not truth_text or same_option_text(text, truth_text))
    return same_option_text(text, truth_text)


# --- numbers -----------------------------------------------------------------------------------

# A sign only at the start of a number ("3-4" is 3 and 4), "1,234,567" as one number, then an
# optional decimal part or denominator and exponent.
_NUMBER = re.compile(
    r"(?<![\w.])[-+−]?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+|/\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
)
_LATEX_FRACTION = re.compile(r"\\[dt]?frac\{\s*([-+]?\d+)\s*\}\{\s*(\d+)\s*\}")


@lru_cache(maxsize=8192)
def parse_number(text: str) -> Fraction | None:
    """The last number in ``text`` (after ``####`` when present) as an exact fraction.

    Cached: a problem's truth is parsed for each of its distinct answers.
    """
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    if "frac" in text:
        text = _LATEX_FRACTION.sub(r"\1/\2", text)
    numbers = _NUMBER.findall(text.replace("{,}", ","))
    if not numbers:
        return None
    try:
        return Fraction(numbers[-1].replace(",", "").replace("−", "-"))
    except (ValueError, ZeroDivisionError):
        return None


def numeric(prediction: str, ground_truth: str) -> bool:
    truth = parse_number(ground_truth)
    return truth is not None and parse_number(prediction) == truth


# --- math --------------------------------------------------------------------------------------


def _math_parse(text: str) -> list[Any]:
    from math_verify import parse

    forms = [text]
    if "$" not in text:
        # math-verify reads bare LaTeX ("2\sqrt{2}", "\{1,2\}") right only between $ signs:
        # outside them it takes "2\sqrt{2}" for 2.
        forms.insert(0 if "\\" in text else 1, f"${text}$")
    for form in forms:
        parsed = parse(form, parsing_timeout=_math_timeout())
        if parsed:
            return parsed
    return []


def _math_timeout() -> int | None:
    # math-verify times out with SIGALRM, which only the main thread may use.
    return 5 if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=4096)
def _math_gold(ground_truth: str) -> list[Any]:
    """Parsed once per problem: every candidate of a problem is compared with the same truth."""
    return _math_parse(ground_truth)


def math_answer(prediction: str, ground_truth: str) -> bool:
    from math_verify import verify

    gold = _math_gold(ground_truth)
    if not gold:
        # Not mathematics to math-verify (a word, a name): compare as text.
        return exact(prediction, ground_truth)
    predicted = _math_parse(prediction)
    return bool(predicted) and verify(gold, predicted, timeout_seconds=_math_timeout())


# --- text --------------------------------------------------------------------------------------


def exact(prediction: str, ground_truth: str) -> bool:
    return normalize(prediction) == normalize(ground_truth)


def regex_match(prediction: str, ground_truth: str) -> bool:
    try:
        return re.fullmatch(ground_truth, prediction.strip()) is not None
    except re.error as error:
        raise ValueError(f"ground truth {ground_truth!r} is not a valid regular expression: {error}") from None


VERIFIERS: dict[str, Verifier] = {
    "multiple_choice": multiple_choice,
    "numeric": numeric,
    "math": math_answer,
    "exact": exact,
    "regex": regex_match,
}


def named_function(name: str, kind: str, builtins: Mapping[str, Callable[..., Any]]) -> Callable[..., Any]:
    """A built-in ``kind`` (verifier, reward) by name, or a user's function given as
    ``package.module:function``; ValueError naming the known ones otherwise."""
    if name in builtins:
        return builtins[name]
    module_name, sep, attr = name.partition(":")
    if not sep:
        raise ValueError(f"unknown {kind} {name!r}: use one of {', '.join(sorted(builtins))} or 'package.module:function'")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import {kind} {name!r}: {error}") from None
    if callable(function):
        return function
    raise ValueError(f"{kind} {name!r} is not callable")


def get_verifier(name: str) -> Verifier:
    """A verifier by name, or a user's function given as ``package.module:function``."""
    return named_function(name, "verifier", VERIFIERS)
