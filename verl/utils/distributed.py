"""Process-group helpers for the data-parallel actor (trainer -> actor ranks -> gradient all-reduce).

Every helper treats "no process group initialised" and "a group of one rank" alike, so the same
actor code runs in a single process and across gloo/NCCL ranks.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Iterable

import torch
import torch.distributed as dist


def find_free_port() -> int:
    """A TCP port on localhost that is free right now (for a rendezvous address)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for_device(device: str) -> str:
    """The torch.distributed backend for tensors on ``device``: NCCL for ``cuda``, else gloo."""
    return "nccl" if device == "cuda" else "gloo"


def init_process_group(
    backend: str,
    rank: int,
    world_size: int,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
    timeout_s: float = 300.0,
) -> None:
    """Join the default process group through a TCP rendezvous at ``master_addr:master_port``."""
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def get_world_size(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def get_rank(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def all_reduce_sum_(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group`` in place; returns it."""
    if get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_gradients_(
    params: Iterable[torch.nn.Parameter], group: dist.ProcessGroup | None = None
) -> None:
    """Sum the ``.grad`` of every trainable parameter over ``group``, in one flat buffer.

    A sum, not a mean: the actor already divides each rank's loss by GLOBAL token/sequence
    counts, so the summed gradient is exactly the single-process gradient. A parameter that
    received no gradient on this rank contributes zeros (it may have one on another rank).
    """
    if get_world_size(group) == 1:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # One collective over a flat buffer per dtype: far fewer round trips than one per tensor.
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for same_dtype in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in same_dtype])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for p in same_dtype:
            numel = p.grad.numel()
            p.grad.copy_(flat[offset : offset + numel].view_as(p.grad))
            offset += numel
