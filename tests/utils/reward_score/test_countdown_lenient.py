"""Countdown rule of our CPU task (countdown_lenient): correct answers score 1; wrong, reused, missing and
malicious expressions score 0 fast."""

from __future__ import annotations

import time

import numpy as np
import pytest

from verl.utils.reward_score.countdown_lenient import compute_score, extract_expression

TRUTH = {"target": 43, "numbers": [3, 7, 12]}


@pytest.mark.parametrize("response", ["12*3+7", "7+3*12", " (12*3)+7 \n", "12*3+7<|end|>", "12*3+7<|end|>garbage",
                                      "thinking... <answer>7 + 12*3</answer>", "((12))*3+(7)"])
def test_correct_expression_scores_one(response):
    assert compute_score(response, TRUTH) == 1.0


def test_division_within_tolerance_and_numpy_ground_truth():
    assert compute_score("(4+8)/2", {"target": 6, "numbers": np.array([4, 8, 2])}) == 1.0
    assert compute_score("8-4/2", {"target": np.int64(6), "numbers": [2, 4, 8]}) == 1.0
    assert 7 / 25 * 25 != 7  # float rounding that the tolerance absorbs
    assert compute_score("7/25*25", {"target": 7, "numbers": [25, 25, 7]}) == 1.0
    assert compute_score("7/3", {"target": 2, "numbers": [3, 7]}) == 0.0


@pytest.mark.parametrize("response, why", [
    ("12*3+3", "wrong value and a missing number"),
    ("12*3-7", "wrong value"),
    ("12*3+7+3", "reused 3"),
    ("12*3", "missing 7"),
    ("12*3+7*1", "extra number"),
    ("-12*-3+7", "unary minus"),
    ("12.0*3+7", "float literal"),
    ("0x0c*3+7", "hex literal"),
    ("12*3+7=43", "trailing equation"),
    ("12 3 7", "not an expression"),
    ("(12*3+7", "unbalanced"),
    ("12*3+7)", "unbalanced"),
    ("(((", "unbalanced"),
    ("", "empty"),
    ("<answer>12*3+7", "unclosed answer tag"),
    ("12*3+7/0", "division by zero"),
])
def test_invalid_answers_score_zero(response, why):
    assert compute_score(response, TRUTH) == 0.0, why


@pytest.mark.parametrize("response", [
    "__import__('os').system('x')",
    "9**9**9",
    "2**100",
    "12**3+7",
    "(lambda: 43)()",
    "[x for x in range(10**9)]",
    "((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((1",
    "(" * 10000 + "1" + ")" * 10000,
    "1+" * 100000 + "1",
    "9" * 100000,
    "<answer>" * 20000,
    "12*3+7" + "+0" * 100,
])
def test_malicious_or_huge_inputs_score_zero_quickly(response):
    start = time.perf_counter()
    assert compute_score(response, TRUTH) == 0.0
    assert time.perf_counter() - start < 0.1


def test_magnitude_cap_and_format_score():
    truth = {"target": 1, "numbers": [999999, 999999, 999999]}
    assert compute_score("999999*999999*999999", truth, format_score=0.1) == 0.1  # 1e18 > cap
    assert compute_score("12*3+7+3", TRUTH, format_score=0.1) == 0.1
    assert compute_score("12*3-7", TRUTH, format_score=0.1) == 0.1
    assert compute_score("12**3", TRUTH, format_score=0.1) == 0.0  # not an accepted expression at all
    assert compute_score("12*3+7", TRUTH, format_score=0.1) == 1.0


def test_extract_expression():
    assert extract_expression("  7*(6+15)<|end|><|pad|>") == "7*(6+15)"
    assert extract_expression("a <answer>1</answer> b <answer> 2+3 </answer>") == "2+3"
    assert extract_expression("<answer>1") is None
