"""open-r1's and TRL's reward tests, ported to our rewards (issue 27, item 2).

Sources, every case of a reward we also offer, inputs and expected values verbatim:
- open-r1 ``tests/test_rewards.py`` at 21b48fbe (its last change; rewards at c1e11922): format_reward,
  tag_count_reward, reasoning_steps_reward, len_reward, accuracy_reward.
- TRL ``tests/test_rewards.py`` at f2cd5771, whose ``trl/rewards`` are those of the installed trl 1.16.0:
  think_format_reward, accuracy_reward, reasoning_accuracy_reward (our ``correctness`` splits the
  reasoning off before reading the answer, as that one does).
Not ported, rewards we do not offer: cosine-scaled, repetition penalty, soft overlong punishment,
code format, open-r1's reward-name lookup.

A case is one completion with its expected score; for a test of a batch (open-r1's
test_multiple_completions) or of a group reward (len_reward) it is the whole call. One adapter per
reward, named like the upstream function, turns the upstream call into ours: ``solution`` is our
``answer`` field, math-verify is our ``math`` verifier. A deliberate difference asserts what we give
(``ours``), beside the upstream value, with the formula it follows (``why``). None waits for a
change of the verifier: TRL's unparsable gold answers are words, which our verifiers compare as text.

Counts (test_the_counts_above_are_the_cases keeps them true):
    open-r1: 27 cases: 21 as upstream, 6 deliberate differences
    TRL: 34 cases: 30 as upstream, 4 deliberate differences
    all: 61 cases: 51 as upstream, 10 deliberate differences (each asserts our value: all 61 pass)
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from jobs.scoring.config import RewardConfig
from jobs.scoring.rewards import RewardContext, RewardSet, bind

pytestmark = pytest.mark.unit

Completion = list[dict[str, str]]
Expected = list[float | None] | Callable[[list[float | None]], None]
MATH = RewardContext(verifier="math")


def ours(name: str, completions: Sequence[Completion], solution: Sequence[str] | None = None, **params: Any) -> list[float | None]:
    """Our reward ``name`` as a run's config binds it, on upstream's completions (TRL's conversational
    form) and solutions (our ``answer`` field)."""
    columns = {} if solution is None else {"answer": list(solution)}
    return bind(RewardConfig(name, params=params), MATH)([None] * len(completions), completions, **columns)


# --- one adapter per reward, with upstream's signature --------------------------------------------

def format_reward(completions: Sequence[Completion]) -> list[float | None]:
    return ours("format", completions)


def think_format_reward(completions: Sequence[Completion]) -> list[float | None]:
    return ours("format", completions, tags=["think"], layout="prefix")


def tag_count_reward(completions: Sequence[Completion]) -> list[float | None]:
    return ours("tag_count", completions)


def reasoning_steps_reward(completions: Sequence[Completion]) -> list[float | None]:
    return ours("reasoning_steps", completions)


def len_reward(completions: Sequence[Completion], solution: Sequence[str]) -> list[float | None]:
    return ours("length", completions, solution)


def accuracy_reward(completions: Sequence[Completion], solution: Sequence[str]) -> list[float | None]:
    return ours("correctness", completions, solution)


def reasoning_accuracy_reward(
    completions: Sequence[Completion], solution: Sequence[str], reasoning_delimiters: Sequence[str] | None = None,
) -> list[float | None]:
    # Our answer follows the last </think>; another delimiter is an answer pattern: the text after its last occurrence.
    patterns = {} if reasoning_delimiters is None else {"answer_pattern": [rf".*{re.escape(d)}(.*)" for d in reasoning_delimiters]}
    return ours("correctness", completions, solution, **patterns)


def accuracy_reward_in_worker_thread(completions: Sequence[Completion], solution: Sequence[str]) -> list[float | None]:
    """TRL's test_accuracy_reward_in_worker_thread: the reward called from a thread that is not the main one."""
    results: list[float | None] = []
    exceptions: list[Exception] = []

    def target() -> None:
        try:
            results.extend(accuracy_reward(completions, solution))
        except Exception as e:  # noqa: BLE001 - upstream's check: nothing raised in the thread
            exceptions.append(e)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    assert not exceptions, f"accuracy_reward raised in worker thread: {exceptions[0]}"
    return results


# --- the cases ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    source: str
    test: str
    reward: Callable[..., list[float | None]]
    completions: list[Completion]
    expected: Expected
    solution: list[str] | None = None
    ours: Expected | None = None  # a deliberate difference: what we give instead of ``expected``
    why: str = ""  # the formula ``ours`` follows


def one(content: str) -> Completion:
    return [{"content": content}]


def each(source: str, test: str, reward: Callable[..., list[float | None]], contents: list[str],
         expected: list[float | None], solution: list[str] | None = None, **fields: Any) -> Iterator[Case]:
    """An upstream test of a per-completion reward: one case per completion."""
    for index, (content, value) in enumerate(zip(contents, expected, strict=True)):
        yield Case(source, f"{test}[{index}]", reward, [one(content)], [value],
                   None if solution is None else [solution[index]], **fields)


def same_length_responses(rewards: list[float | None]) -> None:
    assert rewards == [0.0, 0.0]


def different_lengths_correct_answers(rewards: list[float | None]) -> None:
    assert rewards[0] > rewards[1]  # shorter answer should get higher reward
    assert rewards[0] == pytest.approx(0.5)  # shortest correct answer gets maximum reward


def different_lengths_incorrect_answers(rewards: list[float | None]) -> None:
    assert rewards[0] <= 0.0  # incorrect answers should get non-positive rewards
    assert rewards[1] <= 0.0
    assert rewards[0] > rewards[1]  # shorter answer should still be penalized less


def mixed_correctness(rewards: list[float | None]) -> None:
    assert rewards[0] > 0.0  # Shortest correct answer should get positive reward
    assert rewards[2] > rewards[1]  # Longer correct answer might get negative reward
    assert rewards[1] >= rewards[3]
    assert rewards[2] <= 0.0  # Incorrect answers should get non-positive rewards
    assert rewards[3] <= 0.0
    assert rewards[0] > rewards[1]  # Shorter answers should get better rewards within their correctness category
    assert rewards[2] > rewards[3]


def unparseable_solution(rewards: list[float | None]) -> None:
    assert rewards[0] > rewards[1]  # shorter answer should still get better reward
    assert rewards[0] == pytest.approx(0.5)  # treated as correct, shortest gets maximum reward


WORDS_WHY = ("issue 27 item 1 / seed 000's text answers: a gold answer without mathematics is compared as text "
             "(the exact verifier), not skipped; math-verify finds none in it and TRL gives None")
TAG_COUNT_WHY = ("seed 004: 0.5 / 4 = 0.125 for each of <think>, </think>, <answer>, </answer> used exactly once, "
                 "at most 0.5; open-r1 gives 0.25 each, at most 1.0")
OPEN_R1 = [
    Case("open-r1", "test_accuracy_reward_correct_answer", accuracy_reward,
         [one(r"\boxed{\frac{63}{400}}")], [1.0], [r"\frac{63}{400}"]),
    Case("open-r1", "test_accuracy_reward_wrong_answer", accuracy_reward,
         [one(r"\boxed{\frac{64}{400}}")], [0.0], [r"\frac{63}{400}"]),
    Case("open-r1", "test_accuracy_reward_wrong_answer_no_latex", accuracy_reward,
         [one(r"\boxed{3}")], [0.0], ["6"]),
    Case("open-r1", "test_multiple_completions", accuracy_reward,
         [one(r"\boxed{\frac{63}{400}}"), one(r"\boxed{\frac{64}{400}}")], [1.0, 0.0], [r"\frac{63}{400}", r"\frac{63}{400}"]),
    Case("open-r1", "test_format_reward_correct", format_reward,
         [one("<think>\nSome reasoning\n</think>\n<answer>\nThe answer\n</answer>")], [1.0]),
    *each("open-r1", "test_format_reward_incorrect", format_reward, [
        "<think>Only thinking</think>",
        "<answer>Only answer</answer>",
        "No tags at all",
        "<think>Missing closing</think><answer>Missing closing",
        "<think>Wrong order</answer><answer>Wrong order</think>",
    ], [0.0] * 5),
    *each("open-r1", "test_reasoning_steps_reward", reasoning_steps_reward, [
        # Full credit cases (3 or more steps)
        "Step 1: First step\nStep 2: Second step\nStep 3: Third step",
        "First, we do this.\nSecond, we do that.\nFinally, we conclude.",
        # Partial credit cases (less than 3 steps)
        "Step 1: Only step",
        "First, we do this.\nFinally, we conclude.",
        # No credit case
        "Just plain text without any clear steps",
    ], [1.0, 1.0, 1 / 3, 2 / 3, 0.0]),
    Case("open-r1", "test_format_reward_specific_multiline", format_reward, [one(
        "<think>\nI will count each distinct object in the image:\n1. Purple scooter\n2. Red bicycle\n3. Green motorcycle\n"
        "4. Gray sedan\n5. Yellow school bus\n6. Small green double-decker bus\n7. Small red car\n8. Small purple car\n"
        "9. Small gray dirt bike\n\nThere are 9 distinct objects in total.\n</think>\n<answer>\n9\n</answer>")], [1.0]),
    Case("open-r1", "test_same_length_responses", len_reward,
         [one(r"\boxed{\frac{63}{400}}"), one(r"\boxed{\frac{64}{400}}")], same_length_responses, [r"\frac{63}{400}"] * 2),
    Case("open-r1", "test_different_lengths_correct_answers", len_reward,
         [one(r"\boxed{\frac{63}{400}}"), one(r"\boxed{\frac{63}{400}}  " + "x" * 10)],
         different_lengths_correct_answers, [r"\frac{63}{400}"] * 2),
    Case("open-r1", "test_different_lengths_incorrect_answers", len_reward,
         [one(r"\boxed{\frac{64}{400}}"), one(r"\boxed{\frac{64}{400}}  " + "x" * 10)],
         different_lengths_incorrect_answers, [r"\frac{63}{400}"] * 2),
    Case("open-r1", "test_mixed_correctness", len_reward, [
        one(r"\boxed{\frac{63}{400}}"),  # correct, shorter
        one(r"\boxed{\frac{63}{400}}  " + "x" * 10),  # correct, longer
        one(r"\boxed{\frac{64}{400}}"),  # incorrect, shorter
        one(r"\boxed{\frac{64}{400}}  " + "x" * 10),  # incorrect, longer
    ], mixed_correctness, [r"\frac{63}{400}"] * 4),
    Case("open-r1", "test_unparseable_solution", len_reward,
         [one(r"\boxed{answer}"), one(r"\boxed{answer} " + "x" * 10)], unparseable_solution, ["unparseable_latex"] * 2,
         ours=[0.0, -0.5],
         why="seed 004: lambda if r = 1, min(0, lambda) if r = 0, r from the run's verifier: 'answer' is not "
             "'unparseable_latex', so r = 0 and the rewards are [min(0, 0.5), min(0, -0.5)] = [0.0, -0.5]; open-r1 "
             "counts an answer whose gold it cannot parse as correct, paying 0.5 for a wrong answer (a gold answer "
             "our verifier cannot judge gives None instead)"),
    Case("open-r1", "test_tag_count_rewards_all_correct", tag_count_reward,
         [one("<think>\nSome reasoning\n</think>\n<answer>\nThe answer\n</answer>")], [1.0], ours=[0.5], why=TAG_COUNT_WHY),
    Case("open-r1", "test_tag_count_rewards_missing_think_begin", tag_count_reward,
         [one("Some reasoning\n</think>\n<answer>\nThe answer\n</answer>")], [0.75], ours=[0.375], why=TAG_COUNT_WHY),
    Case("open-r1", "test_tag_count_rewards_missing_think_end", tag_count_reward,
         [one("<think>\nSome reasoning\n<answer>\nThe answer\n</answer>")], [0.75], ours=[0.375], why=TAG_COUNT_WHY),
    Case("open-r1", "test_tag_count_rewards_missing_answer_begin", tag_count_reward,
         [one("<think>\nSome reasoning\n</think>\nThe answer\n</answer>")], [0.75], ours=[0.375], why=TAG_COUNT_WHY),
    Case("open-r1", "test_tag_count_rewards_missing_answer_end", tag_count_reward,
         [one("<think>\nSome reasoning\n</think>\n<answer>\nThe answer")], [0.75], ours=[0.375], why=TAG_COUNT_WHY),
    Case("open-r1", "test_tag_count_rewards_missing_all_tags", tag_count_reward,
         [one("Some reasoning\nThe answer")], [0.0]),
]

TRL = [
    *each("TRL", "TestThinkFormatReward.test_valid_format", think_format_reward, [
        "<think>This is my reasoning.</think>This is my answer.",  # Simple, one-line reasoning
        "<think>\nThis is my reasoning.\n</think>\nThis is my answer.",  # Multiline reasoning
        "<think>\nThis is\nmy reasoning.\n</think>\nThis is my answer.",  # Multiline reasoning
        "<think>\nThis is <some tag> my reasoning.</think>\nThis is my answer.",  # Reasoning including other tags
        "<think></think>\nThis is my answer.",  # Empty reasoning
    ], [1.0, 1.0, 1.0, 1.0, 1.0]),
    *each("TRL", "TestThinkFormatReward.test_invalid_format", think_format_reward, [
        "<think>\nThis is my reasoning.\nThis is my answer.",  # No closing </think>
        "<think>This is my reasoning.\nThis is my answer.",  # No closing </think>
        "This is my reasoning. This is my answer.",  # No <think> tags
        "This is my reasoning.\nThis is my answer.",  # No <think> tags
        "This is my reasoning.</think>\nThis is my answer.",  # No opening <think>
        "This is my reasoning.</think>This is my answer.",  # No opening <think>
        "This<think>is my reasoning.</think>\nThis is my answer.",  # <think> tag in the middle
        "<think>This is<think>my reasoning.</think></think>This is my answer.",  # Nested <think> tags
        "<think>This is</think>\nmy\n<think>reasoning.</think>\nThis is my answer.",  # Multiline <think>
    ], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
    *each("TRL", "TestThinkFormatReward.test_mixed_format", think_format_reward, [
        "<think>This is my reasoning.</think>This is my answer.",  # Valid
        "<think>\nThis is my reasoning.\n</think>\nThis is my answer.",  # Valid
        "<think>This is my reasoning.\nThis is my answer.",  # Invalid
        "This is my reasoning. This is my answer.",  # Invalid
    ], [1.0, 1.0, 0.0, 0.0]),
    *each("TRL", "TestAccuracyReward.test_accuracy_reward_correct_answer", accuracy_reward,
          [r"\boxed{\frac{63}{400}}", r"\boxed{\frac{63}{400}}"], [1.0, 1.0], [r"\frac{63}{400}", "63/400"]),
    Case("TRL", "TestAccuracyReward.test_accuracy_reward_wrong_answer", accuracy_reward,
         [one(r"\boxed{\frac{64}{400}}")], [0.0], [r"\frac{63}{400}"]),
    Case("TRL", "TestAccuracyReward.test_accuracy_reward_wrong_answer_no_latex", accuracy_reward,
         [one(r"\boxed{3}")], [0.0], ["6"]),
    *each("TRL", "TestAccuracyReward.test_accuracy_reward_unparsable_gold", accuracy_reward,
          ["Answer is forty two.", r"Some other content. \boxed{43}."], [None, None],
          ["Answer is forty two.", "Answer is forty three."],
          # ours: "forty two" (the "answer is" phrase) vs "Answer is forty two.", "43" vs "Answer is forty three."
          ours=[0.0], why=WORDS_WHY),
    Case("TRL", "TestAccuracyReward.test_accuracy_reward_in_worker_thread", accuracy_reward_in_worker_thread,
         [one(r"\boxed{\frac{1}{3}}")], [1.0], [r"\frac{1}{3}"]),
    *each("TRL", "TestReasoningAccuracyReward.test_correct_answer_yields_unit_reward", reasoning_accuracy_reward, [
        r"<think> Reasoning content </think> \boxed{\frac{63}{400}}",
        r"Reasoning content </think> \boxed{\frac{63}{400}}",
    ], [1.0, 1.0], [r"\frac{63}{400}", r"\frac{63}{400}"]),
    Case("TRL", "TestReasoningAccuracyReward.test_correct_answer_with_custom_tags_yields_unit_reward",
         lambda completions, solution: reasoning_accuracy_reward(completions, solution, reasoning_delimiters=["</REASONING_END>"]),
         [one(r"<REASONING_START> Reasoning content </REASONING_END> \boxed{\frac{63}{400}}")], [1.0], [r"\frac{63}{400}"]),
    Case("TRL", "TestReasoningAccuracyReward.test_incorrect_answer_yields_zero_reward", reasoning_accuracy_reward,
         [one(r"<think> Reasoning content </think> \boxed{\frac{64}{400}}")], [0.0], [r"\frac{63}{400}"]),
    *each("TRL", "TestReasoningAccuracyReward.test_correct_answer_in_reasoning_yields_zero_reward", reasoning_accuracy_reward, [
        r"<think> My answer is \boxed{42} </think> Some other text.",
        r"<think> The answer is \boxed{42} </think> Here's a wrong answer: \boxed{43}.",
    ], [0.0, 0.0], [r"\boxed{42}", r"\boxed{42}"]),
    Case("TRL", "TestReasoningAccuracyReward.test_incomplete_reasoning_yields_zero_reward[0]", reasoning_accuracy_reward,
         [one(r"<think> Incomplete reasoning without closing tag")], [0.0], [r"\frac{63}{400}"]),
    Case("TRL", "TestReasoningAccuracyReward.test_incomplete_reasoning_yields_zero_reward[1]", reasoning_accuracy_reward,
         [one(r"Correct answer \frac{63}{400} but completely missing reasoning content")], [0.0], [r"\frac{63}{400}"],
         ours=[1.0],
         why="seed 000's generate.py parses <think>...</think> where it is: a response with no reasoning tag at all is "
             "all answer (jobs.scoring.answers.split_thinking; the opening tag may be in the prompt), so its "
             r"\frac{63}{400} is read and right; TRL scores 0 without its delimiter. A <think> never closed "
             "is no answer for both (case [0])"),
    Case("TRL", "TestReasoningAccuracyReward.test_unparsable_gold_solution_yields_none_reward", reasoning_accuracy_reward,
         [one(r"<think> Reasoning content </think> \boxed{42}")], [None], ["forty two"],
         ours=[0.0], why=WORDS_WHY),  # "42" vs "forty two", as text
]

CASES = OPEN_R1 + TRL


def check(expected: Expected, rewards: list[float | None]) -> None:
    if callable(expected):
        expected(rewards)
    else:
        assert rewards == pytest.approx(expected)


@pytest.mark.parametrize("case", [pytest.param(case, id=f"{case.source}::{case.test}") for case in CASES])
def test_ported_case(case: Case) -> None:
    rewards = case.reward(case.completions, *([] if case.solution is None else [case.solution]))
    check(case.expected if case.ours is None else case.ours, rewards)


def test_the_counts_above_are_the_cases() -> None:
    assert all((c.ours is None) == (not c.why) for c in CASES), "each deliberate difference says which formula it follows"
    for source, cases in (("open-r1", OPEN_R1), ("TRL", TRL), ("all", CASES)):
        differ = sum(c.ours is not None for c in cases)
        assert f"{source}: {len(cases)} cases: {len(cases) - differ} as upstream, {differ} deliberate differences" in __doc__


# --- what the ported cases rest on, beyond upstream's inputs ---------------------------------------

def test_prefix_layout_takes_several_tags_and_is_refused_misspelled() -> None:
    texts = ["<think>r</think>\n<answer>a</answer> then free text", "<think>r</think> text <answer>a</answer>",
             "<think>r</think><answer>a</answer><think>again</think>"]
    assert ours("format", [one(t) for t in texts], layout="prefix") == [1.0, 0.0, 0.0]
    assert ours("format", [one(t) for t in texts]) == [0.0, 0.0, 0.0], "fullmatch allows nothing after the blocks"
    with pytest.raises(ValueError, match=r"parameter 'layout' of reward 'format': Input should be 'fullmatch', 'prefix' or 'present'"):
        bind(RewardConfig("format", params={"layout": "prefx"}), MATH)


def cannot_judge(prediction: str, ground_truth: str) -> bool | None:
    """A verifier (tests.unit.test_rewards_ported:cannot_judge) that cannot read the gold answer "?"."""
    return None if ground_truth == "?" else prediction == ground_truth


def test_a_verdict_of_none_is_no_score_counted() -> None:
    verifier = {"verifier": "tests.unit.test_rewards_ported:cannot_judge"}
    rewards = RewardSet([RewardConfig("correctness", params=verifier), RewardConfig("length", params=verifier)], MATH)
    scores = rewards.score([None] * 3, ["ANSWER: 7", "ANSWER: 7 or so", "ANSWER: 8"], answer=["?", "7", "8"])
    assert scores.by_reward == {"correctness": [None, 0.0, 1.0], "length": [None, -0.5, 0.5]}
    assert scores.totals == [None, -0.5, 1.5]
    assert rewards.failures == {"correctness": 1, "length": 1}
