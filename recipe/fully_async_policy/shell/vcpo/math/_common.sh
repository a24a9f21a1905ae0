# Sourced by math/*.sh: the MATH task's defaults for the shared GPU recipe launcher.
task=math
default_model=models/Qwen2.5-7B
default_rollout_gpus=4  # of NGPUS_PER_NODE=8; the rest train
train_tp=4               # Megatron TP of configs/task/math.yaml (documentation for the layout)
source "$(dirname "${BASH_SOURCE[0]}")/../_gpu_common.sh"
