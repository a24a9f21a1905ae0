"""The actor's policy-loss entry point: batch keys per config, anchors per mode, config validation,
and the torch actor's M2PO/rejection/GSPO wiring (M2PO over 2 gloo ranks: tests/trainer/ppo/test_policy_losses.py)."""

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from verl.protocol import DataProto
from verl.trainer.config import load_config
from verl.trainer.ppo import core_algos as ca
from verl.utils.config import ConfigError
from verl.workers.actor.config import PolicyLossSpec, PolicyUpdateConfig
from verl.workers.actor.dp_actor import DataParallelPPOActor
from verl.workers.actor.policy_loss import actor_policy_loss, prepare_minibatch, required_batch_keys
from verl.workers.utils.vcpo import ESSScalingConfig, GradBaseliningConfig

torch.set_num_threads(1)

FORWARD = ("input_ids", "attention_mask", "position_ids", "responses")


# ------------------------------------------------------------------ batch keys


def _update(mode="bypass", recompute=None, **overrides) -> PolicyUpdateConfig:
    """The resolved actor config; ``recompute`` defaults to what the trainer derives (all but bypass)."""
    loss = {k: overrides.pop(k) for k in list(overrides) if k in PolicyLossSpec.__dataclass_fields__}
    recompute = mode != "bypass" if recompute is None else recompute
    return PolicyUpdateConfig(policy_loss=PolicyLossSpec(mode=mode, **loss), recompute_old_log_prob=recompute,
                              **overrides)


@pytest.mark.parametrize("config,extra", [
    # ppo_clip against the rollout log-probs is no longer a config (without bypass the old log-probs
    # are always recomputed), but the actor still anchors correctly when handed it.
    (_update("ppo_clip", recompute=False), ["rollout_log_probs"]),
    (_update("ppo_clip"), ["old_log_probs"]),
    (_update("bypass"), []),
    (_update("decoupled_ppo"), ["old_log_probs", "rollout_log_probs"]),
    (_update("gspo"), ["old_log_probs"]),
    (_update("bypass", rejection_level="geometric"), ["rollout_log_probs"]),
    (_update("bypass", recompute=True, m2po=True), ["old_log_probs", "rollout_log_probs"]),
    (_update("bypass", tis_level="sequence", grad_baselining=GradBaseliningConfig(enable=True)),
     ["rollout_log_probs", "token_level_rewards"]),
    (_update("bypass", ess_scaling=ESSScalingConfig(enable=True)), ["rollout_log_probs"]),
])
def test_required_batch_keys_per_config(config, extra):
    assert required_batch_keys(config) == (*FORWARD, "response_mask", "advantages", *extra)


# ------------------------------------------------------------------ config validation (keys -> loss: test_actor_config.py)


RC = "algorithm.rollout_correction"
SKIP = "async_training.skip_recompute_old_log_prob"


@pytest.mark.parametrize("overrides,key,mentions", [
    # Bypass has no ratio for GSPO to shape.
    ([f"{SKIP}=true", "actor_rollout_ref.actor.policy_loss.loss_mode=gspo"],
     "actor_rollout_ref.actor.policy_loss.loss_mode", "skip_recompute_old_log_prob=true"),
    (["actor_rollout_ref.actor.policy_loss.loss_mode=reinforce"], "actor_rollout_ref.actor.policy_loss.loss_mode",
     "vanilla"),
    ([f"{RC}.rollout_rs=segment"], f"{RC}.rollout_rs", "geometric"),
    ([f"{RC}.rollout_rs=token", f"{RC}.rollout_rs_threshold_lower=1.5"], f"{RC}.rollout_rs_threshold_lower",
     "<= 1"),
    ([f"{RC}.rollout_rs=token", f"{RC}.rollout_rs_threshold=0.9"], f"{RC}.rollout_rs_threshold", ">= 1"),
    ([f"{RC}.rollout_rs=m2po", f"{RC}.rollout_rs_threshold=0.0"], f"{RC}.rollout_rs_threshold", "greater than 0"),
    (["method=vcpo", f"{RC}.rollout_rs=token"], "actor_rollout_ref.actor.grad_baselining.enable",
     "algorithm.rollout_correction.rollout_rs='none'"),
    (["method=vcpo", f"{RC}.rollout_rs=m2po"], "actor_rollout_ref.actor.grad_baselining.enable",
     "(got 'm2po')"),
])
def test_invalid_loss_configs_name_their_keys(overrides, key, mentions):
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    assert info.value.key == key and mentions in str(info.value)


def test_new_modes_validate():
    load_config([f"{SKIP}=false", f"{RC}.rollout_is=token"])
    gspo = load_config([f"{SKIP}=false", "actor_rollout_ref.actor.policy_loss.loss_mode=gspo",
                        "actor_rollout_ref.actor.clip_ratio_low=3e-4", "actor_rollout_ref.actor.clip_ratio_high=4e-4",
                        "actor_rollout_ref.actor.clip_ratio_c=null"]).policy_loss_spec()
    assert (gspo.clip_ratio_low, gspo.clip_ratio_high, gspo.clip_ratio_c) == (3e-4, 4e-4, None)
    # The M2PO method: token TIS plus the second-moment mask (rollout_rs picks one mask kind).
    m2po = load_config(["method=m2po"]).policy_loss_spec()
    assert (m2po.mode, m2po.tis_level, m2po.m2po) == ("bypass", "token", True)


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
    config = PolicyUpdateConfig(policy_loss=PolicyLossSpec(mode=mode, tis_level="token", rejection_level="token",
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
    config = PolicyUpdateConfig(policy_loss=PolicyLossSpec(mode="bypass", m2po=True))
    calls = []
    masks, mask_metrics = prepare_minibatch(config, micro, lambda: calls.append(1) or logp.detach())
    assert calls == [1] and 0 < mask_metrics["m2po_masked_frac"].item() < 1
    with_mask, _ = actor_policy_loss(config, {**micro, **masks}, logp, torch.tensor(10.0), torch.tensor(3.0))
    fallback, metrics = actor_policy_loss(config, micro, logp, torch.tensor(10.0), torch.tensor(3.0))
    assert with_mask.item() == fallback.item()
    assert metrics["m2po_m2_after"].item() <= 0.04 < metrics["m2po_m2_before"].item()
    recompute = PolicyUpdateConfig(policy_loss=PolicyLossSpec(mode="bypass", m2po=True), recompute_old_log_prob=True)
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
    config = PolicyUpdateConfig(ppo_mini_batch_size=6, ppo_micro_batch_size_per_gpu=micro,
                                log_prob_micro_batch_size_per_gpu=micro, grad_clip=1e9,
                                policy_loss=policy_loss, **overrides)
    return DataParallelPPOActor(config, model, _RecordingSGD(model.parameters(), lr=0.1))


def test_dp_actor_m2po_gradient_uses_the_minibatch_mask():
    """Three micro-batches share one mask from the whole mini-batch: the gradient equals that of
    -(1/B) sum_i (1/L_i) sum_t keep_t A_i log pi_t with keep from a brute-force sort of d^2."""
    data = _batch()
    model = _model()
    reference = copy.deepcopy(model)
    actor = _actor(model, PolicyLossSpec(mode="bypass", m2po=True))
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
    (PolicyLossSpec(mode="bypass", tis_level="sequence", rejection_level="geometric",
                    rejection_low=0.7, rejection_high=1.4), False, ["actor/rejected_frac"]),
    (PolicyLossSpec(mode="gspo", clip_ratio_low=3e-4, clip_ratio_high=4e-4), False, ["actor/gspo_clipfrac"]),
    (PolicyLossSpec(mode="decoupled_ppo", tis_level="token"), True, ["actor/pg_clipfrac"]),
])
def test_dp_actor_logs_the_collapse_diagnostics(policy_loss, recompute, names):
    """Every mode trains (parameters move, loss finite) and logs its mask/clip fraction in [0, 1]
    next to the IS-weight, KL and ESS metrics the stability experiment plots."""
    data = _batch()
    model = _model()
    if recompute:
        data.batch["old_log_probs"] = _actor(model, PolicyLossSpec()).compute_log_prob(data)[0]
    before = [p.detach().clone() for p in model.parameters()]
    metrics = _actor(model, policy_loss, recompute_old_log_prob=recompute).update_policy(data)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    for name in [*names, "actor/is_weight_mean", "actor/log_is_weight_max", "actor/is_weight_truncated_frac",
                 "actor/rollout_kl_k3", "actor/ess_ratio", "actor/grad_norm", "actor/pg_loss"]:
        assert name in metrics and metrics[name] == metrics[name], name
    for name in names:
        assert 0.0 <= metrics[name] <= 1.0
