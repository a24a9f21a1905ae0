"""Per-trajectory squared gradient norms for OPOB, inside the actor's update (trainer/actor step).

For trajectory i of a micro-batch, f_i = Σ_t ω_{i,t} m_{i,t} log π_θ(y_{i,t}) (ω = per-token weights,
1 by default) and we need ‖∇θ f_i‖² over every trainable parameter. Two methods:

- ``per_traj``: one forward and backward per trajectory (the VCPO release's method), summing
  ‖∂f_i/∂p‖² over parameters. Works for any layer type.
- ``batched`` (default): ONE forward and one backward over the whole micro-batch. Forward hooks
  record each layer's input a_{i,t}; tensor hooks on the layer outputs receive the output
  gradients g_{i,t} = ∂(Σ_j f_j)/∂out_{i,t}, which only depend on trajectory i (samples do not
  interact in a decoder LM). Per layer, without materialising per-trajectory gradients unless
  that is cheaper:
    Linear weight   ‖Σ_t g_t a_tᵀ‖² = Σ_{t,s} (a_t·a_s)(g_t·g_s)  ("gram", cost T²(in+out))
                    or the per-sample product Σ_t g_t a_tᵀ squared  ("direct", cost T·in·out);
    Linear bias     ‖Σ_t g_t‖²;
    norm weight     ‖Σ_t g_t ⊙ x̂_t‖², x̂_t = ∂out_t/∂weight (the normalised input), materialised;
    Embedding       rows Σ_{t: id_t = v} g_t, summed per (trajectory, token id) then squared;
    tied lm_head    the embedding matrix E gets both gradients, so
                    ‖G_emb + G_head‖² = ‖G_emb‖² + ‖G_head‖² + 2⟨G_emb, G_head⟩ with
                    ⟨G_emb, G_head⟩ = Σ_s Σ_t g^head_s[id_t] (h_s · g^emb_t), h_s = lm_head input.
  The backward is taken only to the embedding outputs (``torch.autograd.grad``), so autograd
  skips every weight-gradient matmul and never touches ``.grad``.

The weighted update g = (1/B) Σ_i c_i s_i = −∇ℓ, ℓ = Σ_i k_i f_i with k_i from
``verl.workers.utils.vcpo.opob_loss_coefficients``, can then be assembled three ways:
1. second backward on the same graph: ``backward(..., retain_graph=True)`` then
   ``opob_surrogate_loss(...).backward()`` (the OPOB scope must fit in the micro-batch);
2. deferred weight gradients: ``backward(..., keep_factors=True)`` for each micro-batch, then
   ``accumulate_weighted_grads(k)`` once with k for every kept row, which adds Σ_i k_i ∇θ f_i to
   ``.grad`` from the stored layer inputs and output gradients (per Linear one matmul (k ⊙ G)ᵀ A):
   no second backward, and the scope may span micro-batches, but the layer inputs and output
   gradients of every kept micro-batch stay alive until then (what the actor uses);
3. a second forward/backward per micro-batch once every coefficient of the minibatch is known
   (any scope, any micro-batch split; the norm pass then runs without ``retain_graph``).

Padding contributes nothing: layer inputs are zeroed where the attention mask is 0 (output
gradients too where they enter alone: biases), and token ids equal to the embedding's
``padding_idx`` get no gradient (as in autograd). Model-parallel pieces of one trajectory's norm combine with
``verl.workers.utils.vcpo.combine_shard_sq_grad_norms``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from verl.utils.torch_functional import logprobs_from_logits, masked_sum

LINEAR_STRATEGIES = ("auto", "gram", "direct")
# Elements of one materialised per-sample gradient chunk in "direct" mode (256 MB of fp32).
_DIRECT_CHUNK_ELEMENTS = 1 << 26


class UnsupportedLayerError(RuntimeError):
    """The batched method cannot account for some trainable parameters; use ``per_traj``."""


def response_log_probs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor, responses: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π_θ(y_t | y_<t) from logits / temperature, float32 [B, R], for the response part of ``input_ids``.

    Response token t sits at position P + t and is predicted by the logits at P + t − 1, so only
    the last R + 1 positions go through the lm_head (``logits_to_keep``) and the final one is dropped.
    Any forward works under ``PerTrajectoryGradNorms.capture`` as long as every hooked layer sees
    either all positions or a suffix of them (as here): the attention mask is aligned to the end.
    """
    num_response = responses.shape[1]
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=num_response + 1, use_cache=False)
    logits = out.logits[:, :-1, :] / temperature
    return logprobs_from_logits(logits, responses)


def trajectory_objective(log_probs: torch.Tensor, response_mask: torch.Tensor,
                         token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """f_i = Σ_t ω_{i,t} m_{i,t} log π_θ(y_{i,t}), [B]; ω = 1 when ``token_weights`` is None. The mask
    selects tokens; the weights scale them, whatever their sign."""
    weighted = log_probs if token_weights is None else log_probs * token_weights
    return masked_sum(weighted, response_mask, dim=-1)


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return "Norm" in type(module).__name__ and isinstance(weight, nn.Parameter) and weight.dim() == 1


def _role(module: nn.Module, param_name: str) -> str | None:
    """How the batched method handles ``module.<param_name>``, or None if it cannot."""
    if isinstance(module, nn.Linear) and param_name in ("weight", "bias"):
        return f"linear_{param_name}"
    if isinstance(module, nn.Embedding) and param_name == "weight" and not module.sparse and module.max_norm is None:
        return "embedding"
    if _is_norm(module) and param_name in ("weight", "bias"):
        return f"norm_{param_name}"
    return None


class PerTrajectoryGradNorms:
    """Batched per-trajectory squared gradient norms through removable hooks ("ghost norms").

    Usage (one forward; norms; then the weighted gradient without a second backward)::

        with PerTrajectoryGradNorms(model) as ghost:
            with ghost.capture(attention_mask):
                log_probs = response_log_probs(model, input_ids, attention_mask, position_ids, responses)
            sq_norms = ghost.backward(trajectory_objective(log_probs, response_mask), keep_factors=True)
            ...  # OPOB coefficients from sq_norms
            ghost.accumulate_weighted_grads(opob_loss_coefficients(c, w_trunc, lengths, B))

    Construction checks that every trainable parameter belongs to a supported layer
    (Linear, Embedding, *Norm with a 1-D weight, an Embedding/Linear weight tie) and raises
    ``UnsupportedLayerError`` naming the others. Hooks live only inside ``with``.
    """

    def __init__(self, model: nn.Module, linear_strategy: str = "auto"):
        if linear_strategy not in LINEAR_STRATEGIES:
            raise ValueError(f"linear_strategy={linear_strategy!r}: must be one of {LINEAR_STRATEGIES}")
        if getattr(model, "is_gradient_checkpointing", False):
            raise UnsupportedLayerError("gradient checkpointing recomputes layer outputs the hooks cannot see; "
                                        "disable it or use grad_norm_method='per_traj'")
        self.model = model
        self.linear_strategy = linear_strategy
        self._modules, self._tied, self.covered_parameters = self._plan(model)
        self._handles: list[Any] = []
        self._capturing = False
        # (kind, parameter, tensors, first row): factors of every kept micro-batch, rows numbered
        # across them in the order of the backward calls.
        self._factors: list[tuple[str, nn.Parameter, tuple[torch.Tensor, ...], int]] = []
        self._kept_rows = 0
        self._reset()

    @staticmethod
    def _plan(model: nn.Module) -> tuple[dict[nn.Module, str], dict[nn.Module, nn.Module], list[str]]:
        """Covered modules (module -> name), tied pairs (lm_head Linear -> Embedding), covered parameter names."""
        users: dict[int, list[tuple[str, nn.Module, str]]] = {}
        for module_name, module in model.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                if param.requires_grad:
                    users.setdefault(id(param), []).append((module_name, module, param_name))
        covered: dict[nn.Module, str] = {}
        tied: dict[nn.Module, nn.Module] = {}
        names_covered: list[str] = []
        uncovered: list[str] = []
        for entries in users.values():
            roles = [_role(module, param_name) for _, module, param_name in entries]
            names = " = ".join(f"{module_name}.{param_name}".lstrip(".") for module_name, _, param_name in entries)
            if len(entries) == 1 and roles[0] is not None:
                covered[entries[0][1]] = entries[0][0]
            elif len(entries) == 2 and sorted(map(str, roles)) == ["embedding", "linear_weight"]:
                embedding = next(m for (_, m, _), r in zip(entries, roles) if r == "embedding")
                head = next(m for (_, m, _), r in zip(entries, roles) if r == "linear_weight")
                tied[head] = embedding
                for module_name, module, _ in entries:
                    covered[module] = module_name
            else:
                uncovered.append(names)
                continue
            names_covered.append(names)
        if uncovered:
            raise UnsupportedLayerError(
                "the batched per-trajectory gradient norm cannot account for trainable parameter(s) "
                f"{', '.join(uncovered)}; use grad_norm_method='per_traj'")
        return covered, tied, names_covered

    # -- hook lifetime ----------------------------------------------------------------------

    def __enter__(self) -> "PerTrajectoryGradNorms":
        for module in self._modules:
            self._handles.append(module.register_forward_hook(self._forward_hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._capturing = False
        self._discard_factors()
        self._reset()

    def _discard_factors(self) -> None:
        self._factors = []
        self._kept_rows = 0

    def _reset(self) -> None:
        """Drop everything one forward/backward recorded (the deferred factors live on)."""
        self._mask: torch.Tensor | None = None
        self._inputs: dict[nn.Module, torch.Tensor] = {}
        self._roots: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        # Inputs shared by several Linear layers (q/k/v, gate/up): [input, users left, masked input,
        # Gram A Aᵀ], so the masking and the Gram are computed once for all of them.
        self._shared: dict[int, list[Any]] = {}
        self._tied_head: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self._sq: torch.Tensor | None = None
        self._active = False
        self._keep_factors = False

    @contextmanager
    def capture(self, attention_mask: torch.Tensor) -> Iterator[None]:
        """Record layer inputs during the forward run inside this block (attention_mask [B, T])."""
        if not self._handles:
            raise RuntimeError("enter the PerTrajectoryGradNorms context before capture()")
        self._reset()
        self._mask = attention_mask.bool()
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False

    def _forward_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self._capturing:
            return
        if module in self._inputs:
            raise UnsupportedLayerError(f"{self._modules[module]} ran twice in one forward (shared across calls); "
                                        "use grad_norm_method='per_traj'")
        x = args[0]
        if isinstance(module, nn.Embedding):
            self._inputs[module] = x
            self._roots.append((module, x, output))
            return
        if not x.requires_grad:
            raise UnsupportedLayerError(f"{self._modules[module]} is not downstream of an embedding, so the "
                                        "backward to the embeddings cannot reach it; use grad_norm_method='per_traj'")
        if x.dim() != 3 or x.shape[0] != self._mask.shape[0] or x.shape[1] > self._mask.shape[1]:
            raise UnsupportedLayerError(f"{self._modules[module]} input of shape {tuple(x.shape)} is not "
                                        "[batch, positions, features]; use grad_norm_method='per_traj'")
        self._inputs[module] = x
        if isinstance(module, nn.Linear):
            entry = self._shared.setdefault(id(x), [x, 0, None, None])
            entry[1] += 1
        output.register_hook(lambda grad, m=module: self._on_output_grad(m, grad))

    # -- the backward -----------------------------------------------------------------------

    def backward(self, objective: torch.Tensor, retain_graph: bool = False, keep_factors: bool = False) -> torch.Tensor:
        """‖∇θ f_i‖² for every trajectory, float32 [B], from the objective f [B] of the captured forward.

        Gradients flow only to the embedding outputs; ``.grad`` of the parameters is untouched.
        ``retain_graph``: the same graph can be backpropagated again (a weighted loss).
        ``keep_factors``: keep what ``accumulate_weighted_grads`` needs; factors of successive
        backward calls add up (rows numbered in call order) until it is called.
        """
        if not self._roots:
            raise RuntimeError("no captured forward: run the model inside capture() first")
        self._sq = torch.zeros(self._mask.shape[0], dtype=torch.float64, device=objective.device)
        self._active = True
        self._keep_factors = keep_factors
        try:
            embedding_outputs = [out for _, _, out in self._roots]
            grads = torch.autograd.grad(objective.sum(), embedding_outputs, retain_graph=retain_graph,
                                        allow_unused=True)
            for (module, ids, out), grad in zip(self._roots, grads):
                self._embedding_contribution(module, ids, torch.zeros_like(out) if grad is None else grad)
            if self._tied_head:
                raise RuntimeError("tied lm_head gradient arrived without its embedding gradient")
            if keep_factors:
                self._kept_rows += self._mask.shape[0]
            return self._sq.clamp(min=0.0).float()
        except BaseException:
            self._discard_factors()  # partial factors must never reach accumulate_weighted_grads
            raise
        finally:
            self._reset()

    def accumulate_weighted_grads(self, traj_coefficients: torch.Tensor) -> None:
        """``.grad`` += Σ_i k_i ∇θ f_i over every row kept by ``backward(..., keep_factors=True)``
        since the last call (``traj_coefficients`` [rows kept], in backward-call order); then drops them.

        Linear: (k ⊙ G)ᵀ A over all (trajectory, position) rows; bias and norm weights:
        Σ_i k_i (per-trajectory gradient); embeddings: rows k_i g_{i,t} added at id_{i,t}. Exactly
        what a backward of Σ_i k_i f_i would add (up to float summation order).
        """
        if not self._factors:
            raise RuntimeError("no stored factors: call backward(..., keep_factors=True) first")
        if traj_coefficients.shape != (self._kept_rows,):
            raise ValueError(f"{tuple(traj_coefficients.shape)} coefficients for {self._kept_rows} kept trajectories")
        factors, self._factors, self._kept_rows = self._factors, [], 0
        for kind, param, tensors, first_row in factors:
            k = traj_coefficients[first_row : first_row + tensors[-1].shape[0]].detach().float()
            if kind == "outer":
                a, g = tensors
                update = (g * k[:, None, None]).reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1]).float()
            elif kind == "per_sample":
                update = k @ tensors[0]
            else:
                ids, g = tensors
                update = torch.zeros(param.shape, dtype=torch.float32, device=g.device)
                update.index_add_(0, ids.reshape(-1), (g * k[:, None, None]).reshape(-1, g.shape[-1]))
            if param.grad is None:
                param.grad = update.to(param.dtype)
            else:
                param.grad.add_(update.to(param.grad.dtype))

    def _keep(self, kind: str, param: nn.Parameter, *tensors: torch.Tensor) -> None:
        if self._keep_factors:
            self._factors.append((kind, param, tensors, self._kept_rows))

    def _positions(self, length: int) -> torch.Tensor:
        # Layers see the last `length` positions (the lm_head only the logits kept).
        return self._mask[:, -length:, None]

    def _masked(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self._positions(x.shape[1]), x, torch.zeros((), dtype=x.dtype, device=x.device))

    def _on_output_grad(self, module: nn.Module, grad: torch.Tensor) -> None:
        if not self._active or module not in self._inputs:
            return
        recorded = self._inputs.pop(module)
        # Only biases need the output gradient masked: every other use multiplies it by the (masked)
        # layer input, so padding drops out there and one pass over the largest tensors is saved.
        g = grad.detach().float()
        bias = getattr(module, "bias", None)
        if isinstance(module, nn.Linear):
            entry = self._shared[id(recorded)]
            entry[1] -= 1
            if module in self._tied:
                self._tied_head[module] = (self._masked_input(entry), g)
            else:
                self._sq += self._linear_weight(entry, g).double()
            self._keep("outer", module.weight, self._masked_input(entry), g)
            if entry[1] == 0:
                del self._shared[id(recorded)]
        else:
            x, weight = recorded.detach(), module.weight
            with torch.no_grad():
                ones = torch.func.functional_call(module, {"weight": torch.ones_like(weight)}, (x,))
                zeros = torch.func.functional_call(module, {"weight": torch.zeros_like(weight)}, (x,))
            # x̂ = ∂out/∂weight exactly: an elementwise-affine norm (RMSNorm, LayerNorm, (1+w)-style)
            # is affine in its weight, so out(1) − out(0) is the derivative.
            per_traj = (g * self._masked(ones - zeros).float()).sum(1)
            self._sq += per_traj.pow(2).sum(-1).double()
            self._keep("per_sample", module.weight, per_traj)
        if isinstance(bias, nn.Parameter) and bias.requires_grad:
            per_traj = self._masked(g).sum(1)
            self._sq += per_traj.pow(2).sum(-1).double()
            self._keep("per_sample", bias, per_traj)

    def _masked_input(self, entry: list[Any]) -> torch.Tensor:
        if entry[2] is None:
            entry[2] = self._masked(entry[0].detach()).float()
        return entry[2]

    def _use_gram(self, positions: int, fan_in: int, fan_out: int, gram_cached: bool) -> bool:
        if self.linear_strategy != "auto":
            return self.linear_strategy == "gram"
        gram_cost = positions * positions * (fan_out if gram_cached else fan_in + fan_out)
        return gram_cost < positions * fan_in * fan_out

    def _linear_weight(self, entry: list[Any], g: torch.Tensor) -> torch.Tensor:
        """Σ_{t,s} (a_t·a_s)(g_t·g_s) or ‖Σ_t g_t a_tᵀ‖² per sample."""
        a = self._masked_input(entry)
        positions, fan_in, fan_out = a.shape[1], a.shape[2], g.shape[2]
        if self._use_gram(positions, fan_in, fan_out, entry[3] is not None):
            if entry[3] is None:
                entry[3] = torch.bmm(a, a.transpose(1, 2))
            return (entry[3] * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
        return _direct_sq_norm(g, a)

    def _embedding_contribution(self, module: nn.Embedding, ids: torch.Tensor, grad: torch.Tensor) -> None:
        keep = self._mask[:, -ids.shape[1]:]
        if module.padding_idx is not None:
            keep = keep & (ids != module.padding_idx)
        g = torch.where(keep[..., None], grad.detach(), torch.zeros((), dtype=grad.dtype)).float()
        self._keep("rows", module.weight, ids, g)
        heads = [head for head, emb in self._tied.items() if emb is module]
        if not heads:
            self._sq += embedding_sq_norm(ids, g, module.num_embeddings).double()
            return
        h, g_head = self._tied_head.pop(heads[0])
        positions, hidden, vocab = h.shape[1], h.shape[2], g_head.shape[2]
        gram_cost = positions * positions * (hidden + vocab) + positions * ids.shape[1] * hidden
        auto_gram = self.linear_strategy == "auto" and gram_cost < positions * hidden * vocab
        if self.linear_strategy == "gram" or auto_gram:
            head_sq = (torch.bmm(h, h.transpose(1, 2)) * torch.bmm(g_head, g_head.transpose(1, 2))).sum((1, 2))
            # ⟨G_emb, G_head⟩ = Σ_{s,t} g^head_s[id_t] (h_s · g^emb_t)
            h_dot_g = torch.bmm(h, g.transpose(1, 2))
            head_at_ids = torch.gather(g_head, 2, ids[:, None, :].expand(-1, positions, -1))
            cross = (h_dot_g * head_at_ids).sum((1, 2))
            self._sq += (head_sq + 2.0 * cross + embedding_sq_norm(ids, g, module.num_embeddings)).double()
            return
        for start, stop in sample_chunks(ids.shape[0], vocab * hidden):
            full = torch.bmm(g_head[start:stop].transpose(1, 2), h[start:stop])
            full.scatter_add_(1, ids[start:stop, :, None].expand(-1, -1, hidden), g[start:stop])
            self._sq[start:stop] += full.pow(2).sum((1, 2)).double()


def sample_chunks(batch: int, elements_per_sample: int) -> Iterator[tuple[int, int]]:
    step = max(1, _DIRECT_CHUNK_ELEMENTS // max(1, elements_per_sample))
    for start in range(0, batch, step):
        yield start, min(batch, start + step)


def _direct_sq_norm(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """‖Σ_t g_t a_tᵀ‖²_F per sample, materialising [chunk, out, in] at a time."""
    out = torch.empty(g.shape[0], dtype=torch.float32, device=g.device)
    for start, stop in sample_chunks(g.shape[0], g.shape[2] * a.shape[2]):
        out[start:stop] = torch.bmm(g[start:stop].transpose(1, 2), a[start:stop]).pow(2).sum((1, 2))
    return out


def embedding_sq_norm(ids: torch.Tensor, g: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """Per sample Σ_v ‖Σ_{t: id_t = v} g_t‖²: segment sums over (sample, token id), O(B·T·H)."""
    batch, positions, hidden = g.shape
    keys = (torch.arange(batch, device=ids.device)[:, None] * num_embeddings + ids).reshape(-1)
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    rows = torch.zeros(unique_keys.shape[0], hidden, dtype=g.dtype, device=g.device)
    rows.index_add_(0, inverse, g.reshape(-1, hidden))
    out = torch.zeros(batch, dtype=g.dtype, device=g.device)
    out.index_add_(0, unique_keys // num_embeddings, rows.pow(2).sum(-1))
    return out


def _per_traj_sq_grad_norms(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            position_ids: torch.Tensor, responses: torch.Tensor, response_mask: torch.Tensor,
                            token_weights: torch.Tensor | None, temperature: float) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    out = torch.zeros(input_ids.shape[0], dtype=torch.float64, device=input_ids.device)
    for i in range(input_ids.shape[0]):
        row = slice(i, i + 1)
        log_probs = response_log_probs(model, input_ids[row], attention_mask[row], position_ids[row],
                                       responses[row], temperature)
        weights = None if token_weights is None else token_weights[row]
        f_i = trajectory_objective(log_probs, response_mask[row], weights).sum()
        grads = torch.autograd.grad(f_i, params, allow_unused=True)
        out[i] = sum(g.double().pow(2).sum() for g in grads if g is not None)
    return out.float()


def per_trajectory_sq_grad_norms(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                 position_ids: torch.Tensor, responses: torch.Tensor, response_mask: torch.Tensor,
                                 token_weights: torch.Tensor | None = None, temperature: float = 1.0,
                                 method: str = "batched", linear_strategy: str = "auto") -> torch.Tensor:
    """‖∇θ f_i‖², f_i = Σ_t ω_{i,t} m_{i,t} log π_θ(y_{i,t}), float32 [B], over all trainable parameters.

    With ``token_weights`` None this is ‖∇θ log π(τ_i)‖² (the OPOB unit); with
    ω_{i,t} = w̃_i / L_i it is ‖s_i‖². Runs its own forward(s) and backward(s); ``.grad`` of the
    parameters is left exactly as it was. ``method``: ``batched`` or ``per_traj``.
    """
    if method == "per_traj":
        return _per_traj_sq_grad_norms(model, input_ids, attention_mask, position_ids, responses, response_mask,
                                       token_weights, temperature)
    if method != "batched":
        raise ValueError(f"method={method!r}: must be 'batched' or 'per_traj'")
    with PerTrajectoryGradNorms(model, linear_strategy) as ghost:
        with ghost.capture(attention_mask):
            log_probs = response_log_probs(model, input_ids, attention_mask, position_ids, responses, temperature)
        return ghost.backward(trajectory_objective(log_probs, response_mask, token_weights))
