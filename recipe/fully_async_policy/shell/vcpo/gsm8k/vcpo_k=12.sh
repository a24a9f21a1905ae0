#!/usr/bin/env bash
# GSM8K, asynchronous VCPO with max lag k = 12 (the paper's GSM8K run): partial rollouts, bypass
# loss with sequence TIS (C = 8), the ESS-scaled lr and the off-policy optimal baseline.
# Qwen2-1.5B on one 8-GPU node by default: vLLM engines (TP=2) on 6 GPUs, the Megatron actor
# (TP=2 + SP) on 2. Settings: configs/task/gsm8k.yaml and configs/method/vcpo.yaml; paths
# (MODEL_PATH, TRAIN_FILE, TEST_FILE), layout (NNODES, NGPUS_PER_NODE, N_GPUS_ROLLOUT) and
# budget: _common.sh. Extra arguments are Hydra overrides, e.g.
# `trainer.total_training_steps=100`.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

# ================= Method and lag =================
method=vcpo
staleness_threshold=12

# ================= Logging =================
experiment_name=gsm8k_vcpo_k${staleness_threshold}

launch "$@"
