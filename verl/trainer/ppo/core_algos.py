"""Advantage estimators, loss aggregation, importance weights and policy losses (trainer/actor).

Data flow: the trainer calls ``compute_advantage`` on a rollout batch from the queue; the actor
calls ``compute_policy_loss`` (which calls ``agg_loss`` and the log-space IS helpers) per
micro-batch. Every function is pure: tensors (and, for M2PO's global mask, a process group) in,
tensors out; each states its formula.

Shapes: B trajectories, R response positions; ``response_mask`` [B, R] is 1 on tokens the policy
generated. Log-probs are float32 and 0 (or anything) where the mask is 0: masked positions never
reach a sum, even as NaN.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol, Sequence, get_args

import numpy as np
import torch
import torch.distributed as dist

from verl.utils.distributed import all_reduce_sum_
from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits, masked_mean, masked_sum

if TYPE_CHECKING:
    from verl.protocol import DataProto

__all__ = [
    "ADV_ESTIMATORS",
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "LOSS_AGG_MODES",
    "POLICY_LOSS_MODES",
    "REJECTION_LEVELS",
    "TIS_LEVELS",
    "OutcomeAdvantage",
    "agg_loss",
    "apply_kl_penalty",
    "build_kl_controller",
    "compute_advantage",
    "compute_drgrpo_outcome_advantage",
    "compute_grpo_outcome_advantage",
    "compute_policy_loss",
    "compute_reinforce_baseline_advantage",
    "compute_rloo_outcome_advantage",
    "entropy_from_logits",
    "get_adv_estimator_fn",
    "gspo_token_loss",
    "group_ids_from_index",
    "group_ids_from_uids",
    "kl_penalty",
    "logprobs_from_logits",
    "loss_normalizer_counts",
    "m2po_keep_mask",
    "ppo_clip_token_loss",
    "rejection_keep_mask",
    "rollout_kl_k3",
    "rollout_kl_k3_per_token",
    "sequence_log_is_weight",
    "token_log_is_ratio",
    "truncated_is_weight",
    "truncated_log_is_weight",
]

LossAggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
LOSS_AGG_MODES: tuple[str, ...] = get_args(LossAggMode)
POLICY_LOSS_MODES = ("ppo_clip", "bypass", "decoupled_ppo", "gspo")
TIS_LEVELS = ("none", "token", "sequence")
REJECTION_LEVELS = ("none", "token", "sequence", "geometric")

# exp() of a log-ratio beyond this overflows float32 or is clipped anyway (e^20 ~ 5e8).
_MAX_LOG_RATIO = 20.0
# Bit pattern of the largest finite float32: the top of M2PO's bisection over squared log-ratios.
_MAX_FINITE_FLOAT32_BITS = 0x7F7FFFFF


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


# --------------------------------------------------------------------------- KL to the reference policy

KLEstimator = Literal["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3",
                      "kl+", "k1+", "abs+", "mse+", "k2+", "low_var_kl+", "k3+"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)
# veRL's clamps for k3: the log-ratio to [-20, 20] so exp stays finite, the estimate to [-10, 10].
_K3_LOG_RATIO_BOUND = 20.0
_K3_VALUE_BOUND = 10.0


def _kl_estimate(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, estimator: str) -> torch.Tensor:
    """The per-token value of one estimator; d = log pi - log pi_ref:

        kl / k1:          d
        abs:              |d|
        mse / k2:         d^2 / 2
        low_var_kl / k3:  clamp(e^-d' + d' - 1, -10, 10) with d' = clamp(d, -20, 20)

    On samples from pi, k1 and k3 are unbiased for KL(pi || pi_ref) (k3 >= 0 with lower variance).
    """
    d = log_prob - ref_log_prob
    if estimator in ("kl", "k1"):
        return d
    if estimator == "abs":
        return d.abs()
    if estimator in ("mse", "k2"):
        return 0.5 * d.square()
    if estimator in ("low_var_kl", "k3"):
        neg_d = torch.clamp(-d, min=-_K3_LOG_RATIO_BOUND, max=_K3_LOG_RATIO_BOUND)
        return torch.clamp(torch.exp(neg_d) - neg_d - 1.0, min=-_K3_VALUE_BOUND, max=_K3_VALUE_BOUND)
    raise ValueError(f"unknown KL estimator {estimator!r}; known: {', '.join(KL_ESTIMATORS)}")


def kl_penalty(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate [B, R] between the policy and the reference (``_kl_estimate``).

    A ``+`` suffix (``k3+``, ``low_var_kl+``, ...) is straight-through: the VALUE is the named
    estimator's, the GRADIENT is k2's, d (grad d). k2's gradient is the one whose expectation on
    samples from pi is the gradient of KL(pi || pi_ref); k1's and k3's are not. ``k2+`` is k2.
    """
    if not estimator.endswith("+"):
        return _kl_estimate(log_prob, ref_log_prob, estimator)
    value = _kl_estimate(log_prob, ref_log_prob, estimator[:-1])
    gradient_carrier = _kl_estimate(log_prob, ref_log_prob, "k2")
    return gradient_carrier - gradient_carrier.detach() + value.detach()


class FixedKLController:
    """A constant KL-in-reward coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing changes."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019)'s proportional controller of beta towards a target KL:

        e = clip(KL / target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_steps / horizon)

    ``n_steps`` is the number of trajectories the KL was measured on.
    """

    def __init__(self, kl_coef: float, target_kl: float, horizon: int):
        super().__init__(kl_coef)
        self.target_kl, self.horizon = float(target_kl), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target_kl - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def build_kl_controller(kind: str, kl_coef: float, target_kl: float = 0.1,
                        horizon: int = 10000) -> FixedKLController:
    """``algorithm.kl_ctrl``: ``fixed`` or ``adaptive``."""
    if kind == "fixed":
        return FixedKLController(kl_coef)
    if kind == "adaptive":
        return AdaptiveKLController(kl_coef, target_kl, horizon)
    raise ValueError(f"unknown KL controller {kind!r}: expected 'fixed' or 'adaptive'")


def apply_kl_penalty(data: "DataProto", controller: FixedKLController, estimator: str,
                     behaviour_key: str = "rollout_log_probs") -> tuple["DataProto", dict[str, float]]:
    """KL in the reward: ``token_level_rewards`` = ``token_level_scores`` - beta * kl_t, kl_t =
    ``kl_penalty(log mu, log pi_ref)`` on response tokens, with beta the controller's value BEFORE
    this batch updates it (by the mean, over trajectories with response tokens, of the per-token
    mean KL).

    The log-probs are those of the policy that SAMPLED each token (``behaviour_key``, the rollout's
    by default): a trajectory is penalised for what its own policy did, and on its own samples k1
    and k3 are unbiased for KL(mu || pi_ref). Returns (data, ``actor/reward_kl_penalty[_coeff]``).
    """
    b = data.batch
    mask = b["response_mask"]
    kl = kl_penalty(b[behaviour_key].float(), b["ref_log_prob"].float(), estimator)
    kl = torch.where(mask > 0, kl, torch.zeros_like(kl))
    beta = controller.value
    b["token_level_rewards"] = b["token_level_scores"] - beta * kl
    has_tokens = mask.sum(-1) > 0
    current_kl = float(masked_mean(kl, mask, dim=-1)[has_tokens].mean()) if bool(has_tokens.any()) else 0.0
    controller.update(current_kl, n_steps=len(mask))
    return data, {"actor/reward_kl_penalty": current_kl, "actor/reward_kl_penalty_coeff": beta}


# --------------------------------------------------------------------------- policy loss


def ppo_clip_token_loss(
    log_prob: torch.Tensor,
    anchor_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped per-token loss against anchor log-probs a_t; returns (l [B, R], clipped, dual-clipped).

    r_t = exp(clamp(log pi_t - a_t, -20, 20)),
    l_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high)),
    dual clip for A_t < 0: l_t = min(l_t, -A_t c) (off when ``clip_ratio_c`` is None).
    ``clipped`` marks tokens where the clipped branch is taken (zero gradient there).
    """
    log_ratio = torch.clamp(log_prob - anchor_log_prob, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    losses = torch.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    if clip_ratio_c is None:
        return losses, is_clipped, torch.zeros_like(is_clipped)
    dual = -advantages * clip_ratio_c
    lower = (advantages < 0) & (losses > dual)
    return torch.where(lower, dual, losses), is_clipped, lower


def gspo_token_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_ratio_low: float,
    clip_ratio_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GSPO, token form: returns (l [B, R], clipped [B, R], log s_i [B]).

    Sequence ratio (length-normalised, log space): log s_i = clamp(sum_t m_it (log pi_it - old_it) / L_i, -20, 20).
    Token ratio s_it = sg(s_i) * pi_it / sg(pi_it): its value is s_i, its gradient s_i grad log pi_it.
    l_it = max(-A_it s_it, -A_it clip(s_it, 1 - eps_low, 1 + eps_high)).
    With one advantage per sequence and seq-mean-token-mean aggregation the gradient equals that
    of GSPO's sequence objective -(1/B) sum_i min(s_i A_i, clip(s_i) A_i), since
    grad s_i = s_i (1/L_i) sum_t grad log pi_it. Clipping acts on whole sequences.
    """
    lengths = response_mask.float().sum(-1).clamp(min=1.0)
    log_ratio = token_log_is_ratio(log_prob.detach(), old_log_prob, response_mask).float()
    log_seq_ratio = torch.clamp(log_ratio.sum(-1) / lengths, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_seq_ratio[:, None] + log_prob - log_prob.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped, log_seq_ratio


def rejection_keep_mask(
    log_ratio: torch.Tensor, response_mask: torch.Tensor, level: str, low: float, high: float
) -> torch.Tensor:
    """Masked IS: 1 on response tokens whose IS ratio lies in [low, high], else 0; float [B, R].

    With d_t = log pi_t - log mu_t (``token_log_is_ratio``, 0 off the mask) and L_i the length:
      token:     keep_t = [low <= exp(d_t) <= high]
      sequence:  keep_i = [low <= w_i <= high],                  log w_i = sum_t d_t
      geometric: keep_i = [low <= exp(sum_t d_t / L_i) <= high]  (the per-token geometric mean)
    Compared in log space (low = 0 means no lower bound). A NaN ratio is rejected.
    """
    log_low = math.log(low) if low > 0 else float("-inf")
    log_high = math.log(high)
    if level == "token":
        stat = log_ratio
    elif level == "sequence":
        stat = log_ratio.sum(-1, keepdim=True)
    elif level == "geometric":
        stat = log_ratio.sum(-1, keepdim=True) / response_mask.float().sum(-1, keepdim=True).clamp(min=1.0)
    else:
        raise ValueError(f"unknown rejection_level {level!r}; known: {', '.join(REJECTION_LEVELS[1:])}")
    keep = (stat >= log_low) & (stat <= log_high)
    return (keep & (response_mask > 0)).float()


def m2po_keep_mask(
    log_ratio: torch.Tensor,
    response_mask: torch.Tensor,
    threshold: float,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """M2PO: mask the tokens with the largest squared log-ratio until the second moment is <= threshold.

    With d_t = log pi_t - log mu_t over the response tokens of ALL ranks of ``group``:
      M2(S) = sum_{t in S} d_t^2 / |S|;  keep = {t : d_t^2 <= x*},  x* = max{x : M2({t : d_t^2 <= x}) <= tau}.
    M2 of {d^2 <= x} grows with x, so x* is found by bisection on the bit pattern of the float32
    d^2 (monotone for non-negative floats), each probe one all-reduce of (count, sum) in float64:
    the same x* as on the concatenated batch in one process, at most 32 tiny all-reduces and one
    when nothing needs masking. Tokens tied at x* are kept together; a non-finite d^2 is always
    masked. Returns (keep [B, R] float, metrics): ``m2po_masked_frac`` (masked share of response
    tokens), ``m2po_m2_before`` (over the finite d^2), ``m2po_m2_after``; global, equal on every rank.
    """
    valid = response_mask > 0
    squared = torch.where(valid, log_ratio.detach().float() ** 2, torch.zeros((), device=log_ratio.device))
    finite = valid & torch.isfinite(squared)
    values = squared[finite]

    def kept_count_and_sum(bits: int) -> torch.Tensor:
        cut = torch.tensor(bits, dtype=torch.int32).view(torch.float32).to(values.device)
        selected = values[values <= cut].double()
        return all_reduce_sum_(torch.stack([selected.new_tensor(float(selected.numel())), selected.sum()]), group)

    def within(stats: torch.Tensor) -> bool:
        return bool(stats[1] <= threshold * stats[0])

    num_valid = all_reduce_sum_(valid.double().sum().reshape(1), group)[0]
    low, high = -1, _MAX_FINITE_FLOAT32_BITS
    total = kept_count_and_sum(high)
    if within(total):
        low = high
    else:
        high -= 1
        while low < high:  # invariant: M2 within threshold at low (-1: keep nothing), x* <= high
            mid = (low + high + 1) // 2
            if within(kept_count_and_sum(mid)):
                low = mid
            else:
                high = mid - 1
    if low < 0:
        keep, kept = torch.zeros_like(finite), total.new_zeros(2)
    else:
        cut = torch.tensor(low, dtype=torch.int32).view(torch.float32).to(squared.device)
        keep = finite & (squared <= cut)
        kept = total if low == _MAX_FINITE_FLOAT32_BITS else kept_count_and_sum(low)
    metrics = {
        "m2po_masked_frac": ((num_valid - kept[0]) / num_valid.clamp(min=1.0)).float(),
        "m2po_m2_before": (total[1] / total[0].clamp(min=1.0)).float(),
        "m2po_m2_after": (kept[1] / kept[0].clamp(min=1.0)).float(),
    }
    return keep.float(), metrics


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
    rejection_level: str = "none",
    rejection_low: float = 0.5,
    rejection_high: float = 2.0,
    token_keep_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy-gradient loss on [B, R] tensors, reduced by ``agg_loss``; returns (loss, metrics).

    Per-token loss l_t, with anchor log-probs a_t (the policy the ratio is taken against):
      ppo_clip:      a_t = old_t, l_t = ``ppo_clip_token_loss`` (clip + dual clip).
      decoupled_ppo: a_t = old_t = the proximal policy pi_prox (old log-probs recomputed with the
                     current weights), l_t = w_t * ``ppo_clip_token_loss`` with the behaviour weight
                     w_t = exp(a_t - log mu_t), detached: truncated by TIS below when tis_level is
                     token (min(w_t, C)) or sequence (min(w_i, C) on every token); untruncated
                     (log w_t clamped at 20) when tis_level is none.
      gspo:          a_t = old_t, l_t = ``gspo_token_loss`` (sequence ratio s_i, token form).
      bypass:        rho_t = exp(log pi_t - sg(log pi_t)) = 1 with gradient grad log pi_t,
                     a_t = sg(log pi_t), l_t = -A rho_t (no clipping; ``old_log_prob`` unused).
    Truncated IS against the rollout (behaviour) log-probs mu, detached:
      token:    l_t *= min(exp(a_t - log mu_t), C)
      sequence: l_t *= min(exp(sum_s (a_s - log mu_s)), C)  (the same w~_i on every token of i)
    So bypass + sequence TIS + seq-mean-token-mean is VCPO's l_i = -(w~_i / L_i) sum_t A_i log pi.
    Masks (a masked token's l_t is replaced by 0 with ``where``, so a NaN there cannot leak):
      rejection_level (``rejection_keep_mask`` on d_t = a_t - log mu_t, the ratio TIS uses);
      token_keep_mask (M2PO's, ``m2po_keep_mask``, computed over the global mini-batch by the caller).
    Masked tokens still count in the normalisers N_tok, N_seq and L_i: they add a zero, so the
    loss scale does not depend on how many were masked, and shards keep adding up (``agg_loss``).

    Metrics (detached 0-dim tensors, no host sync; over this call's tokens/sequences):
    ``pg_loss``, ``pg_clipfrac`` (tokens where the clipped branch is taken),
    ``pg_clipfrac_lower`` (dual clip), ``ppo_kl`` (mean of a_t - log pi_t); gspo adds
    ``gspo_clipfrac`` (sequences whose s_i lies outside [1 - eps_low, 1 + eps_high]); with rollout
    log-probs also ``rollout_kl_k3`` (see ``rollout_kl_k3``) and the IS statistics at the TIS
    level in use (sequence level when ``tis_level="none"``, token level for decoupled_ppo):
    ``is_weight_mean`` (truncated), ``log_is_weight_max`` (untruncated, log space),
    ``is_weight_truncated_frac``, ``is_weight_nonfinite_frac``; with a rejection level
    ``rejected_frac`` (share of response tokens rejected).
    """
    mask = response_mask.float()
    log_prob = log_prob.float()
    adv = advantages.float()
    metrics: dict[str, torch.Tensor] = {}
    zero = torch.zeros((), device=log_prob.device)
    if mode in ("ppo_clip", "decoupled_ppo", "gspo"):
        if old_log_prob is None:
            raise ValueError(f"mode={mode!r} needs old_log_prob")
        anchor = old_log_prob.float()
        if mode == "gspo":
            pg_losses, clipped, log_seq_ratio = gspo_token_loss(
                log_prob, anchor, adv, mask, clip_ratio_low, clip_ratio_high
            )
            seq_ratio = torch.exp(log_seq_ratio)
            outside = (seq_ratio < 1.0 - clip_ratio_low) | (seq_ratio > 1.0 + clip_ratio_high)
            metrics["gspo_clipfrac"] = masked_mean(outside.float(), (mask.sum(-1) > 0).float())
            lower = torch.zeros_like(clipped)
        else:
            pg_losses, clipped, lower = ppo_clip_token_loss(
                log_prob, anchor, adv, clip_ratio_low, clip_ratio_high, clip_ratio_c
            )
        metrics["pg_clipfrac"] = masked_mean(clipped.float(), mask)
        metrics["pg_clipfrac_lower"] = masked_mean(lower.float(), mask)
        metrics["ppo_kl"] = masked_mean(anchor - log_prob.detach(), mask)
    elif mode == "bypass":
        anchor = log_prob.detach()
        pg_losses = -adv * torch.exp(log_prob - anchor)
        metrics.update(pg_clipfrac=zero, pg_clipfrac_lower=zero, ppo_kl=zero)
    else:
        raise ValueError(f"unknown policy loss mode {mode!r}; known: {', '.join(POLICY_LOSS_MODES)}")

    if tis_level not in TIS_LEVELS:
        raise ValueError(f"unknown tis_level {tis_level!r}; known: {', '.join(TIS_LEVELS)}")
    if rejection_level not in REJECTION_LEVELS:
        raise ValueError(f"unknown rejection_level {rejection_level!r}; known: {', '.join(REJECTION_LEVELS)}")
    for needs, what in ((tis_level != "none", f"tis_level={tis_level!r}"),
                        (mode == "decoupled_ppo", "mode='decoupled_ppo'"),
                        (rejection_level != "none", f"rejection_level={rejection_level!r}")):
        if needs and rollout_log_prob is None:
            raise ValueError(f"{what} needs rollout_log_prob")
    if rollout_log_prob is not None:
        log_ratio = token_log_is_ratio(anchor, rollout_log_prob, mask)
        weight_level = tis_level if tis_level != "none" else ("token" if mode == "decoupled_ppo" else "sequence")
        if weight_level == "token":
            log_weight, weight_mask = log_ratio, mask
        else:
            log_weight, weight_mask = log_ratio.sum(dim=-1), (mask.sum(dim=-1) > 0).float()
        weight = truncated_is_weight(log_weight, tis_cap)
        if tis_level != "none":
            pg_losses = pg_losses * (weight if tis_level == "token" else weight[:, None])
        elif mode == "decoupled_ppo":
            pg_losses = pg_losses * torch.exp(torch.clamp(log_weight.detach().float(), max=_MAX_LOG_RATIO))
        metrics.update(_is_weight_metrics(log_weight, weight, weight_mask, tis_cap))
        metrics["rollout_kl_k3"] = rollout_kl_k3(log_prob, rollout_log_prob, mask)
        if rejection_level != "none":
            keep = rejection_keep_mask(log_ratio, mask, rejection_level, rejection_low, rejection_high)
            pg_losses = torch.where(keep > 0, pg_losses, torch.zeros_like(pg_losses))
            metrics["rejected_frac"] = masked_mean(1.0 - keep, mask)
    if token_keep_mask is not None:
        pg_losses = torch.where(token_keep_mask > 0, pg_losses, torch.zeros_like(pg_losses))

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
