"""The ``async_training`` config section: defaults, and bad values rejected at start-up naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from verl.trainer.config import register_configs, to_trainer_config
from verl.utils.config import ConfigError

CONFIG_DIR = str(Path(__file__).resolve().parents[3] / "configs")
register_configs()


def load(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return to_trainer_config(compose(config_name="ppo_trainer", overrides=list(overrides)))


def test_defaults_are_synchronous_and_sized_by_k():
    at = load().async_training
    assert at.k == 0 and at.trigger_parameter_sync_step == 1 and not at.partial_rollout
    assert at.threads_per_worker(2) == 2  # phases alternate: each may use both cores
    at = load("async_training.k=4", "data.train_batch_size=16").async_training
    assert at.queue_capacity(16) == 5 * 16 and at.threads_per_worker(2) == 1


@pytest.mark.parametrize("overrides, key, fragment", [
    (["async_training.k=-1"], "async_training.k", ">= 0"),
    (["async_training.k=1", "async_training.trigger_parameter_sync_step=3"],
     "async_training.trigger_parameter_sync_step", "k + 1 = 2"),
    (["async_training.num_rollout_replicas=0"], "async_training.num_rollout_replicas", "> 0"),
    (["async_training.k=2", "async_training.queue_max_groups=20"], "async_training.queue_max_groups", "48"),
    (["async_training.require_batches=0"], "async_training.require_batches", "> 0"),
])
def test_invalid_async_values_name_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as err:
        load(*overrides)
    assert err.value.key == key and fragment in str(err.value)


def test_require_batches_scales_the_trainer_batch():
    # 2 x 16 prompts x 8 responses = 256 trajectories: a mini-batch of 96 does not divide it.
    with pytest.raises(ConfigError) as err:
        load("async_training.require_batches=2", "actor.ppo_mini_batch_size=96")
    assert err.value.key == "actor.ppo_mini_batch_size"
    assert load("async_training.require_batches=2").async_training.groups_per_step(16) == 32
