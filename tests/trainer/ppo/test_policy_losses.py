"""Off-policy corrections and losses (TIS, decoupled PPO, GSPO, rejection masks, M2PO) against hand
computations, and M2PO's global mask over 2 gloo ranks against one process."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from verl.trainer.ppo import core_algos as ca
from verl.utils import distributed as vd

torch.set_num_threads(1)

E = math.exp


def _leaf(values):
    return torch.tensor([values], requires_grad=True)


# ------------------------------------------------------------------ truncated IS


def test_token_tis_by_hand():
    """bypass + token TIS, seq-mean-token-mean: l = -(1/L) sum_t min(pi_t / mu_t, C) A."""
    logp = _leaf([-1.0, -2.0])
    mu = torch.tensor([[-1.5, -1.0]])
    adv = torch.full((1, 2), 2.0)
    loss, metrics = ca.compute_policy_loss(logp, None, adv, torch.ones(1, 2), mode="bypass",
                                           rollout_log_prob=mu, tis_level="token", tis_cap=1.5)
    (grad,) = torch.autograd.grad(loss, logp)
    w = [min(E(0.5), 1.5), min(E(-1.0), 1.5)]  # e^0.5 = 1.65 is truncated to 1.5
    assert loss.item() == pytest.approx(-(2 * w[0] + 2 * w[1]) / 2, rel=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-2 * w[0] / 2, -2 * w[1] / 2]]))
    assert metrics["is_weight_truncated_frac"].item() == pytest.approx(0.5)
    assert metrics["is_weight_mean"].item() == pytest.approx((w[0] + w[1]) / 2, rel=1e-6)
    assert metrics["log_is_weight_max"].item() == pytest.approx(0.5)


def test_sequence_tis_by_hand():
    """bypass + sequence TIS: every token of i carries min(exp(sum_t (log pi_t - log mu_t)), C)."""
    logp = _leaf([-1.0, -2.0])
    mu = torch.tensor([[-1.5, -1.0]])
    adv = torch.full((1, 2), 2.0)
    for cap, w in ((8.0, E(-0.5)), (0.5, 0.5)):
        loss, _ = ca.compute_policy_loss(logp, None, adv, torch.ones(1, 2), mode="bypass",
                                         rollout_log_prob=mu, tis_level="sequence", tis_cap=cap)
        (grad,) = torch.autograd.grad(loss, logp)
        assert loss.item() == pytest.approx(-2 * w, rel=1e-6)
        torch.testing.assert_close(grad, torch.tensor([[-w, -w]]))


# ------------------------------------------------------------------ decoupled PPO


def _decoupled_case():
    # r = pi / pi_prox: e^0.1 (inside), e^-0.5 (below, A < 0), e^0.5 (above, A > 0), e^1.5 (dual clip, A < 0)
    prox = torch.full((1, 4), -1.0)
    logp = _leaf([-0.9, -1.5, -0.5, 0.5])
    # w = pi_prox / mu: e^0.2, e^-0.2, e^0, e^0.1
    mu = torch.tensor([[-1.2, -0.8, -1.0, -1.1]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    return logp, prox, mu, adv


@pytest.mark.parametrize("tis_level,cap", [("token", 8.0), ("token", 1.1), ("none", 1.1)])
def test_decoupled_ppo_by_hand(tis_level, cap):
    """l_t = w_t * max(-A r_t, -A clip(r_t, 0.8, 1.2)), dual clip at c = 3; w_t = min(pi_prox / mu, C)
    at tis_level=token, untruncated at none; token-mean."""
    logp, prox, mu, adv = _decoupled_case()
    loss, metrics = ca.compute_policy_loss(
        logp, prox, adv, torch.ones(1, 4), "token-mean", mode="decoupled_ppo", clip_ratio_c=3.0,
        rollout_log_prob=mu, tis_level=tis_level, tis_cap=cap,
    )
    (grad,) = torch.autograd.grad(loss, logp)
    w = [E(0.2), E(-0.2), 1.0, E(0.1)]
    if tis_level == "token":
        w = [min(x, cap) for x in w]
    per_token = [-E(0.1) * w[0],  # unclipped
                 0.8 * w[1],      # clipped at 1 - eps: -A * 0.8
                 -1.2 * w[2],     # clipped at 1 + eps: -A * 1.2
                 3.0 * w[3]]      # dual clip: -A * c
    assert loss.item() == pytest.approx(sum(per_token) / 4, rel=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-E(0.1) * w[0] / 4, 0.0, 0.0, 0.0]]))
    # tokens 2 and 3 take the clipped branch; token 4's unclipped branch wins, then the dual clip caps it
    assert metrics["pg_clipfrac"].item() == pytest.approx(2 / 4)
    assert metrics["pg_clipfrac_lower"].item() == pytest.approx(1 / 4)
    assert metrics["ppo_kl"].item() == pytest.approx(-(0.1 - 0.5 + 0.5 + 1.5) / 4, rel=1e-6)
    # the IS statistics are per token for decoupled PPO
    assert metrics["log_is_weight_max"].item() == pytest.approx(0.2)


def test_decoupled_ppo_equals_ppo_clip_when_proximal_is_behaviour():
    """pi_prox = mu makes w = 1: decoupled PPO is then plain PPO clip."""
    logp, _, mu, adv = _decoupled_case()
    a, _ = ca.compute_policy_loss(logp, mu, adv, torch.ones(1, 4), mode="decoupled_ppo", rollout_log_prob=mu)
    b, _ = ca.compute_policy_loss(logp, mu, adv, torch.ones(1, 4), mode="ppo_clip")
    assert a.item() == pytest.approx(b.item(), rel=1e-7)


# ------------------------------------------------------------------ GSPO


def _gspo_case():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]], requires_grad=True)
    # mean log-ratios: (0.1 + 0.1) / 2 = 0.1 and (0.6 + 0.2 + 0.1) / 3 = 0.3; last token of row 0 is padding
    old = torch.tensor([[-1.1, -2.1, 5.0], [-1.6, -1.2, -1.1]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    return logp, old, mask


@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (3e-4, 4e-4)])
def test_gspo_by_hand(eps_low, eps_high):
    logp, old, mask = _gspo_case()
    adv = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    loss, metrics = ca.compute_policy_loss(logp, old, adv, mask, "seq-mean-token-mean", mode="gspo",
                                           clip_ratio_low=eps_low, clip_ratio_high=eps_high)
    (grad,) = torch.autograd.grad(loss, logp)
    s = [E(0.1), E(0.3)]
    if eps_high == 0.2:
        # s_1 = 1.105 inside, s_2 = 1.350 > 1.2 clipped (A > 0): value 1.2, no gradient
        value = (-s[0] - 1.2) / 2
        expected = torch.tensor([[-s[0] / 2 / 2, -s[0] / 2 / 2, 0.0], [0.0, 0.0, 0.0]])
    else:
        value = (-(1 + eps_high) - (1 + eps_high)) / 2
        expected = torch.zeros(2, 3)
    assert loss.item() == pytest.approx(value, rel=1e-6)
    torch.testing.assert_close(grad, expected)
    assert metrics["gspo_clipfrac"].item() == pytest.approx(0.5 if eps_high == 0.2 else 1.0)


def test_gspo_gradient_equals_sequence_objective():
    """GSPO-token with one advantage per sequence has the gradient of the sequence objective
    -(1/B) sum_i min(s_i A_i, clip(s_i) A_i), s_i = exp(mean_t (log pi - old)) differentiated directly."""
    logp, old, mask = _gspo_case()
    adv = torch.tensor([-0.7, 1.3])
    loss, _ = ca.compute_policy_loss(logp, old, adv[:, None].expand(2, 3), mask, mode="gspo",
                                     clip_ratio_low=0.2, clip_ratio_high=0.4)
    (grad,) = torch.autograd.grad(loss, logp)

    ref_logp = logp.detach().clone().requires_grad_()
    s = torch.exp(((ref_logp - old) * mask).sum(-1) / mask.sum(-1))
    ref = -torch.minimum(s * adv, s.clamp(0.8, 1.4) * adv).mean()
    (ref_grad,) = torch.autograd.grad(ref, ref_logp)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


# ------------------------------------------------------------------ rejection masks


def test_token_rejection_by_hand():
    """Ratios e^0.5, e^-1, e^0.1, e^1 against [0.5, 2]: tokens 2 and 4 rejected; they add 0 but
    still count in the token-mean normaliser."""
    logp = _leaf([-1.0, -1.0, -1.0, -1.0])
    mu = torch.tensor([[-1.5, 0.0, -1.1, -2.0]])
    loss, metrics = ca.compute_policy_loss(logp, None, torch.ones(1, 4), torch.ones(1, 4), "token-mean",
                                           mode="bypass", rollout_log_prob=mu, rejection_level="token",
                                           rejection_low=0.5, rejection_high=2.0)
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == pytest.approx(-2 / 4)
    torch.testing.assert_close(grad, torch.tensor([[-0.25, 0.0, -0.25, 0.0]]))
    assert metrics["rejected_frac"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("level,expected_loss,rejected", [("sequence", -1 / 2, 2 / 4), ("geometric", -3 / 2, 0.0)])
def test_sequence_and_geometric_rejection_by_hand(level, expected_loss, rejected):
    """Row a: d = (0.3, 0.3), w = e^0.6 = 1.82, geometric e^0.3; row b: d = (0.5, 0.5), w = e^1 = 2.72
    (rejected at sequence level), geometric e^0.5 = 1.65 (kept). A = (1, 2), seq-mean-token-mean."""
    logp = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], requires_grad=True)
    mu = torch.tensor([[-1.3, -1.3], [-1.5, -1.5]])
    adv = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    loss, metrics = ca.compute_policy_loss(logp, None, adv, torch.ones(2, 2), mode="bypass", rollout_log_prob=mu,
                                           rejection_level=level, rejection_low=0.5, rejection_high=2.0)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    assert metrics["rejected_frac"].item() == pytest.approx(rejected)


def test_rejected_nan_ratio_does_not_reach_the_loss():
    logp = _leaf([-1.0, -1.0])
    mu = torch.tensor([[float("nan"), -1.0]])
    loss, metrics = ca.compute_policy_loss(logp, None, torch.ones(1, 2), torch.ones(1, 2), "token-mean",
                                           mode="bypass", rollout_log_prob=mu, tis_level="token",
                                           rejection_level="token")
    assert loss.item() == pytest.approx(-0.5)
    assert metrics["rejected_frac"].item() == pytest.approx(0.5)
    assert metrics["is_weight_nonfinite_frac"].item() == pytest.approx(0.5)


def test_rejection_keep_mask_ignores_padding():
    log_ratio = torch.tensor([[0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    for level in ("token", "sequence", "geometric"):
        keep = ca.rejection_keep_mask(log_ratio, mask, level, 0.0, 1.0)
        assert keep.tolist() == [[1.0, 1.0, 0.0]]


# ------------------------------------------------------------------ M2PO


D = [0.1, -0.2, 0.5, 0.05, 0.3, 0.0]  # squares 0.01, 0.04, 0.25, 0.0025, 0.09, 0: M2 = 0.3925 / 6


@pytest.mark.parametrize("threshold,masked,after", [
    (0.04, [2], 0.1425 / 5),               # drop 0.25: 0.1425 / 5 = 0.0285 <= 0.04
    (0.01, [2, 4, 1], 0.0125 / 3),         # drop 0.25, 0.09 (0.013), 0.04: 0.0125 / 3 = 0.0042
    (0.1, [], 0.3925 / 6),                 # already within
])
def test_m2po_masks_largest_squared_log_ratios_by_hand(threshold, masked, after):
    log_ratio = torch.tensor([D + [7.0]])  # last position is padding
    mask = torch.tensor([[1.0] * 6 + [0.0]])
    keep, metrics = ca.m2po_keep_mask(log_ratio, mask, threshold)
    expected = [0.0 if i in masked else 1.0 for i in range(6)] + [0.0]
    assert keep.tolist() == [expected]
    assert metrics["m2po_m2_before"].item() == pytest.approx(0.3925 / 6, rel=1e-6)
    assert metrics["m2po_m2_after"].item() == pytest.approx(after, rel=1e-6)
    assert metrics["m2po_masked_frac"].item() == pytest.approx(len(masked) / 6)


def test_m2po_ties_are_masked_together_and_nonfinite_always_masked():
    # M2 = 0.32 / 6 = 0.053; dropping one 0.16 would give 0.16 / 5 = 0.032 <= 0.04, but its twin goes with it
    log_ratio = torch.tensor([[0.4, -0.4, 0.0, 0.0, 0.0, 0.0, float("nan")]])
    keep, metrics = ca.m2po_keep_mask(log_ratio, torch.ones(1, 7), 0.04)
    assert keep.tolist() == [[0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0]]
    assert metrics["m2po_m2_before"].item() == pytest.approx(0.32 / 6, rel=1e-6)  # over the finite values
    assert metrics["m2po_m2_after"].item() == 0.0
    assert metrics["m2po_masked_frac"].item() == pytest.approx(3 / 7)


def test_m2po_mask_matches_brute_force_on_random_data():
    """Against the definition: drop the k largest squares for the smallest k leaving M2 <= tau."""
    g = torch.Generator().manual_seed(0)
    log_ratio = torch.randn(8, 16, generator=g) * 0.3
    mask = (torch.rand(8, 16, generator=g) > 0.2).float()
    keep, metrics = ca.m2po_keep_mask(log_ratio, mask, 0.04)
    squares = sorted((log_ratio[mask > 0] ** 2).tolist(), reverse=True)
    k = next(k for k in range(len(squares) + 1) if sum(squares[k:]) <= 0.04 * max(len(squares) - k, 0) + 1e-12)
    assert 0 < k < len(squares)
    assert int(((1 - keep) * mask).sum()) == k
    assert (log_ratio[(keep == 0) & (mask > 0)] ** 2).min() >= (log_ratio[keep > 0] ** 2).max()
    assert metrics["m2po_m2_after"].item() == pytest.approx(sum(squares[k:]) / (len(squares) - k), rel=1e-5)


def test_token_keep_mask_zeroes_masked_tokens_in_the_loss():
    logp = _leaf([-1.0, -1.0, -1.0])
    keep = torch.tensor([[1.0, 0.0, 1.0]])
    loss, _ = ca.compute_policy_loss(logp, None, torch.ones(1, 3), torch.ones(1, 3), "token-mean",
                                     mode="bypass", token_keep_mask=keep)
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == pytest.approx(-2 / 3)
    torch.testing.assert_close(grad, torch.tensor([[-1 / 3, 0.0, -1 / 3]]))


# ------------------------------------------------------------------ M2PO over 2 gloo ranks


def _m2po_data():
    """12 rows split 5 / 7 over two ranks (uneven on purpose), d ~ N(0, 0.3^2): M2 ~ 0.09 > 0.04."""
    g = torch.Generator().manual_seed(3)
    log_ratio = torch.randn(12, 9, generator=g) * 0.3
    mask = (torch.rand(12, 9, generator=g) > 0.25).float()
    log_ratio[4, 0] = float("nan")
    return log_ratio, mask


def _m2po_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    vd.init_process_group("gloo", rank, world_size, master_port=port)
    try:
        log_ratio, mask = _m2po_data()
        rows = slice(0, 5) if rank == 0 else slice(5, 12)
        keep, metrics = ca.m2po_keep_mask(log_ratio[rows], mask[rows], 0.04)
        torch.save({"keep": keep, "metrics": metrics}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_m2po_global_mask_over_two_ranks_equals_one_process(tmp_path):
    mp.spawn(_m2po_worker, args=(2, vd.find_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    log_ratio, mask = _m2po_data()
    keep, metrics = ca.m2po_keep_mask(log_ratio, mask, 0.04)
    assert 0 < metrics["m2po_masked_frac"].item() < 1
    assert torch.equal(torch.cat([ranks[0]["keep"], ranks[1]["keep"]]), keep)
    for out in ranks:
        for name, value in metrics.items():
            assert out["metrics"][name].item() == pytest.approx(value.item(), rel=1e-6)
    # a per-rank mask would differ: the global cut is not each shard's own
    local = torch.cat([ca.m2po_keep_mask(log_ratio[:5], mask[:5], 0.04)[0],
                       ca.m2po_keep_mask(log_ratio[5:], mask[5:], 0.04)[0]])
    assert not torch.equal(local, keep)
