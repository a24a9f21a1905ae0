"""HF <-> Megatron-Core weight conversion for Qwen2/Llama (model dir -> Megatron actor -> param sync -> engines).

``load_hf_weights`` gives each rank the shards it owns of an HF state dict; ``export_hf_weights``
reassembles full HF-named tensors on global rank 0 for the rollout engines; the offline model merger
(``verl.model_merger``) reassembles them from checkpoint rank files with the same table and rules
(``hf_counterpart``, ``hf_tensors_from_megatron_shards``, ``complete_hf_state_dict``). Layout facts used:
- linear_qkv rows are grouped per query group g: [q heads of g (n_rep * d), k_g (d), v_g (d)],
  with n_rep = heads / kv_heads; TP rank r owns query groups [r * G/tp, (r+1) * G/tp).
- linear_fc1 on TP rank r is [gate rows of r; up rows of r] (SwiGLU: silu(first half) * second).
- column-parallel weights (qkv, fc1, embedding, output layer) split rows, row-parallel weights
  (linear_proj, fc2) split columns; norms are replicated on every TP rank.
- PP stage s holds HF layers [s * L/pp, (s+1) * L/pp) under local indices 0..L/pp-1.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from verl.models.mcore.config import hf_has_qkv_bias, hf_head_dim
from verl.utils.megatron.parallel import ParallelGroups

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


class StageShard(Protocol):
    """Which tensor-parallel shard and pipeline stage a rank holds. ``ParallelGroups`` is one (live
    ranks); the offline merger describes a checkpoint rank file with another."""

    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int


def hf_state_dict_keys(hf_config: Any) -> list[str]:
    """The keys of ``AutoModelForCausalLM(hf_config).state_dict()`` (lm_head.weight is listed even when tied)."""
    per_layer = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"]
    if hf_has_qkv_bias(hf_config):
        per_layer = ["self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
                     "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias"]
    per_layer += ["self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                  "input_layernorm.weight", "post_attention_layernorm.weight"]
    keys = ["model.embed_tokens.weight"]
    for i in range(hf_config.num_hidden_layers):
        keys += [f"model.layers.{i}.{name}" for name in per_layer]
    return keys + ["model.norm.weight", "lm_head.weight"]


def _attention_shape(hf_config: Any) -> tuple[int, int, int]:
    """(query groups G, query heads per group n_rep, head dim d)."""
    groups = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    return groups, hf_config.num_attention_heads // groups, hf_head_dim(hf_config)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hf_config: Any) -> torch.Tensor:
    """HF q [H*d, ...], k/v [G*d, ...] -> Megatron's fused [G * (n_rep + 2) * d, ...], grouped per query group."""
    groups, n_rep, d = _attention_shape(hf_config)
    tail = q.shape[1:]
    fused = torch.cat([q.reshape(groups, n_rep * d, *tail), k.reshape(groups, d, *tail),
                       v.reshape(groups, d, *tail)], dim=1)
    return fused.reshape(groups * (n_rep + 2) * d, *tail)


def split_qkv(fused: torch.Tensor, hf_config: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_qkv`` for the full (TP-gathered) tensor."""
    groups, n_rep, d = _attention_shape(hf_config)
    tail = fused.shape[1:]
    per_group = fused.reshape(groups, (n_rep + 2) * d, *tail)
    q, k, v = per_group.split([n_rep * d, d, d], dim=1)
    return q.reshape(groups * n_rep * d, *tail), k.reshape(groups * d, *tail), v.reshape(groups * d, *tail)


def _unfuse_fc1(full: torch.Tensor, groups: StageShard) -> tuple[torch.Tensor, torch.Tensor]:
    # TP-gathered rows are [gate_0; up_0; gate_1; up_1; ...] (one pair per TP rank).
    per_rank = full.reshape(groups.tp_size, 2, full.shape[0] // (2 * groups.tp_size), *full.shape[1:])
    return per_rank[:, 0].reshape(-1, *full.shape[1:]), per_rank[:, 1].reshape(-1, *full.shape[1:])


def _shard(full: torch.Tensor, dim: int, groups: StageShard) -> torch.Tensor:
    return full.chunk(groups.tp_size, dim=dim)[groups.tp_rank]


def _hf_layer_index(local_index: int, hf_config: Any, groups: StageShard) -> int:
    return groups.pp_rank * (hf_config.num_hidden_layers // groups.pp_size) + local_index


@dataclass(frozen=True)
class HFCounterpart:
    """Where a Megatron parameter's values live in the HF state dict, and how they are laid out.

    ``layout``: ``replicated`` (same tensor on every TP rank), ``rows`` / ``cols`` (one HF tensor
    split over TP along dim 0 / 1), ``qkv`` (q, k, v fused per query group, then rows),
    ``gate_up`` (gate and up each split over rows, concatenated per TP rank). ``exported`` is false
    for a tied output layer: the embedding already carries those values.
    """

    hf_keys: tuple[str, ...]
    layout: str
    exported: bool = True

    @property
    def tp_dim(self) -> int | None:
        """The dim along which TP shards concatenate (None: replicated, every TP rank holds it whole)."""
        return {"replicated": None, "cols": 1}.get(self.layout, 0)


_LAYER_PARAMS: dict[str, tuple[tuple[str, ...], str]] = {
    "input_layernorm.weight": (("input_layernorm.weight",), "replicated"),
    "pre_mlp_layernorm.weight": (("post_attention_layernorm.weight",), "replicated"),
    "self_attention.linear_qkv.weight": (tuple(f"self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
    "self_attention.linear_qkv.bias": (tuple(f"self_attn.{p}_proj.bias" for p in "qkv"), "qkv"),
    "self_attention.linear_proj.weight": (("self_attn.o_proj.weight",), "cols"),
    "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
    "mlp.linear_fc2.weight": (("mlp.down_proj.weight",), "cols"),
}


def hf_counterpart(name: str, hf_config: Any, groups: StageShard) -> HFCounterpart:
    """The one Megatron -> HF name table, used by ``load_hf_weights``, ``export_hf_weights`` and the
    offline merger (``verl.model_merger``)."""
    if name == "embedding.word_embeddings.weight":
        return HFCounterpart(("model.embed_tokens.weight",), "rows")
    if name == "output_layer.weight":
        # A tied model's last stage (PP > 1) keeps its own copy of the input embedding.
        if hf_config.tie_word_embeddings:
            return HFCounterpart(("model.embed_tokens.weight",), "rows", exported=False)
        return HFCounterpart(("lm_head.weight",), "rows")
    if name == "decoder.final_layernorm.weight":
        return HFCounterpart(("model.norm.weight",), "replicated")
    match = _LAYER.match(name)
    if match is None or match.group(2) not in _LAYER_PARAMS:
        raise KeyError(f"Megatron parameter {name!r} has no HF counterpart")
    prefix = f"model.layers.{_hf_layer_index(int(match.group(1)), hf_config, groups)}."
    suffixes, layout = _LAYER_PARAMS[match.group(2)]
    return HFCounterpart(tuple(prefix + s for s in suffixes), layout)


def megatron_shard_from_hf(name: str, hf: dict[str, torch.Tensor], hf_config: Any,
                            groups: StageShard) -> torch.Tensor:
    """This rank's value of Megatron parameter ``name``, cut from the full HF tensors."""
    where = hf_counterpart(name, hf_config, groups)
    tensors = [hf[key] for key in where.hf_keys]
    if where.layout == "replicated":
        return tensors[0]
    if where.layout in ("rows", "cols"):
        return _shard(tensors[0], 0 if where.layout == "rows" else 1, groups)
    if where.layout == "qkv":
        # Query groups are contiguous in the fused layout, so an even row split gives each TP
        # rank whole groups.
        return _shard(fuse_qkv(*tensors, hf_config), 0, groups)
    return torch.cat([_shard(t, 0, groups) for t in tensors], dim=0)  # gate_up


def hf_tensors_from_megatron(name: str, full: torch.Tensor, hf_config: Any,
                             groups: StageShard) -> dict[str, torch.Tensor]:
    """Inverse of ``megatron_shard_from_hf`` for the TP-gathered ``full`` tensor of ``name``."""
    where = hf_counterpart(name, hf_config, groups)
    if not where.exported:
        return {}
    if where.layout == "qkv":
        parts = split_qkv(full, hf_config)
    elif where.layout == "gate_up":
        parts = _unfuse_fc1(full, groups)
    else:
        return {where.hf_keys[0]: full}
    # The parts are views into the gathered tensor; own them so it can be freed.
    return {key: part.clone() for key, part in zip(where.hf_keys, parts)}


def hf_tensors_from_megatron_shards(name: str, shards: Sequence[torch.Tensor], hf_config: Any,
                                    stage: StageShard) -> dict[str, torch.Tensor]:
    """Full HF tensors of Megatron parameter ``name`` from its values on the TP ranks of ``stage``.

    ``shards`` are in TP-rank order, one per rank; a replicated parameter may pass TP rank 0's
    alone (its copy is the one kept). The one TP concat rule, for live export and offline merge.
    """
    where = hf_counterpart(name, hf_config, stage)
    if where.tp_dim is None:
        full = shards[0]
    elif len(shards) != stage.tp_size:
        raise ValueError(f"{name}: got {len(shards)} tensor-parallel shards, the layout has tp_size={stage.tp_size}")
    else:
        full = shards[0] if stage.tp_size == 1 else torch.cat(list(shards), dim=where.tp_dim)
    return hf_tensors_from_megatron(name, full, hf_config, stage)


def complete_hf_state_dict(tensors: dict[str, torch.Tensor], hf_config: Any) -> dict[str, torch.Tensor]:
    """All stages' HF tensors in ``AutoModelForCausalLM.state_dict()`` key order; for tied embeddings
    ``lm_head.weight`` is the embedding tensor itself. A missing key raises ``KeyError``."""
    if hf_config.tie_word_embeddings and "model.embed_tokens.weight" in tensors:
        tensors = {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}
    keys = hf_state_dict_keys(hf_config)
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise KeyError(f"export is missing HF keys {missing[:5]} ({len(missing)} in all)")
    return {key: tensors[key] for key in keys}


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, hf_state_dict: dict[str, torch.Tensor], hf_config: Any,
                    groups: ParallelGroups) -> None:
    """Copy the shards this rank owns from a full HF state dict into ``model`` (one pipeline stage).

    Every parameter of ``model`` is written; a missing HF key or a shape mismatch raises. Values
    are cast to the parameter's dtype and device.
    """
    for name, param in model.named_parameters():
        value = megatron_shard_from_hf(name, hf_state_dict, hf_config, groups)
        if value.shape != param.shape:
            raise ValueError(f"{name}: HF shard has shape {tuple(value.shape)}, Megatron expects {tuple(param.shape)}")
        param.copy_(value.to(dtype=param.dtype, device=param.device))


def _tp_shards(name: str, param: torch.Tensor, where: HFCounterpart, groups: ParallelGroups) -> list[torch.Tensor]:
    """This parameter's value on every TP rank (all-gathered; a replicated one: this rank's alone),
    after checking that Megatron shards it the way the name table says."""
    if groups.tp_size == 1:
        return [param.detach()]
    megatron_dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
    if megatron_dim != where.tp_dim:
        raise ValueError(f"{name}: Megatron splits it along dim {megatron_dim}, the name table's layout "
                         f"{where.layout!r} along {where.tp_dim} (None: replicated)")
    if megatron_dim is None:
        return [param.detach()]
    parts = [torch.empty_like(param) for _ in range(groups.tp_size)]
    dist.all_gather(parts, param.detach().contiguous(), group=groups.tp)
    return parts


def _stage_hf_tensors(model: torch.nn.Module, hf_config: Any, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """This stage's parameters as full HF-named fp32 CPU tensors (collective over the TP group)."""
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        shards = [s.float().cpu() for s in _tp_shards(name, param, hf_counterpart(name, hf_config, groups), groups)]
        out.update(hf_tensors_from_megatron_shards(name, shards, hf_config, groups))
    return out


@torch.no_grad()
def export_hf_weights(model: torch.nn.Module, hf_config: Any, groups: ParallelGroups) -> dict[str, torch.Tensor] | None:
    """Full HF-named fp32 CPU tensors on global rank 0 (None elsewhere); a collective: EVERY rank must call it.

    Shards are all-gathered over TP on the data/context-parallel replica of global rank 0, then
    the stages of its pipeline (the ranks with tp, cp and dp rank 0) send theirs to it with
    ``gather_object`` (on NCCL that needs ``torch.cuda.set_device`` done, as usual). The keys
    equal the HF model's ``state_dict()`` keys; for tied embeddings ``lm_head.weight`` is the
    embedding tensor itself.
    """
    # A TP group shares its dp/cp coordinates, so replicas other than dp = cp = 0 skip the
    # gathers as a whole group.
    if groups.cp_rank != 0 or groups.dp_rank != 0:
        return None
    stage = _stage_hf_tensors(model, hf_config, groups)
    if groups.tp_rank != 0:
        return None
    if groups.pp_size > 1:
        received: list[Any] | None = [None] * groups.pp_size if groups.pp_rank == 0 else None
        dist.gather_object(stage, received, dst=dist.get_global_rank(groups.pp, 0), group=groups.pp)
        if groups.pp_rank != 0:
            return None
        for part in received[1:]:
            stage.update(part)
    if dist.get_rank() != 0:
        return None
    return complete_hf_state_dict(stage, hf_config)
