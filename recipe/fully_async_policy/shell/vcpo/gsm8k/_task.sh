# GSM8K (paper: Qwen2-1.5B, 8 prompts x 8 responses per step, prompt/response 2048/2048).
# Data: python scripts/data/prepare_gsm8k.py --input <gsm8k train.jsonl> --out data/gsm8k/train.parquet
#       (and --split test for data/gsm8k/test.parquet).
source "$(dirname "${BASH_SOURCE[0]}")/../paper_gpu_common.sh"
MODEL_PATH=${MODEL_PATH:-$HOME/models/Qwen2-1.5B}
task=(
  model.path="$MODEL_PATH"
  data.train_files=[data/gsm8k/train.parquet]
  data.val_files=[data/gsm8k/test.parquet]
  data.train_batch_size=8
  rollout.n=8
  data.max_prompt_length=2048
  data.max_response_length=2048
  rollout.max_seq_len=4096
  actor.ppo_mini_batch_size=64
  actor.ppo_micro_batch_size_per_gpu=8
  # Our parallel layout, not the paper's (Qwen2-1.5B has 2 KV heads: TP <= 2); DP = NGPUS / 2.
  actor.megatron.tensor_model_parallel_size=2
  actor.megatron.sequence_parallel=true
  trainer.total_training_steps=400
  trainer.val_freq=20
)
