"""KL to the reference policy: the estimators' values, clamps and straight-through gradients, the
fixed and adaptive controllers against hand-computed updates, and the KL-in-reward penalty."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from verl.protocol import DataProto
from verl.trainer.ppo.core_algos import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    apply_kl_penalty,
    build_kl_controller,
    kl_penalty,
)

# Hand-written per-token formulas, d = log pi - log pi_ref, independent of the implementation.
BY_HAND = {
    "k1": lambda d: d,
    "abs": lambda d: abs(d),
    "k2": lambda d: 0.5 * d * d,
    "k3": lambda d: min(max(math.exp(-max(min(d, 20.0), -20.0)) + max(min(d, 20.0), -20.0) - 1.0, -10.0), 10.0),
}
ALIASES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_estimator_values_match_the_formulas(estimator):
    log_prob = torch.tensor([[-0.3, -2.0, -0.01, -40.0]], dtype=torch.float64)
    ref = torch.tensor([[-0.5, -0.2, -3.0, -0.1]], dtype=torch.float64)
    got = kl_penalty(log_prob, ref, estimator)
    formula = BY_HAND[ALIASES[estimator.rstrip("+")]]
    expected = [formula(float(a - b)) for a, b in zip(log_prob[0], ref[0])]
    assert got[0].tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_k3_is_clamped_where_exp_would_overflow():
    # d = -100: e^{-d} would be e^100; veRL's rule clamps d to -20 and the value to 10.
    value = kl_penalty(torch.tensor([-100.0]), torch.tensor([0.0]), "low_var_kl")
    assert value.item() == 10.0 and torch.isfinite(value).all()


@pytest.mark.parametrize("estimator", ["k1+", "kl+", "abs+", "k3+", "low_var_kl+", "mse+", "k2+"])
def test_straight_through_variants_take_k2s_gradient(estimator):
    """``X+``: value of X, gradient of d^2 / 2, i.e. d per token."""
    ref = torch.tensor([-0.5, -0.2, -3.0], dtype=torch.float64)
    log_prob = torch.tensor([-0.3, -2.0, -0.01], dtype=torch.float64, requires_grad=True)
    value = kl_penalty(log_prob, ref, estimator)
    value.sum().backward()
    torch.testing.assert_close(log_prob.grad, (log_prob - ref).detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(value.detach(), kl_penalty(log_prob.detach(), ref, estimator.rstrip("+")))


def test_plain_k3_gradient_is_its_own():
    """Without '+', the gradient is the estimator's: d/d(log pi) (e^{-d} + d - 1) = 1 - e^{-d}."""
    ref = torch.tensor([-0.5, -0.2], dtype=torch.float64)
    log_prob = torch.tensor([-0.3, -2.0], dtype=torch.float64, requires_grad=True)
    kl_penalty(log_prob, ref, "k3").sum().backward()
    d = (log_prob - ref).detach()
    torch.testing.assert_close(log_prob.grad, 1.0 - torch.exp(-d), rtol=0, atol=1e-12)


def test_unknown_estimator_is_an_error():
    with pytest.raises(ValueError, match="unknown KL estimator 'k9'"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k9")


def test_adaptive_controller_follows_hand_computed_updates():
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon), step by step."""
    controller = build_kl_controller("adaptive", kl_coef=0.05, target_kl=0.1, horizon=1000)
    assert isinstance(controller, AdaptiveKLController)
    beta = 0.05
    for current_kl, n in ((0.3, 64), (0.11, 64), (0.0, 128), (0.1, 32), (0.05, 64)):
        controller.update(current_kl, n)
        error = min(max(current_kl / 0.1 - 1.0, -0.2), 0.2)
        beta *= 1.0 + error * n / 1000
        assert controller.value == pytest.approx(beta, rel=1e-12)
    # 0.3 -> +0.2 clip, 0.0 -> -0.2 clip; 0.1 (on target) leaves beta unchanged
    assert beta == pytest.approx(0.05 * 1.0128 * 1.0064 * 0.9744 * 1.0 * 0.9872, rel=1e-12)
    restored = build_kl_controller("adaptive", kl_coef=1.0, target_kl=0.1, horizon=1000)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value


def test_fixed_controller_never_moves():
    controller = build_kl_controller("fixed", kl_coef=0.2)
    assert type(controller) is FixedKLController
    controller.update(5.0, 1000)
    assert controller.value == 0.2


def test_kl_in_reward_subtracts_beta_times_kl_on_response_tokens_only():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    behaviour = torch.tensor([[-0.2, -1.0, -5.0], [-0.7, 0.0, 0.0], [0.0, 0.0, 0.0]])
    ref = torch.tensor([[-0.4, -0.5, -1.0], [-0.7, -9.0, 0.0], [-1.0, -1.0, -1.0]])
    scores = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    data = DataProto.from_dict(tensors={"response_mask": mask, "rollout_log_probs": behaviour, "ref_log_prob": ref,
                                        "token_level_scores": scores.clone()},
                               non_tensors={"uid": np.array(["a", "a", "b"], dtype=object)})
    controller = AdaptiveKLController(kl_coef=0.5, target_kl=0.01, horizon=100)
    data, metrics = apply_kl_penalty(data, controller, "k1")
    kl = torch.tensor([[0.2, -0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(data.batch["token_level_rewards"], scores - 0.5 * kl)
    # Mean over trajectories with tokens of each one's mean token KL: ((0.2 - 0.5) / 2 + 0) / 2.
    assert metrics["actor/reward_kl_penalty"] == pytest.approx(-0.075)
    assert metrics["actor/reward_kl_penalty_coeff"] == 0.5  # beta used for this batch, before the update
    assert controller.value == pytest.approx(0.5 * (1 - 0.2 * 3 / 100))
