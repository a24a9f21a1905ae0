"""VCPO math against hand computations: ESS, lr scale, scaled step, OPOB weights/baselines/coefficients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from verl.trainer.ppo.core_algos import group_ids_from_uids, sequence_log_is_weight, truncated_log_is_weight
from verl.utils.config import ConfigError, build_config
from verl.workers.utils.vcpo import (
    ESSScalingConfig,
    GradBaseliningConfig,
    aggregate_baseline,
    assert_whole_groups,
    check_whole_groups,
    combine_shard_sq_grad_norms,
    compute_opob,
    ess_lr_scale,
    global_ess,
    lr_scale_from_ess,
    opob_baselines,
    opob_coefficients,
    opob_log_weights,
    opob_surrogate_loss,
    scaled_lr_step,
    scope_normalized_weights,
    trajectory_advantages,
    vcpo_metrics,
    weighted_quantile,
)

torch.set_num_threads(1)


def naive_ess(log_w: np.ndarray) -> float:
    w = np.exp(np.asarray(log_w, dtype=np.float64))
    return float(w.sum() ** 2 / (w ** 2).sum())


def test_sequence_log_is_weight_sums_masked_differences_and_ignores_padding_infinities():
    log_prob = torch.tensor([[-1.0, -2.0, -float("inf")], [-0.5, -0.25, -3.0]])
    rollout = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, -1.25, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    log_w = sequence_log_is_weight(log_prob, rollout, mask)
    assert log_w.dtype == torch.float32
    torch.testing.assert_close(log_w, torch.tensor([0.5 - 1.0, 0.0 + 1.0 - 2.0]))


def test_ess_of_equal_weights_is_the_batch_size():
    for value in (-30.0, 0.0, 7.5):
        ess = global_ess(torch.full((16,), value))
        assert ess.batch_size == 16
        assert ess.ess == pytest.approx(16.0, rel=1e-6)
        assert ess.ess_ratio == pytest.approx(1.0, rel=1e-6)


def test_one_dominating_weight_gives_ratio_one_over_b():
    log_w = torch.tensor([60.0, 0.0, 0.0, -1.0, 2.0, 0.5, 0.0, 0.0])
    ess = global_ess(log_w)
    assert ess.ess == pytest.approx(naive_ess(log_w.numpy()), rel=1e-6)
    assert ess.ess_ratio == pytest.approx(1.0 / 8, rel=1e-6)


def test_log_space_ess_matches_naive_formula_and_survives_huge_log_weights():
    gen = torch.Generator().manual_seed(0)
    log_w = torch.randn(64, generator=gen) * 3.0
    expected = naive_ess(log_w.numpy())
    assert global_ess(log_w).ess == pytest.approx(expected, rel=1e-5)
    # exp(1e4) overflows even float64; ESS is scale-invariant, so it must be unchanged.
    # float32 rounds log w + 1e4 to ~1e-3, so compare with the naive ESS of what was passed.
    for offset in (1e4, -1e4):
        shifted = log_w + offset
        result = global_ess(shifted)
        assert math.isfinite(result.log_ess)
        assert result.ess == pytest.approx(naive_ess(shifted.double().numpy() - offset), rel=1e-6)
        assert result.ess == pytest.approx(expected, rel=1e-3)


def test_clipped_ess_uses_min_w_c():
    log_w = torch.tensor([math.log(20.0), math.log(0.5), 0.0, math.log(3.0)])
    clipped = global_ess(truncated_log_is_weight(log_w, 8.0))
    w = np.array([8.0, 0.5, 1.0, 3.0])
    assert clipped.ess == pytest.approx(w.sum() ** 2 / (w ** 2).sum(), rel=1e-6)


def test_nonfinite_log_weights_follow_the_documented_rule_and_never_give_full_lr():
    posinf = global_ess(torch.tensor([0.0, float("inf"), 1.0, -2.0]))
    assert posinf.ess == 1.0 and posinf.ess_ratio == 0.25 and posinf.num_posinf == 1
    two_posinf = global_ess(torch.tensor([float("inf"), float("inf"), 0.0, 0.0]))
    assert two_posinf.ess == 1.0
    nan = global_ess(torch.tensor([0.0, float("nan"), 1.0, 0.0]))
    assert math.isnan(nan.ess_ratio) and nan.num_nan == 1 and not nan.is_finite
    all_zero = global_ess(torch.full((4,), -float("inf")))
    assert math.isnan(all_zero.ess_ratio)

    for rule in ("sqrt", "linear"):
        scale, flagged = ess_lr_scale(nan.ess_ratio, 1.0, rule, "skip", nan.batch_size)
        assert scale == 0.0 and flagged
        scale, flagged = ess_lr_scale(nan.ess_ratio, 0.5, rule, "min_lr", nan.batch_size)
        expected = (0.25 / 0.5) ** (0.5 if rule == "sqrt" else 1.0)
        assert scale == pytest.approx(expected) and flagged
        assert ess_lr_scale(float("inf"), 1.0, rule, "skip", 4)[0] == 0.0
        scale, flagged = ess_lr_scale(posinf.ess_ratio, 1.0, rule, "skip", 4)
        assert scale == pytest.approx(0.25 ** (0.5 if rule == "sqrt" else 1.0)) and not flagged


def test_lr_scale_rules_match_hand_values():
    assert ess_lr_scale(0.25, 1.0, "sqrt")[0] == pytest.approx(0.5)
    assert ess_lr_scale(0.25, 1.0, "linear")[0] == pytest.approx(0.25)
    assert ess_lr_scale(0.6, 0.55, "sqrt")[0] == 1.0
    assert ess_lr_scale(0.3, 0.55, "sqrt")[0] == pytest.approx(math.sqrt(0.3 / 0.55))
    assert ess_lr_scale(0.3, 0.55, "linear")[0] == pytest.approx(0.3 / 0.55)
    ess = global_ess(torch.tensor([math.log(3.0), 0.0, 0.0, 0.0]))  # ESS = 36/12 = 3, ratio 0.75
    assert lr_scale_from_ess(ess, ESSScalingConfig(enable=True))[0] == pytest.approx(math.sqrt(0.75))
    assert lr_scale_from_ess(ess, ESSScalingConfig(enable=False)) == (1.0, False)


def test_scaled_lr_step_scales_one_step_and_restores_the_scheduler_lr_even_on_error():
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    param.grad = torch.ones(3)
    with scaled_lr_step(optimizer, 0.3):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.03)
        optimizer.step()
    torch.testing.assert_close(param.detach(), torch.full((3,), -0.03))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    scheduler.step()  # scheduled lr = 0.05
    with pytest.raises(RuntimeError, match="boom"):
        with scaled_lr_step(optimizer, 0.0):
            raise RuntimeError("boom")
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 3)


@pytest.mark.parametrize("cls, data, key", [
    (ESSScalingConfig, {"scaling_rule": "cube"}, "scaling_rule"),
    (ESSScalingConfig, {"base_ess_ratio": 0.0}, "base_ess_ratio"),
    (ESSScalingConfig, {"nonfinite_rule": "full_lr"}, "nonfinite_rule"),
    (GradBaseliningConfig, {"scope": "batch"}, "scope"),
    (GradBaseliningConfig, {"agg_mode": "trimmed"}, "agg_mode"),
    (GradBaseliningConfig, {"weighting": "double"}, "weighting"),
    (GradBaseliningConfig, {"winsorize_lower": 0.6}, "winsorize_lower"),
])
def test_configs_refuse_bad_values_by_key(cls, data, key):
    build_config(cls, {})
    with pytest.raises(ConfigError) as err:
        build_config(cls, data)
    assert err.value.key == key


def test_winsorize_bounds_must_be_ordered():
    GradBaseliningConfig().validate("opob")
    with pytest.raises(ConfigError) as err:
        GradBaseliningConfig(winsorize_lower=0.5, winsorize_upper=0.5).validate("opob")
    assert err.value.key == "opob.winsorize_upper"


def test_opob_log_weights_implement_the_three_weightings():
    sq = torch.tensor([4.0, 9.0, 0.25])
    w = torch.tensor([2.0, 12.0, 0.5])
    w_trunc = w.clamp(max=8.0)
    lengths = torch.tensor([4.0, 2.0, 8.0])
    log_w = torch.log(w)
    sq, w, w_trunc, lengths = (t.double() for t in (sq, w, w_trunc, lengths))
    paper = opob_log_weights(sq, log_w, w_trunc, lengths, GradBaseliningConfig())
    assert paper.dtype == torch.float64
    torch.testing.assert_close(paper.exp(), w ** 2 * sq)
    reference = opob_log_weights(sq, log_w, w_trunc, lengths, GradBaseliningConfig(weighting="reference"))
    torch.testing.assert_close(reference.exp(), w_trunc ** 2 * w ** 2 * sq)
    exact = opob_log_weights(sq, log_w, w_trunc, lengths,
                             GradBaseliningConfig(use_clipped_is_ratios=True, normalize_by_length=True))
    torch.testing.assert_close(exact.exp(), (w_trunc / lengths) ** 2 * sq)
    unweighted = opob_log_weights(sq, log_w, w_trunc, lengths, GradBaseliningConfig(use_is_weights=False))
    torch.testing.assert_close(unweighted.exp(), sq)
    # w = e^5000 is no problem in log space, and log W keeps float64 precision there (issue 15,
    # edge case 2: float32 would be off by ~|log W| * 6e-8 = 6e-4).
    huge = opob_log_weights(sq, log_w.double() + 5000.0, w_trunc, lengths, GradBaseliningConfig())
    torch.testing.assert_close(huge, paper + 10000.0, rtol=0.0, atol=1e-9)


def test_weighted_quantile_is_the_inverse_weighted_cdf():
    v = torch.tensor([3.0, 1.0, 4.0, 2.0])
    assert weighted_quantile(v, torch.ones(4), 0.5) == 2.0  # lower median
    assert weighted_quantile(v, torch.tensor([0.0, 0.0, 1.0, 0.0]), 0.5) == 4.0
    assert weighted_quantile(v, torch.tensor([1.0, 3.0, 1.0, 1.0]), 0.5) == 1.0  # C=[3,4,5,6], qS=3
    assert weighted_quantile(v, torch.tensor([1.0, 2.9, 1.0, 1.1]), 0.5) == 2.0
    assert weighted_quantile(v, torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.95) == 4.0


def test_opob_baselines_match_hand_computed_aggregates():
    values = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 2.0, 5.0])
    weights = torch.tensor([1.0, 3.0, 2.0, 4.0, 1.0, 1.0, 2.0])
    gids = torch.tensor([7, 7, 7, 7, 9, 9, 9])
    b = opob_baselines(values, torch.log(weights), gids, "mean")
    g1 = (1 * 1 + 4 * 1) / 10.0
    g2 = (0 * 1 + 2 * 1 + 5 * 2) / 4.0
    torch.testing.assert_close(b, torch.tensor([g1] * 4 + [g2] * 3, dtype=torch.float64))
    # median: group 7 sorted (0:w3, 0:w2, 1:w1, 1:w4), S=10, C=[3,5,6,10] >= 5 at k=2 -> 0;
    # group 9 sorted (0:1, 2:1, 5:2), S=4, C=[1,2,4] >= 2 at k=2 -> 2.
    b = opob_baselines(values, torch.log(weights), gids, "median")
    torch.testing.assert_close(b, torch.tensor([0.0] * 4 + [2.0] * 3, dtype=torch.float64))
    b = opob_baselines(values, torch.log(weights), None, "mean")
    expected = float((values.double() * weights).sum() / weights.sum())
    torch.testing.assert_close(b, torch.full((7,), expected, dtype=torch.float64))


def test_winsorized_mean_clips_to_weighted_quantiles():
    values = torch.arange(20.0)
    b = opob_baselines(values, torch.zeros(20), None, "winsorized_mean")
    # Q(0.05): C_k = k >= 1 -> v_(1) = 0; Q(0.95): C_k >= 19 -> v_(19) = 18; so 19 -> 18.
    assert float(b[0]) == pytest.approx((sum(range(19)) + 18) / 20.0)
    # Weighted: the outlier 100 carries 1/22 of the weight, less than 5%: clipped to 3.
    values = torch.tensor([1.0, 2.0, 3.0, 100.0])
    weights = torch.tensor([5.0, 8.0, 8.0, 1.0])
    b = opob_baselines(values, torch.log(weights), None, "winsorized_mean")
    assert float(b[0]) == pytest.approx((5 * 1 + 8 * 2 + 8 * 3 + 1 * 3) / 22.0)


def test_baseline_weights_are_scale_invariant_and_follow_the_nonfinite_rule():
    values = torch.tensor([1.0, 0.0, 3.0, 2.0])
    log_weights = torch.tensor([0.5, -1.0, 2.0, 0.0])
    base = opob_baselines(values, log_weights, None, "mean")
    torch.testing.assert_close(opob_baselines(values, log_weights + 1e4, None, "mean"), base)
    torch.testing.assert_close(opob_baselines(values, log_weights - 1e4, None, "mean"), base)
    nan = opob_baselines(values, torch.tensor([0.0, float("nan"), 1.0, 0.0]), None, "mean")
    torch.testing.assert_close(nan, torch.full((4,), 1.5, dtype=torch.float64))  # undefined -> plain mean
    zero = opob_baselines(values, torch.full((4,), -float("inf")), None, "median")
    torch.testing.assert_close(zero, torch.full((4,), 1.0, dtype=torch.float64))  # plain lower median of 0,1,2,3
    inf = opob_baselines(values, torch.tensor([float("inf"), 0.0, float("inf"), 5.0]), None, "mean")
    torch.testing.assert_close(inf, torch.full((4,), 2.0, dtype=torch.float64))  # mean of the dominating ones
    torch.testing.assert_close(scope_normalized_weights(torch.tensor([0.0, math.log(0.5), 1e4])),
                               torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))


def test_coefficients_for_group_and_minibatch_scope_match_hand_computation():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 2.0])
    gids = torch.tensor([1, 1, 1, 1, 2, 2, 3, 3])
    weights = torch.tensor([1.0, 3.0, 2.0, 4.0, 1.0, 5.0, 1.0, 3.0])
    b = opob_baselines(rewards, torch.log(weights), gids, "mean")
    c = opob_coefficients(rewards, b, gids, norm_by_std=True)
    b1, s1 = 0.5, 0.5  # group 1: W-mean (1 + 4) / 10, population std 0.5
    b3, s3 = 6.0 / 4.0, 1.0  # group 3: (0 + 6) / 4, std of {0, 2} is 1
    expected = [(1 - b1) / s1, (0 - b1) / s1, (0 - b1) / s1, (1 - b1) / s1, 0.0, 0.0,
                (0 - b3) / s3, (2 - b3) / s3]  # group 2 has std 0 -> divided by 1
    torch.testing.assert_close(c, torch.tensor(expected, dtype=torch.float64))
    advantages = torch.tensor([0.5, -1.0, 2.0, 0.0])
    b = opob_baselines(advantages, torch.log(torch.tensor([1.0, 1.0, 2.0, 4.0])), None, "mean")
    c = opob_coefficients(advantages, b)
    torch.testing.assert_close(c, advantages.double() - (0.5 - 1.0 + 4.0) / 8.0)
    with pytest.raises(ValueError, match="group_ids"):
        opob_coefficients(advantages, b, None, norm_by_std=True)


def test_compute_opob_chains_weights_baselines_and_coefficients():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    sq = torch.tensor([1.0, 4.0, 2.0, 1.0])
    log_w = torch.tensor([0.0, math.log(0.5), 1.0, 0.0])
    w_trunc = log_w.exp().clamp(max=8.0)
    lengths = torch.tensor([3.0, 5.0, 2.0, 1.0])
    gids = torch.tensor([0, 0, 1, 1])
    out = compute_opob(GradBaseliningConfig(), rewards, sq, log_w, w_trunc, lengths, gids)
    W = log_w.double().exp() ** 2 * sq  # [1, 1, 2e^2, 1]
    b0 = float((1 * W[0]) / (W[0] + W[1]))
    b1 = float((1 * W[2]) / (W[2] + W[3]))
    f64 = {"dtype": torch.float64}
    torch.testing.assert_close(out.baselines, torch.tensor([b0, b0, b1, b1], **f64))
    torch.testing.assert_close(out.coefficients,
                               torch.tensor([(1 - b0) / 0.5, -b0 / 0.5, (1 - b1) / 0.5, -b1 / 0.5], **f64))
    mini = compute_opob(GradBaseliningConfig(scope="minibatch"), rewards, sq, log_w, w_trunc, lengths, None)
    bm = float((W * rewards).sum() / W.sum())
    torch.testing.assert_close(mini.coefficients, rewards.double() - bm)


def test_group_coefficients_keep_float64_when_rewards_differ_by_one_float32_step():
    """Issue 15, edge case 1: rewards [0.5]*7 + [nextafter(0.5)] with one heavier trajectory. A
    baseline rounded to float32 lands on one of the two rewards, and c is finite and wrong."""
    rewards = torch.tensor([0.5] * 7 + [float(np.nextafter(np.float32(0.5), np.float32(1.0)))], dtype=torch.float32)
    log_weights = torch.tensor([0.0] * 7 + [math.log(1.2)], dtype=torch.float64)
    gids = torch.zeros(8, dtype=torch.long)
    b = opob_baselines(rewards, log_weights, gids, "mean")
    c = opob_coefficients(rewards, b, gids, norm_by_std=True, std_eps=0.0)
    v, w = rewards.double(), log_weights.exp()
    expected_b = float((w * v).sum() / w.sum())
    expected = (v - expected_b) / v.std(unbiased=False)
    torch.testing.assert_close(b, torch.full((8,), expected_b, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(c, expected, rtol=1e-6, atol=1e-6)
    # What the float32 baseline gave (the test fails on that code): far from the float64 answer.
    rounded = (v - float(np.float32(expected_b))) / v.std(unbiased=False)
    assert (rounded - expected).abs().max() > 0.1


def test_group_ids_from_uids_are_stable_and_split_groups_are_detected():
    ids = group_ids_from_uids(np.array(["a", "b", "a", "c"], dtype=object))
    assert ids[0] == ids[2] and len({int(ids[0]), int(ids[1]), int(ids[3])}) == 3
    torch.testing.assert_close(ids, group_ids_from_uids(["a", "b", "a", "c"]))
    assert int(ids.min()) >= 0
    check_whole_groups([torch.tensor([1, 1, 2]), torch.tensor([3, 3])])
    with pytest.raises(ValueError, match="group 2 on ranks \\[0, 1\\]"):
        check_whole_groups([torch.tensor([1, 1, 2]), torch.tensor([2, 3])])
    assert_whole_groups(torch.tensor([5, 5, 6]))  # one process: nothing to compare


def test_surrogate_loss_gradient_is_minus_g_per_token():
    log_prob = torch.randn(3, 4, generator=torch.Generator().manual_seed(1)).requires_grad_()
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    c = torch.tensor([0.5, -2.0, 1.0])
    w_trunc = torch.tensor([1.0, 8.0, 0.25])
    loss = opob_surrogate_loss(log_prob, mask, c, w_trunc, global_batch_size=6)
    loss.backward()
    expected = -(c * w_trunc / torch.tensor([2.0, 4.0, 1.0]))[:, None] * mask / 6.0
    torch.testing.assert_close(log_prob.grad, expected)


def test_vcpo_metrics_match_hand_computation():
    log_prob = torch.tensor([[-1.0, -2.0], [-0.5, -3.0], [-1.0, -1.0]])
    rollout = torch.tensor([[-1.0, -1.0], [-0.5, -1.0], [-4.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    log_w = sequence_log_is_weight(log_prob, rollout, mask)  # [-1, 0, 3]
    ess = global_ess(log_w)
    clipped = global_ess(truncated_log_is_weight(log_w, 8.0))
    sq = torch.tensor([10 ** -3.5, 10 ** 0.5, 10 ** 2.5])  # log10 norms -1.75, 0.25, 1.25: mid-bin
    m = vcpo_metrics(log_prob, rollout, mask, 8.0, ess, clipped, 0.7, sq_grad_norms=sq,
                     baselines=torch.tensor([0.1, 0.1, 0.4]), log_weights=torch.tensor([0.0, float("nan"), 1.0]))
    w = np.exp([-1.0, 0.0, 3.0])
    assert m["ess"] == pytest.approx(w.sum() ** 2 / (w ** 2).sum(), rel=1e-6)
    assert m["ess_ratio_clipped"] == pytest.approx(naive_ess(np.log(np.minimum(w, 8.0))) / 3, rel=1e-6)
    assert m["is_weight_mean"] == pytest.approx(np.minimum(w, 8.0).mean(), rel=1e-6)
    assert m["is_weight_max"] == pytest.approx(w.max(), rel=1e-6)
    assert m["log_is_weight_max"] == pytest.approx(3.0)
    assert m["is_weight_truncated_frac"] == pytest.approx(1.0 / 3)
    ratios = np.array([0.0, -1.0, 0.0, 3.0])  # masked tokens' log(pi/mu)
    k3 = np.expm1(ratios) - ratios
    assert m["rollout_kl_k3"] == pytest.approx(k3.mean(), rel=1e-6)
    assert m["lr_scale"] == 0.7 and m["nonfinite_count"] == 0.0
    assert m["traj_grad_norm_mean"] == pytest.approx((10 ** -1.75 + 10 ** 0.25 + 10 ** 1.25) / 3, rel=1e-6)
    hist = {k: v for k, v in m.items() if k.startswith("traj_grad_norm_hist/")}
    assert sum(hist.values()) == 3
    for exponent in (-2, 0, 1):  # floor(log10) of the three norms
        assert hist[f"traj_grad_norm_hist/1e{exponent}"] == 1
    assert m["opob_baseline_max"] == pytest.approx(0.4)
    assert m["opob_baseline_std"] == pytest.approx(np.std([0.1, 0.1, 0.4]))
    assert m["opob_weight_nonfinite_count"] == 1.0
    assert all(isinstance(v, float) for v in m.values())


def test_nonfinite_log_weights_are_counted_and_histogram_clips_to_end_bins():
    log_prob = torch.tensor([[-1.0], [-1.0], [-1.0]])
    rollout = torch.tensor([[-float("inf")], [float("nan")], [-1.0]])
    mask = torch.ones(3, 1)
    log_w = sequence_log_is_weight(log_prob, rollout, mask)
    m = vcpo_metrics(log_prob, rollout, mask, 8.0, global_ess(log_w), global_ess(log_w), 0.0,
                     sq_grad_norms=torch.tensor([1e-20, 1e20, 1.0]))
    assert m["nonfinite_count"] == 2.0 and math.isnan(m["ess_ratio"])
    assert m["is_weight_mean"] == pytest.approx(1.0) and m["is_weight_truncated_frac"] == 0.0
    assert m["traj_grad_norm_hist/1e-4"] == 1 and m["traj_grad_norm_hist/1e3"] == 1 and m["traj_grad_norm_hist/1e0"] == 1


def test_shard_combination_in_one_process_is_sharded_plus_replicated():
    got = combine_shard_sq_grad_norms(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(got, torch.tensor([1.5, 2.25]))


def test_is_weight_max_is_nan_when_no_log_weight_is_finite():
    # Every trajectory's log w is NaN or +inf: the max over the empty set of finite weights is
    # undefined (NaN), never the inf that a NaN comparison would produce.
    log_prob = torch.tensor([[-1.0], [-1.0]])
    rollout = torch.tensor([[float("nan")], [-float("inf")]])
    mask = torch.ones(2, 1)
    log_w = sequence_log_is_weight(log_prob, rollout, mask)
    m = vcpo_metrics(log_prob, rollout, mask, 8.0, global_ess(log_w), global_ess(log_w), 0.0)
    assert math.isnan(m["is_weight_max"]) and math.isnan(m["log_is_weight_max"])
    # One finite weight: its value, exactly.
    rollout = torch.tensor([[-1.5], [-float("inf")]])
    log_w = sequence_log_is_weight(log_prob, rollout, mask)
    m = vcpo_metrics(log_prob, rollout, mask, 8.0, global_ess(log_w), global_ess(log_w), 0.0)
    assert m["is_weight_max"] == pytest.approx(math.exp(0.5))


@pytest.mark.parametrize("agg_mode", ["mean", "median", "winsorized_mean"])
def test_an_empty_scope_has_a_nan_baseline_in_every_aggregation(agg_mode):
    empty = torch.zeros(0)
    assert math.isnan(float(aggregate_baseline(empty, empty, agg_mode)))


def test_min_lr_rule_on_an_empty_minibatch_skips_the_step_and_names_a_missing_batch_size():
    assert ess_lr_scale(float("nan"), 1.0, "sqrt", "min_lr", batch_size=0) == (0.0, True)
    assert ess_lr_scale(float("nan"), 1.0, "linear", "min_lr", batch_size=4) == (0.25, True)
    with pytest.raises(ValueError, match="batch_size"):
        ess_lr_scale(float("nan"), 1.0, "sqrt", "min_lr")


def test_trajectory_advantage_does_not_depend_on_where_the_mask_starts():
    # Outcome advantages broadcast over the kept tokens (0 where masked). A trajectory whose first
    # response token is masked still has its advantage; one with no token has 0.
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 0]])
    advantages = torch.tensor([[0.5, 0.5, 0.0], [0.0, -1.25, -1.25], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(trajectory_advantages(advantages, mask), torch.tensor([0.5, -1.25, 0.0]))
