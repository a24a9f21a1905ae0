"""RewardManager: raising, hanging, crashing and printing scorers cost one sample 0 and a counter, never the batch."""

from __future__ import annotations

import importlib
import sys
import textwrap
import threading
import time
import types

import numpy as np
import pytest

from verl.utils.config import ConfigError
from verl.utils.reward_score import RewardManager, default_compute_score

# Scorers the worker process must import by name, so they live in a real module on sys.path.
SCORERS = textwrap.dedent('''
    import os, time

    def scorer(data_source, solution_str, ground_truth, extra_info=None):
        if solution_str == "raise":
            raise RuntimeError("scorer bug")
        if solution_str == "sleep":
            time.sleep(60)
        if solution_str == "crash":
            os._exit(3)
        if solution_str == "print":
            print("chatter on stdout " * 1000)
        if solution_str == "nan":
            return float("nan")
        if solution_str == "none":
            return None
        return float(solution_str == ground_truth)
''')


@pytest.fixture()
def scorer(tmp_path, monkeypatch):
    (tmp_path / "h2_test_scorers.py").write_text(SCORERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("h2_test_scorers")
    yield module.scorer
    sys.modules.pop("h2_test_scorers", None)


def test_raising_scorer_scores_zero_and_is_counted(scorer):
    with RewardManager(timeout_s=5.0, compute_score=scorer) as manager:
        scores, stats = manager.score(["x"] * 4, ["a", "raise", "b", "a"], ["a", "a", "a", "a"])
    assert scores.dtype == np.float32
    assert scores.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert stats["reward/num_errors"] == 1 and stats["reward/num_timeouts"] == 0
    assert stats["reward/mean"] == pytest.approx(0.5)


def test_hanging_scorer_times_out_and_later_samples_are_scored(scorer):
    with RewardManager(timeout_s=1.0, compute_score=scorer) as manager:
        manager.score(["x"], ["a"], ["a"])  # start the worker outside the timed call
        start = time.perf_counter()
        scores, stats = manager.score(["x"] * 4, ["a", "sleep", "a", "b"], ["a"] * 4)
        elapsed = time.perf_counter() - start
    assert scores.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert stats["reward/num_timeouts"] == 1 and stats["reward/num_errors"] == 0
    # One timeout plus restarting the worker process (~0.3 s idle; slack for a loaded CI machine).
    assert 1.0 <= elapsed < 4.0


def test_crash_non_finite_and_non_numeric_scores_are_errors_and_stdout_is_harmless(scorer):
    with RewardManager(timeout_s=5.0, compute_score=scorer) as manager:
        scores, stats = manager.score(["x"] * 6, ["print", "crash", "a", "nan", "none", "a"], ["a"] * 6)
    assert scores.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert stats["reward/num_errors"] == 3 and stats["reward/num_timeouts"] == 0


def test_usable_from_a_non_main_thread(scorer):
    out = {}

    def run():
        with RewardManager(timeout_s=0.5, compute_score=scorer) as manager:
            out["result"] = manager.score(["x"] * 3, ["a", "sleep", "a"], ["a"] * 3)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    scores, stats = out["result"]
    assert scores.tolist() == [1.0, 0.0, 1.0] and stats["reward/num_timeouts"] == 1


def test_default_scorer_mixes_in_process_and_worker_sources():
    sources = ["countdown_lenient", "countdown", "openai/gsm8k", "HuggingFaceH4/MATH-500", "math_lenient", "aime2025",
               "aime2025", "unknown_task"]
    responses = ["12*3+7", "<answer>12*3+7</answer>", "#### 5", "$\\boxed{0.5}$", "$\\boxed{0.5}$", "Answer: 17",
                 "Answer: 16", "x"]
    truths = [{"target": 43, "numbers": [3, 7, 12]}] * 2 + ["5", "\\frac{1}{2}", "\\frac{1}{2}", "17", "17", "x"]
    with RewardManager(timeout_s=10.0) as manager:
        scores, stats = manager.score(sources, responses, truths, [None] * 8)
    # DAPO's rule (aime*) scores -1 when wrong and reports acc, averaged over the two samples that had it.
    assert scores.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0, 0.0]
    assert stats["reward/extra/acc/mean"] == 0.5
    assert stats["reward/num_errors"] == 1  # the unknown data source
    for source, response, truth, score in zip(sources[:7], responses, truths, scores):
        result = default_compute_score(source, response, truth)
        assert (result["score"] if isinstance(result, dict) else result) == score


def test_length_mismatch_and_bad_timeout_are_rejected(scorer):
    with pytest.raises(ValueError, match="must match"):
        RewardManager(compute_score=scorer).score(["x"], ["a", "b"], ["a"])
    with pytest.raises(ConfigError) as info:
        RewardManager(timeout_s=0.0)
    assert info.value.key == "reward_model.timeout_s"
    with pytest.raises(Exception, match="pickle|attribute|lambda|local"):
        RewardManager(compute_score=lambda *args: 1.0)


def test_scorer_the_worker_cannot_import_fails_loudly():
    module = types.ModuleType("h2_parent_only_scorers")
    exec("def scorer(*args):\n    return 1.0\n", module.__dict__)
    sys.modules[module.__name__] = module
    try:
        manager = RewardManager(compute_score=module.scorer)
        with pytest.raises(RuntimeError, match="scoring function"):
            manager.score(["x"], ["a"], ["a"])
    finally:
        sys.modules.pop(module.__name__)
