"""Verifiers: is an extracted answer right? Small pure functions ``(prediction, ground_truth) -> bool | None``:
None when the ground truth cannot be read by the verifier (no number for ``numeric``, nothing at all,
a regular expression that does not compile ...): the candidate is then neither right nor wrong, as
TRL's ``accuracy_reward`` leaves such samples out. Answers that differ only in surrounding
whitespace, markdown emphasis or end punctuation ("Paris." and "Paris") are alike to every verifier,
and so are answers that differ only in case, but for ``regex``, whose pattern says whether case matters.

A data set picks one by name in ``filter.verifier``:

- ``auto`` (the default): each problem's by its ground truth's shape (``choose_verifier``): GSM8K's
  ``... #### 72`` -> numeric, option letters ("(B) Piano", "B") -> multiple_choice, a number, alone or
  with unit words ("72", "1,234", "3/4", "5 cm", "18 dollars") -> numeric, mathematics (LaTeX, "x^2+1",
  "y = 3x + 2", "(1, 2)", "sqrt(2)", "pi/2") -> math, anything else -> exact.
- ``multiple_choice``: the seed's rules. Option letters decide ("B" = "(B) Piano"); without a letter
  the option text decides, case-insensitively, equal or contained as whole words ("piano", "It is a
  piano"). A prediction that names several options ("A or B", "(A) 3 (B) 4"), hedges ("piano or
  violin"), negates, or states other numbers than the option ("4 sounds") is wrong.
- ``numeric``: the last number (after ``####`` when present), thousands separators, signs, decimals,
  fractions, ``\\frac{a}{b}``, units and trailing text allowed; compared exactly as fractions.
- ``math``: math-verify (LaTeX, ``\\boxed{}``, equivalent forms such as ``\\frac12`` = ``0.5``); when
  either side holds no mathematics (a word, a name) the two are compared as text, as ``exact`` does.
- ``exact``: equal after trimming, case folding and collapsing whitespace.
- ``regex``: the ground truth is a regular expression the whole prediction (trimmed, or without its
  end punctuation) must match.
- ``package.module:function``: a user's function with the same signature.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import threading
from collections.abc import Callable, Mapping
from fractions import Fraction
from functools import lru_cache
from typing import Any

Verifier = Callable[[str, str], bool | None]

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


def multiple_choice(prediction: str, ground_truth: str) -> bool | None:
    truth_letters, truth_text = _parse_option(ground_truth)
    if not truth_letters and not truth_text:
        return None
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


def numeric(prediction: str, ground_truth: str) -> bool | None:
    truth = parse_number(ground_truth)
    return None if truth is None else parse_number(prediction) == truth


# --- math --------------------------------------------------------------------------------------


# A LaTeX command ("\\frac", "\\text"); a word of two or more letters ("Paris", "on"), which math-verify
# would read between $ signs as a product of single letters ("pairs" = "Paris"); names of functions and
# constants written without their backslash ("sqrt(2)", "pi/2"), which are mathematics, not words.
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD_OF_LETTERS = re.compile(r"[^\W\d_]{2,}")
_MATH_NAMES = r"sqrt|d?frac|pi|infty|sin|cos|tan|log|ln|exp"
_MATH_NAME = re.compile(rf"(?<![\\A-Za-z])(?:{_MATH_NAMES})(?![A-Za-z])")
# As a LaTeX command: all but "sqrt(...)", which math-verify reads itself ("\sqrt(2)" it does not).
_BARE_COMMAND = re.compile(rf"(?<![\\A-Za-z])(?!sqrt\s?\()(?:{_MATH_NAMES})(?![A-Za-z])")


def _has_words(text: str) -> bool:
    return _WORD_OF_LETTERS.search(_MATH_NAME.sub(" ", _LATEX_COMMAND.sub(" ", text))) is not None


def _has_latex(text: str) -> bool:
    """A LaTeX command other than text in \\text{}: "5\\text{ cm}" has none, "\\frac{1}{2}" has."""
    return _LATEX_COMMAND.search(_LATEX_TEXT.sub("", text)) is not None


def _math_parse(text: str) -> list[Any]:
    """What math-verify reads in ``text``; empty when it finds no mathematics there (a word, a name)."""
    from math_verify import parse

    if "$" not in text and not _has_words(text):
        # math-verify reads mathematics right only between $ signs: outside them it takes the last number
        # ("y = 3x + 2", "(1, 2)" and "2\sqrt{2}" are 2), and "pi" only as "\pi". Words are never wrapped.
        text = "$" + _BARE_COMMAND.sub(lambda name: "\\" + name.group(), text) + "$"
    parsed = parse(text, parsing_timeout=_math_timeout())
    # A list of strings alone is text math-verify could not turn into mathematics.
    return parsed if any(not isinstance(value, str) for value in parsed) else []


def _math_timeout() -> int | None:
    # math-verify times out with SIGALRM, which only the main thread may use.
    return 5 if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=4096)
def _math_gold(ground_truth: str) -> list[Any]:
    """Parsed once per problem: every candidate of a problem is compared with the same truth."""
    return _math_parse(ground_truth)


def math_answer(prediction: str, ground_truth: str) -> bool | None:
    from math_verify import verify

    gold = _math_gold(ground_truth)
    if not gold:
        # LaTeX that math-verify cannot read is unknown; a word or a name is compared as text.
        return None if _has_latex(ground_truth) else exact(prediction, ground_truth)
    predicted = _math_parse(prediction)
    if not predicted:
        return exact(prediction, ground_truth)
    return verify(gold, predicted, timeout_seconds=_math_timeout())


# --- text --------------------------------------------------------------------------------------


def exact(prediction: str, ground_truth: str) -> bool | None:
    truth = normalize(ground_truth)
    return normalize(prediction) == truth if truth else None


@lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern)
    except re.error:
        return None


def regex_match(prediction: str, ground_truth: str) -> bool | None:
    pattern = _compiled(ground_truth)
    if pattern is None:
        return None
    trimmed = prediction.strip()
    return any(pattern.fullmatch(form) is not None for form in (trimmed, trimmed.strip(_EDGE_CHARS)))


# --- auto --------------------------------------------------------------------------------------

# The whole answer is one number, then at most three unit words: "72", "-1,234.5", "3/4", "50%", "5 cm",
# "18 dollars", "5 km/h" (edge punctuation and "$" already off). A unit is a word of two or more letters
# or a ratio of words; not a variable ("3 x") nor a mathematical name ("2 pi").
_UNIT = rf"(?!(?:{_MATH_NAMES})(?![a-z]))(?:[^\W\d_]{{2,}}|[^\W\d_]+(?:/[^\W\d_]+)+)"
_NUMBER_WITH_UNITS = re.compile(rf"(?:{_NUMBER.pattern})%?(?:\s+{_UNIT}){{0,3}}")
# A lone lower-case letter is a variable ("x", "$y$"), not an option.
_VARIABLE = re.compile(r"\$?[a-z]\$?")


@lru_cache(maxsize=4096)
def choose_verifier(ground_truth: str) -> str:
    """The built-in verifier for a ground truth of this shape (``filter.verifier: auto``)."""
    if "####" in ground_truth and parse_number(ground_truth) is not None:
        return "numeric"  # GSM8K's worked solution, its answer after ####
    if _parse_option(ground_truth)[0] and not _VARIABLE.fullmatch(ground_truth.strip()):
        return "multiple_choice"
    if _NUMBER_WITH_UNITS.fullmatch(normalize(ground_truth)):
        return "numeric"
    if _has_latex(ground_truth) or (not _has_words(_LATEX_TEXT.sub("", ground_truth)) and _math_gold(ground_truth)):
        return "math"  # LaTeX, or an expression without words ("x^2+1", "y = 3x + 2"); not prose with a number
    return "exact"


def auto(prediction: str, ground_truth: str) -> bool | None:
    return VERIFIERS[choose_verifier(ground_truth)](prediction, ground_truth)


def verifier_for(name: str, ground_truth: str) -> str:
    """The verifier that judges a problem with this ground truth when ``filter.verifier`` is ``name``."""
    return choose_verifier(ground_truth) if name == "auto" else name


VERIFIERS: dict[str, Verifier] = {
    "auto": auto,
    "multiple_choice": multiple_choice,
    "numeric": numeric,
    "math": math_answer,
    "exact": exact,
    "regex": regex_match,
}


def user_module(name: str) -> Any:
    """A user's module, found as ``python -m pipeline.run`` finds it: from the current folder too (a
    tool run as ``python tools/status.py`` has its own folder on the path instead)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name.partition(".")[0] or os.getcwd() in sys.path:
            raise
        sys.path.append(os.getcwd())
        return importlib.import_module(name)


def named_function(name: str, kind: str, builtins: Mapping[str, Callable[..., Any]]) -> Callable[..., Any]:
    """A built-in ``kind`` (verifier, reward) by name, or a user's function given as
    ``package.module:function``; ValueError naming the known ones otherwise."""
    if name in builtins:
        return builtins[name]
    module_name, sep, attr = name.partition(":")
    if not sep:
        raise ValueError(f"unknown {kind} {name!r}: use one of {', '.join(sorted(builtins))} or 'package.module:function'")
    try:
        function = getattr(user_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import {kind} {name!r}: {error}") from None
    if callable(function):
        return function
    raise ValueError(f"{kind} {name!r} is not callable")


def get_verifier(name: str) -> Verifier:
    """A verifier by name, or a user's function given as ``package.module:function``."""
    return named_function(name, "verifier", VERIFIERS)
