"""MATH reward: boxed-answer extraction with brace matching and math-verify equivalence, never raising."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from verl.utils.reward_score.math import compute_score, extract_boxed_answer, last_boxed_only_string

FIXTURE = Path(__file__).parents[2] / "fixtures" / "math_sample.jsonl"


def fixture_records() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]


def test_boxed_extraction_of_fixture():
    answers = [extract_boxed_answer(r["solution"]) for r in fixture_records()]
    assert answers == ["\\frac{1}{2}", "x^2+2x+1", "\\dfrac{\\sqrt{9}}{4}", "7", "(2, -3)"]


@pytest.mark.parametrize("text, expected", [
    ("\\boxed{a{b}c} and \\boxed{d}", "\\boxed{d}"),
    ("\\boxed{\\frac{1}{2}", None),  # unclosed
    ("no box", None),
    ("$\\fbox{12}$", "\\fbox{12}"),
    ("$\\boxed 7$.", "\\boxed 7"),
    ("\\boxed{1} then \\fbox{2}", "\\fbox{2}"),
])
def test_last_boxed_only_string(text, expected):
    assert last_boxed_only_string(text) == expected


def test_fixture_solutions_verify_against_their_ground_truth():
    for record in fixture_records():
        assert compute_score(record["solution"], extract_boxed_answer(record["solution"])) == 1.0, record


@pytest.mark.parametrize("response, truth, expected", [
    ("so $\\boxed{0.5}$", "\\frac{1}{2}", 1.0),
    ("the root is $\\boxed{\\frac{3}{4}}$", "\\dfrac{\\sqrt{9}}{4}", 1.0),
    ("$\\boxed{(x+1)^2}$", "x^2+2x+1", 1.0),
    ("so $\\boxed{\\frac{1}{3}}$", "\\frac{1}{2}", 0.0),
    ("no answer at all", "\\frac{1}{2}", 0.0),
    ("$\\boxed{\\frac{1}{", "\\frac{1}{2}", 0.0),
    ("\\boxed{7}", "\\boxed{", 0.0),  # broken ground truth: 0, not an exception
])
def test_equivalence(response, truth, expected):
    assert compute_score(response, truth) == expected


def test_works_outside_the_main_thread():
    # math-verify's signal-based timeouts raise in worker threads; the wrapper must switch them off.
    results = []
    thread = threading.Thread(target=lambda: results.append(compute_score("$\\boxed{0.5}$", "\\frac{1}{2}")))
    thread.start()
    thread.join()
    assert results == [1.0]
