"""Per-trajectory squared gradient norms for OPOB in the Megatron actor (trainer/actor step), under TP, SP, CP and PP.

For trajectory i of a micro-batch, f_i = Σ_t ω_{i,t} m_{i,t} log π_θ(y_{i,t}) and OPOB needs ‖∇θ f_i‖²
over every trainable parameter of the whole model (docs/vcpo.md, OPOB). Under Megatron each rank holds
a piece of θ and a piece of each trajectory, and the pieces combine by two different rules:

- a parameter SHARDED over TP (``tensor_model_parallel``: column/row weights, column biases, the
  vocab-parallel embedding and output layer) has disjoint slices on the TP ranks: squared norms add;
  a parameter REPLICATED over TP (norm weights, row biases) is counted once; the stages of PP hold
  disjoint parameters: squared norms add (``combine_shard_sq_grad_norms`` over TP, then over PP);
- a rank that sees only PART OF A TRAJECTORY'S TOKENS holds a partial per-trajectory gradient of
  the same parameter: every parameter under CP, and the ``sequence_parallel`` norm weights under SP
  (each TP rank normalises its own sequence shard). Partial gradients are summed over that group
  BEFORE squaring, since ‖Σ_r G_r‖² ≠ Σ_r ‖G_r‖²;
- tied embeddings: with one stage the embedding weight also feeds the output layer; with PP the
  last stage holds a copy (``shared_embedding``) whose gradient Megatron sums with the first
  stage's. Either way the two per-trajectory gradients are summed before squaring and counted once.

Methods (``method``):

- ``per_traj``: one forward and backward per trajectory (the VCPO release's method) with
  ``torch.autograd.grad`` on the parameter list, then the reductions above per parameter. Any layer.
- ``batched``: one forward and one backward for the micro-batch. Hooks record each layer's input
  a_{i,t} and output gradient g_{i,t}; the weights are frozen for the pass and the backward runs
  only to the embedding outputs (and the stage input), so Megatron's layers skip their
  weight-gradient matmuls and nothing is accumulated anywhere. Per layer, per trajectory:
    ColumnParallelLinear   G_i = Σ_t g_t a_tᵀ, [out/tp, in]; under SP the layer input is the sequence
                           shard and is all-gathered over TP first (Megatron gathers it too);
    RowParallelLinear      G_i = Σ_t g_t a_tᵀ, [out, in/tp]; under SP the output is reduce-scattered,
                           so its gradient is the sequence shard and is all-gathered over TP;
    biases                 Σ_t g_t over the full sequence;
    norms                  Σ_t g_t ⊙ x̂_t, x̂_t = ∂out_t/∂weight (exact for any norm affine in its weight);
    VocabParallelEmbedding rows Σ_{t: id_t = v} g_t for this rank's vocabulary range (sparse segment
                           sums; under CP the ids and gradients are all-gathered over CP first);
    tied embedding         the dense [V/tp, h] per-trajectory gradient of embedding + output layer.
  These are direct products (einsum over tokens), all-reduced over CP (and over TP for SP norm
  weights) before squaring. Memory: one layer's per-trajectory gradients at a time, b × in × out
  floats, taken in chunks of trajectories of at most 2^26 elements (as the HF ghost norm does); a
  tied embedding's b × V/tp × h is held whole until both parts are in. No full-model
  per-trajectory gradient exists.
  A trainable parameter outside these layer types raises ``UnsupportedLayerError`` naming it.

PP is handled here with a small schedule of its own (forward through the stages with point-to-point
sends over ``groups.pp``, then backward), not Megatron's schedules, because those accumulate into
``.grad``/``.main_grad``. Neither method touches ``.grad``/``.main_grad``: the backward is
``torch.autograd.grad`` (Megatron DDP's grad-accumulator hooks never run) and the linear layers'
``gradient_accumulation_fusion`` (which writes ``main_grad`` from inside the backward on GPU) is
switched off for the duration. Padding needs no mask: positions outside the objective get zero
output gradients, and autograd's weight gradient is exactly the sum over every position.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from torch import nn

from verl.utils.distributed import all_reduce_sum_, get_world_size
from verl.utils.megatron.parallel import ParallelGroups
from verl.workers.actor.traj_grad_norms import UnsupportedLayerError, embedding_sq_norm, sample_chunks
from verl.workers.utils.vcpo import combine_shard_sq_grad_norms

GRAD_NORM_METHODS = ("batched", "per_traj")
ObjectiveFn = Callable[[nn.Module, dict[str, Any]], torch.Tensor]

__all__ = ["GRAD_NORM_METHODS", "UnsupportedLayerError", "megatron_traj_sq_grad_norms"]


def megatron_traj_sq_grad_norms(model: nn.Module, objective_fn: ObjectiveFn, micro_batch: dict[str, Any],
                                groups: ParallelGroups, method: str = "batched") -> torch.Tensor:
    """‖∇θ f_i‖² over all trainable parameters of the full model, float32 [b], the same on every
    TP/CP/PP rank of this data-parallel replica (a collective over them; DP replicas are independent).

    ``model``: this PP stage's GPTModel, bare or wrapped (``.module`` chain: DDP, Float16Module).
    ``objective_fn(model, micro_batch)`` runs this stage's forward: on the last stage it returns
    f [b] summed over the response tokens THIS CP rank holds (the local part: not all-reduced over
    CP; identical on the TP ranks); on any other stage the model's output tensor. Non-first stages
    get their input through ``set_input_tensor`` before it is called. ``micro_batch``: whatever
    ``objective_fn`` reads, batch-first, with ``input_ids`` [b, s_local] on every stage (it gives b);
    for ``per_traj`` every tensor whose dim 0 is b is sliced to one row.
    ``groups``: from ``initialize_megatron``; ``groups.embedding`` links the stages of a tied embedding.
    """
    if method not in GRAD_NORM_METHODS:
        raise ValueError(f"method={method!r}: must be one of {GRAD_NORM_METHODS}")
    stage = _unwrap(model)
    with _without_grad_accumulation_fusion(stage):
        if method == "batched":
            return _batched(model, stage, objective_fn, micro_batch, groups)
        return _per_traj(model, stage, objective_fn, micro_batch, groups)


# ----------------------------------------------------------------------------------------------
# Combining the pieces of one trajectory's gradient across ranks
# ----------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    while not hasattr(model, "set_input_tensor") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    if not hasattr(model, "set_input_tensor"):
        raise TypeError(f"{type(model).__name__} is not a Megatron language model (no set_input_tensor)")
    return model


@contextmanager
def _without_grad_accumulation_fusion(stage: nn.Module) -> Iterator[None]:
    layers = [m for m in stage.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    saved = [m.gradient_accumulation_fusion for m in layers]
    for m in layers:
        m.gradient_accumulation_fusion = False
    try:
        yield
    finally:
        for m, fused in zip(layers, saved):
            m.gradient_accumulation_fusion = fused


def _sums_partials_over_tp(stage: nn.Module, name: str, param: nn.Parameter, tp_size: int) -> bool:
    """Whether TP ranks hold partial gradients of this replicated parameter (as Megatron's
    ``finalize_model_grads`` decides: SP norm weights, and q/k norms that see only local heads)."""
    if tp_size == 1:
        return False
    config = stage.config
    return bool((config.sequence_parallel and getattr(param, "sequence_parallel", False))
                or (getattr(config, "qk_layernorm", False) and ("q_layernorm" in name or "k_layernorm" in name)))


def _tied_parameters(stage: nn.Module, pp_size: int) -> set[int]:
    """Parameters whose per-trajectory gradients arrive in two parts (embedding and output layer)."""
    if not getattr(stage, "share_embeddings_and_output_weights", False):
        return set()
    if pp_size == 1:
        return {id(stage.shared_embedding_or_output_weight())}
    return {id(p) for p in stage.parameters() if getattr(p, "shared_embedding", False)}


def _row_sq_norms(traj_grad: torch.Tensor) -> torch.Tensor:
    """Σ_j G[i, j]² per row i, float64 (the norm in float32, one pass; ~1e-7 relative)."""
    return torch.linalg.vector_norm(traj_grad.flatten(1), dim=1).double().pow(2)


class _SqNormAccumulator:
    """Per-trajectory squared norms of this rank's parameters, split into TP-sharded and TP-replicated."""

    def __init__(self, batch: int, stage: nn.Module, groups: ParallelGroups, device: torch.device):
        self.stage, self.groups = stage, groups
        self.sharded = torch.zeros(batch, dtype=torch.float64, device=device)
        self.replicated = torch.zeros(batch, dtype=torch.float64, device=device)
        self.tied = _tied_parameters(stage, groups.pp_size)
        self._pending: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}

    def add_grad(self, param: nn.Parameter, traj_grad: torch.Tensor, partial_over_tp: bool,
                 rows: slice = slice(None)) -> None:
        """Add the per-trajectory gradients [n, *param.shape] of trajectories ``rows`` (all by default;
        a tied weight's pieces must come for all rows at once)."""
        if id(param) in self.tied:
            previous = self._pending.get(id(param))
            self._pending[id(param)] = (param, traj_grad if previous is None else previous[1] + traj_grad)
            return
        traj_grad = all_reduce_sum_(traj_grad.contiguous(), self.groups.cp)
        if partial_over_tp:
            traj_grad = all_reduce_sum_(traj_grad, self.groups.tp)
        self.add_sq(param, _row_sq_norms(traj_grad), rows)

    def add_sq(self, param: nn.Parameter, sq: torch.Tensor, rows: slice = slice(None)) -> None:
        """Add complete per-trajectory squared norms of this rank's copy of ``param`` (trajectories ``rows``)."""
        sharded = self.groups.tp_size == 1 or getattr(param, "tensor_model_parallel", False)
        (self.sharded if sharded else self.replicated)[rows] += sq.double()

    def finish(self) -> torch.Tensor:
        for param, traj_grad in self._pending.values():
            traj_grad = all_reduce_sum_(traj_grad.contiguous(), self.groups.cp)
            if self.groups.pp_size > 1:
                # The first and last stages each hold a copy; Megatron sums their gradients over
                # the embedding group. Count the summed gradient once, on the last stage.
                traj_grad = all_reduce_sum_(traj_grad, self.groups.embedding)
                if not self.groups.is_last_stage:
                    continue
            self.add_sq(param, _row_sq_norms(traj_grad))
        self._pending.clear()
        stage_sq = combine_shard_sq_grad_norms(self.sharded, self.replicated, self.groups.tp)
        return combine_shard_sq_grad_norms(stage_sq, torch.zeros_like(stage_sq), self.groups.pp)


# ----------------------------------------------------------------------------------------------
# One forward and backward through the pipeline stages
# ----------------------------------------------------------------------------------------------


_WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _send(tensor: torch.Tensor, peer: int, groups: ParallelGroups) -> None:
    # Header: dtype code, then the shape padded with −1, so the receiver can allocate.
    header = torch.full((8,), -1, dtype=torch.long, device=tensor.device)
    header[0] = _WIRE_DTYPES.index(tensor.dtype)
    header[1 : 1 + tensor.dim()] = torch.tensor(tensor.shape)
    dst = dist.get_global_rank(groups.pp, peer)
    dist.send(header, dst=dst, group=groups.pp)
    dist.send(tensor.detach().contiguous(), dst=dst, group=groups.pp)


def _recv(peer: int, groups: ParallelGroups, device: torch.device) -> torch.Tensor:
    header = torch.empty(8, dtype=torch.long, device=device)
    src = dist.get_global_rank(groups.pp, peer)
    dist.recv(header, src=src, group=groups.pp)
    shape = [n for n in header[1:].tolist() if n >= 0]
    tensor = torch.empty(shape, dtype=_WIRE_DTYPES[int(header[0])], device=device)
    dist.recv(tensor, src=src, group=groups.pp)
    return tensor


def _forward_backward(model: nn.Module, stage: nn.Module, objective_fn: ObjectiveFn, micro_batch: dict[str, Any],
                      groups: ParallelGroups, inputs: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor | None]:
    """∂(Σ_i f_i)/∂inputs() on this stage, running every stage's forward then every backward.

    ``inputs`` is called after the forward (so it can name tensors the forward created).
    """
    device = next(stage.parameters()).device
    stage_input = None
    if not groups.is_first_stage:
        stage_input = _recv(groups.pp_rank - 1, groups, device).requires_grad_()
        stage.set_input_tensor(stage_input)
    try:
        out = objective_fn(model, micro_batch)
        if groups.is_last_stage:
            if out.dim() != 1:
                raise ValueError(f"objective_fn returned shape {tuple(out.shape)} on the last stage; "
                                 "expected f [b], one value per trajectory")
            root, root_grad = out.sum(), None
        else:
            _send(out, groups.pp_rank + 1, groups)
            root, root_grad = out, _recv(groups.pp_rank + 1, groups, out.device)
        wanted = inputs() + ([stage_input] if stage_input is not None else [])
        grads = list(torch.autograd.grad(root, wanted, grad_outputs=root_grad, allow_unused=True))
        if stage_input is not None:
            input_grad = grads.pop()
            _send(torch.zeros_like(stage_input) if input_grad is None else input_grad, groups.pp_rank - 1, groups)
        return grads
    finally:
        if stage_input is not None:
            stage.set_input_tensor(None)


# ----------------------------------------------------------------------------------------------
# per_traj: one forward and backward per trajectory
# ----------------------------------------------------------------------------------------------


def _batch_size(micro_batch: dict[str, Any]) -> int:
    input_ids = micro_batch.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("micro_batch['input_ids'] must be the [b, s] token ids (it gives the batch size b)")
    return input_ids.shape[0]


def _row(micro_batch: dict[str, Any], i: int, batch: int) -> dict[str, Any]:
    return {k: v[i : i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch else v
            for k, v in micro_batch.items()}


def _per_traj(model: nn.Module, stage: nn.Module, objective_fn: ObjectiveFn, micro_batch: dict[str, Any],
              groups: ParallelGroups) -> torch.Tensor:
    named = [(n, p) for n, p in stage.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    batch = _batch_size(micro_batch)
    out = torch.zeros(batch, dtype=torch.float32, device=params[0].device)
    for i in range(batch):
        grads = _forward_backward(model, stage, objective_fn, _row(micro_batch, i, batch), groups, lambda: params)
        acc = _SqNormAccumulator(1, stage, groups, params[0].device)
        for (name, param), grad in zip(named, grads):
            grad = torch.zeros_like(param, dtype=torch.float32) if grad is None else grad.float()
            acc.add_grad(param, grad[None], _sums_partials_over_tp(stage, name, param, groups.tp_size))
        out[i] = acc.finish()[0]
    return out


# ----------------------------------------------------------------------------------------------
# batched: one forward and one backward per micro-batch, per-layer direct products
# ----------------------------------------------------------------------------------------------


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return "Norm" in type(module).__name__ and isinstance(weight, nn.Parameter) and weight.dim() == 1


def _gather_dim(tensor: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank of ``group`` along ``dim``, in rank order."""
    size = get_world_size(group)
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _LayerHooks:
    """Forward hooks that turn one forward/backward into per-trajectory squared norms."""

    def __init__(self, stage: nn.Module, groups: ParallelGroups, acc: _SqNormAccumulator):
        self.stage, self.groups, self.acc = stage, groups, acc
        self.roots: list[tuple[VocabParallelEmbedding, torch.Tensor, torch.Tensor]] = []
        self._names = {m: n for n, m in stage.named_modules()}
        self.trainable = {id(p) for p in stage.parameters() if p.requires_grad}
        self._check_coverage()

    def _check_coverage(self) -> None:
        if getattr(self.stage.config, "recompute_granularity", None) is not None:
            raise UnsupportedLayerError("activation recomputation reruns layer forwards inside the backward, "
                                        "where the hooks cannot pair inputs with output gradients; "
                                        "use grad_norm_method='per_traj'")
        covered: set[int] = set()
        for module in self.stage.modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                covered.update(id(p) for p in (module.weight, module.bias) if p is not None)
            elif isinstance(module, VocabParallelEmbedding) or _is_norm(module):
                covered.update(id(p) for p in module.parameters(recurse=False))
        uncovered = [n for n, p in self.stage.named_parameters() if id(p) in self.trainable and id(p) not in covered]
        if uncovered:
            raise UnsupportedLayerError(
                "the batched per-trajectory gradient norm cannot account for trainable parameter(s) "
                f"{', '.join(uncovered)}; use grad_norm_method='per_traj'")

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Hooks on, and every weight frozen: the backward then yields only activation gradients,
        and Megatron's linear layers skip their weight-gradient matmuls (``linear_with_frozen_weight``)."""
        frozen = [p for p in self.stage.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        handles = []
        for module in self.stage.modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                handles.append(module.register_forward_hook(self._linear_forward, with_kwargs=True))
            elif isinstance(module, VocabParallelEmbedding):
                handles.append(module.register_forward_hook(self._embedding_forward))
            elif _is_norm(module):
                handles.append(module.register_forward_hook(self._norm_forward))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for p in frozen:
                p.requires_grad_(True)

    # -- linear layers ------------------------------------------------------------------------

    def _linear_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
        weight = module.weight if weight is None else weight
        if isinstance(module, ColumnParallelLinear):
            gather = kwargs.get("runtime_gather_output")
            if (module.gather_output if gather is None else gather) and self.groups.tp_size > 1:
                raise UnsupportedLayerError(f"{self._names[module]} gathers its output over TP; the batched "
                                            "gradient norm needs the local output shard; use grad_norm_method='per_traj'")
        x, out = (args[0] if args else kwargs["input_"]), output[0]
        if not out.requires_grad:
            return
        out.register_hook(lambda grad, m=module, a=x, w=weight: self._linear_backward(m, a, w, grad))

    def _linear_backward(self, module: nn.Module, a: torch.Tensor, weight: nn.Parameter, grad: torch.Tensor) -> None:
        sequence_parallel = module.sequence_parallel and self.groups.tp_size > 1
        a, g = a.detach().float(), grad.detach().float()
        # Under SP Megatron all-gathers a column layer's input and reduce-scatters a row layer's
        # output; the weight gradient is formed over the full sequence, so gather the shard.
        if sequence_parallel and isinstance(module, ColumnParallelLinear):
            a = _gather_dim(a, 0, self.groups.tp)
        if sequence_parallel and isinstance(module, RowParallelLinear):
            g = _gather_dim(g, 0, self.groups.tp)
        if id(weight) in self.trainable:
            # The same chunks on every rank (shapes agree across CP ranks), so the CP sums pair up.
            chunks = [(0, g.shape[1])] if id(weight) in self.acc.tied else sample_chunks(g.shape[1], weight.numel())
            for start, stop in chunks:
                traj_grad = torch.einsum("sbo,sbi->boi", g[:, start:stop], a[:, start:stop])
                self.acc.add_grad(weight, traj_grad, partial_over_tp=False, rows=slice(start, stop))
        bias = module.bias
        if bias is not None and id(bias) in self.trainable:
            self.acc.add_grad(bias, g.sum(0), partial_over_tp=False)

    # -- norms ----------------------------------------------------------------------------------

    def _norm_forward(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        if output.requires_grad:
            output.register_hook(lambda grad, m=module, x=args[0]: self._norm_backward(m, x, grad))

    def _norm_backward(self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
        x, weight = x.detach(), module.weight
        with torch.no_grad():
            ones = torch.func.functional_call(module, {"weight": torch.ones_like(weight)}, (x,))
            zeros = torch.func.functional_call(module, {"weight": torch.zeros_like(weight)}, (x,))
        # A norm is affine in its weight, so out(1) − out(0) = ∂out/∂weight exactly.
        g = grad.detach().float().movedim(1, 0)  # Megatron layout [s, b, ...] -> [b, s, ...]
        name = self._names[module]
        if id(weight) in self.trainable:
            per_traj = (g * (ones - zeros).float().movedim(1, 0)).flatten(1, -2).sum(1)
            partial = _sums_partials_over_tp(self.stage, f"{name}.weight", weight, self.groups.tp_size)
            self.acc.add_grad(weight, per_traj, partial)
        bias = getattr(module, "bias", None)
        if bias is not None and id(bias) in self.trainable:
            partial = _sums_partials_over_tp(self.stage, f"{name}.bias", bias, self.groups.tp_size)
            self.acc.add_grad(bias, g.flatten(1, -2).sum(1), partial)

    # -- embeddings -----------------------------------------------------------------------------

    def _embedding_forward(self, module: VocabParallelEmbedding, args: tuple[Any, ...],
                           output: torch.Tensor) -> torch.Tensor:
        # The weights are frozen for this pass, so the embedding output becomes the leaf the
        # backward runs to.
        root = output.detach().requires_grad_()
        self.roots.append((module, args[0], root))
        return root

    def embedding_grads(self, grads: list[torch.Tensor | None]) -> None:
        """Per-trajectory embedding gradients from ∂(Σ_i f_i)/∂(embedding output), after the backward."""
        for (module, ids, out), grad in zip(self.roots, grads):
            weight = module.weight
            if id(weight) not in self.trainable:
                continue
            g = torch.zeros_like(out) if grad is None else grad.detach()
            if module.reduce_scatter_embeddings:
                g = _gather_dim(g, 0, self.groups.tp).transpose(0, 1)  # [s/tp, b, h] shards -> [b, s, h]
            g = g.float()
            local = ids - module.vocab_start_index
            in_range = (ids >= module.vocab_start_index) & (ids < module.vocab_end_index)
            local = torch.where(in_range, local, torch.zeros_like(local))
            g = torch.where(in_range[..., None], g, torch.zeros((), dtype=g.dtype, device=g.device))
            if id(weight) in self.acc.tied:
                dense = torch.zeros((g.shape[0], *weight.shape), dtype=torch.float32, device=g.device)
                dense.scatter_add_(1, local[..., None].expand(-1, -1, g.shape[-1]), g)
                self.acc.add_grad(weight, dense, partial_over_tp=False)
                continue
            # Row sums per (trajectory, token id) need every token of the trajectory: gather the
            # CP shards (tokens, not [V, h] gradients) and count the result once.
            local, g = _gather_dim(local, 1, self.groups.cp), _gather_dim(g, 1, self.groups.cp)
            self.acc.add_sq(weight, embedding_sq_norm(local, g, weight.shape[0]))


def _batched(model: nn.Module, stage: nn.Module, objective_fn: ObjectiveFn, micro_batch: dict[str, Any],
             groups: ParallelGroups) -> torch.Tensor:
    batch = _batch_size(micro_batch)
    acc = _SqNormAccumulator(batch, stage, groups, next(stage.parameters()).device)
    hooks = _LayerHooks(stage, groups, acc)
    with hooks.installed():
        grads = _forward_backward(model, stage, objective_fn, micro_batch, groups,
                                  lambda: [out for _, _, out in hooks.roots])
    hooks.embedding_grads(grads)
    return acc.finish()
