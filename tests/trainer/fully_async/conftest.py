"""Shared pieces of the pipeline tests: a Ray cluster per module and the CPU config shrunk to seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from verl.trainer.config import TrainerConfig, load_config


@pytest.fixture(scope="module")
def ray_cluster():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


def small_overrides(assets, run_dir: Path, *overrides: str) -> list[str]:
    """The command-line overrides that shrink the CPU default to seconds per run: 4 prompts x 4
    responses per step, one optimizer step of all 4 prompts, greedy validation only at the end."""
    return [
        f"actor_rollout_ref.model.path={assets['model']}", "actor_rollout_ref.model.warm_start.enable=false",
        f"data.train_files=[{assets['train']}]", f"data.val_files=[{assets['test']}]",
        "data.train_batch_size=4", "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16", "data.max_response_length=12",
        "actor_rollout_ref.rollout.val_kwargs.do_sample=false", "trainer.logger=[jsonl]",
        f"trainer.default_local_dir={run_dir}", "trainer.val_before_train=false", "trainer.test_freq=0", *overrides,
    ]


def small_config(assets, run_dir: Path, *overrides: str) -> TrainerConfig:
    """The CPU default shrunk to seconds per run (``small_overrides``), validated."""
    return load_config(small_overrides(assets, run_dir, *overrides))
