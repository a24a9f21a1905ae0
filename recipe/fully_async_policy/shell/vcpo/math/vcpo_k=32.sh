#!/usr/bin/env bash
# MATH, asynchronous VCPO, max lag k = 32, GPU (vLLM engine, Megatron actor; see ../paper_gpu_common.sh).
# Extra arguments are Hydra overrides, e.g. `trainer.total_training_steps=100`.
source "$(dirname "$0")/_task.sh"
# shellcheck disable=SC2046  # the helper prints space-separated overrides
launch "${paper_common[@]}" "${task[@]}" trainer.experiment_name=math_vcpo_k32 $(vcpo_async 32) "$@"
