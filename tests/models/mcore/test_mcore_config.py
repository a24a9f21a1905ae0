import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from verl.models import tiny_qwen2_config
from verl.models.mcore.config import check_supported_hf_config, hf_to_transformer_config
from verl.utils.megatron.parallel import MegatronParallelConfig

torch.set_num_threads(1)


def test_transformer_config_carries_the_hf_architecture_and_parallel_layout():
    hf = tiny_qwen2_config(112)
    tc = hf_to_transformer_config(hf, MegatronParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True))
    assert (tc.num_layers, tc.hidden_size, tc.num_attention_heads, tc.num_query_groups) == (4, 128, 4, 2)
    assert (tc.kv_channels, tc.ffn_hidden_size, tc.layernorm_epsilon) == (32, 384, hf.rms_norm_eps)
    assert tc.normalization == "RMSNorm" and tc.gated_linear_unit and tc.activation_func is F.silu
    assert tc.add_qkv_bias and not tc.add_bias_linear
    assert tc.hidden_dropout == 0.0 and tc.attention_dropout == 0.0
    assert tc.tensor_model_parallel_size == 2 and tc.sequence_parallel
    assert tc.params_dtype == torch.float32 and tc.use_cpu_initialization


@pytest.mark.parametrize("config, field", [
    (tiny_qwen2_config(112, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     "rope_parameters.rope_type"),
    (tiny_qwen2_config(112, use_sliding_window=True, sliding_window=8), "use_sliding_window"),
    (tiny_qwen2_config(112, hidden_act="gelu"), "hidden_act"),
    (LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                 attention_bias=True), "attention_bias"),
    (LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, mlp_bias=True),
     "mlp_bias"),
])
def test_unsupported_hf_configs_are_refused_naming_the_field(config, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        check_supported_hf_config(config)


def test_plain_llama_is_accepted_without_qkv_bias():
    llama = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                        num_hidden_layers=2, vocab_size=64)
    tc = hf_to_transformer_config(llama, MegatronParallelConfig())
    assert not tc.add_qkv_bias and tc.num_query_groups == 2 and tc.kv_channels == 16
