import pytest
import torch

from verl.models import tiny_qwen2_config
from verl.utils.config import ConfigError
from verl.utils.megatron.parallel import MegatronParallelConfig

torch.set_num_threads(1)


def test_data_parallel_size_is_world_over_tp_pp_cp():
    cfg = MegatronParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, context_parallel_size=2)
    assert cfg.data_parallel_size(16) == 2
    assert MegatronParallelConfig().data_parallel_size(4) == 4


@pytest.mark.parametrize("fields, world_size, key", [
    ({"tensor_model_parallel_size": 0}, None, "actor.megatron.tensor_model_parallel_size"),
    ({"sequence_parallel": True}, None, "actor.megatron.sequence_parallel"),
    ({"tensor_model_parallel_size": 2, "context_parallel_size": 2}, 6, "trainer.actor_world_size"),
    ({"tensor_model_parallel_size": 4}, None, "model.num_key_value_heads"),  # tiny: 4 heads, 2 KV heads
    ({"tensor_model_parallel_size": 8}, None, "model.num_attention_heads"),
    ({"pipeline_model_parallel_size": 3}, None, "model.num_hidden_layers"),
])
def test_validate_names_the_offending_key(fields, world_size, key):
    with pytest.raises(ConfigError) as err:
        MegatronParallelConfig(**fields).validate("actor.megatron", world_size=world_size,
                                                  hf_config=tiny_qwen2_config(112))
    assert err.value.key == key


def test_validate_refuses_a_vocab_that_tp_does_not_divide():
    cfg = MegatronParallelConfig(tensor_model_parallel_size=2)
    with pytest.raises(ConfigError) as err:
        cfg.validate("actor.megatron", hf_config=tiny_qwen2_config(111))
    assert err.value.key == "model.vocab_size"
    cfg.validate("actor.megatron", world_size=4, hf_config=tiny_qwen2_config(112))
