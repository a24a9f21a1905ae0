"""The ``async_training`` config section: defaults, the release's batch mode, and bad values
rejected at start-up naming the key."""

from __future__ import annotations

import pytest

from verl.trainer.config import load_config
from verl.utils.config import ConfigError


def test_defaults_are_synchronous_and_sized_by_k():
    at = load_config().async_training
    assert at.k == 0 and at.trigger_parameter_sync_step == 1 and not at.partial_rollout
    assert at.threads_per_worker(2) == 2  # phases alternate: each may use both cores
    at = load_config(["async_training.staleness_threshold=4", "data.train_batch_size=16"]).async_training
    assert at.queue_capacity(16) == 5 * 16 and at.threads_per_worker(2) == 1


def test_staleness_threshold_is_a_whole_number_of_versions():
    assert load_config(["async_training.staleness_threshold=2.0"]).async_training.k == 2
    # veRL's fractional sample budget bounds no trajectory's lag: refused.
    with pytest.raises(ConfigError) as err:
        load_config(["async_training.staleness_threshold=0.5"])
    assert err.value.key == "async_training.staleness_threshold" and "whole number" in str(err.value)


@pytest.mark.parametrize("overrides, key, fragment", [
    (["async_training.staleness_threshold=-1"], "async_training.staleness_threshold", "greater than or equal to 0"),
    (["async_training.staleness_threshold=1", "async_training.trigger_parameter_sync_step=3"],
     "async_training.trigger_parameter_sync_step", "staleness_threshold + 1 = 2"),
    (["rollout.n_gpus_per_node=0"], "rollout.n_gpus_per_node", "greater than 0"),
    (["async_training.staleness_threshold=2", "async_training.queue_max_groups=20"],
     "async_training.queue_max_groups", "48"),
    (["async_training.require_batches=0"], "async_training.require_batches", "greater than 0"),
    # require_batches counts mini-batches only in the release's mode (data.train_batch_size=0).
    (["async_training.require_batches=2"], "async_training.require_batches", "data.train_batch_size=0"),
    (["async_training.skip_recompute_old_log_prob=true", "async_training.compute_prox_log_prob=true"],
     "async_training.compute_prox_log_prob", "contradicts"),
])
def test_invalid_async_values_name_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert err.value.key == key and fragment in str(err.value)


def test_release_batch_mode_sizes_the_step_by_require_batches():
    # data.train_batch_size=0: a step is require_batches mini-batches of ppo_mini_batch_size prompts.
    config = load_config(["data.train_batch_size=0", "async_training.require_batches=2"])
    assert config.prompts_per_step == 2 * 16 and config.trajectories_per_step == 2 * 16 * 8
    assert config.async_training.queue_capacity(config.prompts_per_step) == 32
    config = load_config(["data.train_batch_size=0", "async_training.require_batches=3",
                          "actor_rollout_ref.actor.ppo_mini_batch_size=4", "async_training.staleness_threshold=2"])
    assert config.prompts_per_step == 12 and config.async_training.queue_capacity(12) == 3 * 12
    # With an explicit batch the step is that many prompts, and it must split into whole mini-batches.
    assert load_config(["data.train_batch_size=32"]).prompts_per_step == 32
    with pytest.raises(ConfigError) as err:
        load_config(["data.train_batch_size=24"])
    assert err.value.key == "data.train_batch_size"
