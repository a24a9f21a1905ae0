"""custom_reward_function through the user's entry point: a bad path or name fails while the config
is validated, before Ray starts; a veRL-style reward file trains, sees every data source
(unknown ones included), gets reward_kwargs, and its dict entries reach the logged metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from tests.trainer.fully_async.conftest import small_overrides
from verl.trainer.config import load_config
from verl.utils.config import ConfigError
from verl.utils.tracking import read_metrics

REWARD_FILE = textwrap.dedent('''
    def compute_score(data_source, solution_str, ground_truth, extra_info=None, bonus=0.0):
        well_formed = isinstance(ground_truth, dict) and "target" in ground_truth and "split" in extra_info
        return {"score": bonus + (0.25 if data_source == "my_secret_task" else 0.0),
                "well_formed": well_formed, "length": len(solution_str), "pred": solution_str}
''')


def test_missing_file_or_function_fails_at_config_validation(tmp_path):
    missing = tmp_path / "no_reward.py"
    with pytest.raises(ConfigError) as info:
        load_config([f"custom_reward_function.path={missing}"])
    assert str(missing) in str(info.value) and "compute_score" in str(info.value)
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD_FILE)
    with pytest.raises(ConfigError) as info:
        load_config([f"custom_reward_function.path={reward}", "custom_reward_function.name=score"])
    assert info.value.key == "custom_reward_function.name" and str(reward) in str(info.value)
    with pytest.raises(ConfigError, match="reward_kwargs.*path"):
        load_config(["+custom_reward_function.reward_kwargs.bonus=1"])
    config = load_config([f"custom_reward_function.path={reward}", "+custom_reward_function.reward_kwargs.bonus=1"])
    assert config.custom_reward_function.reward_kwargs == {"bonus": 1}


@pytest.mark.slow
def test_main_ppo_trains_with_a_custom_reward_file(pipeline_assets, tmp_path):
    reward = tmp_path / "my_reward.py"
    reward.write_text(REWARD_FILE)
    # A data source no built-in rule knows: accepted, because the custom function scores everything.
    train = tmp_path / "secret.parquet"
    pd.read_parquet(pipeline_assets["train"]).assign(data_source="my_secret_task").to_parquet(train)
    run_dir = tmp_path / "run"
    overrides = small_overrides(pipeline_assets, run_dir, "trainer.total_training_steps=2",
                                f"trainer.cache_dir={tmp_path / 'cache'}", f"data.train_files=[{train}]",
                                f"custom_reward_function.path={reward}",
                                "+custom_reward_function.reward_kwargs.bonus=0.5")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-m", "verl.trainer.main_ppo", *overrides], cwd=Path(__file__).parents[2],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = {record["step"]: record for record in read_metrics(run_dir)}
    assert sorted(metrics) == [1, 2]
    for step in (1, 2):
        record = metrics[step]
        assert record["batch/score/mean"] == pytest.approx(0.75)  # 0.25 for the source + bonus 0.5
        assert record["reward/extra/well_formed/mean"] == 1.0
        assert record["reward/extra/length/mean"] > 0
        assert "reward/extra/pred/mean" not in record
        assert record["reward/num_errors"] == 0 and record["reward/num_timeouts"] == 0
    # Validation (countdown_lenient rows) is scored by the same function: the bonus only.
    assert metrics[2]["val/greedy_acc"] == pytest.approx(0.5)
