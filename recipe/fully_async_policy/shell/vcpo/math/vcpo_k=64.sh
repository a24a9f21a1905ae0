#!/usr/bin/env bash
# MATH -> MATH-500, asynchronous VCPO with max lag k = 64 (the paper's stress test of large
# lags): partial rollouts, bypass loss with sequence TIS (C = 8), the ESS-scaled lr and the off-
# policy optimal baseline.
# Qwen2.5-7B on one 8-GPU node by default: vLLM engines (TP=2) on 4 GPUs, the Megatron actor
# (TP=4 + SP) on 4. Settings: configs/task/math.yaml and configs/method/vcpo.yaml; paths
# (MODEL_PATH, TRAIN_FILE, TEST_FILE), layout (NNODES, NGPUS_PER_NODE, N_GPUS_ROLLOUT) and
# budget: _common.sh. Extra arguments are Hydra overrides, e.g.
# `trainer.total_training_steps=100`.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

# ================= Method and lag =================
method=vcpo
staleness_threshold=64

# ================= Logging =================
experiment_name=math_vcpo_k${staleness_threshold}

launch "$@"
