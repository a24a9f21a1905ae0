# Sourced by math/*.sh: the paths, GPU layout, budget and launch command shared by the MATH
# recipes. What defines the task (model size, batch, lengths, optimizer, vLLM engine, Megatron
# layout, validation sampling) is configs/task/math.yaml; the method is configs/method/*.yaml.
# The scripts run from the repository root: relative paths are relative to it.
cd "$(dirname "${BASH_SOURCE[0]}")/../../../../.."
PYTHON=${PYTHON:-python}

# ================= Paths =================
MODEL_PATH=${MODEL_PATH:-models/Qwen2.5-7B}
TRAIN_FILE=${TRAIN_FILE:-data/math/train.parquet}
TEST_FILE=${TEST_FILE:-data/math/test.parquet}

# ================= GPU Layout =================
# Rollout and training on separate GPUs of every node. The engines are TP=2, so n_gpus_rollout
# must be even; the actor is Megatron TP=4 + SP, so n_gpus_training must be a multiple of 4.
NNODES=${NNODES:-1}
NGPUS_PER_NODE=${NGPUS_PER_NODE:-8}
n_gpus_rollout=${N_GPUS_ROLLOUT:-4}
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
        task=math \
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
