#!/usr/bin/env bash
# Countdown, synchronous GRPO (k = 0) on the CPU default: tiny Qwen2-architecture model,
# character tokenizer, cached SFT warm start, torch engine and torch actor. It runs through the
# fully-async pipeline with k = 0: the rollouter starts a step's prompts only once it holds
# that step's weights, so every trajectory is trained by the weights that generated it.
# Extra arguments are Hydra overrides, e.g. `trainer.total_training_steps=50 actor.optim.lr=5e-5`.
set -euo pipefail
cd "$(dirname "$0")/../../../../.."
PYTHON=${PYTHON:-python}

args=(
  trainer.experiment_name=countdown_synchronous
  model.path=preset:tiny
  data.train_batch_size=16
  rollout.n=8
  rollout.temperature=1.0
  data.max_response_length=16
  algorithm.adv_estimator=grpo
  actor.ppo_mini_batch_size=128
  actor.optim.lr=5e-5
  actor.loss_agg_mode=seq-mean-token-mean
  actor.policy_loss.mode=bypass
  trainer.total_training_steps=300
  trainer.val_freq=25
)

echo "+ $PYTHON -m verl.trainer.main_ppo ${args[*]} $*" >&2
exec "$PYTHON" -m verl.trainer.main_ppo "${args[@]}" "$@"
