"""DAPO's +/-1 math reward (math_dapo, math, math_dapo_reasoning, aime*) scores exactly as veRL's
math_dapo.compute_score: each expected value below is veRL's (read from its code and confirmed
by running it outside this repo)."""

from __future__ import annotations

import pytest

from verl.utils.reward_score import default_compute_score
from verl.utils.reward_score.math_dapo import compute_score, normalize_final_answer

DAPO_SOURCES = ["math_dapo", "math", "math_dapo_reasoning", "aime2024", "aime2025", "aime_any"]

# (response, ground truth, veRL's score, veRL's normalized prediction)
VERL_CASES = [
    ("Thinking...\nAnswer: 42", "42", 1.0, "42"),
    ("answer : 42", "42", 1.0, "42"),                     # any case, spaces around the colon
    ("Answer: 7\nAnswer: 42", "42", 1.0, "42"),           # the last one
    ("Answer: 42\nso that is it", "42", 1.0, "42"),       # to the end of its line
    ("Answer: \\boxed{42}", "42", 1.0, "42"),
    ("Answer: $42$", "42", 1.0, "42"),
    ("Answer: 1,000", "1000", 1.0, "1000"),
    ("Answer: 5 dollars", "5", 1.0, "5"),
    ("Answer: x = 3", "3", 1.0, "3"),
    ("Answer: \\frac12", "\\frac{1}{2}", 1.0, "\\frac{1}{2}"),
    ("Answer: \\text{(B)}", "(B)", 1.0, "(B)"),
    ("Answer: 0.5", "\\frac{1}{2}", -1.0, "0.5"),
    ("Answer: 41", "42", -1.0, "41"),
    ("the answer is \\boxed{42}", "42", -1.0, "[INVALID]"),   # a boxed answer needs an Answer: line
    ("Answer: 42" + " and more" * 40, "42", -1.0, "[INVALID]"),  # more than 300 characters before the end
]


@pytest.mark.parametrize("response, truth, score, prediction", VERL_CASES)
def test_scores_as_verl(response, truth, score, prediction):
    assert compute_score(response, truth) == {"score": score, "acc": score == 1.0, "pred": prediction}


@pytest.mark.parametrize("source", DAPO_SOURCES)
def test_release_dapo_sources_route_here(source):
    for response, truth, score, prediction in VERL_CASES:
        assert default_compute_score(source, response, truth) == {"score": score, "acc": score == 1.0,
                                                                 "pred": prediction}


def test_strict_box_mode():
    assert compute_score("so \\boxed{42}", "42", strict_box_verify=True) == {"score": 1.0, "acc": True, "pred": "42"}
    assert compute_score("\\boxed{ 42}", "42", strict_box_verify=True)["score"] == -1.0
    assert compute_score("\\boxed{42}" + "." * 100, "42", strict_box_verify=True)["pred"] is None


def test_normalize_final_answer():
    assert normalize_final_answer("x = \\$1,000") == "1000"
    assert normalize_final_answer("\\textbf{12} inches") == "12"
    assert normalize_final_answer("\\sqrt2") == "\\sqrt{2}"
