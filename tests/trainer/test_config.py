"""Start-up validation: the composed config is the CPU default, overrides in veRL's spelling reach
the typed config, and bad configs fail before anything starts, naming the key and value."""

from __future__ import annotations

import pytest

from verl.trainer.config import TrainerConfig, load_config
from verl.trainer.main_ppo import check_model_layout, prepare_model
from verl.utils.config import ConfigError, UnknownKeyError

ARR = "actor_rollout_ref"


def test_a_bare_trainer_config_validates():
    config = TrainerConfig().validate()
    # The rollout lengths are derived from the data section, never typed twice.
    assert config.rollout_engine.prompt_length == config.data.max_prompt_length
    assert config.rollout_engine.response_length == config.data.max_response_length


def test_default_config_is_the_cpu_countdown_run():
    config = load_config()
    assert config.model.path == "preset:tiny" and config.model.warm_start.enable
    assert [p.endswith("countdown/train.parquet") for p in config.data.train_files] == [True]
    assert config.algorithm.adv_estimator == "grpo"
    assert config.data.train_batch_size == config.prompts_per_step == 16 and config.rollout_engine.n == 8
    assert config.async_training.k == 0 and not config.async_training.partial_rollout
    spec = config.policy_loss_spec()
    assert (spec.mode, spec.tis_level, spec.tis_cap) == ("bypass", "sequence", 8.0)
    update = config.policy_update_config()
    # The user's mini-batch counts prompts; the actor's counts trajectories.
    assert config.actor.ppo_mini_batch_size == 16 and update.ppo_mini_batch_size == 16 * 8
    assert not update.recompute_old_log_prob
    assert not update.ess_scaling.enable and not update.grad_baselining.enable
    assert config.trajectories_per_step % update.ppo_mini_batch_size == 0


def test_vcpo_method_turns_on_ess_scaling_and_opob_at_lag_k():
    config = load_config(["method=vcpo", "async_training.staleness_threshold=4"])
    assert config.async_training.k == 4 and config.async_training.partial_rollout
    update = config.policy_update_config()
    assert update.ess_scaling.enable and update.ess_scaling.scaling_rule == "sqrt"
    assert update.grad_baselining.enable and update.grad_baselining.scope == "group"
    assert update.grad_baselining.norm_by_std
    assert (update.policy_loss.mode, update.policy_loss.tis_level, update.policy_loss.tis_cap) == (
        "bypass", "sequence", 8.0)


def test_overrides_reach_the_typed_config():
    config = load_config([f"{ARR}.actor.optim.lr=3e-5", f"{ARR}.rollout.n=4", f"{ARR}.actor.ppo_mini_batch_size=16",
                          f"+{ARR}.actor.optim.weight_decay=0.1"])
    assert config.actor.optim.lr == pytest.approx(3e-5)
    # ``+key`` on a key the schema defines sets it (the release's scripts spell some keys that way).
    assert config.actor.optim.weight_decay == pytest.approx(0.1)
    assert config.rollout_engine.n == 4
    assert config.policy_update_config().ppo_mini_batch_size == 16 * 4


@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        ([f"{ARR}.rollout.n=1"], f"{ARR}.rollout.n", ">= 2"),
        ([f"{ARR}.actor.optim.lr=-1e-4"], f"{ARR}.actor.optim.lr", "greater than or equal to 0"),
        (["trainer.n_gpus_per_node=3"], f"{ARR}.actor.ppo_mini_batch_size", "n_gpus_per_node=3"),
        ([f"{ARR}.actor.ppo_mini_batch_size=12"], "data.train_batch_size", "ppo_mini_batch_size=12"),
        (["algorithm.adv_estimator=ppo_gae"], "algorithm.adv_estimator", "grpo"),
        ([f"{ARR}.actor.loss_agg_mode=mean"], f"{ARR}.actor.loss_agg_mode", "seq-mean-token-mean"),
        (["data.max_response_length=0"], "data.max_response_length", "greater than 0"),
        (["data.train_batch_size=many"], "data.train_batch_size", "valid integer"),
        # The list item is the bad value: pydantic names its index.
        (["trainer.logger=[console,mlflow]"], "trainer.logger.1", "jsonl"),
        (["trainer.val_only=true", "data.val_files=[]"], "trainer.val_only", "data.val_files"),
        (["algorithm.use_kl_in_reward=true", "algorithm.kl_penalty=full"], "algorithm.kl_penalty", "low_var_kl"),
        ([f"{ARR}.actor.use_kl_loss=true", f"{ARR}.ref.log_prob_use_dynamic_bsz=true"],
         f"{ARR}.ref.log_prob_use_dynamic_bsz", "log_prob_micro_batch_size_per_gpu"),
    ],
)
def test_invalid_values_name_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert err.value.key == key
    assert fragment in str(err.value)


@pytest.mark.parametrize("override, suggestion", [
    (f"{ARR}.actor.optim.learning_rate=1e-4", f"{ARR}.actor.optim.lr"),
    (f"+{ARR}.actor.optim.learning_rate=1e-4", f"{ARR}.actor.optim.lr"),
    # An old key from before the move to veRL's tree points at its new home.
    ("actor.optim.lr=1e-4", f"{ARR}.actor.optim.lr"),
    ("+actor.optim.lr=1e-4", f"{ARR}.actor.optim.lr"),
])
def test_unknown_key_fails_with_a_suggestion(override, suggestion):
    with pytest.raises(UnknownKeyError) as err:
        load_config([override])
    assert err.value.key == override.lstrip("+").split("=")[0]
    assert suggestion in err.value.suggestions
    assert "did you mean" in str(err.value) and suggestion in str(err.value)


def test_open_mappings_take_new_sub_keys():
    config = load_config(["+ray_kwargs.ray_init.runtime_env.env_vars.FOO=bar"])
    assert config.ray_kwargs.ray_init.runtime_env == {"env_vars": {"FOO": "bar"}}


def test_rollout_lengths_are_derived_from_the_data_section():
    config = load_config(["data.max_prompt_length=40", "data.max_response_length=24"])
    assert (config.rollout_engine.prompt_length, config.rollout_engine.response_length) == (40, 24)
    assert config.rollout_engine.max_new_tokens == 24 and config.rollout_engine.max_seq_len == 64
    # Setting the derived key to the same value is harmless; a different one is refused.
    assert load_config([f"{ARR}.rollout.prompt_length=32"]).rollout_engine.prompt_length == 32
    with pytest.raises(ConfigError) as err:
        load_config([f"{ARR}.rollout.prompt_length=64"])
    assert err.value.key == f"{ARR}.rollout.prompt_length" and "data.max_prompt_length=32" in str(err.value)
    # The engine may hold longer sequences, never shorter ones.
    assert load_config([f"{ARR}.rollout.max_model_len=96"]).rollout_engine.max_seq_len == 96
    with pytest.raises(ConfigError) as err:
        load_config([f"{ARR}.rollout.max_model_len=40"])
    assert err.value.key == f"{ARR}.rollout.max_model_len" and "= 48" in str(err.value)


def test_megatron_sizes_are_checked_against_the_actor_world_before_ray_starts():
    megatron = (f"{ARR}.actor.strategy=megatron", f"{ARR}.actor.megatron.tensor_model_parallel_size=2")
    # 4 ranks at TP = 2 leave 2 data-parallel ranks: a mini-batch of 16 x 8 = 128 trajectories splits.
    config = load_config([*megatron, "trainer.n_gpus_per_node=4"])
    assert config.actor.megatron.data_parallel_size(4) == 2 == config.data_parallel_size
    with pytest.raises(ConfigError) as err:
        load_config([*megatron, "trainer.n_gpus_per_node=3"])
    assert err.value.key == "trainer.n_gpus_per_node" and "tp*pp*cp" in str(err.value)
    # Only data-parallel ranks split the batch: 6 ranks at TP = 2 are 3 DP ranks, and 128 % 3 != 0.
    with pytest.raises(ConfigError, match="data-parallel size") as err:
        load_config([*megatron, "trainer.n_gpus_per_node=6"])
    assert err.value.key == f"{ARR}.actor.ppo_mini_batch_size"
    # The torch actor would accept 2 ranks for the same batch: the DP size, not the world, decides.
    load_config(["trainer.n_gpus_per_node=2"])


def test_megatron_tp_against_the_model_heads_fails_before_ray(tmp_path):
    # The tiny preset has 4 attention heads and 2 KV heads: TP = 4 splits the heads, not the KV heads.
    config = load_config([f"{ARR}.actor.strategy=megatron", f"{ARR}.actor.megatron.tensor_model_parallel_size=4",
                          "trainer.n_gpus_per_node=4", f"{ARR}.model.warm_start.enable=false",
                          f"trainer.cache_dir={tmp_path / 'cache'}"])
    model_path = prepare_model(config)
    with pytest.raises(ConfigError) as err:
        check_model_layout(config, model_path)
    assert err.value.key == f"{ARR}.actor.megatron.tensor_model_parallel_size" and err.value.value == 4
    assert "num_key_value_heads=2" in str(err.value)
    # TP = 2 divides both: the layout passes.
    ok = load_config([f"{ARR}.actor.strategy=megatron", f"{ARR}.actor.megatron.tensor_model_parallel_size=2",
                      "trainer.n_gpus_per_node=2", f"{ARR}.model.warm_start.enable=false"])
    check_model_layout(ok, model_path)
