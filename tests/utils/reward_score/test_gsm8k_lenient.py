"""Our lenient GSM8K rule (gsm8k_lenient): strict '#### N' and flexible last-number extraction, compared as decimals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from verl.utils.reward_score.gsm8k import reference_answer
from verl.utils.reward_score.gsm8k_lenient import compute_score, extract_final_answer

FIXTURE = Path(__file__).parents[2] / "fixtures" / "gsm8k_sample.jsonl"


def fixture_records() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]


def test_fixture_solutions_score_one_against_their_own_ground_truth():
    for record in fixture_records():
        assert compute_score(record["answer"], reference_answer(record["answer"])) == 1.0


@pytest.mark.parametrize("response, truth, expected", [
    ("so the total is 3,250 dollars.\n#### 3,250", "3250", 1.0),
    ("#### 3250.00", "3250", 1.0),
    ("#### 45.", "45", 1.0),
    ("####45", "45", 1.0),
    ("#### -7", "-7", 1.0),
    ("#### 44", "45", 0.0),
    ("the answer is 45", "45", 0.0),  # strict: no '####'
    ("#### 12 then #### 45", "45", 1.0),  # the last one counts
    ("#### ,", "45", 0.0),
])
def test_strict(response, truth, expected):
    assert compute_score(response, truth) == expected


def test_flexible_takes_the_last_number_and_format_score():
    assert compute_score("first 12, then 3,250.", "3250", method="flexible") == 1.0
    assert compute_score("first 3250, then 12", "3250", method="flexible") == 0.0
    assert compute_score("no numbers here", "3250", method="flexible") == 0.0
    assert compute_score("#### 12", "13", format_score=0.1) == 0.1
    assert compute_score("nothing", "13", format_score=0.1) == 0.0
    assert extract_final_answer("a 1 b 2,000", "flexible") == "2,000"
    with pytest.raises(ValueError, match="method"):
        extract_final_answer("#### 1", "lenient")
