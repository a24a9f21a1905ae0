"""Custom reward functions by path (veRL's custom_reward_function) in the RewardManager: dict
scores and their metrics, reward_kwargs, and each failure rule (missing file, missing function,
import error at construction; raising and hanging per sample)."""

from __future__ import annotations

import os
import pickle
import sys
import textwrap
import time

import pytest

from verl.utils.config import ConfigError
from verl.utils.reward_score import CustomRewardFunction, RewardManager

# Written as a veRL user writes one: module-level imports, the veRL signature, a dict result.
REWARD_FILE = textwrap.dedent('''
    import os
    import time

    def compute_score(data_source, solution_str, ground_truth, extra_info=None, bonus=0.0):
        if solution_str == "raise":
            raise RuntimeError("bug in the user's scorer")
        if solution_str == "hang":
            time.sleep(60)
        if solution_str == "no score":
            return {"acc": 1.0}
        correct = solution_str == ground_truth
        return {
            "score": (1.0 if correct else -1.0) + bonus,
            "acc": correct,
            "length": float(len(solution_str)),
            "weight": extra_info["weight"],
            "pid": os.getpid(),
            "source_is_mine": data_source == "my_task",
            "pred": solution_str,  # not a number: not a metric
        }

    def plain(data_source, solution_str, ground_truth, extra_info=None):
        return len(solution_str)

    def too_narrow(data_source, solution_str, ground_truth):
        return 0.0
''')


@pytest.fixture()
def reward_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(REWARD_FILE)
    return path


def test_dict_scores_kwargs_and_extra_metrics(reward_file):
    function = CustomRewardFunction(str(reward_file), "compute_score", {"bonus": 0.5})
    with RewardManager(timeout_s=10.0, compute_score=function) as manager:
        scores, stats = manager.score(["my_task", "my_task", "other"], ["a", "b", "a"], ["a", "a", "a"],
                                      [{"weight": 1.0}, {"weight": 2.0}, {"weight": 6.0}])
    assert scores.tolist() == [1.5, -0.5, 1.5]
    assert stats["reward/extra/acc/mean"] == pytest.approx(2 / 3)
    assert stats["reward/extra/length/mean"] == 1.0
    assert stats["reward/extra/weight/mean"] == 3.0
    assert stats["reward/extra/source_is_mine/mean"] == pytest.approx(2 / 3)
    assert "reward/extra/pred/mean" not in stats
    assert stats["reward/num_errors"] == 0 and stats["reward/num_timeouts"] == 0
    # Scored in the reward worker process, not in this one.
    assert stats["reward/extra/pid/mean"] != os.getpid()


def test_float_scores_have_no_extra_metrics(reward_file):
    with RewardManager(compute_score=CustomRewardFunction(str(reward_file), "plain")) as manager:
        scores, stats = manager.score(["x", "y"], ["abc", ""], [None, None])
    assert scores.tolist() == [3.0, 0.0]
    assert not [key for key in stats if key.startswith("reward/extra/")]


def test_raising_and_scoreless_results_score_zero_and_count_as_errors(reward_file):
    function = CustomRewardFunction(str(reward_file))
    with RewardManager(timeout_s=10.0, compute_score=function) as manager:
        scores, stats = manager.score(["t"] * 3, ["a", "raise", "no score"], ["a"] * 3, [{"weight": 0.0}] * 3)
    assert scores.tolist() == [1.0, 0.0, 0.0]
    assert stats["reward/num_errors"] == 2 and stats["reward/num_timeouts"] == 0
    assert stats["reward/extra/acc/mean"] == 1.0  # failed samples report no extras


def test_hanging_function_scores_zero_and_counts_as_timeout(reward_file):
    function = CustomRewardFunction(str(reward_file))
    with RewardManager(timeout_s=0.5, compute_score=function) as manager:
        manager.score(["t"], ["a"], ["a"], [{"weight": 0.0}])  # start the worker outside the timed call
        start = time.perf_counter()
        scores, stats = manager.score(["t"] * 3, ["a", "hang", "a"], ["a"] * 3, [{"weight": 0.0}] * 3)
        elapsed = time.perf_counter() - start
    assert scores.tolist() == [1.0, 0.0, 1.0]
    assert stats["reward/num_timeouts"] == 1 and stats["reward/num_errors"] == 0
    assert elapsed < 10.0  # the timeout plus a fresh worker that loads the file again


def test_missing_file_fails_at_construction_naming_file_and_name(tmp_path):
    missing = tmp_path / "nowhere.py"
    with pytest.raises(ConfigError) as info:
        CustomRewardFunction(str(missing), "compute_score")
    assert info.value.key == "custom_reward_function.path"
    assert str(missing) in str(info.value) and "compute_score" in str(info.value)


def test_missing_function_fails_at_construction_naming_file_and_name(reward_file):
    with pytest.raises(ConfigError) as info:
        CustomRewardFunction(str(reward_file), "score_it")
    assert info.value.key == "custom_reward_function.name"
    assert str(reward_file) in str(info.value) and "score_it" in str(info.value)
    assert "compute_score" in str(info.value)  # what the file does define


def test_import_error_fails_at_construction_naming_file_and_name(tmp_path):
    broken = tmp_path / "broken_reward.py"
    broken.write_text("import a_module_that_does_not_exist\n\ndef compute_score(*args, **kwargs):\n    return 0.0\n")
    with pytest.raises(ConfigError) as info:
        CustomRewardFunction(str(broken), "compute_score")
    message = str(info.value)
    assert str(broken) in message and "compute_score" in message and "a_module_that_does_not_exist" in message


def test_signature_that_cannot_take_the_call_fails_at_construction(reward_file):
    with pytest.raises(ConfigError, match="too_narrow.*extra_info"):
        CustomRewardFunction(str(reward_file), "too_narrow")
    with pytest.raises(ConfigError, match="reward_kwargs"):
        CustomRewardFunction(str(reward_file), "compute_score", {"no_such_argument": 1})


def test_pickles_as_its_path_and_reloads_the_file(reward_file):
    function = CustomRewardFunction(str(reward_file), "plain")
    loaded_as = [name for name in sys.modules if name.startswith("verl_custom_reward_")]
    for name in loaded_as:
        del sys.modules[name]  # as in a fresh process, which cannot import the file by module name
    copy = pickle.loads(pickle.dumps(function))
    assert copy("x", "abcd", None) == 4.0
    assert (copy.path, copy.name, copy.reward_kwargs) == (str(reward_file), "plain", {})


def test_worker_that_can_no_longer_load_the_file_fails_loudly(reward_file):
    manager = RewardManager(compute_score=CustomRewardFunction(str(reward_file), "plain"))
    reward_file.unlink()
    with pytest.raises(RuntimeError, match="could not load the scoring function.*my_reward.py"):
        manager.score(["x"], ["a"], [None])
