"""Data preparers run as scripts: they write veRL-schema parquet with the right ground truths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from verl.models.char_tokenizer import build_char_tokenizer
from verl.utils.dataset.countdown import row_to_problem, solve, split_problems
from verl.utils.dataset.rl_dataset import RLDataset
from verl.utils.reward_score import default_compute_score

REPO = Path(__file__).parents[2]
FIXTURES = REPO / "tests" / "fixtures"


def run_script(name: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "data" / name), *args], env=env,
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise AssertionError(done.stderr)
    return done.stdout


def assert_schema(rows: list[dict], data_source: str, split: str) -> None:
    for index, row in enumerate(rows):
        assert row["data_source"] == data_source
        assert row["prompt"][0]["role"] == "user" and len(row["prompt"]) == 1
        assert row["reward_model"]["style"] == "rule"
        assert row["extra_info"]["split"] == split and row["extra_info"]["index"] == index


def test_prepare_countdown(tmp_path):
    out = run_script("prepare_countdown.py", "--out_dir", str(tmp_path), "--train_size", "200", "--test_size", "40",
                     "--seed", "9")
    assert "train: 200 problems" in out and "test: 40 problems" in out
    train, test = split_problems(200, 40, seed=9)
    for split, problems in (("train", train), ("test", test)):
        rows = pq.read_table(tmp_path / f"{split}.parquet").to_pylist()
        assert_schema(rows, "countdown_lenient", split)
        assert [row_to_problem(row) for row in rows] == problems
        for row, problem in zip(rows, problems):
            answer = solve(problem.numbers, problem.target)[0]
            assert default_compute_score("countdown_lenient", answer, row["reward_model"]["ground_truth"]) == 1.0


def test_prepare_gsm8k(tmp_path):
    out_path = tmp_path / "gsm8k" / "train.parquet"
    out = run_script("prepare_gsm8k.py", "--input", str(FIXTURES / "gsm8k_sample.jsonl"), "--out", str(out_path))
    assert "5 GSM8K problems" in out
    rows = pq.read_table(out_path).to_pylist()
    assert_schema(rows, "openai/gsm8k", "train")
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["22", "3250", "0.5", "45", "1200000"]
    records = [json.loads(line) for line in (FIXTURES / "gsm8k_sample.jsonl").read_text().splitlines()]
    for row, record in zip(rows, records):
        assert row["prompt"][0]["content"].startswith(record["question"])
        assert row["prompt"][0]["content"].endswith('output the final answer after "####".')
        assert default_compute_score("openai/gsm8k", record["answer"], row["reward_model"]["ground_truth"]) == 1.0
    dataset = RLDataset(str(out_path), build_char_tokenizer(), max_prompt_length=512)
    assert len(dataset) == 5 and dataset.data_sources() == ["openai/gsm8k"]


def test_prepare_math_from_jsonl_and_from_a_directory(tmp_path):
    run_script("prepare_math.py", "--input", str(FIXTURES / "math_sample.jsonl"), "--out", str(tmp_path / "a.parquet"))
    rows = pq.read_table(tmp_path / "a.parquet").to_pylist()
    assert_schema(rows, "DigitalLearningGmbH/MATH-lighteval", "test")  # veRL's boxed-answer rule, not DAPO's
    assert [r["reward_model"]["ground_truth"] for r in rows] == [
        "\\frac{1}{2}", "x^2+2x+1", "\\dfrac{\\sqrt{9}}{4}", "7", "(2, -3)"]
    assert rows[0]["prompt"][0]["content"].endswith("within \\boxed{}.")
    assert (rows[1]["extra_info"]["level"], rows[1]["extra_info"]["type"]) == ("Level 2", "Algebra")
    for row in rows:
        solution, truth = row["extra_info"]["solution"], row["reward_model"]["ground_truth"]
        assert default_compute_score(row["data_source"], solution, truth) == 1.0
    run_script("prepare_math.py", "--input", str(FIXTURES / "math_raw"), "--out", str(tmp_path / "b.parquet"),
               "--split", "train", "--data_source", "HuggingFaceH4/MATH-500")
    rows = pq.read_table(tmp_path / "b.parquet").to_pylist()
    assert_schema(rows, "HuggingFaceH4/MATH-500", "train")
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["1024", "\\frac{25}{4}"]


def test_preparers_name_the_bad_record(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "4"}) + "\n")
    with pytest.raises(AssertionError, match="bad.jsonl:1"):
        run_script("prepare_gsm8k.py", "--input", str(bad), "--out", str(tmp_path / "x.parquet"))
    bad.write_text(json.dumps({"problem": "p", "solution": "no box"}) + "\n")
    with pytest.raises(AssertionError, match="bad.jsonl:1"):
        run_script("prepare_math.py", "--input", str(bad), "--out", str(tmp_path / "y.parquet"))
