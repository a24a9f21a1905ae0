"""Tensor helpers shared by the actor and the loss functions (trainer/actor side of the data flow).

Everything here reduces in float32 whatever the model's dtype: log-probs, entropies and masked
statistics feed importance weights, where bf16 rounding would show up as spurious off-policyness.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Rows of logits processed at once by the log-prob/entropy helpers: bounds the float32
# temporaries to rows x vocab instead of the whole [B, T, V] tensor.
_ROW_CHUNK = 1024


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) = z_label - logsumexp(z), in float32.

    ``logits`` [..., V] (any float dtype), ``labels`` [...] long; returns [...] float32.
    Rows are processed in chunks so a bf16 [B, T, V] input never gets a full float32 copy.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    out = []
    for start in range(0, flat_logits.shape[0], _ROW_CHUNK):
        z = flat_logits[start : start + _ROW_CHUNK].float()
        picked = z.gather(-1, flat_labels[start : start + _ROW_CHUNK, None]).squeeze(-1)
        out.append(picked - torch.logsumexp(z, dim=-1))
    if not out:
        return torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
    return torch.cat(out).reshape(labels.shape)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum_v p_v log p_v = logsumexp(z) - sum_v softmax(z)_v z_v, in float32.

    ``logits`` [..., V]; returns [...] float32. The second form needs no log of a
    probability that may underflow to zero.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    out = []
    for start in range(0, flat.shape[0], _ROW_CHUNK):
        z = flat[start : start + _ROW_CHUNK].float()
        out.append(torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1))
    if not out:
        return torch.zeros(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    return torch.cat(out).reshape(logits.shape[:-1])


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(values * mask), taking values only where mask > 0.

    ``torch.where`` rather than a product: a NaN or inf at a masked (padding) position must not
    leak into the sum (0 * nan = nan).
    """
    picked = torch.where(mask > 0, values * mask, torch.zeros_like(values))
    return picked.sum() if dim is None else picked.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(values * mask) / sum(mask); 0 where the mask is empty."""
    total = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / total.clamp(min=1e-8)


@contextlib.contextmanager
def onloaded(module: torch.nn.Module, device: str, offload: bool) -> Iterator[None]:
    """With ``offload``, move a CPU-offloaded ``module`` to ``device`` for the block and back to CPU
    after (freeing the accelerator's cache); without it, do nothing."""
    if not offload:
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
