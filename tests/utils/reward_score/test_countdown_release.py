"""Countdown by default (data source ``countdown``) scores exactly as the VCPO release's
countdown.compute_score: each expected value below is the release's (read from its code and
confirmed by running it outside this repo), with format_score=0.1 so that "no answer" (0),
"an answer that fails" (0.1) and "correct" (1) are told apart."""

from __future__ import annotations

import time

import numpy as np
import pytest

from verl.utils.reward_score import default_compute_score
from verl.utils.reward_score.countdown import compute_score, evaluate_expression, extract_solution

TRUTH = {"target": 43, "numbers": [3, 7, 12]}

# (response, ground truth, extra_info, the release's score with format_score=0.1)
RELEASE_CASES = [
    ("<answer>12*3+7</answer>", TRUTH, None, 1.0),
    ("\\boxed{12*3+7}", TRUTH, None, 1.0),
    ("so \\boxed{(12*3)+7}.", TRUTH, None, 1.0),
    ("<answer>7 + 3 * 12</answer>", TRUTH, None, 1.0),
    ("\\boxed{12*3+7} and later <answer>1+1</answer>", TRUTH, None, 1.0),   # a boxed answer wins
    ("<answer>1+2</answer> no, <answer>12*3+7</answer>", TRUTH, None, 1.0),  # the last tag counts
    ("Assistant: <answer>12*3+7</answer>", TRUTH, None, 1.0),
    ("<|im_start|>assistant\n<answer>12*3+7</answer>", TRUTH, None, 1.0),
    ("<answer>-3*-12+7</answer>", TRUTH, None, 1.0),       # unary minus is Python arithmetic
    ("12*3+7", TRUTH, None, 0.0),                           # a bare expression is no answer
    ("<answer>12*3+7\n</answer>", TRUTH, None, 0.0),        # the tag must close on the same line
    ("<answer>12*3+7</answer> Assistant: done", TRUTH, None, 0.0),  # only text after "Assistant:" counts
    ("<answer>12*3+7", TRUTH, None, 0.0),
    ("<answer>12*3-7</answer>", TRUTH, None, 0.1),          # wrong value
    ("<answer>12*3+7+3</answer>", TRUTH, None, 0.1),        # a number used twice
    ("<answer>12*3.0+7</answer>", TRUTH, None, 0.1),        # "3.0" counts as the integers 3 and 0
    ("<answer>(12*3)+7=43</answer>", TRUTH, None, 0.1),     # 43 is not one of the numbers
    ("\\boxed{\\frac{12}{3}+7}", TRUTH, None, 0.1),         # no nested braces: the answer is "\frac{12"
    ("<answer></answer>", TRUTH, None, 0.1),
    ("<answer>12 3 7</answer>", TRUTH, None, 0.1),          # the numbers, but not Python
    ("<answer>(4+8)/2</answer>", {"target": 6, "numbers": [4, 8, 2]}, None, 1.0),
    ("<answer>7/25*25</answer>", {"target": 7, "numbers": [25, 25, 7]}, None, 1.0),  # within 1e-5
    ("<answer>7/2</answer>", {"target": 3, "numbers": [7, 2]}, None, 0.1),   # true division
    ("<answer>7//2</answer>", {"target": 3, "numbers": [7, 2]}, None, 1.0),  # floor division
    ("<answer>2**3</answer>", {"target": 8, "numbers": [2, 3]}, None, 1.0),
    ("<answer>1/0</answer>", {"target": 1, "numbers": [1, 0]}, None, 0.1),
    ("<answer>1+2+3</answer>", {"target_number": 6, "nums": [1, 2, 3]}, None, 1.0),
    ("<answer>1+2+3</answer>", {"target": 6, "nums": [1, 2, 3]}, None, 1.0),
    ("<answer>3-3</answer>", {"target": 0, "numbers": [3, 3]}, None, 0.0),  # a target of 0 is "not found"
    ("<answer>12*3+7</answer>", "", {"target": 43, "numbers": [3, 7, 12]}, 1.0),
    ("<answer>12*3+7</answer>", {"x": 1}, {"metadata": {"target": 43, "numbers": [3, 7, 12]}}, 1.0),
    ("<answer>12 * 3 + 7</answer>", "12*3+7", None, 1.0),   # no target: equal to the string, spaces aside
    ("<answer>7+12*3</answer>", "12*3+7", None, 0.0),
    ("<answer>12*3+7</answer>", {"target": "43", "numbers": [3, 7, 12]}, None, 0.1),  # a string target
]


@pytest.mark.parametrize("response, truth, extra_info, expected", RELEASE_CASES)
def test_scores_as_the_release(response, truth, extra_info, expected):
    assert compute_score(response, truth, extra_info=extra_info, format_score=0.1) == expected
    # The default format_score is 0, and the data source "countdown" routes here.
    assert default_compute_score("countdown", response, truth, extra_info) == (1.0 if expected == 1.0 else 0.0)


def test_extract_solution():
    assert extract_solution("x \\boxed{ 1+2 } y <answer>3</answer>") == "1+2"
    assert extract_solution("<answer> 1 </answer><answer> 2+3 </answer>") == "2+3"
    assert extract_solution("Assistant: a Assistant: <answer>4</answer>") == "4"
    assert extract_solution("1+2") is None


@pytest.mark.parametrize("expression, value", [
    ("1+2*3", 7), ("(1+2)*3", 9), ("7/2", 3.5), ("7//2", 3), ("-7//2", -4), ("2**-1", 0.5), ("--3", 3),
    ("1.5*2", 3.0), (".5+5.", 5.5), ("  2 *\t3", 6), ("(1+\n2)", 3),
])
def test_values_are_pythons(expression, value):
    assert evaluate_expression(expression) == value == eval(expression, {"__builtins__": None}, {})


def test_numpy_numbers_are_read_where_the_release_would_raise():
    # The release's `numbers or nums` raises on a NumPy array; a parquet reader may return one.
    assert compute_score("<answer>12*3+7</answer>", {"target": np.int64(43), "numbers": np.array([3, 7, 12])}) == 1.0


def test_a_power_too_large_to_compute_scores_format_score_at_once():
    # The release's eval would compute 9**(9**9), a number of 370 million digits; here it is refused.
    start = time.perf_counter()
    assert compute_score("<answer>9**9**9</answer>", {"target": 1, "numbers": [9, 9, 9]}, format_score=0.1) == 0.1
    assert compute_score("<answer>(2**3)**2</answer>", {"target": 64, "numbers": [2, 3, 2]}) == 1.0
    assert time.perf_counter() - start < 0.5
