"""Turns engine trajectories into the padded training batch (rollouter -> queue -> trainer).

The layout is the one documented in ``verl/protocol.py``: left-padded prompts, right-padded
responses, behaviour log-probs aligned with the responses, and per-trajectory versions.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from verl.protocol import DataProto, to_object_array
from verl.workers.rollout.base import Trajectory


def trajectories_to_batch(
    trajectories: Sequence[Trajectory],
    prompt_info: dict[str, Sequence[Any]],
    pad_token_id: int,
    max_prompt_length: int,
    max_response_length: int,
    meta_info: dict[str, Any] | None = None,
) -> DataProto:
    """Pad trajectories into one DataProto.

    ``prompt_info`` holds per-trajectory non-tensor columns (``uid``, ``data_source``,
    ``ground_truth``, ``extra_info``, ...) in the same order as ``trajectories``.
    """
    b = len(trajectories)
    prompts = torch.full((b, max_prompt_length), pad_token_id, dtype=torch.long)
    responses = torch.full((b, max_response_length), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((b, max_prompt_length), dtype=torch.long)
    response_mask = torch.zeros((b, max_response_length), dtype=torch.float32)
    rollout_log_probs = torch.zeros((b, max_response_length), dtype=torch.float32)
    for i, traj in enumerate(trajectories):
        p, r = len(traj.prompt_ids), len(traj.response_ids)
        if p > max_prompt_length:
            raise ValueError(f"trajectory {traj.request_id}: prompt has {p} tokens > max_prompt_length={max_prompt_length}")
        if r > max_response_length:
            raise ValueError(
                f"trajectory {traj.request_id}: response has {r} tokens > max_response_length={max_response_length}"
            )
        if p:
            prompts[i, max_prompt_length - p:] = torch.tensor(traj.prompt_ids, dtype=torch.long)
            prompt_mask[i, max_prompt_length - p:] = 1
        if r:
            responses[i, :r] = torch.tensor(traj.response_ids, dtype=torch.long)
            response_mask[i, :r] = 1.0
            rollout_log_probs[i, :r] = torch.tensor(traj.response_logprobs, dtype=torch.float32)
    attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    non_tensors = {k: to_object_array(v) for k, v in prompt_info.items()}
    non_tensors["request_id"] = to_object_array([t.request_id for t in trajectories])
    non_tensors["finish_reason"] = to_object_array([t.finish_reason for t in trajectories])
    non_tensors["param_version_start"] = np.array([t.param_version_start for t in trajectories], dtype=np.int64)
    non_tensors["param_version_end"] = np.array([t.param_version_end for t in trajectories], dtype=np.int64)
    return DataProto.from_dict(
        tensors={
            "prompts": prompts,
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], dim=1),
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "response_mask": response_mask,
            "rollout_log_probs": rollout_log_probs,
        },
        non_tensors=non_tensors,
        meta_info=dict(meta_info or {}),
    )
