"""Shared assets for the pipeline tests: a random-init tiny model and small Countdown files."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch
from hydra import compose, initialize_config_dir

from verl.models.presets import build_tiny_model_dir
from verl.trainer.config import register_configs, to_trainer_config
from verl.utils.dataset.countdown import write_countdown_parquet

CONFIG_DIR = str(Path(__file__).resolve().parents[3] / "configs")
register_configs()


@pytest.fixture(scope="session")
def pipeline_assets(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("async_assets")
    files = write_countdown_parquet(root / "data", train_size=400, test_size=8, seed=5)
    model = build_tiny_model_dir(str(root / "model"), preset="tiny", seed=0)
    return {"root": root, "train": str(files["train"]), "test": str(files["test"]), "model": model}


@pytest.fixture(scope="module")
def ray_cluster():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


def small_config(assets, run_dir: Path, *overrides: str):
    """The CPU default shrunk to seconds per run: 4 prompts x 4 responses per step."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=[
            f"model.path={assets['model']}", "model.warm_start.enable=false",
            f"data.train_files=[{assets['train']}]", f"data.val_files=[{assets['test']}]",
            "data.train_batch_size=4", "rollout.n=4", "actor.ppo_mini_batch_size=16",
            "actor.ppo_micro_batch_size_per_gpu=16", "data.max_response_length=12",
            "rollout.val_kwargs.mean_at_n_samples=0", "trainer.logger=[jsonl]", f"trainer.run_dir={run_dir}",
            "trainer.val_before_train=false", "trainer.val_freq=0", *overrides,
        ])
    return to_trainer_config(cfg)
