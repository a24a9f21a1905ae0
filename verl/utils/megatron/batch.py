"""Batch layout for the Megatron actor: left-align padded rows, pad for SP/CP, split/merge CP chunks.

Data flow: queue -> trainer -> Megatron actor: the shared batch layout (prompts left-padded,
responses right-padded) -> ``left_align`` (real tokens first; Megatron's causal attention has no
padding mask and RoPE reads the token index as the position) -> ``pad_sequence_for_parallel`` ->
``split_for_context_parallel`` -> model -> log-probs at ``response_index``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to positions 0..n_i-1, pads after them.

    ``input_ids``/``attention_mask`` [B, P+R] (prompt columns then ``response_length`` = R
    response columns). Returns
    - ``aligned_ids`` [B, P+R]: real tokens in their original order, then the row's pad tokens;
      causal attention never lets a real token see the pads behind it;
    - ``aligned_position_ids`` [B, P+R]: 0..n_i-1 on real tokens, 0 on pads (as the shared
      layout's clamp(cumsum(mask) - 1, 0));
    - ``valid_mask`` [B, P+R] bool: True on real tokens;
    - ``response_index`` [B, R] long: response token t of row i is predicted by the logit at
      aligned position p_i - 1 + t, with p_i the row's real prompt length. Gather per-position
      log-probs (of the next token) there: ``aligned_to_responses(token_log_probs, response_index)``.
    """
    batch, seq_len = input_ids.shape
    valid = attention_mask.bool()
    # A stable sort of "not valid" keeps real tokens in order and moves pads behind them.
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    aligned_valid = torch.gather(valid, 1, order)
    aligned_ids = torch.gather(input_ids, 1, order)
    aligned_position_ids = (aligned_valid.long().cumsum(dim=1) - 1).clamp(min=0) * aligned_valid
    prompt_lengths = valid[:, : seq_len - response_length].sum(dim=1, keepdim=True)
    if bool((prompt_lengths == 0).any()):
        # Nothing would predict the first response token of a row without a prompt.
        raise ValueError("left_align: every row needs at least one prompt token")
    steps = torch.arange(response_length, device=input_ids.device).expand(batch, -1)
    response_index = prompt_lengths - 1 + steps
    return aligned_ids, aligned_position_ids, aligned_valid, response_index


def next_token_labels(aligned_ids: torch.Tensor) -> torch.Tensor:
    """labels[:, j] = aligned_ids[:, j+1] (the token the logit at j predicts); the last column is 0."""
    labels = torch.zeros_like(aligned_ids)
    labels[:, :-1] = aligned_ids[:, 1:]
    return labels


def aligned_to_responses(per_position: torch.Tensor, response_index: torch.Tensor) -> torch.Tensor:
    """[B, T, ...] values at aligned positions -> [B, R, ...] values of the response tokens."""
    index = response_index.reshape(*response_index.shape, *([1] * (per_position.dim() - 2)))
    return torch.gather(per_position, 1, index.expand(-1, -1, *per_position.shape[2:]))


def responses_to_aligned(per_response: torch.Tensor, response_index: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[B, R] response values (advantages, masks, old log-probs) -> [B, seq_len] at their logit positions, 0 elsewhere.

    ``response_index`` rises strictly along each row, so no two responses share a position.
    """
    out = torch.zeros(per_response.shape[0], seq_len, dtype=per_response.dtype, device=per_response.device)
    return out.scatter(1, response_index, per_response)


def pad_sequence_for_parallel(tensor: torch.Tensor, multiple: int, seq_dim: int = 1, value: int | float = 0
                              ) -> torch.Tensor:
    """Pad ``tensor`` at the end of ``seq_dim`` to a multiple of ``multiple`` (tp under SP, 2*cp under CP).

    Use multiple = lcm(tp if SP else 1, 2*cp if CP > 1 else 1). The padding goes after every real
    token, so causal attention never lets a real token see it.
    """
    length = tensor.shape[seq_dim]
    extra = (-length) % multiple
    if extra == 0:
        return tensor
    pad_shape = list(tensor.shape)
    pad_shape[seq_dim] = extra
    return torch.cat([tensor, tensor.new_full(pad_shape, value)], dim=seq_dim)


def context_parallel_multiple(tp_size: int, sequence_parallel: bool, cp_size: int) -> int:
    """The sequence-length multiple SP and CP need together: lcm(tp if SP, 2*cp if CP > 1)."""
    return math.lcm(tp_size if sequence_parallel else 1, 2 * cp_size if cp_size > 1 else 1)


def split_for_context_parallel(tensor: torch.Tensor, cp_size: int, cp_rank: int, seq_dim: int = 1) -> torch.Tensor:
    """This CP rank's part of the sequence: chunks r and 2cp-1-r of 2cp equal chunks (Megatron's load balancing).

    Causal attention costs grow along the sequence; pairing an early chunk with a late one gives
    every rank the same work. The length along ``seq_dim`` must be a multiple of 2*cp.
    """
    if cp_size == 1:
        return tensor
    if tensor.shape[seq_dim] % (2 * cp_size) != 0:
        raise ValueError(f"sequence length {tensor.shape[seq_dim]} is not a multiple of 2*cp = {2 * cp_size}")
    chunks = tensor.chunk(2 * cp_size, dim=seq_dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=seq_dim)


def merge_context_parallel_chunks(parts: list[torch.Tensor], seq_dim: int = 1) -> torch.Tensor:
    """Inverse of ``split_for_context_parallel`` given every rank's part, in CP-rank order."""
    cp_size = len(parts)
    if cp_size == 1:
        return parts[0]
    ordered: list[torch.Tensor | None] = [None] * (2 * cp_size)
    for rank, part in enumerate(parts):
        first, second = part.chunk(2, dim=seq_dim)
        ordered[rank], ordered[2 * cp_size - 1 - rank] = first, second
    return torch.cat(ordered, dim=seq_dim)


def gather_from_context_parallel(tensor: torch.Tensor, cp_group: dist.ProcessGroup | None, seq_dim: int = 1
                                 ) -> torch.Tensor:
    """All-gather every CP rank's part and put the sequence back in order (no gradient; for outputs)."""
    cp_size = dist.get_world_size(cp_group) if cp_group is not None and dist.is_initialized() else 1
    if cp_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(cp_size)]
    dist.all_gather(parts, tensor.detach().contiguous(), group=cp_group)
    return merge_context_parallel_chunks(parts, seq_dim)
