"""The actor's config: the user-facing ``actor_rollout_ref.actor`` section (a bad value raises
ConfigError naming its full key), its resolution with ``algorithm.rollout_correction`` and
``async_training`` into the ``PolicyUpdateConfig`` the actors run on, and the OPOB preconditions."""

import pytest

from verl.trainer.config import load_config
from verl.utils.config import ConfigError, build_config
from verl.workers.actor.config import ActorConfig, PolicyLossSpec, PolicyUpdateConfig
from verl.workers.utils.vcpo import ESSScalingConfig, GradBaseliningConfig

A = "actor_rollout_ref.actor"
RC = "algorithm.rollout_correction"
SKIP = "async_training.skip_recompute_old_log_prob"
PROX = "async_training.compute_prox_log_prob"


def test_defaults_are_valid_and_build_from_plain_data():
    ActorConfig().validate(A)
    config = build_config(ActorConfig, {"optim": {"betas": [0.8, 0.95]}, "clip_ratio_c": None,
                                        "policy_loss": {"loss_mode": "gspo"}})
    assert config.optim.betas == [0.8, 0.95] and config.clip_ratio_c is None
    assert config.policy_loss.loss_mode == "gspo"
    config.validate(A)


@pytest.mark.parametrize(
    "override,key",
    [
        ("strategy=fsdp9", f"{A}.strategy"),
        ("ppo_mini_batch_size=0", f"{A}.ppo_mini_batch_size"),
        ("ppo_micro_batch_size_per_gpu=-2", f"{A}.ppo_micro_batch_size_per_gpu"),
        ("ppo_epochs=0", f"{A}.ppo_epochs"),
        ("loss_agg_mode=mean", f"{A}.loss_agg_mode"),
        ("optim.clip_grad=0.0", f"{A}.optim.clip_grad"),
        ("entropy_coeff=-0.1", f"{A}.entropy_coeff"),
        ("policy_loss.loss_mode=reinforce", f"{A}.policy_loss.loss_mode"),
        ("clip_ratio_low=1.5", f"{A}.clip_ratio_low"),
        ("clip_ratio_high=-0.1", f"{A}.clip_ratio_high"),
        ("optim.lr=-1e-4", f"{A}.optim.lr"),
        ("optim.weight_decay=-0.1", f"{A}.optim.weight_decay"),
        ("optim.eps=0.0", f"{A}.optim.eps"),
        ("optim.lr_decay_style=step", f"{A}.optim.lr_decay_style"),
        ("optim.lr_warmup_steps=-1", f"{A}.optim.lr_warmup_steps"),
        ("optim.min_lr_ratio=1.5", f"{A}.optim.min_lr_ratio"),
        ("optim.lr_decay_steps=0", f"{A}.optim.lr_decay_steps"),
        # Cross-field rules, checked after the types.
        ("strategy=fsdp", f"{A}.strategy"),
        ("clip_ratio=1.5", f"{A}.clip_ratio"),
        ("clip_ratio_c=1.0", f"{A}.clip_ratio_c"),
        ("optim.betas=[0.9]", f"{A}.optim.betas"),
        ("optim.betas=[0.9,1.0]", f"{A}.optim.betas"),
        ("use_dynamic_bsz=true", f"{A}.use_dynamic_bsz"),
        ("fsdp_config.param_offload=true", f"{A}.fsdp_config.param_offload"),
        ("use_rollout_log_probs=false", f"{A}.use_rollout_log_probs"),
        ("megatron.param_offload=true", f"{A}.megatron.param_offload"),
    ],
)
def test_invalid_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config([f"{A}.{override}"])
    assert info.value.key == key
    assert key in str(info.value)
    assert info.value.allowed  # says what would be valid


@pytest.mark.parametrize("override,key", [
    ("rollout_is=segment", f"{RC}.rollout_is"),
    ("rollout_is_threshold=0.0", f"{RC}.rollout_is_threshold"),
])
def test_invalid_rollout_correction_names_its_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config([f"{RC}.{override}"])
    assert info.value.key == key and info.value.allowed


def test_vcpo_keys_reach_the_policy_update():
    config = load_config([
        f"{A}.ess_scaling.enable=true", f"{A}.ess_scaling.scaling_rule=linear", f"{A}.ess_scaling.base_ess_ratio=0.55",
        f"{A}.ess_scaling.use_clipped=true", f"{A}.grad_baselining.enable=true", f"{A}.grad_baselining.scope=minibatch",
        f"{A}.grad_baselining.agg_mode=median", f"{A}.update_policy_per_traj=true",
        f"{SKIP}=true", f"{RC}.rollout_is=sequence",
    ])
    update = config.policy_update_config()
    assert update.ess_scaling == ESSScalingConfig(True, "linear", 0.55, True)
    assert (update.grad_baselining.scope, update.grad_baselining.agg_mode, update.grad_norm_method) == (
        "minibatch", "median", "per_traj")
    assert ActorConfig().grad_baselining == GradBaseliningConfig() and not ActorConfig().ess_scaling.enable
    assert load_config().policy_update_config().grad_norm_method == "batched"


@pytest.mark.parametrize(
    "overrides,key,names",
    [
        ([f"{A}.ess_scaling.scaling_rule=cube"], f"{A}.ess_scaling.scaling_rule", "sqrt"),
        ([f"{A}.ess_scaling.base_ess_ratio=0.0"], f"{A}.ess_scaling.base_ess_ratio", "greater than 0"),
        ([f"{A}.ess_scaling.nonfinite_rule=ignore"], f"{A}.ess_scaling.nonfinite_rule", "skip"),
        ([f"{A}.grad_baselining.scope=batch"], f"{A}.grad_baselining.scope", "group"),
        # The release's switch replaced grad_norm_method's two names.
        ([f"{A}.update_policy_per_traj=ghost"], f"{A}.update_policy_per_traj", "valid boolean"),
        ([f"{A}.grad_baselining.enable=true", f"{SKIP}=false"], f"{A}.grad_baselining.enable",
         f"{SKIP}=true"),
        ([f"{A}.grad_baselining.enable=true", f"{RC}.rollout_is=token"], f"{A}.grad_baselining.enable",
         f"{RC}.rollout_is='sequence'"),
        ([f"{A}.grad_baselining.enable=true", f"{A}.loss_agg_mode=token-mean"], f"{A}.grad_baselining.enable",
         f"{A}.loss_agg_mode"),
        ([f"{A}.grad_baselining.enable=true", f"{A}.entropy_coeff=0.01"], f"{A}.grad_baselining.enable",
         f"{A}.entropy_coeff"),
    ],
)
def test_invalid_vcpo_settings_name_their_keys(overrides, key, names):
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    assert info.value.key == key and names in str(info.value)


def test_vcpo_recipe_settings_are_valid():
    update = load_config(["method=vcpo", "async_training.staleness_threshold=2"]).policy_update_config()
    assert update.ess_scaling.enable and update.grad_baselining.enable
    update.check_grad_baselining(f"{A}.grad_baselining.enable")


# ------------------------------------------------------------------ keys -> PolicyUpdateConfig


def test_policy_update_config_resolves_units_and_moved_keys():
    config = load_config([
        f"{A}.ppo_mini_batch_size=4", "actor_rollout_ref.rollout.n=4", f"{A}.ppo_micro_batch_size_per_gpu=6",
        f"{A}.optim.clip_grad=0.5", f"{A}.optim.lr_decay_style=cosine", f"{A}.optim.lr_decay_steps=40",
        f"{A}.clip_ratio=0.25", f"{A}.clip_ratio_high=0.28", f"{A}.clip_ratio_c=null", f"{A}.ppo_epochs=2",
        f"{A}.shuffle=true",
    ])
    update = config.policy_update_config()
    # Prompts in the user's config, trajectories in the actor's: 4 prompts x 4 responses.
    assert update.ppo_mini_batch_size == 16 and update.ppo_micro_batch_size_per_gpu == 6
    # The old-log-prob pass uses the actor's micro-batch unless the rollout section sets its own.
    assert update.log_prob_micro_batch_size_per_gpu == 6
    assert update.grad_clip == 0.5 and update.optim.lr_decay_style == "cosine" and update.optim.decay_steps(7) == 40
    assert (update.policy_loss.clip_ratio_low, update.policy_loss.clip_ratio_high) == (0.25, 0.28)
    assert update.policy_loss.clip_ratio_c is None
    assert (update.ppo_epochs, update.shuffle, update.strategy) == (2, True, "torch")
    assert load_config(["actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=3"]).policy_update_config(
    ).log_prob_micro_batch_size_per_gpu == 3
    # null lr_decay_steps: the decay runs over the run's steps.
    assert load_config().policy_update_config().optim.decay_steps(250) == 250


# Each old (mode, recompute_old_log_prob) combination and the keys that express it now.
@pytest.mark.parametrize("overrides,mode,recompute,correction", [
    # old bypass (no recompute)
    ([f"{SKIP}=true", f"{RC}.rollout_is=null"], "bypass", False, {"tis_level": "none"}),
    ([f"{SKIP}=true", f"{RC}.rollout_is=sequence"], "bypass", False, {"tis_level": "sequence", "tis_cap": 8.0}),
    # old ppo_clip + recompute_old_log_prob=true
    ([f"{SKIP}=false", f"{PROX}=true", f"{RC}.rollout_is=null"], "ppo_clip", True, {"tis_level": "none"}),
    # old ppo_clip anchored on the rollout log-probs: the release's sync without the proximal pass; the
    # correction ratio pi_old / mu is 1 there, so rollout_is has no effect
    ([f"{SKIP}=false", f"{PROX}=false", f"{RC}.rollout_is=sequence"], "ppo_clip", False, {"tis_level": "none"}),
    # old decoupled_ppo (recomputed): rollout_is set without bypass
    ([f"{SKIP}=false", f"{PROX}=true", f"{RC}.rollout_is=token", f"{RC}.rollout_is_threshold=2.0"],
     "decoupled_ppo", True, {"tis_level": "token", "tis_cap": 2.0}),
    # old gspo, with and without recompute
    ([f"{SKIP}=false", f"{PROX}=true", f"{A}.policy_loss.loss_mode=gspo"], "gspo", True, {}),
    ([f"{SKIP}=false", f"{A}.policy_loss.loss_mode=gspo"], "gspo", False, {}),
    # old rejection_level/low/high
    ([f"{RC}.rollout_rs=geometric", f"{RC}.rollout_rs_threshold=1.4", f"{RC}.rollout_rs_threshold_lower=0.7"],
     "bypass", False, {"rejection_level": "geometric", "rejection_high": 1.4, "rejection_low": 0.7}),
    # The lower bound defaults to 1 / upper, the upper to the IS cap.
    ([f"{RC}.rollout_rs=token"], "bypass", False,
     {"rejection_level": "token", "rejection_high": 8.0, "rejection_low": 1 / 8.0}),
    # old m2po / m2po_threshold
    ([f"{RC}.rollout_rs=m2po"], "bypass", False, {"m2po": True, "m2po_threshold": 0.04, "rejection_level": "none"}),
    ([f"{RC}.rollout_rs=m2po", f"{RC}.rollout_rs_threshold=0.1"], "bypass", False,
     {"m2po": True, "m2po_threshold": 0.1}),
])
def test_loss_keys_resolve_to_the_old_loss_modes(overrides, mode, recompute, correction):
    config = load_config(overrides)
    spec, update = config.policy_loss_spec(), config.policy_update_config()
    assert update.policy_loss == spec
    assert (spec.mode, update.recompute_old_log_prob) == (mode, recompute)
    for field, value in correction.items():
        assert getattr(spec, field) == pytest.approx(value), field


# ------------------------------------------------------------------ OPOB preconditions


OPOB = GradBaseliningConfig(enable=True)
VCPO_LOSS = PolicyLossSpec(mode="bypass", tis_level="sequence")


@pytest.mark.parametrize("config,mentions", [
    (PolicyUpdateConfig(grad_baselining=OPOB, policy_loss=PolicyLossSpec(mode="ppo_clip", tis_level="sequence")),
     "skip_recompute_old_log_prob=true"),
    (PolicyUpdateConfig(grad_baselining=OPOB, policy_loss=PolicyLossSpec(mode="bypass", tis_level="token")),
     "rollout_is='sequence'"),
    (PolicyUpdateConfig(grad_baselining=OPOB, policy_loss=VCPO_LOSS, loss_agg_mode="token-mean"),
     "loss_agg_mode"),
    (PolicyUpdateConfig(grad_baselining=OPOB, policy_loss=VCPO_LOSS, entropy_coeff=0.01), "entropy_coeff"),
    (PolicyUpdateConfig(grad_baselining=OPOB,
                        policy_loss=PolicyLossSpec(mode="bypass", tis_level="sequence", rejection_level="token")),
     "rollout_rs='none' (got 'token')"),
    (PolicyUpdateConfig(grad_baselining=OPOB, policy_loss=PolicyLossSpec(mode="bypass", tis_level="sequence",
                                                                         m2po=True)),
     "rollout_rs='none' (got 'm2po')"),
])
def test_check_grad_baselining_refuses_what_opob_cannot_baseline(config, mentions):
    with pytest.raises(ConfigError) as info:
        config.check_grad_baselining("the.switch")
    assert info.value.key == "the.switch" and mentions in str(info.value)


def test_check_grad_baselining_passes_the_vcpo_loss_and_ignores_a_disabled_baseline():
    PolicyUpdateConfig(grad_baselining=OPOB, policy_loss=VCPO_LOSS).check_grad_baselining("k")
    PolicyUpdateConfig(policy_loss=PolicyLossSpec(mode="ppo_clip", rejection_level="token")).check_grad_baselining("k")


def test_correction_without_old_log_probs_is_announced_as_having_no_effect():
    quiet = load_config([f"{SKIP}=false", f"{PROX}=true", f"{RC}.rollout_is=sequence"]).startup_notes()
    noted = load_config([f"{SKIP}=false", f"{PROX}=false", f"{RC}.rollout_is=sequence"]).startup_notes()
    assert not any("rollout_is/rollout_rs" in n for n in quiet)
    assert sum("rollout_is/rollout_rs" in n and "compute_prox_log_prob=true" in n for n in noted) == 1
