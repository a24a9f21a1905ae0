#!/usr/bin/env bash
# MATH -> MATH-500, synchronous GRPO baseline (k = 0), as the release runs it: no partial
# rollouts, old log-probs recomputed before each update, sequence IS (C = 8), no VCPO.
# Qwen2.5-7B on one 8-GPU node by default: vLLM engines (TP=2) on 4 GPUs, the Megatron actor
# (TP=4 + SP) on 4. Settings: configs/task/math.yaml and configs/method/sync_recompute.yaml;
# paths (MODEL_PATH, TRAIN_FILE, TEST_FILE), layout (NNODES, NGPUS_PER_NODE, N_GPUS_ROLLOUT) and
# budget: _common.sh. Extra arguments are Hydra overrides, e.g.
# `trainer.total_training_steps=100`.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

# ================= Method and lag =================
method=sync_recompute
staleness_threshold=0

# ================= Logging =================
experiment_name=math_synchronous

launch "$@"
