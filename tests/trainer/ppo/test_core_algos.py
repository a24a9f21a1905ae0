"""Advantage estimators, loss aggregation, IS weights and policy losses against hand computations."""

import math

import numpy as np
import pytest
import torch

from verl.protocol import DataProto
from verl.trainer.ppo import core_algos as ca

torch.set_num_threads(1)

UIDS = np.array(["a", "a", "a", "b", "b", "c"], dtype=object)
SCORES = [1.0, 0.0, 0.5, 2.0, 0.0, 3.0]
MASK = torch.tensor(
    [
        [1, 1, 1, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 1],
        [1, 0, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 0, 0],
    ],
    dtype=torch.float32,
)


def _token_rewards(scores, mask):
    """Scalar reward on each sample's last response token."""
    rewards = torch.zeros_like(mask)
    last = mask.sum(-1).long() - 1
    rewards[torch.arange(len(scores)), last] = torch.tensor(scores)
    return rewards


def _group_lists():
    return {"a": [1.0, 0.0, 0.5], "b": [2.0, 0.0], "c": [3.0]}


def _check_broadcast(out, expected):
    expected = torch.tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(out.scalar_advantages, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.advantages, expected[:, None] * MASK, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.returns, out.advantages)
    torch.testing.assert_close(out.scores, torch.tensor(SCORES))
    # uids a, b, c -> three distinct contiguous ids, equal within a group
    assert out.group_ids.tolist() == [0, 0, 0, 1, 1, 2]


def test_grpo_with_std_matches_hand_computation():
    eps = 1e-6
    expected = []
    for uid, r in zip(UIDS, SCORES):
        g = _group_lists()[uid]
        if len(g) == 1:
            expected.append(0.0)  # a group of one has no baseline: advantage 0
            continue
        mean = sum(g) / len(g)
        std = math.sqrt(sum((x - mean) ** 2 for x in g) / (len(g) - 1))
        expected.append((r - mean) / (std + eps))
    out = ca.compute_grpo_outcome_advantage(_token_rewards(SCORES, MASK), MASK, UIDS, epsilon=eps)
    _check_broadcast(out, expected)


def test_grpo_without_std_and_drgrpo_are_group_centred():
    expected = []
    for uid, r in zip(UIDS, SCORES):
        g = _group_lists()[uid]
        expected.append(0.0 if len(g) == 1 else r - sum(g) / len(g))
    rewards = _token_rewards(SCORES, MASK)
    out = ca.compute_grpo_outcome_advantage(rewards, MASK, UIDS, norm_adv_by_std_in_grpo=False)
    _check_broadcast(out, expected)
    _check_broadcast(ca.get_adv_estimator_fn("drgrpo")(rewards, MASK, UIDS), expected)


def test_grpo_constant_group_gives_zero_advantage():
    uids = np.array(["x"] * 4, dtype=object)
    out = ca.compute_grpo_outcome_advantage(torch.ones(4), torch.ones(4, 3), uids)
    assert torch.all(out.scalar_advantages == 0)


def test_rloo_is_leave_one_out():
    expected = []
    for uid, r in zip(UIDS, SCORES):
        g = _group_lists()[uid]
        expected.append(0.0 if len(g) == 1 else r - (sum(g) - r) / (len(g) - 1))
    # a: 1 - 0.25 = 0.75, 0 - 0.75 = -0.75, 0.5 - 0.5 = 0; b: 2, -2; c: 0
    assert expected == [0.75, -0.75, 0.0, 2.0, -2.0, 0.0]
    _check_broadcast(ca.get_adv_estimator_fn("rloo")(_token_rewards(SCORES, MASK), MASK, UIDS), expected)


def test_reinforce_batch_baseline_plain_and_whitened():
    mean = sum(SCORES) / len(SCORES)
    std = math.sqrt(sum((x - mean) ** 2 for x in SCORES) / (len(SCORES) - 1))
    rewards = _token_rewards(SCORES, MASK)
    fn = ca.get_adv_estimator_fn("reinforce_baseline")
    assert ca.get_adv_estimator_fn("reinforce_plus_plus_baseline") is fn
    _check_broadcast(fn(rewards, MASK, UIDS, whiten=False), [r - mean for r in SCORES])
    _check_broadcast(fn(rewards, MASK, UIDS, epsilon=1e-6), [(r - mean) / (std + 1e-6) for r in SCORES])


def test_estimators_accept_scalar_scores():
    a = ca.compute_rloo_outcome_advantage(torch.tensor(SCORES), MASK, UIDS)
    b = ca.compute_rloo_outcome_advantage(_token_rewards(SCORES, MASK), MASK, UIDS)
    torch.testing.assert_close(a.advantages, b.advantages)


def test_unknown_estimator_lists_known_names():
    with pytest.raises(ValueError, match="grpo.*rloo|drgrpo"):
        ca.get_adv_estimator_fn("ppo_gae")


def test_compute_advantage_fills_the_batch():
    class Settings:
        adv_estimator = "grpo"
        norm_adv_by_std_in_grpo = False

    data = DataProto.from_dict(
        tensors={"token_level_rewards": _token_rewards(SCORES, MASK), "response_mask": MASK},
        non_tensors={"uid": UIDS},
    )
    out = ca.compute_advantage(data, Settings())
    rewards = _token_rewards(SCORES, MASK)
    expected = ca.compute_grpo_outcome_advantage(rewards, MASK, UIDS, norm_adv_by_std_in_grpo=False)
    torch.testing.assert_close(out.batch["advantages"], expected.advantages)
    torch.testing.assert_close(out.batch["returns"], expected.returns)


# ------------------------------------------------------------------ agg_loss

LOSS = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0], [0.5, 0.5, 100.0, 100.0]])
LMASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("token-mean", (1 + 2 + 3 + 4 + 0.5 + 0.5) / 6),
        ("seq-mean-token-mean", (6 / 3 + 4 / 1 + 1 / 2) / 3),
        ("seq-mean-token-sum", (6 + 4 + 1) / 3),
        ("seq-mean-token-sum-norm", (6 + 4 + 1) / (3 * 4)),
    ],
)
def test_agg_loss_matches_hand_computation(mode, expected):
    assert ca.agg_loss(LOSS, LMASK, mode).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("mode", ca.LOSS_AGG_MODES)
def test_agg_loss_shards_with_global_counts_add_up(mode):
    whole = ca.agg_loss(LOSS, LMASK, mode)
    num_tokens, num_seqs = ca.loss_normalizer_counts(LMASK)
    parts = [ca.agg_loss(LOSS[s], LMASK[s], mode, num_tokens, num_seqs) for s in (slice(0, 1), slice(1, 3))]
    assert sum(parts).item() == pytest.approx(whole.item(), abs=1e-6)


def test_agg_loss_ignores_nan_in_padding_and_empty_rows():
    loss = LOSS.clone()
    loss[0, 3] = float("nan")
    mask = torch.cat([LMASK, torch.zeros(1, 4)])  # an all-padding row does not count as a sequence
    loss = torch.cat([loss, torch.full((1, 4), float("inf"))])
    assert ca.agg_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4 + 0.5) / 3, abs=1e-6)


def test_agg_loss_unknown_mode():
    with pytest.raises(ValueError, match="token-mean"):
        ca.agg_loss(LOSS, LMASK, "sum")


# ------------------------------------------------------------------ importance weights


def test_sequence_and_token_log_is_weights():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 7.0]])
    mu = torch.tensor([[-1.5, -1.0, 0.0], [-0.25, -1.0, float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    token = ca.token_log_is_ratio(logp, mu, mask)
    torch.testing.assert_close(token, torch.tensor([[0.5, -1.0, 0.0], [-0.25, 0.5, 0.0]]))
    torch.testing.assert_close(ca.sequence_log_is_weight(logp, mu, mask), torch.tensor([-0.5, 0.25]))


def test_truncated_is_weight_clamps_in_log_space():
    log_w = torch.tensor([1e4, math.log(3.0), -1e4, float("inf"), float("-inf")], requires_grad=True)
    w = ca.truncated_is_weight(log_w, cap=8.0)
    assert not w.requires_grad
    torch.testing.assert_close(w, torch.tensor([8.0, 3.0, 0.0, 8.0, 0.0]))
    assert torch.isnan(ca.truncated_is_weight(torch.tensor([float("nan")]), 8.0)).all()


def test_rollout_kl_k3_matches_formula():
    logp = torch.tensor([[-1.0, -2.0, -0.1], [-3.0, -0.2, -0.2]])
    mu = torch.tensor([[-1.2, -1.5, -9.0], [-2.0, -0.2, -0.3]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    vals = [math.exp(d) - 1 - d for d in (0.2, -0.5, -1.0, 0.0, 0.1)]
    assert ca.rollout_kl_k3(logp, mu, mask).item() == pytest.approx(sum(vals) / 5, rel=1e-5)
    assert ca.rollout_kl_k3(logp, logp, mask).item() == 0.0


# ------------------------------------------------------------------ policy loss


def _loss_inputs(seed=0, b=4, r=5):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(b, r, generator=g) * 3).requires_grad_()
    rollout = logp.detach() + 0.4 * torch.randn(b, r, generator=g)
    adv = torch.randn(b, generator=g)[:, None].expand(b, r).contiguous()
    mask = torch.ones(b, r)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    return logp, rollout, adv, mask


@pytest.mark.parametrize("tis_level", ["none", "sequence", "token"])
def test_bypass_gradient_equals_reference_vcpo_loss(tis_level):
    logp, rollout, adv, mask = _loss_inputs()
    loss, metrics = ca.compute_policy_loss(
        logp, None, adv, mask, "seq-mean-token-mean", mode="bypass",
        rollout_log_prob=rollout, tis_level=tis_level, tis_cap=1.5,
    )
    (grad,) = torch.autograd.grad(loss, logp)

    # independent: l_i = -(1/L_i) sum_t w~ A_i log pi(y_t), averaged over B trajectories
    ref_logp = logp.detach().clone().requires_grad_()
    lengths = mask.sum(-1)
    diff = (ref_logp.detach() - rollout) * mask
    if tis_level == "sequence":
        w = torch.clamp(torch.exp(diff.sum(-1)), max=1.5)[:, None].expand_as(mask)
    elif tis_level == "token":
        w = torch.clamp(torch.exp(diff), max=1.5)
    else:
        w = torch.ones_like(mask)
    ref = (-(w * adv * ref_logp * mask).sum(-1) / lengths).mean()
    (ref_grad,) = torch.autograd.grad(ref, ref_logp)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)
    ref_value = (-(w * adv * mask).sum(-1) / lengths).mean()
    assert loss.item() == pytest.approx(ref_value.item(), abs=1e-6)
    assert metrics["pg_clipfrac"].item() == 0.0
    if tis_level == "sequence":
        seq_w = torch.exp(diff.sum(-1))
        truncated = (seq_w > 1.5).float().mean().item()
        assert 0 < truncated < 1 and metrics["is_weight_truncated_frac"].item() == pytest.approx(truncated)
        expected_mean = torch.clamp(seq_w, max=1.5).mean().item()
        assert metrics["is_weight_mean"].item() == pytest.approx(expected_mean, rel=1e-6)
        assert metrics["log_is_weight_max"].item() == pytest.approx(diff.sum(-1).max().item(), abs=1e-6)


def test_nonfinite_rollout_log_prob_gives_nan_loss_and_is_counted():
    """A NaN behaviour log-prob on a response token makes that sequence's weight NaN: the loss is
    NaN (the actor then skips the step) and the fraction of non-finite weights is reported."""
    logp, rollout, adv, mask = _loss_inputs()
    rollout[1, 0] = float("nan")
    loss, metrics = ca.compute_policy_loss(
        logp, None, adv, mask, mode="bypass", rollout_log_prob=rollout, tis_level="sequence"
    )
    assert torch.isnan(loss)
    assert metrics["is_weight_nonfinite_frac"].item() == pytest.approx(1 / 4)
    assert torch.isfinite(metrics["is_weight_mean"]) and torch.isfinite(metrics["log_is_weight_max"])


def test_ppo_clip_gradient_zero_where_clipped():
    old = torch.zeros(1, 6)
    # log-ratios: inside, above 1+eps, below 1-eps, for A > 0 and A < 0
    log_ratio = torch.tensor([[0.05, 0.5, -0.5, 0.05, 0.5, -0.5]])
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, -1.0]])
    mask = torch.ones(1, 6)
    logp = (old + log_ratio).requires_grad_()
    loss, metrics = ca.compute_policy_loss(
        logp, old, adv, mask, "token-mean", mode="ppo_clip",
        clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=None,
    )
    (grad,) = torch.autograd.grad(loss, logp)
    ratio = torch.exp(log_ratio)
    # d/dlogp of -A*rho/N is -A*rho/N where unclipped; clipped: A>0 & rho>1.2, A<0 & rho<0.8
    expected = -adv * ratio / 6
    expected[0, 1] = 0.0
    expected[0, 5] = 0.0
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-8)
    assert metrics["pg_clipfrac"].item() == pytest.approx(2 / 6)


def test_ppo_clip_dual_clip_caps_negative_advantage_loss():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[2.0, 0.5]], requires_grad=True)  # ratios e^2 = 7.4 > c, e^0.5 = 1.65 < c
    adv = torch.tensor([[-1.0, -1.0]])
    loss, metrics = ca.compute_policy_loss(logp, old, adv, torch.ones(1, 2), "token-mean", clip_ratio_c=3.0)
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == pytest.approx((3.0 + math.exp(0.5)) / 2, rel=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[0.0, math.exp(0.5) / 2]]))
    assert metrics["pg_clipfrac_lower"].item() == pytest.approx(0.5)


def test_ppo_clip_sequence_tis_uses_old_policy_as_anchor():
    logp, rollout, adv, mask = _loss_inputs(seed=3)
    old = logp.detach() - 0.05
    loss, _ = ca.compute_policy_loss(
        logp, old, adv, mask, "token-mean", rollout_log_prob=rollout, tis_level="sequence"
    )
    w = torch.clamp(torch.exp(((old - rollout) * mask).sum(-1)), max=8.0)[:, None]
    ratio = torch.exp(logp.detach() - old)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)) * w
    assert loss.item() == pytest.approx(((per_token * mask).sum() / mask.sum()).item(), rel=1e-6)


def test_policy_loss_rejects_bad_arguments():
    logp, rollout, adv, mask = _loss_inputs()
    with pytest.raises(ValueError, match="bypass"):
        ca.compute_policy_loss(logp, None, adv, mask, mode="reinforce")
    with pytest.raises(ValueError, match="old_log_prob"):
        ca.compute_policy_loss(logp, None, adv, mask, mode="gspo")
    with pytest.raises(ValueError, match="rollout_log_prob"):
        ca.compute_policy_loss(logp, logp.detach(), adv, mask, mode="decoupled_ppo")
    with pytest.raises(ValueError, match="rollout_log_prob"):
        ca.compute_policy_loss(logp, None, adv, mask, mode="bypass", rejection_level="token")
    with pytest.raises(ValueError, match="geometric"):
        ca.compute_policy_loss(logp, None, adv, mask, mode="bypass", rollout_log_prob=rollout,
                               rejection_level="segment")
    with pytest.raises(ValueError, match="rollout_log_prob"):
        ca.compute_policy_loss(logp, None, adv, mask, mode="bypass", tis_level="sequence")
    with pytest.raises(ValueError, match="old_log_prob"):
        ca.compute_policy_loss(logp, None, adv, mask, mode="ppo_clip")


def test_logprobs_and_entropy_re_exported():
    logits = torch.randn(2, 3, 7, dtype=torch.float64)
    labels = torch.randint(0, 7, (2, 3))
    expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(ca.logprobs_from_logits(logits, labels), expected.float())
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(ca.entropy_from_logits(logits), (-(p * p.log()).sum(-1)).float())
