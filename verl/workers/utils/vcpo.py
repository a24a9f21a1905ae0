"""VCPO math for the trainer/actor step (queue -> trainer/actor): log-space ESS, the ESS-scaled lr, and OPOB.

Everything here is a pure function of tensors plus, where a statistic spans the global
minibatch, the process group to reduce over (``None``: this process holds the whole
minibatch). The actors orchestrate; they never re-derive these formulas.

Units, to keep two different squared norms apart:
- ``sq_grad_norms``: ‖∇θ log π_θ(τ_i)‖² = ‖∇θ Σ_t m_{i,t} log π_θ(y_{i,t})‖², unweighted and
  not length-normalised (what ``verl.workers.actor.traj_grad_norms`` returns by default);
- the score of the trained estimator, s_i = ∇θ[(w̃_i / L_i) Σ_t m_{i,t} log π_θ(y_{i,t})], has
  ‖s_i‖² = (w̃_i / L_i)² · ‖∇θ log π_θ(τ_i)‖².
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Annotated, Iterator, Literal, NamedTuple, Sequence

import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field

from verl.trainer.ppo.core_algos import (
    rollout_kl_k3_per_token,
    sequence_log_is_weight,
    truncated_log_is_weight,
)
from verl.utils.config import ConfigError, check_choice, config_section
from verl.utils.distributed import all_reduce_sum_, get_world_size
from verl.utils.torch_functional import masked_sum

ESS_SCALING_RULES = ("sqrt", "linear")
NONFINITE_RULES = ("skip", "min_lr")
OPOB_AGG_MODES = ("mean", "median", "winsorized_mean")

# A group whose rewards spread less than this is not divided by its std (it would blow up 0/0).
GROUP_STD_EPS = 1e-8
# Fraction of a scope's total weight by which a cumulative weight may fall short of a quantile.
_QUANTILE_TIE_SLACK = 1e-6


# ----------------------------------------------------------------------------------------------
# Configs (keys mirror the VCPO release)
# ----------------------------------------------------------------------------------------------


@config_section
class ESSScalingConfig:
    """ESS-scaled learning rate (VCPO part i): each optimizer step's lr is scaled by
    s = min(1, ρ_ess / ρ_ref), as lr·√s (``sqrt``) or lr·s (``linear``)."""

    enable: bool = False
    """Scale each optimizer step's lr by the minibatch's ESS ratio."""
    scaling_rule: Literal["sqrt", "linear"] = "sqrt"
    """``sqrt`` (lr·√s, for Adam-style optimizers) or ``linear`` (lr·s)."""
    base_ess_ratio: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    """ρ_ref: 1.0 for single-turn tasks, 0.55 for multi-turn tool use (engine/trainer mismatch keeps ρ_ess < 1)."""
    use_clipped: bool = False
    """ESS from the truncated weights min(w, C) instead of the raw w."""
    nonfinite_rule: Literal["skip", "min_lr"] = "skip"
    """An undefined ESS (NaN log weight, all weights 0) never gives full lr: ``skip`` the step, or ``min_lr`` (ρ_ess = 1/B)."""


@config_section
class GradBaseliningConfig:
    """Off-policy optimal baseline, OPOB (VCPO part ii).

    The baseline of a scope is b = agg({v_i}, weights W_i), with (see ``opob_log_weights``)
      W_i = [w̃_i² if weighting == "reference"] · [ŵ_i² if use_is_weights] · ‖∇θ log π(τ_i)‖²
            / [L_i² if normalize_by_length],      ŵ_i = w̃_i if use_clipped_is_ratios else w_i.
    ``weighting=paper`` is the paper's W_i = w_i² ‖∇log π(τ_i)‖² (with the defaults); ``reference``
    reproduces the VCPO release, whose per-trajectory norm is already the norm of the
    truncated-weighted score, so with ``use_is_weights`` it counts the IS weight twice. The exact
    minimum-variance baseline of the estimator we train with (W_i = ‖s_i‖² = (w̃_i/L_i)² ‖∇log π(τ_i)‖²)
    is ``paper`` + ``use_clipped_is_ratios`` + ``normalize_by_length``. How the per-trajectory
    norms are computed is ``actor.update_policy_per_traj``.
    """

    enable: bool = False
    """Replace each trajectory's advantage by its OPOB coefficient."""
    scope: Literal["group", "minibatch"] = "group"
    """``group``: one b per GRPO group over rewards (whole groups per rank); ``minibatch``: one b over the global minibatch's advantages."""
    agg_mode: Literal["mean", "median", "winsorized_mean"] = "mean"
    """Weighted mean (the minimum-variance baseline), weighted median, or mean of values clipped to the weighted quantiles."""
    use_is_weights: bool = True
    """Multiply W_i by the squared IS weight."""
    use_clipped_is_ratios: bool = False
    """Use the truncated weight w̃ instead of w in W_i."""
    normalize_by_length: bool = False
    """Divide W_i by the squared response length."""
    norm_by_std: bool = True
    """Group scope: c_i = (R_i − b_G)/σ_G with the group's population reward std (1 when ≤ 1e-8)."""
    weighting: Literal["paper", "reference"] = "paper"
    """``paper``: W_i as in the paper; ``reference``: the release's double-counted IS weight."""
    winsorize_lower: Annotated[float, Field(ge=0.0, le=0.5)] = 0.05
    """Lower weighted quantile for ``winsorized_mean``."""
    winsorize_upper: Annotated[float, Field(ge=0.5, le=1.0)] = 0.95
    """Upper weighted quantile for ``winsorized_mean``."""

    def validate(self, prefix: str) -> None:
        if not self.winsorize_lower < self.winsorize_upper:
            raise ConfigError(f"{prefix}.winsorize_upper", self.winsorize_upper,
                              f"must be > winsorize_lower={self.winsorize_lower}")


# ----------------------------------------------------------------------------------------------
# Collectives over the global minibatch
# ----------------------------------------------------------------------------------------------


def all_gather_rows(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Every rank's rows of ``x`` concatenated in rank order; ranks may hold different row counts."""
    world = get_world_size(group)
    if world == 1:
        return x
    count = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c.item()) for c in counts]
    padded = x.new_zeros((max(sizes),) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def combine_shard_sq_grad_norms(sharded: torch.Tensor, replicated: torch.Tensor,
                                group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """‖∇θ f_i‖² [B] from model-parallel pieces: Σ_ranks (sharded part) + replicated part.

    Tensor-/pipeline-parallel ranks hold disjoint slices of the sharded parameters, so their
    per-trajectory squared norms add (all-reduce SUM over ``group``); parameters replicated on
    every rank of ``group`` (e.g. norm weights under TP) are counted once. Not for sequence or
    context parallelism: there each rank holds a partial gradient of the SAME parameters, and
    the partial gradients must be summed before the norm is taken.
    """
    total = sharded.detach().double().clone()
    all_reduce_sum_(total, group)
    return (total + replicated.detach().double()).float()


# ----------------------------------------------------------------------------------------------
# Sequence importance weights and the effective sample size
# ----------------------------------------------------------------------------------------------


class GlobalESS(NamedTuple):
    """ESS of the global minibatch and what was non-finite in it."""

    log_ess: float
    ess: float
    batch_size: int
    num_posinf: int
    num_nan: int

    @property
    def ess_ratio(self) -> float:
        """ρ_ess = ESS / B ∈ [1/B, 1]; NaN when the ESS is undefined."""
        return self.ess / self.batch_size if self.batch_size > 0 else float("nan")

    @property
    def is_finite(self) -> bool:
        return math.isfinite(self.log_ess)


def global_ess(log_w: torch.Tensor, group: dist.ProcessGroup | None = None) -> GlobalESS:
    """ESS = (Σ_i w_i)² / Σ_i w_i² over the global minibatch, in log space.

    log ESS = 2·LSE_i(log w_i) − LSE_i(2 log w_i), LSE = logsumexp. Each rank reduces its own
    trajectories to (LSE(log w), LSE(2 log w), count); these few scalars are all-gathered and
    combined as LSE over ranks, so nothing is exponentiated outside a logsumexp. Each trajectory
    must count once: ``log_w`` must be complete per trajectory (under context parallelism, sum
    the per-rank partial log w over the CP group first) and ``group`` must hold every trajectory
    exactly once, i.e. the data-parallel group (TP and CP ranks share their trajectories).

    Non-finite rule (never full lr by accident):
    - NaN in any log w_i: ESS undefined → log_ess = NaN.
    - +inf log w_i (and no NaN): the infinite weights dominate every finite one; how they compare
      with each other is unknown, and ESS over them lies in [1, #inf], so we take the infimum:
      ESS = 1 (ρ_ess = 1/B, the one-dominating-trajectory limit).
    - every w_i = 0 (all log w = −inf) or an empty minibatch: 0/0 → log_ess = NaN.
    The result is clamped to [0, log B]: rounding may push it a hair past the true bounds.
    """
    local = log_w.detach().double().reshape(-1)
    nan = torch.isnan(local)
    posinf = torch.isposinf(local)
    finite_or_neg = local[~(nan | posinf)]
    stats = torch.stack([
        torch.logsumexp(finite_or_neg, 0) if finite_or_neg.numel() else local.new_tensor(-math.inf),
        torch.logsumexp(2.0 * finite_or_neg, 0) if finite_or_neg.numel() else local.new_tensor(-math.inf),
        local.new_tensor(float(local.numel())),
        posinf.sum().double(),
        nan.sum().double(),
    ])
    every_rank = all_gather_rows(stats[None], group)
    lse1 = torch.logsumexp(every_rank[:, 0], 0).item()
    lse2 = torch.logsumexp(every_rank[:, 1], 0).item()
    batch_size = int(every_rank[:, 2].sum().item())
    num_posinf = int(every_rank[:, 3].sum().item())
    num_nan = int(every_rank[:, 4].sum().item())
    if num_nan > 0 or batch_size == 0:
        log_ess = float("nan")
    elif num_posinf > 0:
        log_ess = 0.0
    elif lse1 == -math.inf:
        log_ess = float("nan")
    else:
        log_ess = min(max(2.0 * lse1 - lse2, 0.0), math.log(batch_size))
    return GlobalESS(log_ess, math.exp(log_ess), batch_size, num_posinf, num_nan)


def ess_lr_scale(ess_ratio: float, base_ess_ratio: float, rule: str, nonfinite_rule: str = "skip",
                 batch_size: int | None = None) -> tuple[float, bool]:
    """The lr multiplier of one step and whether the ESS was non-finite.

    s = min(1, ρ_ess / ρ_ref);  rule ``sqrt``: scale = √s;  rule ``linear``: scale = s.
    A non-finite ρ_ess (see ``global_ess``) never yields full lr (the release's min(1, NaN) = 1
    does): ``nonfinite_rule`` ``skip`` → scale 0 (the caller skips the optimizer step);
    ``min_lr`` → ρ_ess := 1/B, the smallest ratio an actual minibatch can have.
    """
    check_choice("ess_scaling.scaling_rule", rule, ESS_SCALING_RULES)
    check_choice("ess_scaling.nonfinite_rule", nonfinite_rule, NONFINITE_RULES)
    nonfinite = not math.isfinite(ess_ratio)
    if nonfinite:
        if nonfinite_rule == "skip":
            return 0.0, True
        if batch_size is None:
            raise ValueError("ess_lr_scale: nonfinite_rule='min_lr' needs the global batch_size (B, for rho = 1/B)")
        if batch_size == 0:
            return 0.0, True  # an empty minibatch has no ESS and nothing to train: the step is skipped
        ess_ratio = 1.0 / batch_size
    s = min(1.0, ess_ratio / base_ess_ratio)
    return (math.sqrt(s) if rule == "sqrt" else s), nonfinite


def lr_scale_from_ess(ess: GlobalESS, config: ESSScalingConfig) -> tuple[float, bool]:
    """``ess_lr_scale`` driven by the config; (1.0, False) when ESS scaling is off."""
    if not config.enable:
        return 1.0, False
    return ess_lr_scale(ess.ess_ratio, config.base_ess_ratio, config.scaling_rule, config.nonfinite_rule,
                        ess.batch_size)


@contextmanager
def scaled_lr_step(optimizer: torch.optim.Optimizer, scale: float) -> Iterator[None]:
    """Multiply every param group's lr by ``scale`` inside the block, then restore it.

    Wrap exactly one ``optimizer.step()``; the scheduler's lr comes back even if the step
    raises, so the schedule itself never sees the ESS scaling.
    """
    scheduled = [group["lr"] for group in optimizer.param_groups]
    try:
        for group, lr in zip(optimizer.param_groups, scheduled):
            group["lr"] = lr * scale
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, scheduled):
            group["lr"] = lr


# ----------------------------------------------------------------------------------------------
# OPOB: weights, baselines, coefficients
# ----------------------------------------------------------------------------------------------


def check_whole_groups(group_ids_per_rank: Sequence[torch.Tensor]) -> None:
    """Raise ValueError if any group id occurs on more than one rank (group scope needs whole groups)."""
    owner: dict[int, int] = {}
    split: dict[int, set[int]] = {}
    for rank, ids in enumerate(group_ids_per_rank):
        for gid in torch.as_tensor(ids).reshape(-1).unique().tolist():
            if gid in owner and owner[gid] != rank:
                split.setdefault(gid, {owner[gid]}).add(rank)
            owner.setdefault(gid, rank)
    if split:
        shown = ", ".join(f"group {g} on ranks {sorted(r)}" for g, r in list(split.items())[:5])
        raise ValueError(f"OPOB scope 'group' needs whole groups per rank, but {len(split)} are split: {shown}")


def assert_whole_groups(group_ids: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
    """``check_whole_groups`` across the ranks of ``group`` (one all-gather of the ids)."""
    world = get_world_size(group)
    if world == 1:
        return
    tagged = torch.stack([group_ids.long().reshape(-1),
                          torch.full_like(group_ids.long().reshape(-1), dist.get_rank(group))], dim=1)
    every = all_gather_rows(tagged, group)
    check_whole_groups([every[every[:, 1] == r, 0] for r in range(world)])


def opob_log_weights(sq_grad_norms: torch.Tensor, log_w: torch.Tensor, w_trunc: torch.Tensor,
                     lengths: torch.Tensor, config: GradBaseliningConfig) -> torch.Tensor:
    """log W_i of the OPOB weights, float64 [B] (log space: w_i may overflow any float; float64 so
    that W = exp(log W) keeps its relative precision when |log W| is large).

    log W_i = log ‖∇θ log π(τ_i)‖²
              + 2 log w̃_i                 if weighting == "reference"
              + 2 log ŵ_i                 if use_is_weights (ŵ = w̃ if use_clipped_is_ratios else w)
              − 2 log max(L_i, 1)         if normalize_by_length
    ``sq_grad_norms`` is the unweighted ‖∇θ Σ_t m log π‖², ``w_trunc`` = min(w, C), ``lengths``
    the number of policy tokens L_i. The three weightings of SPEC:
    paper (default flags) w²‖∇log π‖²; reference w̃²w²‖∇log π‖²; exact for the trained
    estimator (paper + use_clipped_is_ratios + normalize_by_length) (w̃/L)²‖∇log π‖².
    """
    log_w_trunc = torch.log(w_trunc.double())
    out = torch.log(sq_grad_norms.double())
    if config.weighting == "reference":
        out = out + 2.0 * log_w_trunc
    if config.use_is_weights:
        out = out + 2.0 * (log_w_trunc if config.use_clipped_is_ratios else log_w.double())
    if config.normalize_by_length:
        out = out - 2.0 * torch.log(lengths.double().clamp(min=1.0))
    return out


def scope_normalized_weights(log_weights: torch.Tensor) -> torch.Tensor:
    """Weights of one scope, W_i / max_j W_j ∈ [0, 1], float64, from log W.

    A baseline is invariant to scaling every weight of its scope, so dividing by the largest
    before exponentiating loses nothing and cannot overflow. Non-finite rule:
    - some log W = +inf: those dominate (the limit): weight 1 for them, 0 for the rest;
    - some log W = NaN, or every W = 0: the weighted baseline is undefined: equal weights
      (the plain, unweighted aggregate).
    """
    lw = log_weights.detach().double()
    if torch.isnan(lw).any():
        return torch.ones_like(lw)
    if torch.isposinf(lw).any():
        return torch.isposinf(lw).double()
    top = lw.max() if lw.numel() else lw.new_tensor(-math.inf)
    if top == -math.inf:
        return torch.ones_like(lw)
    return torch.exp(lw - top)


def trajectory_advantages(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Each trajectory's (outcome) advantage [B], float32: its value at the first response token the
    mask keeps, wherever that is (0 for a trajectory with no response token). Minibatch-scope OPOB
    aggregates these."""
    keep = response_mask > 0
    first = keep.int().argmax(dim=-1, keepdim=True)
    value = advantages.gather(-1, first).squeeze(-1).float()
    return torch.where(keep.any(dim=-1), value, torch.zeros_like(value))


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ W v / Σ W; the plain mean when Σ W is 0 or non-finite (the weighted one is undefined)."""
    v, w = values.double(), weights.double()
    total = w.sum()
    if not torch.isfinite(total) or total <= 0:
        return v.mean()
    return (w * v).sum() / total


def weighted_quantile(values: torch.Tensor, weights: torch.Tensor, q: float) -> torch.Tensor:
    """The lower weighted q-quantile: the inverse of the weighted empirical CDF.

    Sort v_(1) ≤ … ≤ v_(n) carrying weights W_(k), C_k = Σ_{j≤k} W_(j), S = C_n. The quantile is
    v_(k*) with k* = min{k : C_k ≥ q·S − 1e-6·S}, so for q > 0 it is a value of positive weight.
    The 1e-6·S slack makes exact ties (equal weights, the usual case) robust to the float32
    rounding of log weights. The weighted median is q = 0.5 (equal weights, even n: the lower
    middle value). Weights with S = 0 or non-finite S fall back to equal weights. An empty scope
    has no quantile: NaN, as its weighted mean (0/0) is.
    """
    v, w = values.double(), weights.double()
    if v.numel() == 0:
        return v.new_tensor(float("nan"))
    total = w.sum()
    if not torch.isfinite(total) or total <= 0:
        w, total = torch.ones_like(v), v.new_tensor(float(v.numel()))
    order = torch.argsort(v, stable=True)
    cumulative = torch.cumsum(w[order], 0)
    target = (q - _QUANTILE_TIE_SLACK) * total
    k = int(torch.searchsorted(cumulative, target, right=False).clamp(max=v.numel() - 1))
    return v[order][k]


def aggregate_baseline(values: torch.Tensor, weights: torch.Tensor, agg_mode: str,
                       winsorize: tuple[float, float] = (0.05, 0.95)) -> torch.Tensor:
    """One scope's baseline from its values and (finite, ≥ 0) weights, float64 scalar.

    mean: Σ W v / Σ W.  median: weighted_quantile(v, W, 0.5).
    winsorized_mean: v' = clamp(v, Q(lo), Q(hi)) with Q the weighted quantile, then Σ W v' / Σ W.
    """
    check_choice("grad_baselining.agg_mode", agg_mode, OPOB_AGG_MODES)
    if agg_mode == "mean":
        return weighted_mean(values, weights)
    if agg_mode == "median":
        return weighted_quantile(values, weights, 0.5)
    low = weighted_quantile(values, weights, winsorize[0])
    high = weighted_quantile(values, weights, winsorize[1])
    return weighted_mean(values.double().clamp(min=low, max=high), weights)


def opob_baselines(values: torch.Tensor, log_weights: torch.Tensor, group_ids: torch.Tensor | None,
                   agg_mode: str = "mean", group: dist.ProcessGroup | None = None,
                   winsorize: tuple[float, float] = (0.05, 0.95)) -> torch.Tensor:
    """Per-trajectory baseline b_i of its scope, float64 [B] (rounding b to float32 would make
    R - b wrong when a group's rewards differ by less than a float32 step of b).

    b_G = aggregate_baseline({v_i}_{i∈G}, {W_i / max_{j∈G} W_j}_{i∈G}); for the mean this is
    b* = Σ_{i∈G} W_i v_i / Σ_{i∈G} W_i, the minimum of Σ_i W_i (v_i − b)² over b.
    - ``group_ids`` [B] given: one scope per id, local to this rank (whole groups per rank:
      verify with ``assert_whole_groups``); ``group`` is unused.
    - ``group_ids`` None: one scope over the global minibatch: (v, log W) of every rank of
      ``group`` are all-gathered (B scalars each; one code path for all agg modes and the same
      non-finite rule as in one process), and every rank computes the same b.
    Weights come from ``log_weights`` through ``scope_normalized_weights`` (overflow-free, with
    its non-finite rule).
    """
    if group_ids is None:
        all_values = all_gather_rows(values.detach().double(), group)
        all_log_weights = all_gather_rows(log_weights.detach().double(), group)
        b = aggregate_baseline(all_values, scope_normalized_weights(all_log_weights), agg_mode, winsorize)
        return torch.full_like(values, float(b), dtype=torch.float64)
    out = torch.empty(values.shape, dtype=torch.float64, device=values.device)
    for gid in group_ids.unique():
        members = group_ids == gid
        out[members] = aggregate_baseline(values[members], scope_normalized_weights(log_weights[members]),
                                          agg_mode, winsorize)
    return out


def opob_coefficients(values: torch.Tensor, baselines: torch.Tensor, group_ids: torch.Tensor | None = None,
                      norm_by_std: bool = False, std_eps: float = GROUP_STD_EPS) -> torch.Tensor:
    """Per-trajectory coefficients c_i of the final gradient g = (1/B) Σ_i c_i s_i, float64 [B]
    (computed from float64 values and baselines; the loss coefficients round them once, at the end).

    c_i = (v_i − b_i) / σ_{G(i)}  if norm_by_std, σ_G = population std of {v_j}_{j∈G}
          (the group's rewards), replaced by 1 when σ_G ≤ std_eps;
    c_i = v_i − b_i               otherwise (minibatch scope: v are advantages already normalised).
    s_i = ∇θ[(w̃_i / L_i) Σ_t m_{i,t} log π_θ(y_{i,t})] is the truncated-IS, length-normalised score;
    the loss that yields g is ``opob_surrogate_loss`` (its NEGATIVE gradient is g, so an
    optimizer descending the loss ascends the objective along g). B is the global batch size.
    """
    c = values.double() - baselines.double()
    if norm_by_std:
        if group_ids is None:
            raise ValueError("norm_by_std needs group_ids (it divides by each group's reward std)")
        for gid in group_ids.unique():
            members = group_ids == gid
            std = values[members].double().std(unbiased=False)
            if std > std_eps:
                c[members] = c[members] / std
    return c


class OPOBResult(NamedTuple):
    coefficients: torch.Tensor
    baselines: torch.Tensor
    log_weights: torch.Tensor


def compute_opob(config: GradBaseliningConfig, values: torch.Tensor, sq_grad_norms: torch.Tensor,
                 log_w: torch.Tensor, w_trunc: torch.Tensor, lengths: torch.Tensor,
                 group_ids: torch.Tensor | None, group: dist.ProcessGroup | None = None) -> OPOBResult:
    """Weights → baselines → coefficients of one minibatch, as the config says.

    Group scope: values = rewards R_i, one baseline per ``group_ids`` group, c = (R − b_G)/σ_G
    with ``norm_by_std``. Minibatch scope: values = advantages, one baseline over every rank of
    ``group`` (the data-parallel group: each trajectory once), c = A − b.
    """
    log_weights = opob_log_weights(sq_grad_norms, log_w, w_trunc, lengths, config)
    winsorize = (config.winsorize_lower, config.winsorize_upper)
    if config.scope == "group":
        if group_ids is None:
            raise ValueError("OPOB scope 'group' needs group_ids (see group_ids_from_uids)")
        baselines = opob_baselines(values, log_weights, group_ids, config.agg_mode, winsorize=winsorize)
        coefficients = opob_coefficients(values, baselines, group_ids, config.norm_by_std)
    else:
        baselines = opob_baselines(values, log_weights, None, config.agg_mode, group, winsorize)
        coefficients = opob_coefficients(values, baselines)
    return OPOBResult(coefficients, baselines, log_weights)


def opob_loss_coefficients(coefficients: torch.Tensor, w_trunc: torch.Tensor, lengths: torch.Tensor,
                           global_batch_size: int) -> torch.Tensor:
    """k_i = ∂ℓ/∂f_i = −c_i w̃_i / (max(L_i, 1) · B), float32 [B], for ℓ = Σ_i k_i f_i.

    f_i = Σ_t m_{i,t} log π_θ(y_{i,t}), so −∇ℓ = (1/B) Σ_i c_i s_i = g: the per-trajectory factors
    that turn ∇f_i into the OPOB-weighted update (e.g. for
    ``PerTrajectoryGradNorms.accumulate_weighted_grads``). B is the GLOBAL minibatch size, so
    summing every rank's gradient (all-reduce SUM) gives exactly g.
    """
    return -(coefficients.detach().float() * w_trunc.detach().float()
             / (lengths.float().clamp(min=1.0) * global_batch_size))


def opob_surrogate_loss(log_prob: torch.Tensor, response_mask: torch.Tensor, coefficients: torch.Tensor,
                        w_trunc: torch.Tensor, global_batch_size: int) -> torch.Tensor:
    """ℓ = −(1/B) Σ_i c_i (w̃_i / L_i) Σ_t m_{i,t} log π_θ(y_{i,t}) = Σ_i k_i f_i, so −∇ℓ = g.

    The bypass-mode VCPO loss with each trajectory's advantage replaced by its OPOB coefficient
    (c_i and w̃_i detached), L_i = max(Σ_t m_{i,t}, 1); see ``opob_loss_coefficients``.
    """
    k = opob_loss_coefficients(coefficients, w_trunc, response_mask.float().sum(-1), global_batch_size)
    return (k * masked_sum(log_prob.float(), response_mask, dim=-1)).sum()


# ----------------------------------------------------------------------------------------------
# Diagnostics
# ----------------------------------------------------------------------------------------------

# Decades [10^e, 10^(e+1)) of the per-trajectory gradient-norm histogram, fixed so steps compare;
# norms below the first or above the last decade are counted in the end bins.
GRAD_NORM_HIST_EXPONENTS = tuple(range(-4, 4))


def grad_norm_histogram(norms: np.ndarray) -> dict[str, float]:
    """Counts of ``norms`` per decade, keyed ``traj_grad_norm_hist/1e<e>`` (the bin's lower edge)."""
    exponents = np.floor(np.log10(np.maximum(np.asarray(norms, dtype=np.float64), 1e-300)))
    clipped = np.clip(exponents, GRAD_NORM_HIST_EXPONENTS[0], GRAD_NORM_HIST_EXPONENTS[-1])
    return {f"traj_grad_norm_hist/1e{e}": float((clipped == e).sum()) for e in GRAD_NORM_HIST_EXPONENTS}


def vcpo_metrics(log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, response_mask: torch.Tensor,
                 tis_clip: float, ess: GlobalESS, ess_clipped: GlobalESS, lr_scale: float,
                 sq_grad_norms: torch.Tensor | None = None, baselines: torch.Tensor | None = None,
                 log_weights: torch.Tensor | None = None,
                 group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """The VCPO diagnostics of one minibatch, flat float metrics reduced over ``group`` (same on every rank).

    - ``ess``, ``ess_ratio`` (from w), ``ess_clipped``, ``ess_ratio_clipped`` (from w̃ = min(w, C)),
      ``lr_scale``, ``nonfinite_count`` (trajectories whose log w is NaN or +inf: the ESS then
      came from the non-finite rule);
    - sequence IS weights over trajectories with a response token and a finite log w:
      ``is_weight_mean`` (of w̃, as core_algos' TIS metrics), ``is_weight_max`` and
      ``log_is_weight_max`` (of w), ``is_weight_truncated_frac`` (w > C);
    - ``rollout_kl_k3``: KL(rollout‖policy) = E_μ[(r − 1) − log r], r = π/μ, averaged over every
      response token of the global minibatch (``rollout_kl_k3_per_token``);
    - ``traj_grad_norm_mean|max`` of ‖∇log π(τ_i)‖ and its decade histogram (``grad_norm_histogram``);
    - ``opob_baseline_mean|std|min|max`` over trajectories (each trajectory's scope baseline) and
      ``opob_weight_nonfinite_count`` (log W NaN or +inf).
    """
    log_w = sequence_log_is_weight(log_prob.double(), rollout_log_prob.double(), response_mask)
    has_tokens = (response_mask > 0).any(-1)
    all_log_w = all_gather_rows(torch.stack([log_w, has_tokens.double()], 1), group)
    valid = all_log_w[:, 1] > 0
    log_w_ok = all_log_w[valid & torch.isfinite(all_log_w[:, 0]), 0]
    k3 = rollout_kl_k3_per_token(log_prob.double(), rollout_log_prob.double(), response_mask)
    token_stats = torch.stack([k3.sum(), (response_mask > 0).double().sum()])
    all_reduce_sum_(token_stats, group)
    any_ok = log_w_ok.numel() > 0
    max_log_w = float(log_w_ok.max()) if any_ok else float("nan")
    metrics = {
        "ess": ess.ess,
        "ess_ratio": ess.ess_ratio,
        "ess_clipped": ess_clipped.ess,
        "ess_ratio_clipped": ess_clipped.ess_ratio,
        "lr_scale": float(lr_scale),
        "nonfinite_count": float(ess.num_nan + ess.num_posinf),
        "is_weight_mean": float(torch.exp(truncated_log_is_weight(log_w_ok, tis_clip)).mean()) if any_ok else float("nan"),
        # No finite log w: NaN, like the other statistics of an empty set (not the inf a NaN compare gives).
        "is_weight_max": float("nan") if not any_ok else math.exp(max_log_w) if max_log_w < 709.0 else float("inf"),
        "log_is_weight_max": max_log_w,
        "is_weight_truncated_frac": float((log_w_ok > math.log(tis_clip)).double().mean()) if any_ok else 0.0,
        "rollout_kl_k3": float(token_stats[0] / token_stats[1].clamp(min=1.0)),
    }
    if sq_grad_norms is not None:
        norms = all_gather_rows(sq_grad_norms.detach().double(), group).clamp(min=0.0).sqrt()
        metrics["traj_grad_norm_mean"] = float(norms.mean())
        metrics["traj_grad_norm_max"] = float(norms.max())
        metrics.update(grad_norm_histogram(norms.cpu().numpy()))
    if baselines is not None:
        b = all_gather_rows(baselines.detach().double(), group)
        metrics["opob_baseline_mean"] = float(b.mean())
        metrics["opob_baseline_std"] = float(b.std(unbiased=False))
        metrics["opob_baseline_min"] = float(b.min())
        metrics["opob_baseline_max"] = float(b.max())
    if log_weights is not None:
        lw = all_gather_rows(log_weights.detach().double(), group)
        metrics["opob_weight_nonfinite_count"] = float((torch.isnan(lw) | torch.isposinf(lw)).sum())
    return metrics
