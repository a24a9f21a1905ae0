import pytest
import torch

from verl.models import tiny_qwen2_config
from verl.utils.config import ConfigError, build_config
from verl.utils.megatron.parallel import MegatronParallelConfig

torch.set_num_threads(1)


def test_data_parallel_size_is_world_over_tp_pp_cp():
    cfg = MegatronParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, context_parallel_size=2)
    assert cfg.data_parallel_size(16) == 2
    assert MegatronParallelConfig().data_parallel_size(4) == 4


@pytest.mark.parametrize("fields, world_size, key, fragment", [
    ({"sequence_parallel": True}, None, "actor.megatron.sequence_parallel", "tensor_model_parallel_size > 1"),
    ({"tensor_model_parallel_size": 2, "context_parallel_size": 2}, 6, "trainer.n_gpus_per_node", "tp*pp*cp"),
    # tiny: 4 heads, 2 KV heads, 2 layers
    ({"tensor_model_parallel_size": 4}, None, "actor.megatron.tensor_model_parallel_size", "num_key_value_heads=2"),
    ({"tensor_model_parallel_size": 8}, None, "actor.megatron.tensor_model_parallel_size", "num_attention_heads=4"),
    ({"pipeline_model_parallel_size": 3}, None, "actor.megatron.pipeline_model_parallel_size", "num_hidden_layers="),
])
def test_validate_names_the_offending_key(fields, world_size, key, fragment):
    with pytest.raises(ConfigError) as err:
        MegatronParallelConfig(**fields).validate("actor.megatron", world_size=world_size,
                                                  hf_config=tiny_qwen2_config(112))
    assert err.value.key == key
    assert fragment in str(err.value)


def test_parallel_sizes_must_be_positive():
    with pytest.raises(ConfigError) as err:
        build_config(MegatronParallelConfig, {"tensor_model_parallel_size": 0})
    assert err.value.key == "tensor_model_parallel_size"


def test_validate_refuses_a_vocab_that_tp_does_not_divide():
    cfg = MegatronParallelConfig(tensor_model_parallel_size=2)
    with pytest.raises(ConfigError) as err:
        cfg.validate("actor.megatron", hf_config=tiny_qwen2_config(111))
    assert err.value.key == "actor.megatron.tensor_model_parallel_size"
    assert "vocab_size=111" in str(err.value)
    cfg.validate("actor.megatron", world_size=4, hf_config=tiny_qwen2_config(112))
