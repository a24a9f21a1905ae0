# MATH -> MATH-500 (paper: Qwen2.5-7B, 32 prompts x 16 responses per step, prompt/response 1024/2048).
# Data: python scripts/data/prepare_math.py --input <MATH train dir> --split train --out data/math/train.parquet
#       and the MATH-500 test file as data/math/test.parquet.
source "$(dirname "${BASH_SOURCE[0]}")/../paper_gpu_common.sh"
MODEL_PATH=${MODEL_PATH:-$HOME/models/Qwen2.5-7B}
task=(
  model.path="$MODEL_PATH"
  data.train_files=[data/math/train.parquet]
  data.val_files=[data/math/test.parquet]
  data.train_batch_size=32
  rollout.n=16
  data.max_prompt_length=1024
  data.max_response_length=2048
  rollout.max_seq_len=3072
  actor.ppo_mini_batch_size=512
  actor.ppo_micro_batch_size_per_gpu=4
  # Our parallel layout, not the paper's (Qwen2.5-7B has 4 KV heads: TP <= 4); DP = NGPUS / 4.
  actor.megatron.tensor_model_parallel_size=4
  actor.megatron.sequence_parallel=true
  trainer.total_training_steps=400
  trainer.val_freq=20
)
