"""The actor's policy-loss entry point: batch keys per config, anchors per mode, config validation,
and the torch actor's M2PO/rejection/GSPO wiring (M2PO over 2 gloo ranks: tests/trainer/ppo/test_policy_losses.py)."""

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from verl.protocol import DataProto
from verl.trainer.ppo import core_algos as ca
from verl.utils.config import ConfigError
from verl.workers.actor.config import ActorConfig, PolicyLossConfig
from verl.workers.actor.dp_actor import DataParallelPPOActor
from verl.workers.actor.policy_loss import actor_policy_loss, prepare_minibatch, required_batch_keys
from verl.workers.utils.vcpo import ESSScalingConfig, GradBaseliningConfig

torch.set_num_threads(1)

FORWARD = ("input_ids", "attention_mask", "position_ids", "responses")
VCPO_LOSS = PolicyLossConfig(mode="bypass", tis_level="sequence")


# ------------------------------------------------------------------ batch keys


@pytest.mark.parametrize("config,extra", [
    (ActorConfig(policy_loss=PolicyLossConfig(mode="ppo_clip")), ["rollout_log_probs"]),
    (ActorConfig(policy_loss=PolicyLossConfig(mode="ppo_clip"), recompute_old_log_prob=True), ["old_log_probs"]),
    (ActorConfig(policy_loss=PolicyLossConfig(mode="bypass")), []),
    (ActorConfig(policy_loss=PolicyLossConfig(mode="decoupled_ppo"), recompute_old_log_prob=True),
     ["old_log_probs", "rollout_log_probs"]),
    (ActorConfig(policy_loss=PolicyLossConfig(mode="gspo"), recompute_old_log_prob=True), ["old_log_probs"]),
    (ActorConfig(policy_loss=PolicyLossConfig(mode="bypass", rejection_level="geometric")), ["rollout_log_probs"]),
    (ActorConfig(policy_loss=PolicyLossConfig(mode="bypass", m2po=True), recompute_old_log_prob=True),
     ["old_log_probs", "rollout_log_probs"]),
    (ActorConfig(policy_loss=VCPO_LOSS, grad_baselining=GradBaseliningConfig(enable=True)),
     ["rollout_log_probs", "token_level_rewards"]),
    (ActorConfig(policy_loss=PolicyLossConfig(mode="bypass"), ess_scaling=ESSScalingConfig(enable=True)),
     ["rollout_log_probs"]),
])
def test_required_batch_keys_per_config(config, extra):
    assert required_batch_keys(config) == (*FORWARD, "response_mask", "advantages", *extra)


# ------------------------------------------------------------------ config validation


@pytest.mark.parametrize("config,key,mentions", [
    (ActorConfig(policy_loss=PolicyLossConfig(mode="decoupled_ppo")), "actor.policy_loss.mode",
     "actor.recompute_old_log_prob=true"),
    (ActorConfig(policy_loss=PolicyLossConfig(rejection_level="segment")), "actor.policy_loss.rejection_level", ""),
    (ActorConfig(policy_loss=PolicyLossConfig(rejection_low=1.5)), "actor.policy_loss.rejection_low", ""),
    (ActorConfig(policy_loss=PolicyLossConfig(rejection_high=0.9)), "actor.policy_loss.rejection_high", ""),
    (ActorConfig(policy_loss=PolicyLossConfig(m2po_threshold=0.0)), "actor.policy_loss.m2po_threshold", ""),
    (ActorConfig(policy_loss=PolicyLossConfig(mode="bypass", tis_level="sequence", rejection_level="token"),
                 grad_baselining=GradBaseliningConfig(enable=True)),
     "actor.grad_baselining.enable", "actor.policy_loss.rejection_level='none'"),
    (ActorConfig(policy_loss=PolicyLossConfig(mode="bypass", tis_level="sequence", m2po=True),
                 grad_baselining=GradBaseliningConfig(enable=True)),
     "actor.grad_baselining.enable", "actor.policy_loss.m2po=False"),
])
def test_invalid_loss_configs_name_their_keys(config, key, mentions):
    with pytest.raises(ConfigError) as info:
        config.validate("actor")
    assert info.value.key == key and mentions in str(info.value)


def test_new_modes_validate():
    ActorConfig(policy_loss=PolicyLossConfig(mode="decoupled_ppo", tis_level="token"),
                recompute_old_log_prob=True).validate("actor")
    ActorConfig(policy_loss=PolicyLossConfig(mode="gspo", clip_ratio_low=3e-4, clip_ratio_high=4e-4,
                                             clip_ratio_c=None)).validate("actor")
    ActorConfig(policy_loss=PolicyLossConfig(mode="bypass", tis_level="token", m2po=True,
                                             rejection_level="sequence", rejection_low=0.0)).validate("actor")


# ------------------------------------------------------------------ anchors per mode


def _micro(seed=0, b=3, r=4):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, r)
    mask[1, 2:] = 0
    return {
        "response_mask": mask,
        "advantages": torch.randn(b, 1, generator=g) * mask,
        "old_log_probs": -torch.rand(b, r, generator=g) * mask,
        "rollout_log_probs": -torch.rand(b, r, generator=g) * mask,
    }, (-torch.rand(b, r, generator=g)).requires_grad_()


@pytest.mark.parametrize("mode,recompute,anchor", [
    ("ppo_clip", False, "rollout_log_probs"), ("ppo_clip", True, "old_log_probs"),
    ("gspo", False, "rollout_log_probs"), ("gspo", True, "old_log_probs"),
    ("decoupled_ppo", True, "old_log_probs"), ("bypass", False, None),
])
def test_actor_policy_loss_anchors_each_mode(mode, recompute, anchor):
    micro, logp = _micro()
    config = ActorConfig(policy_loss=PolicyLossConfig(mode=mode, tis_level="token", rejection_level="token",
                                                      rejection_low=0.6, rejection_high=1.5),
                         recompute_old_log_prob=recompute, loss_agg_mode="token-mean")
    loss, metrics = actor_policy_loss(config, micro, logp, torch.tensor(10.0), torch.tensor(3.0))
    expected, _ = ca.compute_policy_loss(
        logp, None if anchor is None else micro[anchor], micro["advantages"], micro["response_mask"],
        "token-mean", mode=mode, rollout_log_prob=micro["rollout_log_probs"], tis_level="token",
        global_num_tokens=10.0, rejection_level="token", rejection_low=0.6, rejection_high=1.5,
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-7)
    assert "rejected_frac" in metrics and ("gspo_clipfrac" in metrics) == (mode == "gspo")


def test_m2po_fallback_on_whole_minibatch_equals_prepare_minibatch():
    micro, logp = _micro(seed=2)
    micro["rollout_log_probs"] = micro["rollout_log_probs"] - 0.6 * micro["response_mask"]  # some d^2 > 0.04
    config = ActorConfig(policy_loss=PolicyLossConfig(mode="bypass", m2po=True))
    calls = []
    masks, mask_metrics = prepare_minibatch(config, micro, lambda: calls.append(1) or logp.detach())
    assert calls == [1] and 0 < mask_metrics["m2po_masked_frac"].item() < 1
    with_mask, _ = actor_policy_loss(config, {**micro, **masks}, logp, torch.tensor(10.0), torch.tensor(3.0))
    fallback, metrics = actor_policy_loss(config, micro, logp, torch.tensor(10.0), torch.tensor(3.0))
    assert with_mask.item() == fallback.item()
    assert metrics["m2po_m2_after"].item() <= 0.04 < metrics["m2po_m2_before"].item()
    recompute = ActorConfig(policy_loss=PolicyLossConfig(mode="bypass", m2po=True), recompute_old_log_prob=True)
    prepare_minibatch(recompute, micro, lambda: calls.append(2) or logp.detach())
    assert calls == [1]  # the old log-probs stand in for pi: no forward


# ------------------------------------------------------------------ torch actor wiring

VOCAB, P, R, TEMPERATURE = 40, 4, 5, 1.0


def _model() -> Qwen2ForCausalLM:
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).float()


def _log_probs(model, b) -> torch.Tensor:
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]).logits
    logp = torch.log_softmax(logits[:, P - 1 : P + R - 1].float() / TEMPERATURE, -1)
    return logp.gather(-1, b["responses"][..., None]).squeeze(-1)


def _batch(n=6) -> DataProto:
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, VOCAB, (n, P), generator=g)
    responses = torch.randint(1, VOCAB, (n, R), generator=g)
    response_mask = torch.ones(n, R)
    for i in range(n):
        response_mask[i, 1 + i % R :] = 0
    responses = responses * response_mask.long()
    attention_mask = torch.cat([torch.ones(n, P, dtype=torch.long), response_mask.long()], 1)
    b = {"prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
         "attention_mask": attention_mask, "position_ids": torch.clamp(attention_mask.cumsum(-1) - 1, min=0),
         "response_mask": response_mask}
    with torch.no_grad():
        b["rollout_log_probs"] = (_log_probs(_model(), b) + 0.4 * torch.randn(n, R, generator=g)) * response_mask
    b["advantages"] = torch.randn(n, 1, generator=g) * response_mask
    return DataProto.from_dict(tensors=b, meta_info={"temperature": TEMPERATURE})


class _RecordingSGD(torch.optim.SGD):
    def step(self, closure=None):
        self.recorded = [p.grad.detach().clone() for group in self.param_groups for p in group["params"]]
        return super().step(closure)


def _actor(model, policy_loss, micro=2, **overrides) -> DataParallelPPOActor:
    config = ActorConfig(ppo_mini_batch_size=6, ppo_micro_batch_size_per_gpu=micro, grad_clip=1e9,
                         policy_loss=policy_loss, **overrides)
    config.validate("actor")
    return DataParallelPPOActor(config, model, _RecordingSGD(model.parameters(), lr=0.1))


def test_dp_actor_m2po_gradient_uses_the_minibatch_mask():
    """Three micro-batches share one mask from the whole mini-batch: the gradient equals that of
    -(1/B) sum_i (1/L_i) sum_t keep_t A_i log pi_t with keep from a brute-force sort of d^2."""
    data = _batch()
    model = _model()
    reference = copy.deepcopy(model)
    actor = _actor(model, PolicyLossConfig(mode="bypass", m2po=True))
    metrics = actor.update_policy(data)

    b = data.batch
    mask = b["response_mask"]
    logp = _log_probs(reference, b)
    sq = (logp.detach() - b["rollout_log_probs"]) ** 2
    ordered = sq[mask > 0].sort(descending=True).values
    k = next(k for k in range(len(ordered) + 1) if ordered[k:].sum() <= 0.04 * (len(ordered) - k))
    assert 0 < k < len(ordered)
    keep = (sq < ordered[k - 1]).float() * mask
    loss = (-(keep * b["advantages"] * logp).sum(-1) / mask.sum(-1)).mean()
    loss.backward()
    for recorded, p in zip(actor.optimizer.recorded, reference.parameters()):
        torch.testing.assert_close(recorded, p.grad, rtol=1e-5, atol=1e-7)
    assert metrics["actor/m2po_masked_frac"] == pytest.approx(k / len(ordered))
    assert metrics["actor/m2po_m2_before"] == pytest.approx(ordered.mean().item(), rel=1e-5)
    assert metrics["actor/m2po_m2_after"] <= 0.04


@pytest.mark.parametrize("policy_loss,recompute,names", [
    (PolicyLossConfig(mode="bypass", tis_level="sequence", rejection_level="geometric",
                      rejection_low=0.7, rejection_high=1.4), False, ["actor/rejected_frac"]),
    (PolicyLossConfig(mode="gspo", clip_ratio_low=3e-4, clip_ratio_high=4e-4), False, ["actor/gspo_clipfrac"]),
    (PolicyLossConfig(mode="decoupled_ppo", tis_level="token"), True, ["actor/pg_clipfrac"]),
])
def test_dp_actor_logs_the_collapse_diagnostics(policy_loss, recompute, names):
    """Every mode trains (parameters move, loss finite) and logs its mask/clip fraction in [0, 1]
    next to the IS-weight, KL and ESS metrics the stability experiment plots."""
    data = _batch()
    model = _model()
    if recompute:
        data.batch["old_log_probs"] = _actor(model, PolicyLossConfig()).compute_log_prob(data)[0]
    before = [p.detach().clone() for p in model.parameters()]
    metrics = _actor(model, policy_loss, recompute_old_log_prob=recompute).update_policy(data)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    for name in [*names, "actor/is_weight_mean", "actor/log_is_weight_max", "actor/is_weight_truncated_frac",
                 "actor/rollout_kl_k3", "actor/ess_ratio", "actor/grad_norm", "actor/pg_loss"]:
        assert name in metrics and metrics[name] == metrics[name], name
    for name in names:
        assert 0.0 <= metrics[name] <= 1.0
