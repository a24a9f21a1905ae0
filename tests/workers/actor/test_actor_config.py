"""Actor config validation: a bad value raises ConfigError naming its full key; Hydra takes the schema."""

import pytest
from omegaconf import OmegaConf

from verl.utils.config import ConfigError
from verl.workers.actor.config import ActorConfig, OptimConfig, PolicyLossConfig


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
        ({"policy_loss": PolicyLossConfig(mode="gspo")}, "actor.policy_loss.mode"),
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
