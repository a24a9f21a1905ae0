"""``actor_rollout_ref.actor.checkpoint.save_contents`` with ``hf_model`` through the real trainer
(Hydra config -> Ray workers -> checkpoints): every checkpoint holds a loadable HF model in
``huggingface/``, equal byte for byte to the offline merge of the same checkpoint, and it holds the
trained weights, not the starting ones."""

from __future__ import annotations

import pytest
import ray
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from verl.model_merger import merge_checkpoint
from verl.trainer.config import load_config
from verl.trainer.main_ppo import run
from verl.utils.dataset.countdown import write_countdown_parquet

ARR = "actor_rollout_ref"


@pytest.mark.slow
def test_hf_model_in_save_contents_exports_every_checkpoint(tmp_path, random_model_dirs):
    files = write_countdown_parquet(tmp_path / "data", train_size=64, test_size=8, seed=3)
    run_dir = tmp_path / "run"
    try:
        run(load_config([
            f"{ARR}.model.path={random_model_dirs[True]}", f"{ARR}.model.warm_start.enable=false",
            f"data.train_files=[{files['train']}]", f"data.val_files=[{files['test']}]",
            "data.train_batch_size=4", f"{ARR}.rollout.n=2", f"{ARR}.actor.ppo_mini_batch_size=4",
            f"{ARR}.actor.ppo_micro_batch_size_per_gpu=8", f"{ARR}.actor.optim.lr=1e-3",
            f"{ARR}.actor.entropy_coeff=0.01",  # a gradient even if every reward of the random model is 0
            "trainer.logger=[jsonl]", f"trainer.default_local_dir={run_dir}", "trainer.val_before_train=false",
            "trainer.total_training_steps=2", "trainer.save_freq=1", "trainer.test_freq=0",
            f"{ARR}.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        ]))
    finally:
        if ray.is_initialized():
            ray.shutdown()
    start = load_file(f"{random_model_dirs[True]}/model.safetensors")
    for step in (1, 2):
        checkpoint = run_dir / "checkpoints" / f"global_step_{step}"
        folder = checkpoint / "huggingface"
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        actor = torch.load(checkpoint / "actor.pt", weights_only=False)["model"]
        for name, value in model.state_dict().items():
            assert torch.equal(value, actor[name]), (step, name)
        assert not torch.equal(start["model.embed_tokens.weight"], actor["model.embed_tokens.weight"])
        target = merge_checkpoint(checkpoint, tmp_path / f"hf_{step}")
        assert (target / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
