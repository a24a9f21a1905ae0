"""RolloutConfig validation, its SamplingParams, and the engine factory."""

from __future__ import annotations

import pytest
import torch
import transformers
from omegaconf import OmegaConf

from verl.utils.config import ConfigError
from verl.workers.rollout import RolloutConfig, TorchRolloutEngine, ValKwargs, build_rollout_engine

torch.set_num_threads(1)


def test_defaults_validate_and_validation_is_greedy():
    config = RolloutConfig()
    config.validate("rollout")
    assert (config.val_kwargs.temperature, config.val_kwargs.top_p, config.val_kwargs.top_k,
            config.val_kwargs.n) == (0.0, 1.0, -1, 1)
    assert config.val_kwargs.mean_at_n_temperature == 1.0


@pytest.mark.parametrize("overrides,key", [
    ({"name": "sglang"}, "rollout.name"),
    ({"temperature": -0.1}, "rollout.temperature"),
    ({"top_p": 0.0}, "rollout.top_p"),
    ({"top_p": 1.5}, "rollout.top_p"),
    ({"top_k": 0}, "rollout.top_k"),
    ({"n": 0}, "rollout.n"),
    ({"max_new_tokens": 0}, "rollout.max_new_tokens"),
    ({"max_batch_size": 0}, "rollout.max_batch_size"),
    ({"max_new_tokens": 512, "max_seq_len": 512}, "rollout.max_seq_len"),
    ({"stop_strings": [""]}, "rollout.stop_strings"),
    ({"val_kwargs": ValKwargs(n=0)}, "rollout.val_kwargs.n"),
    ({"val_kwargs": ValKwargs(mean_at_n_samples=-1)}, "rollout.val_kwargs.mean_at_n_samples"),
    ({"val_kwargs": ValKwargs(mean_at_n_temperature=0.0)}, "rollout.val_kwargs.mean_at_n_temperature"),
])
def test_invalid_values_name_their_key(overrides, key):
    with pytest.raises(ConfigError) as error:
        RolloutConfig(**overrides).validate("rollout")
    assert error.value.key == key


def test_sampling_params_follow_the_config():
    config = RolloutConfig(temperature=0.9, top_p=0.7, top_k=20, max_new_tokens=33, stop_strings=["</answer>"],
                           val_kwargs=ValKwargs(temperature=0.8, top_p=0.7, mean_at_n_samples=4))
    train = config.sampling_params(stop_token_ids=(1,))
    assert (train.temperature, train.top_p, train.top_k, train.max_new_tokens) == (0.9, 0.7, 20, 33)
    assert train.stop_token_ids == (1,) and train.stop_strings == ("</answer>",)
    val = config.val_sampling_params()
    assert (val.temperature, val.top_p, val.top_k) == (0.8, 0.7, -1)
    mean_at_n = config.val_sampling_params(mean_at_n=True)
    assert (mean_at_n.temperature, mean_at_n.top_p, mean_at_n.top_k) == (1.0, 1.0, -1)


def test_factory_builds_torch_engine_and_validates_first():
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64)).eval()
    engine = build_rollout_engine(RolloutConfig(max_batch_size=3, max_seq_len=40, max_new_tokens=8, seed=5),
                                  model, None)
    assert isinstance(engine, TorchRolloutEngine)
    assert (engine.max_batch_size, engine.max_seq_len, engine.version) == (3, 40, 0)
    with pytest.raises(ConfigError):
        build_rollout_engine(RolloutConfig(top_p=2.0), model, None)


def test_command_line_overrides_reach_the_dataclass():
    merged = OmegaConf.merge(OmegaConf.structured(RolloutConfig), OmegaConf.from_dotlist(
        ["name=torch", "n=8", "stop_strings=[</answer>]", "val_kwargs.mean_at_n_samples=4", "val_kwargs.top_p=0.7"]))
    config = OmegaConf.to_object(merged)
    config.validate("rollout")
    assert (config.n, config.stop_strings) == (8, ["</answer>"])
    assert (config.val_kwargs.mean_at_n_samples, config.val_kwargs.top_p) == (4, 0.7)
