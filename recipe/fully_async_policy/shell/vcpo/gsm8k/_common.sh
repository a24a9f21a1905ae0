# Sourced by gsm8k/*.sh: the GSM8K task's defaults for the shared GPU recipe launcher.
task=gsm8k
default_model=models/Qwen2-1.5B
default_rollout_gpus=6  # of NGPUS_PER_NODE=8; the rest train
train_tp=2               # Megatron TP of configs/task/gsm8k.yaml (documentation for the layout)
source "$(dirname "${BASH_SOURCE[0]}")/../_gpu_common.sh"
