# Settings shared by the paper's GPU recipes (sourced by gsm8k/*.sh and math/*.sh; see
# ../../../../docs/async.md and the paper's recipe table). GRPO, seq-mean-token-mean, bypass loss
# (no clipping, no KL, no entropy), sequence TIS C = 8, grad clip 1.0, AdamW lr 1e-6
# constant, weight decay 0.1, bf16, temperature 1.0 for training, validation at T = 0.8,
# top-p 0.7.
#
# Backends: vLLM engine (`rollout.name=vllm`) and the Megatron-Core actor
# (`actor.strategy=megatron`, parallel sizes per task in _task.sh; see docs/megatron.md).
# Both are tested on CPU; these GPU-scale settings have not been run by this project.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../../.."
PYTHON=${PYTHON:-python}
NGPUS=${NGPUS:-8}
RAY_NUM_CPUS=${RAY_NUM_CPUS:-32}

paper_common=(
  model.dtype=bfloat16
  model.warm_start.enable=false
  algorithm.adv_estimator=grpo
  rollout.name=vllm
  rollout.temperature=1.0
  rollout.top_p=1.0
  rollout.val_kwargs.temperature=0.8
  rollout.val_kwargs.top_p=0.7
  rollout.val_kwargs.mean_at_n_samples=0
  actor.strategy=megatron
  actor.loss_agg_mode=seq-mean-token-mean
  actor.policy_loss.mode=bypass
  actor.policy_loss.tis_level=sequence
  actor.policy_loss.tis_cap=8
  actor.entropy_coeff=0.0
  actor.grad_clip=1.0
  actor.optim.lr=1e-6
  actor.optim.lr_scheduler=constant
  actor.optim.weight_decay=0.1
  trainer.device=cuda
  trainer.actor_world_size=${NGPUS}
  trainer.ray_num_cpus=${RAY_NUM_CPUS}
)

# VCPO on: ESS-scaled lr (sqrt rule, rho_ref 1.0 for single-turn tasks) and the off-policy
# optimal baseline per GRPO group with std normalisation; partial rollouts; one optimizer
# step per weight sync.
vcpo_async() {
  local k=$1
  echo actor.ess_scaling.enable=true actor.ess_scaling.scaling_rule=sqrt actor.ess_scaling.base_ess_ratio=1.0 \
    actor.grad_baselining.enable=true actor.grad_baselining.scope=group actor.grad_baselining.norm_by_std=true \
    async_training.k="$k" async_training.partial_rollout=true async_training.trigger_parameter_sync_step=1
}

# The synchronous baseline: k = 0, no partial rollouts, old log-probs recomputed, no VCPO.
synchronous() {
  echo actor.ess_scaling.enable=false actor.grad_baselining.enable=false actor.recompute_old_log_prob=true \
    async_training.k=0 async_training.partial_rollout=false async_training.trigger_parameter_sync_step=1
}

launch() {
  echo "+ $PYTHON -m verl.trainer.main_ppo $*" >&2
  exec "$PYTHON" -m verl.trainer.main_ppo "$@"
}
