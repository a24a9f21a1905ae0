# Sourced by <task>/_common.sh: the paths, GPU layout, budget and launch command shared by the
# paper's GPU recipes. The caller sets task (a configs/task/ group), default_model,
# default_rollout_gpus and train_tp; what defines the task (model size, batch, lengths,
# optimizer, vLLM engine, Megatron layout, validation sampling) is configs/task/<task>.yaml and
# the method configs/method/*.yaml. The scripts run from the repository root: relative paths are
# relative to it.
cd "$(dirname "${BASH_SOURCE[0]}")/../../../.."
PYTHON=${PYTHON:-python}

# ================= Paths =================
MODEL_PATH=${MODEL_PATH:-${default_model:?}}
TRAIN_FILE=${TRAIN_FILE:-data/${task:?}/train.parquet}
TEST_FILE=${TEST_FILE:-data/${task}/test.parquet}

# ================= GPU Layout =================
# Rollout and training on separate GPUs of every node. The engines are TP=2, so n_gpus_rollout
# must be even; the Megatron actor's TP (train_tp) must divide n_gpus_training.
NNODES=${NNODES:-1}
NGPUS_PER_NODE=${NGPUS_PER_NODE:-8}
n_gpus_rollout=${N_GPUS_ROLLOUT:-${default_rollout_gpus:?}}
n_gpus_training=$((NGPUS_PER_NODE - n_gpus_rollout))

# ================= Steps =================
# The paper reports its runs at 400 trainer steps (the release's scripts budget 500).
total_training_steps=400
test_freq=10

# ================= Logging =================
project_name=vcpo-rl

# Runs the trainer with the caller's $method, $staleness_threshold and $experiment_name; its
# arguments are extra Hydra overrides and come last, so they win.
launch() {
    set -x
    exec "$PYTHON" -m recipe.fully_async_policy.fully_async_main \
        --config-name=fully_async_ppo_megatron_trainer \
        task="${task}" \
        method="${method:?}" \
        actor_rollout_ref.model.path="${MODEL_PATH}" \
        data.train_files="${TRAIN_FILE}" \
        data.val_files="${TEST_FILE}" \
        async_training.staleness_threshold="${staleness_threshold:?}" \
        trainer.total_training_steps="${total_training_steps}" \
        trainer.test_freq="${test_freq}" \
        trainer.project_name="${project_name}" \
        trainer.experiment_name="${experiment_name:?}" \
        trainer.nnodes="${NNODES}" \
        trainer.n_gpus_per_node="${n_gpus_training}" \
        rollout.nnodes="${NNODES}" \
        rollout.n_gpus_per_node="${n_gpus_rollout}" \
        "$@"
}
