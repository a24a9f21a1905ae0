"""Log-probs and entropies from vocab-parallel logits (Megatron actor: model logits [..., V/tp] -> policy loss).

Each TP rank holds a slice of the vocabulary; the softmax statistics are all-reduced over the
TP group, and the backward passes are written out so each rank gets the exact gradient for its
own slice (Megatron's ``reduce_from_tensor_model_parallel_region`` passes gradients straight
through, which would make an entropy built from it wrong). The caller divides by the
temperature first. Everything is fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _group_size(group: dist.ProcessGroup | None) -> int:
    # None means "no tensor parallelism", never the default (world) group.
    return dist.get_world_size(group) if group is not None else 1


def _all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if _group_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _softmax_statistics(z: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z - m with m the global max, exp(z - m) of this slice, global sum S of exp(z - m)).

    Results are formed from z - m: log p(y) = (z_y - m) - log S loses no precision to a large
    common offset of the logits, where z_y - (m + log S) would round at the offset's scale.
    """
    m = _all_reduce(z.amax(dim=-1), group, dist.ReduceOp.MAX)
    shifted = z - m.unsqueeze(-1)
    e = torch.exp(shifted)
    s = _all_reduce(e.sum(dim=-1), group)
    return shifted, e, s


class _VocabParallelLogProb(torch.autograd.Function):
    """log p(y) = z_y - logsumexp(z); d/dz_v = 1[v = y] - p_v, on this rank's slice only."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        z = logits.float()
        vocab_local = z.shape[-1]
        start = dist.get_rank(group) * vocab_local if _group_size(group) > 1 else 0
        shifted, e, s = _softmax_statistics(z, group)
        local_label = labels - start
        owned = (local_label >= 0) & (local_label < vocab_local)
        safe_label = torch.where(owned, local_label, torch.zeros_like(local_label))
        picked = shifted.gather(-1, safe_label.unsqueeze(-1)).squeeze(-1) * owned
        picked = _all_reduce(picked, group)
        ctx.save_for_backward(e / s.unsqueeze(-1), safe_label, owned)
        ctx.logits_dtype = logits.dtype
        return picked - torch.log(s)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        probs, safe_label, owned = ctx.saved_tensors
        grad_z = -grad.unsqueeze(-1) * probs
        grad_z.scatter_add_(-1, safe_label.unsqueeze(-1), (grad * owned).unsqueeze(-1))
        return grad_z.to(ctx.logits_dtype), None, None


class _VocabParallelEntropy(torch.autograd.Function):
    """H = logsumexp(z) - sum_v p_v z_v; dH/dz_v = p_v (E_p[z] - z_v), on this rank's slice only."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        shifted, e, s = _softmax_statistics(logits.float(), group)
        probs = e / s.unsqueeze(-1)
        # Both terms of H = logsumexp(z) - E_p[z] are taken relative to the max m.
        mean_shifted = _all_reduce((probs * shifted).sum(dim=-1), group)
        ctx.save_for_backward(probs, shifted, mean_shifted)
        ctx.logits_dtype = logits.dtype
        return torch.log(s) - mean_shifted

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        probs, shifted, mean_shifted = ctx.saved_tensors
        grad_z = grad.unsqueeze(-1) * probs * (mean_shifted.unsqueeze(-1) - shifted)
        return grad_z.to(ctx.logits_dtype), None


def vocab_parallel_log_probs(logits: torch.Tensor, labels: torch.Tensor,
                             tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """log p(label) = z_label - logsumexp(z) from vocab-parallel logits, fp32, differentiable.

    ``logits`` [..., V/tp] (TP rank r holds vocabulary ids [r V/tp, (r+1) V/tp)), ``labels`` [...]
    with global ids in [0, V); returns [...] fp32, equal on every TP rank. With ``tp_group`` None
    or of size 1 it is the ordinary log-softmax gather.
    """
    return _VocabParallelLogProb.apply(logits, labels, tp_group)


def vocab_parallel_entropy(logits: torch.Tensor, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """H = -sum_v p_v log p_v = logsumexp(z) - sum_v softmax(z)_v z_v from vocab-parallel logits, fp32, differentiable."""
    return _VocabParallelEntropy.apply(logits, tp_group)
