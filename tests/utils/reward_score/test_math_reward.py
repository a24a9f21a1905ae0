"""MATH data sources score exactly as veRL's math_reward.compute_score (boxed answer, string
normalization): each expected value below is veRL's (read from its code and confirmed by
running it outside this repo)."""

from __future__ import annotations

import pytest

from verl.utils.reward_score import default_compute_score
from verl.utils.reward_score.math_reward import compute_score, is_equiv, last_boxed_only_string, normalize

MATH_SOURCES = ["lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500", "math-500",
                "deepscaler", "test-math-aime24", "test-math-aime25", "dapo_filter"]

# (response, ground truth, veRL's score)
VERL_CASES = [
    ("so $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{1/2}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac12}", "\\frac{1}{2}", 1.0),
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{5 \\text{ cm}}", "5", 1.0),
    ("\\boxed{\\sqrt3}", "\\sqrt{3}", 1.0),
    ("\\boxed{90^\\circ}", "90", 1.0),
    ("\\boxed{10\\%}", "10", 1.0),
    ("\\boxed{\\left( 2, -3 \\right)}", "(2,-3)", 1.0),
    ("the answer is $\\boxed 7$.", "7", 1.0),
    ("\\boxed{1} first, then \\boxed{7}", "7", 1.0),
    ("\\boxed{\\text{ a} \\text{ b}}", "\\text{ a} \\text{ b}", 1.0),  # fails to normalize: compared raw
    ("\\boxed{\\sqrt}", "\\sqrt", 1.0),                                 # likewise
    ("\\boxed 5 and then \\boxed{6}", "6", 0.0),   # any "\boxed " wins over a later \boxed{}
    ("\\fbox{7}", "7", 0.0),                       # found, never accepted
    ("the answer is 7", "7", 0.0),
    ("\\boxed{\\frac{1}{2}", "\\frac{1}{2}", 0.0),  # unclosed
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", 0.0),  # no arithmetic
    ("\\boxed{(x+1)^2}", "x^2+2x+1", 0.0),          # no algebra (math_lenient has it)
    ("\\boxed{1,000}", "1000", 0.0),
    ("\\boxed{7}", 7, 0.0),                         # a non-string ground truth scores 0
]


@pytest.mark.parametrize("response, truth, expected", VERL_CASES)
def test_scores_as_verl(response, truth, expected):
    assert compute_score(response, truth) == expected


@pytest.mark.parametrize("source", MATH_SOURCES)
def test_release_math_sources_route_here(source):
    for response, truth, expected in VERL_CASES:
        assert default_compute_score(source, response, truth) == expected


@pytest.mark.parametrize("text, expected", [
    ("\\boxed{a{b}c} and \\boxed{d}", "\\boxed{d}"),
    ("$\\boxed 7$.", "\\boxed 7"),
    ("\\boxed{1} then \\fbox{2}", "\\boxed{1}"),  # \fbox only when there is no \boxed
    ("no box", None),
])
def test_last_boxed_only_string(text, expected):
    assert last_boxed_only_string(text) == expected


def test_normalize_and_is_equiv():
    assert normalize("\\left(\\tfrac12, 3\\right)") == "(\\frac{1}{2},3)"
    assert normalize("k = 3/4") == "\\frac{3}{4}"
    assert normalize("-3/4") == "\\frac{-3}{4}"
    assert normalize("03/4") == "03/4"  # only canonically written integers become a fraction
    assert is_equiv(None, None) and not is_equiv("1", None)
