#!/usr/bin/env bash
# Countdown, asynchronous VCPO with max lag k = 4 on the CPU default (what the README demo
# runs): tiny Qwen2-architecture model, character tokenizer, cached SFT warm start, torch
# engine and torch actor, one torch thread each so rollout and training overlap on 2 cores.
# Partial rollouts on, bypass loss with sequence TIS (C = 8), ESS-scaled lr and the
# off-policy optimal baseline; one optimizer step per weight sync.
# Extra arguments are Hydra overrides, e.g. `trainer.total_training_steps=50 async_training.k=8`.
set -euo pipefail
cd "$(dirname "$0")/../../../../.."
PYTHON=${PYTHON:-python}

args=(
  trainer.experiment_name=countdown_vcpo_k4
  model.path=preset:tiny
  data.train_batch_size=16
  rollout.n=8
  rollout.temperature=1.0
  data.max_response_length=16
  algorithm.adv_estimator=grpo
  actor.ppo_mini_batch_size=128
  actor.optim.lr=1e-4
  actor.loss_agg_mode=seq-mean-token-mean
  actor.policy_loss.mode=bypass
  actor.policy_loss.tis_level=sequence
  actor.policy_loss.tis_cap=8
  actor.ess_scaling.enable=true
  actor.ess_scaling.scaling_rule=sqrt
  actor.grad_baselining.enable=true
  actor.grad_baselining.scope=group
  actor.grad_baselining.norm_by_std=true
  async_training.k=4
  async_training.partial_rollout=true
  async_training.trigger_parameter_sync_step=1
  trainer.total_training_steps=250
  trainer.val_freq=25
)

echo "+ $PYTHON -m verl.trainer.main_ppo ${args[*]} $*" >&2
exec "$PYTHON" -m verl.trainer.main_ppo "${args[@]}" "$@"
