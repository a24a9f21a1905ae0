#!/usr/bin/env bash
# Countdown, asynchronous VCPO with max lag k = 4, on the CPU default (what `make demo` runs).
#
# task=countdown: the tiny Qwen2-architecture model (random init, character tokenizer), locally
# generated problems, a cached SFT warm start, 16 prompts x 8 responses per step, lr 1e-4, the
# torch engine and the torch actor, one torch thread each so rollout and training overlap.
# method=vcpo: partial rollouts, bypass loss with sequence TIS (C = 8), the ESS-scaled lr and
# the off-policy optimal baseline. This script adds only the run: lag, budget, names.
#
# Extra arguments are Hydra overrides, e.g.
#   bash vcpo_k=4.sh trainer.total_training_steps=50 async_training.staleness_threshold=8
set -euo pipefail
cd "$(dirname "$0")/../../../../.."
PYTHON=${PYTHON:-python}

# ================= Layout (processes on CPU) =================
NNODES=1
NGPUS_PER_NODE=2
n_gpus_rollout=1
n_gpus_training=$((NGPUS_PER_NODE - n_gpus_rollout))

# ================= Lag =================
staleness_threshold=4

# ================= Steps =================
total_training_steps=250
test_freq=25

# ================= Logging =================
project_name=vcpo-rl
experiment_name=countdown_vcpo_k4

set -x
exec "$PYTHON" -m recipe.fully_async_policy.fully_async_main \
    --config-name=fully_async_ppo_trainer \
    task=countdown \
    method=vcpo \
    async_training.staleness_threshold="${staleness_threshold}" \
    trainer.total_training_steps="${total_training_steps}" \
    trainer.test_freq="${test_freq}" \
    trainer.project_name="${project_name}" \
    trainer.experiment_name="${experiment_name}" \
    trainer.nnodes="${NNODES}" \
    trainer.n_gpus_per_node="${n_gpus_training}" \
    rollout.nnodes="${NNODES}" \
    rollout.n_gpus_per_node="${n_gpus_rollout}" \
    "$@"
