"""HF weights from a torch-actor checkpoint (``actor.pt``, already HF-named; checkpoint -> merger)."""

from __future__ import annotations

import torch

from verl.model_merger.checkpoint_files import CheckpointError, CheckpointFiles, load_rank_file


def torch_hf_weights(files: CheckpointFiles) -> dict[str, torch.Tensor]:
    """The ``model`` state dict of ``actor.pt``: the actor module's HF ``state_dict()`` as trained."""
    state = load_rank_file(files.torch_file)
    if "model" not in state:
        raise CheckpointError(f"{files.torch_file} holds no model weights: it was saved without 'model' in "
                              "actor_rollout_ref.actor.checkpoint.save_contents")
    return dict(state["model"])
