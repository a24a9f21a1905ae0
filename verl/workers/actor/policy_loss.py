"""The actor's policy loss from its config (trainer -> actor): one entry point for every actor backend.

The torch actor (``dp_actor``) and the Megatron actor call ``actor_policy_loss`` per micro-batch
and ``prepare_minibatch`` once per mini-batch; the formulas live in ``core_algos``, this module
only maps ``PolicyUpdateConfig`` and batch keys onto them.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from verl.trainer.ppo.core_algos import (
    agg_loss,
    compute_policy_loss,
    kl_penalty,
    m2po_keep_mask,
    token_log_is_ratio,
)
from verl.workers.actor.config import PolicyUpdateConfig

__all__ = ["FORWARD_KEYS", "actor_kl_loss", "actor_policy_loss", "prepare_minibatch", "required_batch_keys"]

FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids", "responses")


def required_batch_keys(config: PolicyUpdateConfig) -> tuple[str, ...]:
    """The ``data.batch`` keys ``update_policy`` needs under ``config``, in a stable order.

    Always the forward inputs, ``response_mask`` and ``advantages``; ``old_log_probs`` for
    decoupled_ppo, and for ppo_clip/gspo/M2PO when ``recompute_old_log_prob`` is set;
    ``rollout_log_probs`` whenever behaviour log-probs enter the loss or VCPO (ppo_clip/gspo
    without recompute, decoupled_ppo, TIS, rejection, M2PO, ESS scaling, OPOB);
    ``token_level_rewards`` for group-scope OPOB; ``ref_log_prob`` for the KL loss. An actor may
    add ``rollout_log_probs`` when present for the ESS/KL/IS diagnostics.
    """
    pl = config.policy_loss
    recompute = config.recompute_old_log_prob
    keys = [*FORWARD_KEYS, "response_mask", "advantages"]
    if pl.mode == "decoupled_ppo":
        keys += ["old_log_probs", "rollout_log_probs"]
    if pl.mode in ("ppo_clip", "gspo"):
        keys.append("old_log_probs" if recompute else "rollout_log_probs")
    if pl.m2po and recompute:
        keys.append("old_log_probs")
    uses_behaviour = (pl.tis_level != "none" or pl.rejection_level != "none" or pl.m2po
                      or config.ess_scaling.enable or config.grad_baselining.enable)
    if uses_behaviour:
        keys.append("rollout_log_probs")
    if config.grad_baselining.enable and config.grad_baselining.scope == "group":
        keys.append("token_level_rewards")
    if config.use_kl_loss:
        keys.append("ref_log_prob")
    return tuple(dict.fromkeys(keys))


def _anchor_log_prob(config: PolicyUpdateConfig, micro: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The log-probs the ratio is taken against: old (recomputed) or rollout for ppo_clip/gspo, the
    proximal policy for decoupled_ppo, none for bypass (it anchors on the current log pi)."""
    mode = config.policy_loss.mode
    if mode == "decoupled_ppo":
        return micro["old_log_probs"]
    if mode in ("ppo_clip", "gspo"):
        return micro["old_log_probs" if config.recompute_old_log_prob else "rollout_log_probs"]
    return None


def _m2po_mask(
    config: PolicyUpdateConfig, batch: dict[str, torch.Tensor], current_log_prob: torch.Tensor | None,
    group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """M2PO's keep mask for pi = the old log-probs when recomputed (the weights at the start of the
    trainer step), else ``current_log_prob`` (the current weights); mu = the rollout log-probs."""
    reference = batch["old_log_probs"] if config.recompute_old_log_prob else current_log_prob
    log_ratio = token_log_is_ratio(reference.detach(), batch["rollout_log_probs"], batch["response_mask"])
    return m2po_keep_mask(log_ratio, batch["response_mask"], config.policy_loss.m2po_threshold, group)


def prepare_minibatch(
    config: PolicyUpdateConfig,
    mini: dict[str, torch.Tensor],
    current_log_prob: Callable[[], torch.Tensor],
    group: dist.ProcessGroup | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Loss inputs that depend on the whole GLOBAL mini-batch, computed once before its micro-batches.

    Returns (tensors to add to ``mini`` and slice with it, metrics). With ``policy_loss.m2po``:
    ``m2po_mask`` [b, R] (``core_algos.m2po_keep_mask`` over every rank of ``group``) and the
    ``m2po_*`` metrics. ``current_log_prob()`` must return this rank's mini-batch log-probs [b, R]
    under the current weights, no grad; it is called only when M2PO needs them (no recompute).
    Every rank must call this together (it all-reduces).
    """
    if not config.policy_loss.m2po:
        return {}, {}
    log_prob = None if config.recompute_old_log_prob else current_log_prob()
    keep, metrics = _m2po_mask(config, mini, log_prob, group)
    return {"m2po_mask": keep}, metrics


def actor_policy_loss(
    config: PolicyUpdateConfig,
    micro: dict[str, torch.Tensor],
    log_prob: torch.Tensor,
    num_tokens: torch.Tensor,
    num_seqs: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The configured policy loss of one micro-batch (``core_algos.compute_policy_loss``); (loss, metrics).

    ``micro`` holds the ``required_batch_keys`` rows of the micro-batch (and ``m2po_mask`` from
    ``prepare_minibatch``); ``log_prob`` [b, R] the current log-probs with grad; ``num_tokens``,
    ``num_seqs`` the global mini-batch counts, so micro-batch losses add up to the mini-batch loss.
    With M2PO and no ``m2po_mask`` in ``micro`` the mask is computed here over ``micro`` on every
    rank of ``group``: right only when ``micro`` is this rank's whole mini-batch, and then all
    ranks must call together.
    """
    pl = config.policy_loss
    metrics: dict[str, torch.Tensor] = {}
    keep = micro.get("m2po_mask")
    if pl.m2po and keep is None:
        keep, metrics = _m2po_mask(config, micro, log_prob, group)
    loss, loss_metrics = compute_policy_loss(
        log_prob,
        _anchor_log_prob(config, micro),
        micro["advantages"],
        micro["response_mask"],
        loss_agg_mode=config.loss_agg_mode,
        mode=pl.mode,
        clip_ratio_low=pl.clip_ratio_low,
        clip_ratio_high=pl.clip_ratio_high,
        clip_ratio_c=pl.clip_ratio_c,
        rollout_log_prob=micro.get("rollout_log_probs"),
        tis_level=pl.tis_level,
        tis_cap=pl.tis_cap,
        global_num_tokens=num_tokens,
        global_num_seqs=num_seqs,
        rejection_level=pl.rejection_level,
        rejection_low=pl.rejection_low,
        rejection_high=pl.rejection_high,
        token_keep_mask=keep,
    )
    loss_metrics.update(metrics)
    return loss, loss_metrics


def actor_kl_loss(
    config: PolicyUpdateConfig,
    micro: dict[str, torch.Tensor],
    log_prob: torch.Tensor,
    num_tokens: torch.Tensor,
    num_seqs: torch.Tensor,
) -> torch.Tensor:
    """The KL-to-reference term of one micro-batch, before ``kl_loss_coef``: the per-token
    ``core_algos.kl_penalty(log pi, log pi_ref, kl_loss_type)`` over the response mask, aggregated
    like the policy loss (``loss_agg_mode`` with the global mini-batch counts).

    The tokens are the batch's, sampled by the behaviour policy mu, and carry no IS weight, as in
    veRL: under staleness this is the KL estimator evaluated on mu's samples, a regulariser rather
    than an unbiased KL(pi || pi_ref) (docs/losses.md). Rejection/M2PO masks do not apply to it.
    """
    kl = kl_penalty(log_prob, micro["ref_log_prob"], config.kl_loss_type)
    return agg_loss(kl, micro["response_mask"], config.loss_agg_mode, num_tokens, num_seqs)
