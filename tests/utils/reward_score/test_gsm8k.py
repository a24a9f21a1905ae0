"""GSM8K by default scores exactly as veRL's gsm8k.compute_score: each expected value below is
what veRL's scorer returns (read from its code and confirmed by running it outside this repo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from verl.utils.reward_score import default_compute_score
from verl.utils.reward_score.gsm8k import CLIP_CHARS, compute_score, extract_solution, reference_answer

FIXTURE = Path(__file__).parents[2] / "fixtures" / "gsm8k_sample.jsonl"

# (response, ground truth, method, veRL's score)
VERL_CASES = [
    ("6 * 7 = 42 apples.\n#### 42", "42", "strict", 1.0),
    ("#### 1,234", "1234", "strict", 1.0),                # strict drops thousands separators
    ("#### -7", "-7", "strict", 1.0),
    ("#### 12 and then #### 42", "42", "strict", 1.0),    # the last one counts
    ("x" * 400 + "#### 42", "42", "strict", 1.0),         # only the end is searched, and it is there
    # Where our earlier rule gave 1 and veRL gives 0:
    ("#### 42.", "42", "strict", 0.0),                    # compared as strings
    ("####42", "42", "strict", 0.0),                      # exactly one space after ####
    ("#### 42.0", "42", "strict", 0.0),
    ("#### 042", "42", "strict", 0.0),
    ("#### 42" + " then some words" * 20, "42", "strict", 0.0),  # answer more than 300 characters before the end
    ("so it is 42.", "42", "flexible", 0.0),              # flexible keeps the trailing period
    ("the total is 1,234", "1234", "flexible", 0.0),      # ...and the commas
    # More of veRL's edges:
    ("#### $42", "42", "strict", 0.0),                    # "$" cannot start the number
    ("####  42", "42", "strict", 0.0),                    # two spaces
    ("the answer is 42", "42", "strict", 0.0),
    ("#### 42", 42, "strict", 0.0),                       # a non-string ground truth never equals
    ("first 12, then 42", "42", "flexible", 1.0),
    ("the total is 1,234", "1,234", "flexible", 1.0),
    ("from 5 down to -3", "-3", "flexible", 1.0),
    ("no numbers at all", "42", "flexible", 0.0),
]


@pytest.mark.parametrize("response, truth, method, expected", VERL_CASES)
def test_scores_as_verl(response, truth, method, expected):
    assert compute_score(response, truth, method=method) == expected


@pytest.mark.parametrize("response, truth, method, expected", [c for c in VERL_CASES if c[2] == "strict"])
def test_default_scorer_of_both_gsm8k_names_is_verls_strict_rule(response, truth, method, expected):
    assert default_compute_score("openai/gsm8k", response, truth) == expected
    assert default_compute_score("gsm8k", response, truth) == expected


def test_format_score_needs_an_answer():
    assert compute_score("#### 41", "42", format_score=0.1) == 0.1
    assert compute_score("no answer", "42", format_score=0.1) == 0.0
    # A lone "." is what veRL's flexible rule returns when it finds no better number.
    assert extract_solution("just a period.", "flexible") == "."
    assert compute_score("just a period.", "42", method="flexible", format_score=0.1) == 0.1
    assert extract_solution("a 1 b 2,000", "flexible") == "2,000"
    with pytest.raises(ValueError, match="method"):
        extract_solution("#### 1", "lenient")


def test_clip_is_counted_from_the_end():
    answer = "#### 42"
    assert compute_score(answer + " " * (CLIP_CHARS - len(answer)), "42") == 1.0
    assert compute_score(answer + " " * (CLIP_CHARS - len(answer) + 1), "42") == 0.0


def fixture_records() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]


def test_reference_answers_of_fixture_and_their_solutions_score_one():
    records = fixture_records()
    assert [reference_answer(r["answer"]) for r in records] == ["22", "3250", "0.5", "45", "1200000"]
    for record in records:
        assert compute_score(record["answer"], reference_answer(record["answer"])) == 1.0
    with pytest.raises(ValueError, match="####"):
        reference_answer("no final line")
