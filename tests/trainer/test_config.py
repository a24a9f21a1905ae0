"""Start-up validation: bad configs fail before anything starts, naming the key and value."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf.errors import ConfigKeyError, ValidationError

from verl.trainer.config import register_configs, to_trainer_config
from verl.utils.config import ConfigError

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")
register_configs()


def load(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=list(overrides))
    return to_trainer_config(cfg)


def test_default_config_is_valid_and_typed():
    config = load()
    assert config.algorithm.adv_estimator == "grpo"
    assert config.rollout.n >= 2
    assert config.data.train_batch_size * config.rollout.n % config.actor.ppo_mini_batch_size == 0


def test_overrides_reach_the_typed_config():
    config = load("actor.optim.lr=3e-5", "rollout.n=4", "actor.ppo_mini_batch_size=64")
    assert config.actor.optim.lr == pytest.approx(3e-5)
    assert config.rollout.n == 4


@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        (["rollout.n=1"], "rollout.n", ">= 2"),
        (["actor.optim.lr=-1e-4"], "actor.optim.lr", ">= 0"),
        (["trainer.actor_world_size=3"], "actor.ppo_mini_batch_size", "actor_world_size=3"),
        (["algorithm.adv_estimator=ppo_gae"], "algorithm.adv_estimator", "grpo"),
        (["actor.loss_agg_mode=mean"], "actor.loss_agg_mode", "seq-mean-token-mean"),
        (["data.max_response_length=0"], "data.max_response_length", "> 0"),
        (["trainer.logger=[console,mlflow]"], "trainer.logger", "jsonl"),
    ],
)
def test_invalid_values_name_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as err:
        load(*overrides)
    assert err.value.key == key
    assert fragment in str(err.value)


def test_unknown_key_fails_in_hydra():
    with pytest.raises((ConfigKeyError, ValidationError, Exception)) as err:
        load("actor.optim.learning_rate=1e-4")
    assert "learning_rate" in str(err.value)


def test_wrong_type_fails_in_hydra():
    with pytest.raises(Exception) as err:
        load("data.train_batch_size=many")
    assert "train_batch_size" in str(err.value)


def test_megatron_sizes_are_checked_against_the_actor_world_before_ray_starts():
    megatron = ("actor.strategy=megatron", "actor.megatron.tensor_model_parallel_size=2")
    # 4 ranks at TP = 2 leave 2 data-parallel ranks: a mini-batch of 128 splits, one of 8 x 8 groups too.
    config = load(*megatron, "trainer.actor_world_size=4")
    assert config.actor.megatron.data_parallel_size(4) == 2
    with pytest.raises(ConfigError) as err:
        load(*megatron, "trainer.actor_world_size=3")
    assert err.value.key == "trainer.actor_world_size" and "tp*pp*cp" in str(err.value)
    # Only data-parallel ranks split the batch: 6 ranks at TP = 2 are 3 DP ranks, and 128 % 3 != 0.
    with pytest.raises(ConfigError, match="data-parallel size") as err:
        load(*megatron, "trainer.actor_world_size=6")
    assert err.value.key == "actor.ppo_mini_batch_size"
    # The torch actor would accept 2 ranks for the same batch: the DP size, not the world, decides.
    load("trainer.actor_world_size=2")
