"""Answer extraction and the verifiers, table by table: what each accepts, what it must refuse, and
which ground truths it cannot read (None: neither right nor wrong)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from jobs.scoring.answers import extract
from jobs.scoring.verifiers import (
    VERIFIERS,
    auto,
    choose_verifier,
    get_verifier,
)

# (raw model output, configured answer pattern(s) or None for the default, thinking, answer)
EXTRACTION = [
    ("<think>I hear...</think>\nANSWER: 3 sounds", None, "I hear...", "3 sounds"),
    ("<think>a\nb</think>\n<answer>(B) Piano</answer>", None, "a\nb", "(B) Piano"),
    ("no tags, the answer is 42.", None, "", "42"),
    ("The answer is 3.5.", None, "", "3.5"),
    ("<think>x</think>\nfirst line\nlast line", None, "x", "last line"),
    ("<think>x</think>\nlast line\n\n", None, "x", "last line"),
    # Ran out of tokens while thinking: there is no answer, whatever the reasoning mentions.
    ("<think>so the answer is B", None, "so the answer is B", ""),
    # Chat templates that put <think> in the prompt: the output starts inside the reasoning.
    ("reasoning only</think>\nANSWER: C", None, "reasoning only", "C"),
    # The answer comes from after the reasoning, not from numbers inside it.
    ("<think>ANSWER: 5</think>\nANSWER: 7", None, "ANSWER: 5", "7"),
    ("<think>t</think>ANSWER: first\nANSWER: second", None, "t", "second"),
    ("<think>t</think>**Answer:** (D) Drums", None, "t", "(D) Drums"),
    ("<think>t</think>Final answer: 12", None, "t", "12"),
    ("<think>t</think><ANSWER>b</ANSWER>", None, "t", "b"),
    ("<think>t</think><answer>\n  multi\n line\n</answer>", None, "t", "multi\n line"),
    ("So $x = \\boxed{\\frac{1}{2}}$ is it.", None, "", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{{2}}", None, "", "{2}"),
    ("ANSWER: $\\boxed{12}$", None, "", "12"),
    ("\\fbox{7}", None, "", "7"),
    ("Natalia sold 48/2 = 24 clips.\n#### 72", None, "", "72"),
    ("It is 5.\nThe answer is: 6", None, "", "6"),
    ("Result => 42 <=", [r"=>\s*(\d+)\s*<="], "", "42"),
    # Configured patterns come first and are tried in order.
    ("ANSWER: 1\nFINAL{2}", [r"FINAL\{(\d+)\}", r"ANSWER: (\d+)"], "", "2"),
    ("ANSWER: 1\nnothing else", [r"FINAL\{(\d+)\}"], "", "1"),
    ("Answer: yes (option A) or [B]", [r"option (\w)|\[(\w)\]"], "", "B"),
    ("", None, "", ""),
]


@pytest.mark.parametrize(("raw", "pattern", "thinking", "answer"), EXTRACTION)
def test_extraction(raw: str, pattern: list[str] | None, thinking: str, answer: str) -> None:
    extracted = extract(raw, pattern) if pattern else extract(raw)
    assert (extracted.thinking_prediction, extracted.answer_prediction) == (thinking, answer)


MULTIPLE_CHOICE = [
    # The seed's examples and option-letter forms.
    ("3 sounds", "(A) 3 sounds", True),
    ("A", "(A) 3 sounds", True),
    ("(A)", "(A) 3 sounds", True),
    ("a", "(A) 3 sounds", True),
    ("(B) Piano", "(B) Piano", True),
    ("piano", "(B) Piano", True),
    ("Piano.", "(B) Piano", True),
    ("B", "(B) Piano", True),
    ("b)", "(B) Piano", True),
    ("B.", "(B) Piano", True),
    ("[B]", "(B) Piano", True),
    ("Option B", "(B) Piano", True),
    ("option b", "(B) Piano", True),
    ("B. Piano", "(B) Piano", True),
    ("B) piano", "(B) Piano", True),
    ("B: Piano", "(B) Piano", True),
    ("Option B: Piano", "(B) Piano", True),
    ("**B**", "(B) Piano", True),
    ("\\text{B}", "(B) Piano", True),
    ("(B) Piano", "B", True),
    ("(B) Piano", "B. Piano", True),
    ("(B) Piano", "Piano", True),
    ("piano", "Piano", True),
    ("  PIANO  ", "piano", True),
    # Containment at word boundaries, both ways.
    ("It is a piano", "(B) Piano", True),
    ("a grand piano", "(B) Piano", True),
    ("piano", "(C) Grand piano", True),
    ("I choose (B) because it sounds like keys", "(B) Piano", True),
    ("3", "(A) 3 sounds", True),
    ("There are 3 sounds in total", "(A) 3 sounds", True),
    ("Yes", "Yes", True),
    ("yes, there is a dog", "Yes", True),
    ("(b) Piano", "(B) Piano", True),
    ("(B) piano", "(B) Piano ", True),
    # Wrong options.
    ("B", "(A) 3 sounds", False),
    ("(C) Violin", "(B) Piano", False),
    ("C", "(B) Piano", False),
    ("guitar", "(B) Piano", False),
    ("4 sounds", "(A) 3 sounds", False),
    ("(B) 4 sounds", "(A) 3 sounds", False),
    ("13 sounds", "(A) 3 sounds", False),
    ("pianos", "(B) Piano", False),
    ("pianist", "(B) Piano", False),
    ("No", "Yes", False),
    # Nothing usable.
    ("", "(A) 3 sounds", False),
    ("   ", "(B) Piano", False),
    # A truth without an option letter or text: unknown.
    ("A", "", None),
    ("A", " ** ", None),
    # Several options named, hedged or negated: never a match.
    ("A or B", "(A) 3 sounds", False),
    ("(A) or (B)", "(A) 3 sounds", False),
    ("(A) 3 sounds (B) 4 sounds", "(A) 3 sounds", False),
    ("A) 3 sounds, B) 4 sounds", "(A) 3 sounds", False),
    ("option A or option C", "(A) 3 sounds", False),
    ("piano or violin", "(B) Piano", False),
    ("either piano or guitar", "(B) Piano", False),
    ("not a piano", "(B) Piano", False),
    ("3 or 4 sounds", "(A) 3 sounds", False),
    ("3 sounds, maybe 4", "(A) 3 sounds", False),
    ("yes and no", "Yes", False),
    # A letter with text that contradicts the option's text.
    ("(A) 4 sounds", "(A) 3 sounds", False),
    ("(B) Violin", "(B) Piano", False),
    # A letter alone cannot be checked against a truth without one.
    ("B", "Piano", False),
    # Parts of the option that identify nothing, and words that only look like letters.
    ("sounds", "(A) 3 sounds", False),
    ("the", "(C) The grand piano", False),
    ("A piano", "(A) 3 sounds", False),
    ("sound(s)", "(S) Silence", False),
    ("e.g. drums", "(E) Piano", False),
]


NUMERIC = [
    ("933", "933", True),
    ("1,234", "1234", True),
    ("1234", "1,234", True),
    ("1,234,567", "1234567", True),
    ("-5", "#### -5", True),
    ("−5", "-5", True),
    ("+7", "7", True),
    ("0.5", "1/2", True),
    ("1/2", "0.5", True),
    ("\\frac{3}{4}", "0.75", True),
    ("\\dfrac{1}{4}", "1/4", True),
    ("2.50", "2.5", True),
    ("42.0", "42", True),
    (".5", "0.5", True),
    ("$1,000.50", "1000.5", True),
    ("42 apples.", "42", True),
    ("The total is 18 dollars", "18", True),
    ("x = 7", "7", True),
    ("50%", "50", True),
    ("1e3", "1000", True),
    ("10{,}000", "10000", True),
    ("She has 3 apples and gives 1, so 2", "2", True),
    ("Step 1: 48/2 = 24\n#### 72", "72", True),
    ("#### 72", "Natalia sold 48/2 = 24 clips.\n#### 72", True),
    ("pages 3-4", "4", True),
    ("answer: 0", "0", True),
    ("-0", "0", True),
    # Must be refused.
    ("93", "933", False),
    ("", "1", False),
    ("five", "5", False),
    ("5", "-5", False),
    ("-5", "5", False),
    ("0.33", "1/3", False),
    ("3.14", "3.14159", False),
    ("1,234", "1.234", False),
    ("42 or 43", "42", False),
    ("12", "#### 21", False),
    ("1/0", "1", False),
    # A truth without a number: unknown.
    ("2", "two", None),
    ("72", "Paris", None),
    ("\\frac{1}{2}", "2", False),
    ("3 1/2", "3.5", False),
    ("1e3", "1", False),
]


MATH = [
    ("\\frac{1}{2}", "0.5", True),
    ("$\\frac{1}{2}$", "\\frac{1}{2}", True),
    ("\\frac12", "1/2", True),
    ("\\dfrac{3}{4}", "0.75", True),
    ("$2\\sqrt{2}$", "\\sqrt{8}", True),
    ("\\frac{\\sqrt2}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("$x^2+2x+1$", "(x+1)^2", True),
    ("x = 3", "3", True),
    ("$\\{1,2\\}$", "\\{2,1\\}", True),
    ("$[1,2)$", "[1,2)", True),
    ("1,234", "1234", True),
    ("50\\%", "50", True),
    ("\\text{Paris}", "Paris", True),
    ("-\\frac{2}{4}", "-0.5", True),
    ("$\\sqrt{16}$", "4", True),
    ("The answer is $\\boxed{10}$", "10", True),
    ("$a+b$", "b+a", True),
    ("3", "4", False),
    ("$\\frac{1}{3}$", "0.33", False),
    ("$-2$", "2", False),
    ("$x^2$", "x^3", False),
    ("\\sqrt{2}", "2", False),
    ("$[1,2]$", "[1,2)", False),
    ("$\\pi$", "3.14159", False),
    ("", "1", False),
    ("London", "Paris", False),
    # Words are compared as text, never as products of letters (math-verify reads "$pairs$" as a*i*p*r*s).
    ("pairs", "Paris", False),
    ("Sprai", "Paris", False),
    ("on", "no", False),
    ("evil", "live", False),
    ("Paris.", "Paris", True),
    ("Paris", "\\text{Paris}", True),
    ("3", "Paris", False),
    ("Paris", "3", False),
    # Single letters are variables: still mathematics.
    ("x", "x", True),
    ("y", "x", False),
    # LaTeX math-verify cannot read: unknown; no truth at all: unknown.
    ("1", "\\frac{1}{", None),
    ("1", "", None),
]


# (prediction, ground truth, right?) for truths that are formulas: judged alike by math and by auto, which
# sends them to math. Every side is read whole, never as its last number ("y = 3x + 2" is not 2).
FORMULAS = [
    ("y = 3x + 2", "y = 3x + 2", True),
    ("y=3x+2", "y = 3x + 2", True),
    ("y = 5x + 2", "y = 3x + 2", False),
    ("2", "y = 3x + 2", False),
    ("x=2", "x = 2", True),
    ("2", "x = 2", True),
    ("z = 2", "x = 2", False),
    ("x = 3", "x = 2", False),
    ("(1,2)", "(1, 2)", True),
    ("(5, 2)", "(1, 2)", False),
    ("(2, 1)", "(1, 2)", False),
    ("2", "(1, 2)", False),
    ("[3,1]", "[3, 1]", True),
    ("[0, 1]", "[3, 1]", False),
    ("[0,1]", "[0, 1]", True),
    ("(0, 1)", "[0, 1]", False),
    ("1", "[0, 1]", False),
    # Names of functions and constants without their backslash are mathematics, not words.
    ("sqrt(2)", "\\sqrt{2}", True),
    ("\\sqrt{2}", "sqrt(2)", True),
    ("sqrt(3)", "sqrt(2)", False),
    ("\\frac{\\pi}{2}", "pi/2", True),
    ("pi/3", "pi/2", False),
    ("2 pi", "2\\pi", True),
]


EXACT = [
    ("Paris", "paris", True),
    ("  New   York ", "new york", True),
    ("Paris.", "Paris", True),
    ("**Paris**", "Paris", True),
    ("Paris, France", "Paris", False),
    ("Pari", "Paris", False),
    ("", "Paris", False),
    ("the Paris", "Paris", False),
    ("Paris", " . ", None),
]


REGEX = [
    ("3", r"3|three", True),
    ("three", r"3|three", True),
    ("  42 ", r"\d+", True),
    ("Paris", r"(?i)paris", True),
    ("33", r"3|three", False),
    ("three cats", r"3|three", False),
    ("paris", r"Paris", False),
    ("", r"\d+", False),
    ("Paris.", r"Paris", True),
    ("**three**", r"3|three", True),
    # A ground truth that is no regular expression: unknown.
    ("(", r"(", None),
]


TABLES = {"multiple_choice": MULTIPLE_CHOICE, "numeric": NUMERIC, "math": MATH, "exact": EXACT, "regex": REGEX}


@pytest.mark.parametrize(
    ("verifier", "prediction", "truth", "ok"),
    [(name, *case) for name, table in TABLES.items() for case in table]
    + [(name, *case) for name in ("math", "auto") for case in FORMULAS],
)
def test_verifier(verifier: str, prediction: str, truth: str, ok: bool | None) -> None:
    assert VERIFIERS[verifier](prediction, truth) is ok


# (verifier, raw model output, ground truth, correct): extraction and verification together.
END_TO_END = [
    ("multiple_choice", "<think>It could be A... no, B.</think>\nANSWER: B", "(B) Piano", True),
    ("multiple_choice", "<think>I hear keys</think>\n<answer>(B) Piano</answer>", "(B) Piano", True),
    ("multiple_choice", "<think>hmm</think>\nThe answer is (B).", "(B) Piano", True),
    ("multiple_choice", "<think>B is likely</think>\nANSWER: (C) Violin", "(B) Piano", False),
    ("multiple_choice", "<think>the answer is B", "(B) Piano", False),
    ("multiple_choice", "<think>x</think>\nANSWER: A or B", "(A) 3 sounds", False),
    ("numeric", "48/2 = 24 clips in May.\n48+24 = 72\n#### 72", "#### 72", True),
    ("numeric", "<think>6*7</think>\nANSWER: 42 apples", "42", True),
    ("numeric", "<think>ANSWER: 42</think>\nANSWER: 41", "42", False),
    ("numeric", "Total: 72.\n#### 27", "72", False),
    ("math", "<think>simplify</think>\nSo $\\boxed{\\frac{2}{4}}$.", "\\frac{1}{2}", True),
    ("math", "The answer is $\\boxed{\\sqrt{8}}$.", "2\\sqrt{2}", True),
    ("math", "The answer is $\\boxed{\\sqrt{7}}$.", "2\\sqrt{2}", False),
    ("exact", "<think>capital</think>\nANSWER: Paris.", "paris", True),
    ("exact", "<think>capital</think>\nANSWER: Paris, France", "Paris", False),
    ("regex", "<think>count</think>\n<answer>three</answer>", r"3|three", True),
    ("regex", "<think>count</think>\n<answer>thirteen</answer>", r"3|three", False),
]


@pytest.mark.parametrize(("verifier", "raw", "truth", "ok"), END_TO_END)
def test_extraction_then_verification(verifier: str, raw: str, truth: str, ok: bool) -> None:
    assert get_verifier(verifier)(extract(raw).answer_prediction, truth) is ok


@pytest.mark.parametrize("verifier", sorted(TABLES))
@pytest.mark.parametrize("prediction", ["Paris.", "  Paris \n", "**Paris**", "Paris!"])
def test_end_punctuation_and_whitespace_are_alike_to_every_verifier(verifier: str, prediction: str) -> None:
    # (Case too, but for regex, whose pattern says whether case matters: "(?i)paris".)
    judge = VERIFIERS[verifier]
    assert judge(prediction, "Paris") is judge("Paris", "Paris"), "numeric reads no number in 'Paris' either way: None"


GSM8K_SOLUTION = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72"
# (ground truth, the verifier auto picks for it)
AUTO = [
    (GSM8K_SOLUTION, "numeric"),
    ("#### 1,234", "numeric"),
    ("(A) 3 sounds", "multiple_choice"),
    ("B", "multiple_choice"),
    ("B. Piano", "multiple_choice"),
    ("72", "numeric"),
    ("-1,234.5", "numeric"),
    ("3/4", "numeric"),
    ("$18", "numeric"),
    ("50%", "numeric"),
    # A number with unit words, as numeric reads it.
    ("5 cm", "numeric"),
    ("18 dollars", "numeric"),
    ("12 hours", "numeric"),
    ("2 apples", "numeric"),
    ("5 km/h", "numeric"),
    ("5\\text{ cm}", "numeric"),
    ("3 sounds", "numeric"),
    ("(C) 3 sounds", "multiple_choice"),
    ("\\frac{1}{2}", "math"),
    ("2\\sqrt{2}", "math"),
    ("x^2+1", "math"),
    ("y = 3x + 2", "math"),
    ("(1, 2)", "math"),
    ("[0, 1]", "math"),
    ("sqrt(2)", "math"),
    ("pi/2", "math"),
    ("2 pi", "math"),
    ("3 x", "math"),
    ("x", "math"),
    ("[1,2)", "math"),
    ("\\frac{1}{", "math"),
    ("Paris", "exact"),
    ("\\text{Paris}", "exact"),
    ("Paris 2024", "exact"),
    ("2 apples and 3 oranges", "exact"),
    ("New York City", "exact"),
]


@pytest.mark.parametrize(("truth", "verifier"), AUTO)
def test_auto_picks_the_verifier_by_the_ground_truths_shape(truth: str, verifier: str) -> None:
    assert choose_verifier(truth) == verifier


# (raw model output, ground truth, what auto says)
AUTO_END_TO_END = [
    ("<think>48+24</think>\nANSWER: 72", GSM8K_SOLUTION, True),
    ("So the total is \\boxed{72}.", GSM8K_SOLUTION, True),
    ("48/2 = 24\n48+24 = 72\n#### 72", GSM8K_SOLUTION, True),
    ("<think>48+23</think>\nANSWER: 71", GSM8K_SOLUTION, False),
    ("<think>keys</think>\nANSWER: B", "(B) Piano", True),
    ("<think>keys</think>\nANSWER: (C) Violin", "(B) Piano", False),
    ("The answer is $\\boxed{0.5}$", "\\frac{1}{2}", True),
    ("ANSWER: Paris.", "Paris", True),
    ("ANSWER: pairs", "Paris", False),
    ("ANSWER: 1", "\\frac{1}{", None),
    ("ANSWER: 5", "5 cm", True),
    ("The length is \\boxed{5\\text{ cm}}", "5 cm", True),
    ("ANSWER: 6 cm", "5 cm", False),
    ("ANSWER: 18", "18 dollars", True),
    ("ANSWER: (C) 3 sounds", "3 sounds", True),
    ("ANSWER: 4 sounds", "3 sounds", False),
    ("ANSWER: y = 3x + 2", "y = 3x + 2", True),
    ("ANSWER: y = 5x + 2", "y = 3x + 2", False),
]


@pytest.mark.parametrize(("raw", "truth", "ok"), AUTO_END_TO_END)
def test_auto_judges_each_problem_with_the_verifier_its_truth_calls_for(raw: str, truth: str, ok: bool | None) -> None:
    assert get_verifier("auto")(extract(raw).answer_prediction, truth) is ok


def test_verifiers_by_name_and_by_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert {name: get_verifier(name) for name in VERIFIERS} == VERIFIERS
    (tmp_path / "my_checks.py").write_text(
        "def same_length(prediction, truth):\n    return len(prediction) == len(truth)\nNOT_A_FUNCTION = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        verifier = get_verifier("my_checks:same_length")
        assert verifier("abc", "xyz") and not verifier("ab", "xyz")
        for name, message in [
            ("nearest", "unknown verifier 'nearest'"),
            ("my_checks:missing", "cannot import verifier 'my_checks:missing'"),
            ("no_such_module:f", "cannot import verifier 'no_such_module:f'"),
            ("my_checks:NOT_A_FUNCTION", "is not callable"),
        ]:
            with pytest.raises(ValueError, match=message):
                get_verifier(name)
    finally:
        sys.modules.pop("my_checks", None)


def test_gsm8k_records_as_they_are_load_with_stable_ids_and_numeric_answers(tmp_path: Path) -> None:
    """Seed 004's GSM8K lines, no id, the solution ending "#### 72", or an answer given as a number."""
    import json

    from jobs.problems.data import load_problems

    path = tmp_path / "gsm8k_train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"question": "How many clips?", "answer": GSM8K_SOLUTION},
                                                            {"question": "6 x 7?", "answer": 42}, {"question": "Half of 3?", "answer": 1.5}]))
    problems = load_problems(path)
    assert [p["id"] for p in problems] == ["gsm8k_train_0", "gsm8k_train_1", "gsm8k_train_2"] == [p["id"] for p in load_problems(path)]
    assert [p["answer"] for p in problems[1:]] == ["42", "1.5"]
    assert [auto(prediction, p["answer"]) for prediction, p in zip(["72", "42", "3/2"], problems, strict=True)] == [True] * 3
