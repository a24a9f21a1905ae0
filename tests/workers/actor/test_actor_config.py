"""Actor config validation: a bad value raises ConfigError naming its full key; Hydra takes the schema."""

import pytest
from omegaconf import OmegaConf

from verl.utils.config import ConfigError
from verl.workers.actor.config import ActorConfig, OptimConfig, PolicyLossConfig
from verl.workers.utils.vcpo import ESSScalingConfig, GradBaseliningConfig


def test_defaults_are_valid_and_hydra_structured():
    ActorConfig().validate("actor")
    merged = OmegaConf.merge(
        OmegaConf.structured(ActorConfig),
        OmegaConf.create(
            {"optim": {"betas": [0.8, 0.95]}, "policy_loss": {"clip_ratio_c": None, "mode": "bypass"}}
        ),
    )
    config = OmegaConf.to_object(merged)
    assert config.optim.betas == [0.8, 0.95] and config.policy_loss.clip_ratio_c is None
    config.validate("actor")


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"strategy": "fsdp9"}, "actor.strategy"),
        ({"ppo_mini_batch_size": 0}, "actor.ppo_mini_batch_size"),
        ({"ppo_micro_batch_size_per_gpu": -2}, "actor.ppo_micro_batch_size_per_gpu"),
        ({"ppo_epochs": 0}, "actor.ppo_epochs"),
        ({"loss_agg_mode": "mean"}, "actor.loss_agg_mode"),
        ({"grad_clip": 0.0}, "actor.grad_clip"),
        ({"entropy_coeff": -0.1}, "actor.entropy_coeff"),
        ({"policy_loss": PolicyLossConfig(mode="reinforce")}, "actor.policy_loss.mode"),
        ({"policy_loss": PolicyLossConfig(clip_ratio_low=1.5)}, "actor.policy_loss.clip_ratio_low"),
        ({"policy_loss": PolicyLossConfig(clip_ratio_high=-0.1)}, "actor.policy_loss.clip_ratio_high"),
        ({"policy_loss": PolicyLossConfig(clip_ratio_c=1.0)}, "actor.policy_loss.clip_ratio_c"),
        ({"policy_loss": PolicyLossConfig(tis_level="segment")}, "actor.policy_loss.tis_level"),
        ({"policy_loss": PolicyLossConfig(tis_cap=0.0)}, "actor.policy_loss.tis_cap"),
        ({"optim": OptimConfig(lr=-1e-4)}, "actor.optim.lr"),
        ({"optim": OptimConfig(betas=[0.9])}, "actor.optim.betas"),
        ({"optim": OptimConfig(betas=[0.9, 1.0])}, "actor.optim.betas"),
        ({"optim": OptimConfig(weight_decay=-0.1)}, "actor.optim.weight_decay"),
        ({"optim": OptimConfig(eps=0.0)}, "actor.optim.eps"),
        ({"optim": OptimConfig(lr_scheduler="step")}, "actor.optim.lr_scheduler"),
        ({"optim": OptimConfig(lr_warmup_steps=-1)}, "actor.optim.lr_warmup_steps"),
        ({"optim": OptimConfig(min_lr_ratio=1.5)}, "actor.optim.min_lr_ratio"),
        ({"optim": OptimConfig(total_training_steps=0)}, "actor.optim.total_training_steps"),
    ],
)
def test_invalid_values_name_their_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        ActorConfig(**overrides).validate("actor")
    assert info.value.key == key
    assert key in str(info.value)
    assert info.value.allowed  # says what would be valid


def test_vcpo_keys_merge_from_hydra_overrides():
    merged = OmegaConf.merge(
        OmegaConf.structured(ActorConfig),
        OmegaConf.from_dotlist([
            "ess_scaling.enable=true", "ess_scaling.scaling_rule=linear", "ess_scaling.base_ess_ratio=0.55",
            "ess_scaling.use_clipped=true", "grad_baselining.enable=true", "grad_baselining.scope=minibatch",
            "grad_baselining.agg_mode=median", "grad_baselining.grad_norm_method=per_traj",
            "policy_loss.mode=bypass", "policy_loss.tis_level=sequence",
        ]),
    )
    config = OmegaConf.to_object(merged)
    config.validate("actor")
    assert config.ess_scaling == ESSScalingConfig(True, "linear", 0.55, True)
    assert (config.grad_baselining.scope, config.grad_baselining.agg_mode, config.grad_baselining.grad_norm_method) == (
        "minibatch", "median", "per_traj")
    assert ActorConfig().grad_baselining == GradBaseliningConfig() and not ActorConfig().ess_scaling.enable


VCPO_LOSS = PolicyLossConfig(mode="bypass", tis_level="sequence")


@pytest.mark.parametrize(
    "overrides,key,names",
    [
        ({"ess_scaling": ESSScalingConfig(scaling_rule="cube")}, "actor.ess_scaling.scaling_rule", "sqrt"),
        ({"ess_scaling": ESSScalingConfig(base_ess_ratio=0.0)}, "actor.ess_scaling.base_ess_ratio", "(0, 1]"),
        ({"ess_scaling": ESSScalingConfig(nonfinite_rule="ignore")}, "actor.ess_scaling.nonfinite_rule", "skip"),
        ({"grad_baselining": GradBaseliningConfig(scope="batch")}, "actor.grad_baselining.scope", "group"),
        ({"grad_baselining": GradBaseliningConfig(grad_norm_method="ghost")},
         "actor.grad_baselining.grad_norm_method", "batched"),
        ({"grad_baselining": GradBaseliningConfig(enable=True)}, "actor.grad_baselining.enable",
         "actor.policy_loss.mode='bypass'"),
        ({"grad_baselining": GradBaseliningConfig(enable=True), "policy_loss": PolicyLossConfig(mode="bypass")},
         "actor.grad_baselining.enable", "actor.policy_loss.tis_level='sequence'"),
        ({"grad_baselining": GradBaseliningConfig(enable=True), "policy_loss": VCPO_LOSS,
          "loss_agg_mode": "token-mean"}, "actor.grad_baselining.enable", "actor.loss_agg_mode"),
        ({"grad_baselining": GradBaseliningConfig(enable=True), "policy_loss": VCPO_LOSS, "entropy_coeff": 0.01},
         "actor.grad_baselining.enable", "actor.entropy_coeff"),
    ],
)
def test_invalid_vcpo_settings_name_their_keys(overrides, key, names):
    with pytest.raises(ConfigError) as info:
        ActorConfig(**overrides).validate("actor")
    assert info.value.key == key and names in str(info.value)


def test_vcpo_recipe_settings_are_valid():
    ActorConfig(policy_loss=VCPO_LOSS, ess_scaling=ESSScalingConfig(enable=True),
                grad_baselining=GradBaseliningConfig(enable=True)).validate("actor")
