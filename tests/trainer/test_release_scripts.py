"""The VCPO release's ten launch scripts, run as written, resolve to the release's meaning.

Input: ``tests/fixtures/release_scripts/*.overrides``, the argv each release script passes to
``recipe.fully_async_policy.fully_async_main`` (see the README there). For each script: a key
naming a release feature this build does not have yet fails at start-up naming that key; every
other key reaches the typed config with the meaning it has in the release, asserted key by key in
``MEANING`` against values derived from the script's own values (and the release's defaults for
the keys it leaves unset). A key refused for any other reason, or whose resolved value disagrees
with the release, is a discrepancy, and every discrepancy of a script is reported at once.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any, Callable

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from verl.trainer.config import TrainerConfig, load_config
from verl.utils.config import ConfigError, UnknownKeyError
from verl.workers.actor.config import ActorConfig
from verl.workers.rollout.vllm_rollout import _scheduler_kwargs

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURE_DIR = REPO_ROOT / "tests" / "fixtures" / "release_scripts"
FIXTURES = sorted(FIXTURE_DIR.glob("*.overrides"))
ARR, ACTOR, ROLLOUT = "actor_rollout_ref", "actor_rollout_ref.actor", "actor_rollout_ref.rollout"
NUM_DISTINCT_KEYS = 123  # the fixture README's count
MIN_HONOURED_KEYS = 117

# Release features this build does not have yet: start-up must fail naming the key.
MISSING_FEATURES = {
    f"{ROLLOUT}.multi_turn.enable": "multi-turn tool use (the SimpleTIR agent loop and its sandbox)",
}

# Values the release itself cannot run, refused at start-up naming the key. The multiturn
# scripts put Megatron TP = 4 on trainer.nnodes * trainer.n_gpus_per_node = 2 ranks, which
# Megatron-Core's initialize_model_parallel rejects when the workers start ("world_size (2) is
# not divisible by 4"). The audit then continues with the value the scripts' own comment asks
# for ("please readjust GPU counts"): 4 training ranks, data-parallel size 1.
INVALID_IN_RELEASE = {
    ("multiturn__synchronous", "trainer.n_gpus_per_node"): 4,
    ("multiturn__vcpo_k=2", "trainer.n_gpus_per_node"): 4,
}

# The release's values for keys some scripts leave unset (its fully_async_ppo_megatron_trainer.yaml).
RELEASE_DEFAULTS = {
    "async_training.skip_recompute_old_log_prob": False,
    "async_training.compute_prox_log_prob": False,
}


# ------------------------------------------------------------------------------ the fixtures


def key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+")


@dataclass(frozen=True)
class Script:
    stem: str
    config_name: str
    overrides: tuple[str, ...]
    values: dict[str, Any] = field(hash=False)
    """Each key (without ``+``) -> its value as Hydra types it."""

    @property
    def keys(self) -> set[str]:
        return set(self.values)


@functools.cache
def read_script(stem: str) -> Script:
    lines = (FIXTURE_DIR / f"{stem}.overrides").read_text().splitlines()
    header = "# config-name: "
    assert lines[0].startswith(header), f"{stem}: first line must be '{header}<name>'"
    overrides = tuple(line for line in lines[1:] if line and not line.startswith("#"))
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    values = {o.key_or_group.lstrip("+"): o.value() for o in parsed}
    assert len(values) == len(overrides), f"{stem}: a key is set twice"
    return Script(stem, lines[0][len(header):].strip(), overrides, values)


STEMS = [p.name.removesuffix(".overrides") for p in FIXTURES]


class Values(dict):
    """A script's values, falling back to the release's defaults for keys it leaves unset."""

    def __missing__(self, key: str) -> Any:
        return RELEASE_DEFAULTS[key]


# ------------------------------------------------------------------------------ the release's meaning


def prompts_per_step(v: Values) -> int:
    """Release: ``required_samples = ppo_mini_batch_size * require_batches`` prompts per trainer step
    when ``data.train_batch_size=0``."""
    mini, batches = v[f"{ACTOR}.ppo_mini_batch_size"], v["async_training.require_batches"]
    return v["data.train_batch_size"] or mini * batches


def release_loss(v: Values) -> tuple[str, bool]:
    """(loss mode, old log-probs recomputed) as the release's ``_process_batch_common`` decides it:
    ``skip_recompute_old_log_prob``: bypass (ratio 1, IS weight deferred to the backward pass);
    else with ``compute_prox_log_prob``: the old log-probs are recomputed and, with ``rollout_is``,
    IS-weighted pi_old / mu (decoupled PPO); else the old log-probs ARE the rollout log-probs
    (no recompute pass; PPO's ratio is taken against mu and the IS weight pi_old / mu is 1)."""
    if v["async_training.skip_recompute_old_log_prob"]:
        return "bypass", False
    if v["async_training.compute_prox_log_prob"]:
        return ("decoupled_ppo" if v["algorithm.rollout_correction.rollout_is"] else "ppo_clip"), True
    return "ppo_clip", False


def loss_of(c: TrainerConfig) -> tuple[str, bool]:
    return c.policy_loss_spec().mode, c.policy_update_config().recompute_old_log_prob


def noted(c: TrainerConfig, prefix: str) -> bool:
    """Whether a start-up note (a key set but without effect here) begins with ``prefix``."""
    return any(note.startswith(prefix) for note in c.startup_notes())


Actual = Callable[[TrainerConfig], Any]
Expected = Callable[[Any, Values], Any]


def same(x: Any, v: Values) -> Any:
    return x


def stored(path: str) -> tuple[Actual, Expected]:
    """The value lands in the field the components read, unchanged."""
    return attrgetter(path), same


def stored_and_noted(path: str, note: str, noted_when: Callable[[Any, Values], bool] = lambda x, v: True):
    """Accepted and unused, as in veRL: stored, and the start-up notes say it has no effect."""
    return (lambda c: (attrgetter(path)(c), noted(c, note))), (lambda x, v: (x, noted_when(x, v)))


def critic_megatron(name: str) -> tuple[Actual, Expected]:
    return (lambda c: (c.critic.megatron[name], noted(c, "critic.*"))), (lambda x, v: (x, True))


def update(attr: str) -> Actual:
    return lambda c: attrgetter(attr)(c.policy_update_config())


def spec(attr: str) -> Actual:
    return lambda c: getattr(c.policy_loss_spec(), attr)


def world(v: Values) -> int:
    return v["trainer.nnodes"] * v["trainer.n_gpus_per_node"]


def megatron_dp(v: Values) -> int:
    model_parallel = (v[f"{ACTOR}.megatron.tensor_model_parallel_size"]
                      * v[f"{ACTOR}.megatron.pipeline_model_parallel_size"]
                      * v[f"{ACTOR}.megatron.context_parallel_size"])
    return world(v) // model_parallel


def rollout_replicas(v: Values) -> int:
    """Release: one vLLM server per ``rollout.tensor_model_parallel_size`` GPUs of the rollout pool."""
    return v["rollout.nnodes"] * v["rollout.n_gpus_per_node"] // v[f"{ROLLOUT}.tensor_model_parallel_size"]


def vllm_kwarg(name: str) -> tuple[Actual, Expected]:
    """Stored, and passed to vLLM as given: the release passes it explicitly (vllm_async_server.py),
    False included, so vLLM's own default never applies."""
    return (lambda c: (getattr(c.rollout_cfg, name), _scheduler_kwargs(c.rollout_cfg).get(name))), \
        (lambda x, v: (x, x))


def ref(name: str) -> tuple[Actual, Expected]:
    return stored_and_noted(f"{ARR}.ref.{name}", f"{ARR}.ref.*")


# key -> (actual: the resolved config's value, expected: (the override's value, the script's values) -> value)
MEANING: dict[str, tuple[Actual, Expected]] = {
    # ---- data
    "data.train_files": (attrgetter("data.train_files"), lambda x, v: [x]),
    "data.val_files": (attrgetter("data.val_files"), lambda x, v: [x]),
    "data.prompt_key": stored("data.prompt_key"),
    "data.truncation": stored("data.truncation"),
    "data.max_prompt_length": (lambda c: (c.data.max_prompt_length, c.rollout_cfg.prompt_length),
                               lambda x, v: (x, x)),
    # Release: vLLM's max_model_len = prompt + response; the response budget is the max new tokens.
    "data.max_response_length": (
        lambda c: (c.data.max_response_length, c.rollout_cfg.max_new_tokens, c.rollout_cfg.max_seq_len),
        lambda x, v: (x, x, v["data.max_prompt_length"] + x)),
    "data.train_batch_size": (lambda c: (c.data.train_batch_size, c.prompts_per_step),
                              lambda x, v: (x, prompts_per_step(v))),
    "data.gen_batch_size": stored_and_noted("data.gen_batch_size", "data.gen_batch_size",
                                            lambda x, v: x != 1),
    "data.return_raw_chat": stored_and_noted("data.return_raw_chat", "data.return_raw_chat", lambda x, v: x),
    "data.filter_overlong_prompts": stored("data.filter_overlong_prompts"),
    "data.filter_overlong_prompts_workers": stored_and_noted(
        "data.filter_overlong_prompts_workers", "data.filter_overlong_prompts_workers", lambda x, v: x != 1),
    # ---- algorithm
    "algorithm.adv_estimator": stored("algorithm.adv_estimator"),
    "algorithm.use_kl_in_reward": stored("algorithm.use_kl_in_reward"),
    "algorithm.kl_ctrl.kl_coef": stored_and_noted("algorithm.kl_ctrl.kl_coef", "algorithm.kl_ctrl.*",
                                                  lambda x, v: not v["algorithm.use_kl_in_reward"]),
    "algorithm.rollout_correction.rollout_is": (lambda c: (c.policy_loss_spec().tis_level, loss_of(c)),
                                                lambda x, v: (x or "none", release_loss(v))),
    "algorithm.rollout_correction.rollout_is_threshold": (spec("tis_cap"), same),
    "algorithm.rollout_correction.rollout_rs": (
        lambda c: (c.algorithm.rollout_correction.rollout_rs, c.policy_loss_spec().rejection_level,
                   c.policy_loss_spec().m2po),
        lambda x, v: (x, "none", False) if x is None else (x, x, False)),
    "algorithm.rollout_correction.rollout_rs_threshold": stored(
        "algorithm.rollout_correction.rollout_rs_threshold"),
    # ---- critic: accepted and unused (GRPO has no critic), as in veRL
    "critic.strategy": stored_and_noted("critic.strategy", "critic.*"),
    "critic.megatron.tensor_model_parallel_size": critic_megatron("tensor_model_parallel_size"),
    "critic.megatron.pipeline_model_parallel_size": critic_megatron("pipeline_model_parallel_size"),
    "critic.megatron.context_parallel_size": critic_megatron("context_parallel_size"),
    "critic.megatron.sequence_parallel": critic_megatron("sequence_parallel"),
    "critic.megatron.dtype": critic_megatron("dtype"),
    # ---- model
    f"{ARR}.hybrid_engine": stored(f"{ARR}.hybrid_engine"),
    f"{ARR}.model.path": stored(f"{ARR}.model.path"),
    f"{ARR}.model.use_remove_padding": stored_and_noted(f"{ARR}.model.use_remove_padding",
                                                        "use_remove_padding", lambda x, v: x),
    # ---- actor: what update_policy runs with
    f"{ACTOR}.strategy": (lambda c: (c.actor.strategy, c.policy_update_config().strategy),
                          lambda x, v: (x, x)),
    f"{ACTOR}.ppo_mini_batch_size": (update("ppo_mini_batch_size"), lambda x, v: x * v[f"{ROLLOUT}.n"]),
    f"{ACTOR}.ppo_micro_batch_size_per_gpu": (update("ppo_micro_batch_size_per_gpu"), same),
    f"{ACTOR}.use_dynamic_bsz": stored(f"{ACTOR}.use_dynamic_bsz"),
    f"{ACTOR}.clip_ratio_low": (spec("clip_ratio_low"), same),
    f"{ACTOR}.clip_ratio_high": (spec("clip_ratio_high"), same),
    f"{ACTOR}.clip_ratio_c": (spec("clip_ratio_c"), same),
    f"{ACTOR}.entropy_coeff": (update("entropy_coeff"), same),
    f"{ACTOR}.loss_agg_mode": (update("loss_agg_mode"), same),
    f"{ACTOR}.use_kl_loss": stored(f"{ACTOR}.use_kl_loss"),
    f"{ACTOR}.kl_loss_coef": stored_and_noted(
        f"{ACTOR}.kl_loss_coef", f"{ACTOR}.kl_loss_coef",
        lambda x, v: not v[f"{ACTOR}.use_kl_loss"] and x != ActorConfig().kl_loss_coef),
    f"{ACTOR}.use_rollout_log_probs": stored(f"{ACTOR}.use_rollout_log_probs"),
    f"{ACTOR}.update_policy_per_traj": (update("grad_norm_method"),
                                        lambda x, v: "per_traj" if x else "batched"),
    f"{ACTOR}.optim.lr": (update("optim.lr"), same),
    f"{ACTOR}.optim.lr_warmup_steps": (update("optim.lr_warmup_steps"), same),
    f"{ACTOR}.optim.lr_decay_style": (update("optim.lr_decay_style"), same),
    f"{ACTOR}.optim.lr_decay_steps": (
        lambda c: c.policy_update_config().optim.decay_steps(c.total_training_steps(num_train_prompts=10**9)),
        same),
    f"{ACTOR}.optim.weight_decay": (update("optim.weight_decay"), same),
    f"{ACTOR}.optim.clip_grad": (update("grad_clip"), same),
    **{f"{ACTOR}.ess_scaling.{name}": (update(f"ess_scaling.{name}"), same)
       for name in ("enable", "scaling_rule", "base_ess_ratio", "use_clipped")},
    **{f"{ACTOR}.grad_baselining.{name}": (update(f"grad_baselining.{name}"), same)
       for name in ("enable", "scope", "agg_mode", "use_is_weights", "use_clipped_is_ratios",
                    "normalize_by_length", "norm_by_std")},
    # ---- actor: the Megatron layout and precision
    f"{ACTOR}.megatron.tensor_model_parallel_size": (
        lambda c: (c.policy_update_config().megatron.tensor_model_parallel_size, c.data_parallel_size),
        lambda x, v: (x, megatron_dp(v))),
    f"{ACTOR}.megatron.pipeline_model_parallel_size": (update("megatron.pipeline_model_parallel_size"), same),
    f"{ACTOR}.megatron.context_parallel_size": (update("megatron.context_parallel_size"), same),
    f"{ACTOR}.megatron.sequence_parallel": (update("megatron.sequence_parallel"), same),
    f"{ACTOR}.megatron.dtype": (lambda c: (c.policy_update_config().megatron.dtype, c.actor.dtype),
                                lambda x, v: (x, x)),
    f"{ACTOR}.megatron.use_remove_padding": stored_and_noted(f"{ACTOR}.megatron.use_remove_padding",
                                                             "use_remove_padding", lambda x, v: x),
    f"{ACTOR}.megatron.param_offload": (update("megatron.param_offload"), same),
    f"{ACTOR}.megatron.optimizer_offload": (update("megatron.optimizer_offload"), same),
    f"{ACTOR}.megatron.grad_offload": (update("megatron.grad_offload"), same),
    # ---- ref: accepted and unused (no KL term, so no reference policy), as in veRL
    **{f"{ARR}.ref.{name}": ref(name)
       for name in ("megatron.tensor_model_parallel_size", "megatron.pipeline_model_parallel_size",
                    "megatron.context_parallel_size", "megatron.sequence_parallel", "megatron.dtype",
                    "megatron.use_remove_padding", "megatron.param_offload", "log_prob_use_dynamic_bsz",
                    "log_prob_micro_batch_size_per_gpu")},
    # ---- rollout engine and sampling
    f"{ROLLOUT}.n": (lambda c: (c.rollout_cfg.n, c.trajectories_per_step),
                     lambda x, v: (x, prompts_per_step(v) * x)),
    f"{ROLLOUT}.name": stored(f"{ROLLOUT}.name"),
    f"{ROLLOUT}.mode": stored_and_noted(f"{ROLLOUT}.mode", f"{ROLLOUT}.mode", lambda x, v: x == "sync"),
    f"{ROLLOUT}.tensor_model_parallel_size": (
        lambda c: (c.rollout_cfg.tensor_model_parallel_size, c.num_rollout_replicas),
        lambda x, v: (x, rollout_replicas(v))),
    # GPU-only knobs: the values the vLLM engine is built with (the CPU tests start no GPU engine).
    f"{ROLLOUT}.gpu_memory_utilization": stored(f"{ROLLOUT}.gpu_memory_utilization"),
    f"{ROLLOUT}.dtype": stored(f"{ROLLOUT}.dtype"),
    f"{ROLLOUT}.enable_chunked_prefill": vllm_kwarg("enable_chunked_prefill"),
    f"{ROLLOUT}.max_num_batched_tokens": vllm_kwarg("max_num_batched_tokens"),
    f"{ROLLOUT}.temperature": (lambda c: c.rollout_cfg.sampling_params().temperature, same),
    f"{ROLLOUT}.top_p": (lambda c: c.rollout_cfg.sampling_params().top_p, same),
    f"{ROLLOUT}.top_k": (lambda c: c.rollout_cfg.sampling_params().top_k, same),
    f"{ROLLOUT}.val_kwargs.do_sample": stored(f"{ROLLOUT}.val_kwargs.do_sample"),
    f"{ROLLOUT}.val_kwargs.n": stored(f"{ROLLOUT}.val_kwargs.n"),
    f"{ROLLOUT}.val_kwargs.temperature": (
        lambda c: c.rollout_cfg.val_sampling_params(sampled=c.rollout_cfg.val_kwargs.do_sample).temperature,
        lambda x, v: x if v[f"{ROLLOUT}.val_kwargs.do_sample"] else 0.0),
    f"{ROLLOUT}.val_kwargs.top_p": (
        lambda c: c.rollout_cfg.val_sampling_params(sampled=c.rollout_cfg.val_kwargs.do_sample).top_p,
        lambda x, v: x if v[f"{ROLLOUT}.val_kwargs.do_sample"] else 1.0),
    f"{ROLLOUT}.val_kwargs.top_k": (
        lambda c: c.rollout_cfg.val_sampling_params(sampled=c.rollout_cfg.val_kwargs.do_sample).top_k,
        lambda x, v: x if v[f"{ROLLOUT}.val_kwargs.do_sample"] else -1),
    f"{ROLLOUT}.calculate_log_probs": stored(f"{ROLLOUT}.calculate_log_probs"),
    f"{ROLLOUT}.log_prob_use_dynamic_bsz": stored(f"{ROLLOUT}.log_prob_use_dynamic_bsz"),
    f"{ROLLOUT}.log_prob_micro_batch_size_per_gpu": (update("log_prob_micro_batch_size_per_gpu"), same),
    f"{ROLLOUT}.multi_turn.enable": stored(f"{ROLLOUT}.multi_turn.enable"),  # a missing feature: refused
    f"{ROLLOUT}.multi_turn.tool_config_path": stored(f"{ROLLOUT}.multi_turn.tool_config_path"),
    f"{ROLLOUT}.multi_turn.format": stored(f"{ROLLOUT}.multi_turn.format"),
    # ---- trainer
    "trainer.logger": stored("trainer.logger"),
    "trainer.project_name": stored("trainer.project_name"),
    "trainer.experiment_name": stored("trainer.experiment_name"),
    "trainer.wandb_entity": stored("trainer.wandb_entity"),
    "trainer.wandb_group": stored("trainer.wandb_group"),
    "trainer.val_before_train": stored("trainer.val_before_train"),
    "trainer.save_freq": stored("trainer.save_freq"),  # <= 0: never, as in the release
    "trainer.rollout_data_dir": stored("trainer.rollout_data_dir"),
    "trainer.log_val_generations": stored("trainer.log_val_generations"),
    "trainer.default_local_dir": (attrgetter("run_dir"), same),
    "trainer.nnodes": (lambda c: c.trainer.world_size, lambda x, v: world(v)),
    "trainer.n_gpus_per_node": (lambda c: (c.trainer.world_size, c.data_parallel_size),
                                lambda x, v: (world(v), megatron_dp(v))),
    # ---- rollout: the rollouter's resources and budget
    "rollout.nnodes": (attrgetter("num_rollout_replicas"), lambda x, v: rollout_replicas(v)),
    "rollout.n_gpus_per_node": (attrgetter("num_rollout_replicas"), lambda x, v: rollout_replicas(v)),
    # Release: total_train_steps = total_rollout_steps / (required_samples * trigger_parameter_sync_step).
    "rollout.total_rollout_steps": (
        lambda c: c.total_training_steps(num_train_prompts=10**9),
        lambda x, v: x // (prompts_per_step(v) * v["async_training.trigger_parameter_sync_step"])),
    # Passes over the prompts: with one step's prompts in the data set, the step budget is
    # min(epochs, the rollout budget).
    "rollout.total_epochs": (
        lambda c: (c.rollout.total_epochs, c.total_training_steps(num_train_prompts=c.prompts_per_step)),
        lambda x, v: (x, min(x, v["rollout.total_rollout_steps"] // prompts_per_step(v)))),
    "rollout.test_freq": (attrgetter("val_freq"), same),
    # ---- async_training
    "async_training.staleness_threshold": (
        lambda c: (c.async_training.staleness_threshold, c.async_training.k), lambda x, v: (x, int(x))),
    "async_training.trigger_parameter_sync_step": stored("async_training.trigger_parameter_sync_step"),
    "async_training.require_batches": (attrgetter("prompts_per_step"), lambda x, v: prompts_per_step(v)),
    "async_training.partial_rollout": stored("async_training.partial_rollout"),
    "async_training.use_rollout_log_probs": stored("async_training.use_rollout_log_probs"),
    "async_training.skip_recompute_old_log_prob": (loss_of, lambda x, v: release_loss(v)),
    "async_training.compute_prox_log_prob": (loss_of, lambda x, v: release_loss(v)),
    # Release: prompts one rollout server generates at once (max_concurrent_samples = servers * this).
    "async_training.bsz_per_dp_rank": stored("async_training.bsz_per_dp_rank"),
    # ---- ray
    "ray_kwargs.ray_init.runtime_env.env_vars.SANDBOX_PORT": (
        lambda c: c.ray_kwargs.ray_init.runtime_env, lambda x, v: {"env_vars": {"SANDBOX_PORT": x}}),
}


# ------------------------------------------------------------------------------ the audit


@dataclass
class Audit:
    """One script, every key accounted for: honoured (stored and its meaning asserted), refused
    at start-up naming the key as expected, or a discrepancy."""

    script: Script
    honoured: set[str] = field(default_factory=set)
    refused: dict[str, str] = field(default_factory=dict)
    discrepancies: dict[str, str] = field(default_factory=dict)
    refusal_order: list[str] = field(default_factory=list)

    @property
    def accounted(self) -> set[str]:
        return self.honoured | set(self.refused) | set(self.discrepancies)


@functools.cache
def audit(stem: str) -> Audit:
    script = read_script(stem)
    result = Audit(script)
    overrides = list(script.overrides)
    values = Values(script.values)
    for _ in range(len(overrides) + 1):
        try:
            config = load_config(overrides, script.config_name)
            break
        except ConfigError as err:
            key = err.key
            result.refusal_order.append(key)
            if key not in script.keys:
                raise AssertionError(f"{stem}: refused on a key the script does not set: {err}") from err
            if key in MISSING_FEATURES:
                result.refused[key] = str(err)
                overrides = [o for o in overrides if key_of(o) != key]
            elif (stem, key) in INVALID_IN_RELEASE:
                result.refused[key] = str(err)
                fix = INVALID_IN_RELEASE[stem, key]
                overrides = [f"{key}={fix}" if key_of(o) == key else o for o in overrides]
                values[key] = fix
            else:
                result.discrepancies[key] = f"refused at start-up: {err}"
                overrides = [o for o in overrides if key_of(o) != key]
    else:  # pragma: no cover - every iteration removes a key
        raise AssertionError(f"{stem}: never loaded")
    for key in sorted(script.keys - set(result.refused) - set(result.discrepancies)):
        if key not in MEANING:
            continue  # reported by test_every_fixture_key_has_a_meaning_row
        actual, expected = MEANING[key]
        want, got = expected(values[key], values), actual(config)
        if got == want:
            result.honoured.add(key)
        else:
            result.discrepancies[key] = (f"release value {script.values[key]!r}: "
                                         f"expected {want!r}, resolved {got!r}")
    return result


def fixture_keys() -> set[str]:
    return set().union(*(read_script(stem).keys for stem in STEMS))


# ------------------------------------------------------------------------------ tests


def test_the_ten_fixtures_cover_the_readmes_123_keys():
    assert len(STEMS) == 10
    assert len(fixture_keys()) == NUM_DISTINCT_KEYS


def test_every_fixture_key_has_a_meaning_row():
    keys = fixture_keys()
    assert sorted(keys - MEANING.keys()) == [], "fixture keys with no row in MEANING"
    assert sorted(MEANING.keys() - keys) == [], "MEANING rows for keys no fixture sets"


@pytest.mark.parametrize("stem", STEMS)
def test_release_script_resolves_to_the_release_meaning(stem):
    result = audit(stem)
    script = result.script
    missing = sorted(script.keys & MISSING_FEATURES.keys())
    # The first error at start-up names a missing feature, when the script uses one.
    if missing:
        assert result.refusal_order[0] in missing, result.refusal_order
    assert sorted(result.refused) == sorted(missing + [k for (s, k) in INVALID_IN_RELEASE if s == stem])
    assert result.accounted == script.keys, sorted(script.keys - result.accounted)
    if result.discrepancies:
        report = "\n".join(f"  {key}: {why}" for key, why in sorted(result.discrepancies.items()))
        pytest.fail(f"{stem}: {len(result.honoured)} honoured, {len(result.refused)} refused as expected, "
                    f"{len(result.discrepancies)} discrepancies:\n{report}", pytrace=False)


def test_at_least_117_of_the_123_keys_are_honoured_by_every_script_that_sets_them():
    audits = [audit(stem) for stem in STEMS]
    not_honoured = set().union(*(set(a.refused) | set(a.discrepancies) for a in audits))
    honoured = fixture_keys() - not_honoured
    counts = {a.script.stem: (len(a.honoured), len(a.refused), len(a.discrepancies)) for a in audits}
    assert len(honoured) >= MIN_HONOURED_KEYS, (
        f"{len(honoured)}/{NUM_DISTINCT_KEYS} honoured; (honoured, refused, discrepant) per script: "
        f"{counts}; not honoured: {sorted(not_honoured)}")


# The release's values of keys no script sets, where ours would change what the run does.
UNSET_KEYS_RELEASE_VALUES = {
    "trainer.total_training_steps": None,  # the budget is rollout.total_rollout_steps
    "actor_rollout_ref.model.warm_start.enable": False,  # RL starts from the checkpoint itself
    "data.val_max_samples": -1,  # validate on the whole val file
}


def test_keys_the_scripts_leave_unset_keep_the_releases_values():
    wrong = {}
    for stem in STEMS:
        script = read_script(stem)
        # The script as the audit loaded it: refused and discrepant keys out, invalid layouts fixed.
        dropped = MISSING_FEATURES.keys() | audit(stem).discrepancies.keys()
        fixes = {key: value for (s, key), value in INVALID_IN_RELEASE.items() if s == stem}
        overrides = [f"{key_of(o)}={fixes[key_of(o)]}" if key_of(o) in fixes else o
                     for o in script.overrides if key_of(o) not in dropped]
        config = load_config(overrides, script.config_name)
        for key, release_value in UNSET_KEYS_RELEASE_VALUES.items():
            assert key not in script.keys
            got = attrgetter(key)(config)
            if got != release_value:
                wrong.setdefault(f"{key}: release {release_value!r}, resolved {got!r} in", []).append(stem)
    if wrong:
        pytest.fail("\n".join(f"{what} {', '.join(stems)}" for what, stems in wrong.items()), pytrace=False)


# ------------------------------------------------------------------------------ bad keys


def test_unknown_keys_fail_with_a_suggestion_or_the_sections_keys():
    with pytest.raises(UnknownKeyError) as typo:
        load_config(["+trainer.typo_key=1"])
    assert typo.value.key == "trainer.typo_key"
    assert typo.value.suggestions or "experiment_name" in str(typo.value)
    with pytest.raises(UnknownKeyError) as lr:
        load_config([f"{ACTOR}.optim.lrr=1e-5"])
    assert lr.value.key == f"{ACTOR}.optim.lrr"
    assert f"{ACTOR}.optim.lr" in lr.value.suggestions and f"{ACTOR}.optim.lr" in str(lr.value)


def test_a_train_batch_not_a_multiple_of_the_mini_batch_names_both():
    mini = load_config().actor.ppo_mini_batch_size
    assert 6 % mini
    with pytest.raises(ConfigError) as err:
        load_config(["data.train_batch_size=6"])
    assert err.value.key == "data.train_batch_size"
    assert f"ppo_mini_batch_size={mini}" in str(err.value)


# ------------------------------------------------------------------------------ the entry point


@pytest.fixture(scope="module")
def dry_runs() -> dict[str, subprocess.CompletedProcess]:
    """``VCPO_DRY_RUN=1 python -m recipe.fully_async_policy.fully_async_main`` with math/vcpo_k=10's
    argv as written, and with an unknown key added; both at once."""
    script = read_script("math__vcpo_k=10")
    argv = [sys.executable, "-m", "recipe.fully_async_policy.fully_async_main",
            f"--config-name={script.config_name}.yaml", *script.overrides]
    env = dict(os.environ, VCPO_DRY_RUN="1", OMP_NUM_THREADS="1")
    procs = {name: subprocess.Popen(argv + extra, cwd=REPO_ROOT, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, extra in (("as_written", []), ("typo", ["+trainer.typo_key=1"]))}
    runs = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        runs[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return runs


def test_release_entry_point_dry_runs_math_vcpo_k10_as_written(dry_runs):
    run = dry_runs["as_written"]
    assert run.returncode == 0, run.stderr[-3000:]
    assert "staleness_threshold: 10.0" in run.stdout


def test_release_entry_point_exits_2_naming_an_unknown_key(dry_runs):
    run = dry_runs["typo"]
    assert run.returncode == 2, run.stderr[-3000:]
    assert "trainer.typo_key" in run.stderr
