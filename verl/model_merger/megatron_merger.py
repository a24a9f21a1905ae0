"""HF weights from Megatron rank files: TP shards concatenated, PP stages offset into one layer
list, with the live export's name table and rules (``verl.models.mcore.weights``; checkpoint -> merger).

Only the ranks of data-parallel and context-parallel replica 0 are read: the other replicas hold
the same parameters.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from verl.model_merger.checkpoint_files import CheckpointError, CheckpointFiles, load_rank_file


def megatron_hf_weights(files: CheckpointFiles, hf_config: Any,
                        log: Callable[[str], None] = lambda _: None) -> dict[str, torch.Tensor]:
    """Full HF-named tensors (in the checkpoint's parameter dtype) in ``state_dict()`` key order."""
    from verl.models.mcore.config import check_supported_hf_config
    from verl.models.mcore.weights import complete_hf_state_dict, hf_tensors_from_megatron_shards

    check_supported_hf_config(hf_config)
    replica = {(lo.pp_rank, lo.tp_rank): rank for rank, lo in files.layouts.items()
               if lo.dp_rank == 0 and lo.cp_rank == 0}
    any_layout = next(iter(files.layouts.values()))
    tp_size, pp_size = any_layout.tp_size, any_layout.pp_size
    if hf_config.num_hidden_layers % pp_size:
        raise CheckpointError(f"{files.directory}: pp_size={pp_size} does not divide the HF config's "
                              f"num_hidden_layers={hf_config.num_hidden_layers} ({files.hf_dir}): wrong config?")
    tensors: dict[str, torch.Tensor] = {}
    for pp_rank in range(pp_size):
        ranks = [replica[(pp_rank, tp_rank)] for tp_rank in range(tp_size)]
        log(f"stage {pp_rank + 1}/{pp_size}: tensor-parallel shards from ranks {ranks}")
        shards = [_model_state(files, rank) for rank in ranks]
        names = [name for name in shards[0] if not name.endswith("._extra_state")]
        for rank, shard in zip(ranks[1:], shards[1:]):
            other = [name for name in shard if not name.endswith("._extra_state")]
            if other != names:
                raise CheckpointError(f"{files.rank_files[rank]}: parameter names differ from "
                                      f"{files.rank_files[ranks[0]]} of the same pipeline stage")
        stage = files.layouts[ranks[0]]
        for name in names:
            try:
                tensors.update(hf_tensors_from_megatron_shards(name, [s[name] for s in shards], hf_config, stage))
            except (KeyError, RuntimeError, ValueError) as err:
                raise CheckpointError(f"{files.rank_files[ranks[0]]}: parameter {name!r} does not fit the HF "
                                      f"config in {files.hf_dir} ({err})") from err
    try:
        return complete_hf_state_dict(tensors, hf_config)
    except KeyError as err:
        raise CheckpointError(f"{files.directory}: {err.args[0]}") from err


def _model_state(files: CheckpointFiles, rank: int) -> dict[str, torch.Tensor]:
    state = load_rank_file(files.rank_files[rank])
    if "model" not in state:
        raise CheckpointError(f"{files.rank_files[rank]} holds no model weights: it was saved without 'model' "
                              "in actor_rollout_ref.actor.checkpoint.save_contents")
    return state["model"]
