"""HF config -> Megatron-Core TransformerConfig for Qwen2/Llama-architecture models (Megatron actor set-up).

Data flow: model directory (HF config) -> ``hf_to_transformer_config`` -> ``build_gpt_model`` ->
Megatron actor. Anything the conversion cannot reproduce exactly is rejected with a
``ValueError`` naming the HF field, so the Megatron actor never silently computes a different
model than the rollout engines.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from verl.utils.megatron.parallel import MegatronParallelConfig

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("qwen2", "llama")


def _rope_parameters(hf_config: Any) -> dict:
    # transformers >= 5 keeps rope settings in `rope_parameters`; older configs use
    # `rope_theta` and `rope_scaling`.
    params = getattr(hf_config, "rope_parameters", None)
    if params:
        return dict(params)
    legacy = dict(getattr(hf_config, "rope_scaling", None) or {})
    legacy.setdefault("rope_type", legacy.get("type", "default"))
    legacy.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return legacy


def hf_rope_theta(hf_config: Any) -> float:
    """The rotary base of a plain (unscaled) RoPE model."""
    return float(_rope_parameters(hf_config)["rope_theta"])


def hf_head_dim(hf_config: Any) -> int:
    """Per-head channels: ``head_dim`` when the config sets it, else hidden_size / num_attention_heads."""
    return int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads)


def hf_has_qkv_bias(hf_config: Any) -> bool:
    """Qwen2 always has q/k/v biases; Llama only with ``attention_bias`` (which is refused, see below)."""
    return hf_config.model_type == "qwen2"


def check_supported_hf_config(hf_config: Any) -> None:
    """Raise ``ValueError`` naming the field when the HF model is not one Megatron's GPT layer reproduces."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r}: the Megatron actor supports {SUPPORTED_MODEL_TYPES}")
    rope = _rope_parameters(hf_config)
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters.rope_type={rope.get('rope_type')!r}: only 'default' (unscaled RoPE) "
                         "is converted; scaled RoPE would change the positions Megatron computes")
    if getattr(hf_config, "use_sliding_window", False):
        raise ValueError("use_sliding_window=True: Megatron's local attention here is full causal attention")
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ValueError(f"layer_types={layer_types!r}: only 'full_attention' layers are supported")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf_config.hidden_act!r}: only 'silu' (SwiGLU MLP) is supported")
    # Llama's attention_bias also puts a bias on o_proj and mlp_bias on every MLP linear;
    # Megatron ties those to add_bias_linear (all linears), which would not match HF.
    if getattr(hf_config, "attention_bias", False) and model_type == "llama":
        raise ValueError("attention_bias=True: Llama's o_proj bias has no exact Megatron counterpart")
    if getattr(hf_config, "mlp_bias", False):
        raise ValueError("mlp_bias=True: MLP biases are not converted")
    if hf_head_dim(hf_config) * hf_config.num_attention_heads != hf_config.hidden_size and model_type == "qwen2":
        raise ValueError(f"head_dim={hf_head_dim(hf_config)}: Qwen2 needs head_dim * num_attention_heads == hidden_size")


def hf_to_transformer_config(hf_config: Any, parallel: MegatronParallelConfig,
                             params_dtype: torch.dtype = torch.float32) -> Any:
    """A ``TransformerConfig`` with the HF model's architecture and this run's parallel layout.

    RMSNorm with the HF epsilon, SwiGLU (gated_linear_unit, silu; fc1 = [gate; up]), grouped-query
    attention (num_query_groups = num_key_value_heads), q/k/v bias for Qwen2, no dropout (the
    HF config's attention_dropout is 0 for these models and RL log-probs must be deterministic),
    fusions off, and CPU initialisation on a CPU machine (weights are loaded from HF afterwards).
    The rotary base and embedding tying are GPTModel arguments, set by ``build_gpt_model``.
    """
    from megatron.core.transformer import TransformerConfig

    check_supported_hf_config(hf_config)
    parallel.validate("actor.megatron", hf_config=hf_config)
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
        kv_channels=hf_head_dim(hf_config),
        ffn_hidden_size=hf_config.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=hf_has_qkv_bias(hf_config),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        # Fusions stay off everywhere: they are untested here and the actor must equal the HF model.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
