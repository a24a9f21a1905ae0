"""Build this pipeline stage's Megatron-Core GPTModel from an HF config and run its forward (Megatron actor).

Data flow: HF config + ``ParallelGroups`` -> ``build_gpt_model`` -> ``load_hf_weights`` ->
``model_forward_logits`` -> vocab-parallel log-probs in the actor.
"""

from __future__ import annotations

from typing import Any

import torch

from verl.models.mcore.config import hf_rope_theta, hf_to_transformer_config
from verl.utils.megatron.cpu_compat import (
    ContextParallelCoreAttention,
    SequenceParallelRMSNorm,
    cpu_compat_active,
)
from verl.utils.megatron.parallel import MegatronParallelConfig, ParallelGroups


def gpt_layer_spec(config: Any, num_local_layers: int) -> Any:
    """A transformer-block spec for ``num_local_layers`` layers: Megatron's local GPT layer with our RMSNorm.

    The norm is ``SequenceParallelRMSNorm`` (HF's formula, SP-capable) for the two per-layer norms
    and the final norm; under context parallelism on CPU the core attention is the all-gather
    implementation, because Megatron's local attention requires Transformer Engine for CP.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    layer.submodules.input_layernorm = SequenceParallelRMSNorm
    layer.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    if config.context_parallel_size > 1 and cpu_compat_active():
        layer.submodules.self_attention.submodules.core_attention = ContextParallelCoreAttention
    return TransformerBlockSubmodules(layer_specs=[layer] * num_local_layers, layer_norm=SequenceParallelRMSNorm)


def build_gpt_model(hf_config: Any, parallel: MegatronParallelConfig, groups: ParallelGroups,
                    params_dtype: torch.dtype = torch.float32) -> Any:
    """The GPTModel holding this rank's pipeline stage and tensor shards (call after ``initialize_megatron``).

    pre_process (embedding) on the first stage, post_process (final norm + output layer) on the
    last; the stage owns layers [pp_rank * L/pp, (pp_rank + 1) * L/pp). Output and input
    embeddings are shared when the HF model ties them (with PP > 1 the last stage keeps its own
    copy of the embedding as ``output_layer.weight``, kept equal by all-reducing its gradient with
    the first stage over ``groups.embedding``). Logits stay vocab-parallel (parallel_output).
    """
    from megatron.core.models.gpt import GPTModel

    config = hf_to_transformer_config(hf_config, parallel, params_dtype)
    num_local_layers = config.num_layers // groups.pp_size
    return GPTModel(
        config=config,
        transformer_layer_spec=gpt_layer_spec(config, num_local_layers),
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
        position_embedding_type="rope",
        rotary_base=hf_rope_theta(hf_config),
    )


def model_forward_logits(model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """One forward of a (stage of a) GPTModel with causal attention and no padding mask.

    ``input_ids``/``position_ids`` are [b, s] (s a multiple of tp under SP; under CP this rank's
    two load-balanced chunks, s = S / cp). RoPE positions come from the token's index in the
    sequence, not from ``position_ids`` (which only learned absolute embeddings read), so rows
    must be left-aligned (``verl.utils.megatron.batch.left_align``).
    Returns on the last stage the vocab-parallel logits [b, s, V / tp] (fp32 for fp32 params;
    SP is gathered back before the output layer, so s is this rank's full local length). On
    any other stage it returns the hidden states [s', b, h] for the next stage (s' = s / tp
    under SP); on stages after the first, the input comes from ``model.set_input_tensor``, as
    Megatron's pipeline schedules do.
    """
    return model(input_ids=input_ids, position_ids=position_ids, attention_mask=None)
