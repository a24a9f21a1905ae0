"""Advantage estimators, loss aggregation, importance weights and policy losses (trainer/actor).

Data flow: the trainer calls ``compute_advantage`` on a rollout batch from the queue; the actor
calls ``compute_policy_loss`` (which calls ``agg_loss`` and the log-space IS helpers) per
micro-batch. Every function is pure: tensors in, tensors out; each states its formula.

Shapes: B trajectories, R response positions; ``response_mask`` [B, R] is 1 on tokens the policy
generated. Log-probs are float32 and 0 (or anything) where the mask is 0: masked positions never
reach a sum, even as NaN.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np
import torch

from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits, masked_mean, masked_sum

if TYPE_CHECKING:
    from verl.protocol import DataProto

__all__ = [
    "ADV_ESTIMATORS",
    "LOSS_AGG_MODES",
    "POLICY_LOSS_MODES",
    "TIS_LEVELS",
    "OutcomeAdvantage",
    "agg_loss",
    "compute_advantage",
    "compute_drgrpo_outcome_advantage",
    "compute_grpo_outcome_advantage",
    "compute_policy_loss",
    "compute_reinforce_baseline_advantage",
    "compute_rloo_outcome_advantage",
    "entropy_from_logits",
    "get_adv_estimator_fn",
    "group_ids_from_index",
    "group_ids_from_uids",
    "logprobs_from_logits",
    "loss_normalizer_counts",
    "rollout_kl_k3",
    "rollout_kl_k3_per_token",
    "sequence_log_is_weight",
    "token_log_is_ratio",
    "truncated_is_weight",
    "truncated_log_is_weight",
]

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
POLICY_LOSS_MODES = ("ppo_clip", "bypass")
TIS_LEVELS = ("none", "token", "sequence")

# exp() of a log-ratio beyond this overflows float32 or is clipped anyway (e^20 ~ 5e8).
_MAX_LOG_RATIO = 20.0


# --------------------------------------------------------------------------- advantages


@dataclass
class OutcomeAdvantage:
    """What an outcome-reward estimator produces.

    ``advantages``/``returns`` [B, R]: the per-sample scalar broadcast over the response mask
    (returns = advantages: these estimators are critic-free). ``scores`` [B]: the scalar
    reward R_i; ``scalar_advantages`` [B]: A_i; ``group_ids`` [B] long: 0..G-1, one per uid.
    The OPOB baseline reads the last three.
    """

    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor
    scalar_advantages: torch.Tensor
    group_ids: torch.Tensor


def group_ids_from_uids(uids: Sequence[Any] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """int64 group ids from each trajectory's ``uid``, equal on every rank and in every batch.

    id = BLAKE2b-64(str(uid)) >> 1: a digest, not an enumeration of this batch, so the ids of one
    group agree across data-parallel ranks and mini-batches (the OPOB whole-group checks compare them).
    """
    if isinstance(uids, torch.Tensor):
        uids = uids.cpu().numpy()
    ids = [int.from_bytes(hashlib.blake2b(str(u).encode(), digest_size=8).digest(), "little") >> 1
           for u in np.asarray(uids, dtype=object).reshape(-1)]
    return torch.tensor(ids, dtype=torch.long)


def group_ids_from_index(index: Sequence[Any] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Contiguous ids 0..G-1 of the uid groups of ONE batch, in sorted-uid order (for bincount-style
    group statistics); ids that must agree across ranks come from ``group_ids_from_uids``."""
    if isinstance(index, torch.Tensor):
        index = index.cpu().numpy()
    _, inverse = np.unique(np.asarray(index), return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.long)


def _outcome_scores(token_level_rewards: torch.Tensor) -> torch.Tensor:
    """R_i = sum_t r_it: the outcome reward sits on one token; a [B] input is already R."""
    rewards = token_level_rewards.float()
    return rewards if rewards.dim() == 1 else rewards.sum(dim=-1)


def _group_stats(
    scores: torch.Tensor, group_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (group mean, unbiased group std, group size) of ``scores``.

    std = sqrt(sum_{j in G} (R_j - mean_G)^2 / (n_G - 1)); 0 for n_G = 1.
    """
    group_ids = group_ids.to(scores.device)
    num_groups = int(group_ids.max()) + 1 if group_ids.numel() else 0
    counts = torch.bincount(group_ids, minlength=num_groups).to(scores.dtype)
    sums = torch.zeros(num_groups, dtype=scores.dtype, device=scores.device).index_add_(0, group_ids, scores)
    mean = (sums / counts)[group_ids]
    sq_dev = torch.zeros_like(sums).index_add_(0, group_ids, (scores - mean) ** 2)
    std = (sq_dev / (counts - 1).clamp(min=1)).sqrt()[group_ids]
    return mean, std, counts[group_ids]


def _broadcast(
    scores: torch.Tensor,
    scalar_advantages: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: torch.Tensor,
) -> OutcomeAdvantage:
    advantages = scalar_advantages[:, None] * response_mask.float()
    return OutcomeAdvantage(advantages, advantages.clone(), scores, scalar_advantages, group_ids)


def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Sequence[Any] | np.ndarray,
    norm_adv_by_std_in_grpo: bool = True,
    epsilon: float = 1e-6,
) -> OutcomeAdvantage:
    """GRPO: A_i = (R_i - mean_G(R)) / (std_G(R) + eps), or R_i - mean_G(R) without std division.

    std_G is the unbiased (Bessel) sample std of the group's rewards. A group of one sample has
    no baseline to compare with: its advantage is 0 (the config layer forbids n < 2).
    """
    scores = _outcome_scores(token_level_rewards)
    group_ids = group_ids_from_index(index)
    mean, std, counts = _group_stats(scores, group_ids)
    centred = scores - mean
    if norm_adv_by_std_in_grpo:
        centred = centred / (std + epsilon)
    scalar = torch.where(counts > 1, centred, torch.zeros_like(centred))
    return _broadcast(scores, scalar, response_mask, group_ids)


def compute_drgrpo_outcome_advantage(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Sequence[Any] | np.ndarray
) -> OutcomeAdvantage:
    """Dr.GRPO: A_i = R_i - mean_G(R), no std division (0 for a group of one).

    Pair it with ``loss_agg_mode="seq-mean-token-sum-norm"`` (constant length normaliser).
    """
    return compute_grpo_outcome_advantage(
        token_level_rewards, response_mask, index, norm_adv_by_std_in_grpo=False
    )


def compute_rloo_outcome_advantage(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Sequence[Any] | np.ndarray
) -> OutcomeAdvantage:
    """RLOO: A_i = R_i - (sum_{j in G, j != i} R_j) / (n_G - 1) = n_G / (n_G - 1) * (R_i - mean_G(R)).

    0 for a group of one.
    """
    scores = _outcome_scores(token_level_rewards)
    group_ids = group_ids_from_index(index)
    mean, _, counts = _group_stats(scores, group_ids)
    leave_one_out = (mean * counts - scores) / (counts - 1).clamp(min=1)
    scalar = torch.where(counts > 1, scores - leave_one_out, torch.zeros_like(scores))
    return _broadcast(scores, scalar, response_mask, group_ids)


def compute_reinforce_baseline_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Sequence[Any] | np.ndarray,
    whiten: bool = True,
    epsilon: float = 1e-6,
) -> OutcomeAdvantage:
    """REINFORCE with a batch-mean baseline: A_i = R_i - mean_B(R), whitened to
    (R_i - mean_B(R)) / (std_B(R) + eps) by default (unbiased std over the batch's samples).

    ``index`` only fills ``group_ids``. Registered as "reinforce_baseline" and, for veRL
    configs, "reinforce_plus_plus_baseline"; unlike veRL's estimator of that name the baseline
    is the batch mean, not the group mean. A batch of one sample gets advantage 0.
    """
    scores = _outcome_scores(token_level_rewards)
    if scores.numel() < 2:
        scalar = torch.zeros_like(scores)
    else:
        scalar = scores - scores.mean()
        if whiten:
            scalar = scalar / (scores.std() + epsilon)
    return _broadcast(scores, scalar, response_mask, group_ids_from_index(index))


ADV_ESTIMATORS: dict[str, Callable[..., OutcomeAdvantage]] = {
    "grpo": compute_grpo_outcome_advantage,
    "rloo": compute_rloo_outcome_advantage,
    "reinforce_baseline": compute_reinforce_baseline_advantage,
    "reinforce_plus_plus_baseline": compute_reinforce_baseline_advantage,
    "drgrpo": compute_drgrpo_outcome_advantage,
}


def get_adv_estimator_fn(name: str) -> Callable[..., OutcomeAdvantage]:
    """The estimator registered under ``name``; each takes (token_level_rewards, response_mask,
    index, **its own options) and returns an ``OutcomeAdvantage``."""
    if name not in ADV_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {', '.join(sorted(ADV_ESTIMATORS))}")
    return ADV_ESTIMATORS[name]


class _AdvantageSettings(Protocol):
    adv_estimator: str
    norm_adv_by_std_in_grpo: bool


def compute_advantage(data: "DataProto", config: _AdvantageSettings) -> "DataProto":
    """Write ``advantages`` and ``returns`` [B, R] into ``data.batch`` (in place; returns ``data``).

    Reads ``token_level_rewards``, ``response_mask`` and the ``uid`` groups. Only GRPO takes
    ``norm_adv_by_std_in_grpo``; the other estimators use their documented defaults.
    """
    estimator = get_adv_estimator_fn(config.adv_estimator)
    options = {}
    if config.adv_estimator == "grpo":
        options["norm_adv_by_std_in_grpo"] = config.norm_adv_by_std_in_grpo
    rewards, mask = data.batch["token_level_rewards"], data.batch["response_mask"]
    out = estimator(rewards, mask, data.non_tensor_batch["uid"], **options)
    data.batch["advantages"] = out.advantages
    data.batch["returns"] = out.returns
    return data


# --------------------------------------------------------------------------- loss aggregation


def loss_normalizer_counts(loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N_tok, N_seq) = (sum of the mask, number of sequences with at least one loss token), float32.

    Sequences without loss tokens (padding rows) are not counted. Sum these over micro-batches
    and data-parallel ranks to get the global counts ``agg_loss`` needs.
    """
    mask = loss_mask.float()
    return mask.sum(), (mask.sum(dim=-1) > 0).float().sum()


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    global_num_tokens: float | torch.Tensor | None = None,
    global_num_seqs: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss [B, R] to a scalar. With m the mask, L_i = sum_t m_it, T = R (the
    padded max response length), N_tok and N_seq from ``loss_normalizer_counts``:

        token-mean:               sum_i sum_t m l / N_tok
        seq-mean-token-mean:      sum_i (sum_t m l / L_i) / N_seq
        seq-mean-token-sum:       sum_i sum_t m l / N_seq
        seq-mean-token-sum-norm:  sum_i sum_t m l / (N_seq * T)     (Dr.GRPO's constant normaliser)

    N_tok and N_seq default to this batch's counts. A micro-batch or data-parallel shard passes
    the counts of the whole mini-batch instead; then the shards' losses (and gradients) add up
    to exactly the whole mini-batch's.
    """
    local_tokens, local_seqs = loss_normalizer_counts(loss_mask)
    num_tokens = local_tokens if global_num_tokens is None else global_num_tokens
    num_seqs = local_seqs if global_num_seqs is None else global_num_seqs
    if loss_agg_mode == "token-mean":
        return masked_sum(loss_mat, loss_mask) / _at_least_one(num_tokens)
    if loss_agg_mode == "seq-mean-token-mean":
        return masked_mean(loss_mat, loss_mask, dim=-1).sum() / _at_least_one(num_seqs)
    if loss_agg_mode == "seq-mean-token-sum":
        return masked_sum(loss_mat, loss_mask) / _at_least_one(num_seqs)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return masked_sum(loss_mat, loss_mask) / (_at_least_one(num_seqs) * loss_mat.shape[-1])
    raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}; known: {', '.join(LOSS_AGG_MODES)}")


def _at_least_one(count: float | torch.Tensor) -> float | torch.Tensor:
    # An all-padding batch has loss 0, not 0/0.
    return count.clamp(min=1.0) if isinstance(count, torch.Tensor) else max(float(count), 1.0)


# --------------------------------------------------------------------------- importance weights


def token_log_is_ratio(
    log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """log r_it = log pi(y_it) - log mu(y_it) on response tokens, 0 elsewhere; [B, R], float32 or wider."""
    dtype = torch.promote_types(torch.promote_types(log_prob.dtype, rollout_log_prob.dtype), torch.float32)
    diff = log_prob.to(dtype) - rollout_log_prob.to(dtype)
    return torch.where(response_mask > 0, diff, torch.zeros_like(diff))


def sequence_log_is_weight(
    log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """log w_i = sum_t m_it (log pi(y_it) - log mu(y_it)); [B], float32 (float64 for float64 inputs).

    The one sequence log IS weight of the code base (TIS here, ESS and OPOB in ``vcpo``). Masked
    positions are dropped with ``where``, so a -inf log-prob on padding cannot turn into NaN.
    Never exponentiated here."""
    return token_log_is_ratio(log_prob, rollout_log_prob, response_mask).sum(dim=-1)


def truncated_log_is_weight(log_weight: torch.Tensor, cap: float) -> torch.Tensor:
    """log w~ = log min(w, C) = min(log w, log C), any shape; NaN stays NaN, -inf stays -inf."""
    return torch.clamp(log_weight, max=math.log(cap))


def truncated_is_weight(log_weight: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated IS weight min(w, C) = exp(min(log w, log C)), detached float32, any shape.

    Clamping in log space first means log w = 1e4 gives C, not exp(1e4) = inf; log w = -inf
    gives 0. A NaN log-weight stays NaN so the non-finite-gradient rule skips the step.
    """
    return torch.exp(truncated_log_is_weight(log_weight.detach().float(), cap))


def rollout_kl_k3_per_token(
    log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """k3_t = r_t - 1 - d_t with d_t = log pi(y_t) - log mu(y_t), r_t = exp(d_t); 0 off the mask.

    Tokens are sampled from mu, so E_mu[r] = 1 and KL(mu || pi) = E_mu[-d] = E_mu[r - 1 - d], with
    r - 1 - d >= 0 token by token (lower variance than -d). d is clamped at 20 so exp(d) stays
    finite; expm1 keeps small d exact. Computed in the inputs' dtype (at least float32), detached.
    """
    d = token_log_is_ratio(log_prob.detach(), rollout_log_prob.detach(), response_mask).clamp(max=_MAX_LOG_RATIO)
    return torch.where(response_mask > 0, torch.expm1(d) - d, torch.zeros_like(d))


def rollout_kl_k3(
    log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """KL(mu || pi) per token by the k3 estimator (``rollout_kl_k3_per_token``), averaged over response tokens."""
    return masked_mean(rollout_kl_k3_per_token(log_prob, rollout_log_prob, response_mask), response_mask)


# --------------------------------------------------------------------------- policy loss


def compute_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor | None,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    mode: str = "ppo_clip",
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float | None = 3.0,
    rollout_log_prob: torch.Tensor | None = None,
    tis_level: str = "none",
    tis_cap: float = 8.0,
    global_num_tokens: float | torch.Tensor | None = None,
    global_num_seqs: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy-gradient loss on [B, R] tensors, reduced by ``agg_loss``; returns (loss, metrics).

    Per-token loss l_t, with anchor log-probs a_t (the policy the ratio is taken against):
      ppo_clip: rho_t = exp(log pi_t - old_t), a_t = old_t,
                l_t = max(-A rho_t, -A clip(rho_t, 1 - eps_low, 1 + eps_high));
                dual clip for A < 0: l_t = min(l_t, -A c) (off when ``clip_ratio_c`` is None).
                log rho is clamped to [-20, 20] before exp.
      bypass:   rho_t = exp(log pi_t - sg(log pi_t)) = 1 with gradient grad log pi_t,
                a_t = sg(log pi_t), l_t = -A rho_t (no clipping; ``old_log_prob`` unused).
    Truncated IS against the rollout (behaviour) log-probs mu, detached:
      token:    l_t *= min(exp(a_t - log mu_t), C)
      sequence: l_t *= min(exp(sum_s (a_s - log mu_s)), C)  (the same w~_i on every token of i)
    So bypass + sequence TIS + seq-mean-token-mean is VCPO's l_i = -(w~_i / L_i) sum_t A_i log pi.

    Metrics (detached 0-dim tensors, no host sync; over this call's tokens/sequences):
    ``pg_loss``, ``pg_clipfrac`` (tokens where the clipped branch is taken),
    ``pg_clipfrac_lower`` (dual clip), ``ppo_kl`` (mean of old - log pi); with rollout
    log-probs also ``rollout_kl_k3`` (see ``rollout_kl_k3``) and the IS statistics at the TIS
    level in use (sequence level when ``tis_level="none"``):
    ``is_weight_mean`` (truncated), ``log_is_weight_max`` (untruncated, log space),
    ``is_weight_truncated_frac``, ``is_weight_nonfinite_frac``.
    """
    mask = response_mask.float()
    log_prob = log_prob.float()
    adv = advantages.float()
    metrics: dict[str, torch.Tensor] = {}
    zero = torch.zeros((), device=log_prob.device)
    if mode == "ppo_clip":
        if old_log_prob is None:
            raise ValueError("mode='ppo_clip' needs old_log_prob")
        anchor = old_log_prob.float()
        log_ratio = torch.clamp(log_prob - anchor, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        ratio = torch.exp(log_ratio)
        unclipped = -adv * ratio
        clipped = -adv * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
        pg_losses = torch.maximum(unclipped, clipped)
        metrics["pg_clipfrac"] = masked_mean((clipped > unclipped).float(), mask)
        if clip_ratio_c is not None:
            dual = -adv * clip_ratio_c
            lower = (adv < 0) & (pg_losses > dual)
            pg_losses = torch.where(lower, dual, pg_losses)
            metrics["pg_clipfrac_lower"] = masked_mean(lower.float(), mask)
        else:
            metrics["pg_clipfrac_lower"] = zero
        metrics["ppo_kl"] = masked_mean(anchor - log_prob.detach(), mask)
    elif mode == "bypass":
        anchor = log_prob.detach()
        pg_losses = -adv * torch.exp(log_prob - anchor)
        metrics.update(pg_clipfrac=zero, pg_clipfrac_lower=zero, ppo_kl=zero)
    else:
        raise ValueError(f"unknown policy loss mode {mode!r}; known: {', '.join(POLICY_LOSS_MODES)}")

    if tis_level not in TIS_LEVELS:
        raise ValueError(f"unknown tis_level {tis_level!r}; known: {', '.join(TIS_LEVELS)}")
    if tis_level != "none" and rollout_log_prob is None:
        raise ValueError(f"tis_level={tis_level!r} needs rollout_log_prob")
    if rollout_log_prob is not None:
        if tis_level == "token":
            log_weight, weight_mask = token_log_is_ratio(anchor, rollout_log_prob, mask), mask
        else:
            log_weight = sequence_log_is_weight(anchor, rollout_log_prob, mask)
            weight_mask = (mask.sum(dim=-1) > 0).float()
        weight = truncated_is_weight(log_weight, tis_cap)
        if tis_level != "none":
            pg_losses = pg_losses * (weight if tis_level == "token" else weight[:, None])
        metrics.update(_is_weight_metrics(log_weight, weight, weight_mask, tis_cap))
        metrics["rollout_kl_k3"] = rollout_kl_k3(log_prob, rollout_log_prob, mask)

    loss = agg_loss(pg_losses, mask, loss_agg_mode, global_num_tokens, global_num_seqs)
    metrics["pg_loss"] = loss.detach()
    return loss, metrics


def _is_weight_metrics(
    log_weight: torch.Tensor, weight: torch.Tensor, weight_mask: torch.Tensor, cap: float
) -> dict[str, torch.Tensor]:
    finite = torch.isfinite(log_weight)
    valid = weight_mask > 0
    ok = (valid & finite).float()
    return {
        "is_weight_mean": masked_mean(weight, ok),
        # -inf when no weight is finite (no host sync to check)
        "log_is_weight_max": torch.where(ok > 0, log_weight, float("-inf")).max(),
        "is_weight_truncated_frac": masked_mean((log_weight > float(np.log(cap))).float(), ok),
        "is_weight_nonfinite_frac": masked_mean((~finite).float(), valid.float()),
    }
