"""The single controller: drives rollout workers and actor ranks (Ray actors) step by step.

dataset -> [RolloutWorker: generate + reward] -> advantages -> [ActorWorker x DP: update]
-> param sync back to the rollout engine. Synchronous (k = 0) training; the fully-async
recipe replaces ``_produce_batch`` with a bounded queue and keeps the rest.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from omegaconf import OmegaConf

from verl.protocol import DataProto
from verl.trainer.config import TrainerConfig
from verl.trainer.ppo.core_algos import compute_advantage
from verl.utils.dataset.rl_dataset import PromptSampler, RLDataset, collate_prompts
from verl.utils.reward_score import check_data_sources
from verl.utils.tracking import Tracking
from verl.workers.actor_worker import ActorWorker
from verl.workers.rollout_worker import RolloutWorker

CHECKPOINT_PREFIX = "global_step_"
COMPLETE_MARKER = "COMPLETE"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rollout_seed(base_seed: int, step: int, salt: int = 0) -> int:
    # A fresh, reproducible sampling seed per step: resuming at step s samples exactly what
    # the uninterrupted run sampled at step s.
    return (base_seed * 1_000_003 + step * 7_919 + salt) % (2**31 - 1)


class RayPPOTrainer:
    def __init__(self, config: TrainerConfig, model_path: str):
        self.config = config
        self.model_path = model_path
        self.run_dir = Path(config.trainer.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.global_step = 0

        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        dc = config.data
        self.train_dataset = RLDataset(dc.train_files, self.tokenizer, dc.max_prompt_length, truncation=dc.truncation)
        self.val_dataset = (
            RLDataset(dc.val_files, self.tokenizer, dc.max_prompt_length, truncation=dc.truncation)
            if dc.val_files else None
        )
        check_data_sources(self.train_dataset.data_sources())
        if self.val_dataset is not None:
            check_data_sources(self.val_dataset.data_sources())
        self.sampler = PromptSampler(
            len(self.train_dataset), dc.train_batch_size, seed=config.trainer.seed, shuffle=dc.shuffle
        )

    # ------------------------------------------------------------------ workers
    def init_workers(self) -> None:
        tc, n_threads = self.config.trainer, self.config.trainer.num_threads_per_worker
        env = {"env_vars": {"OMP_NUM_THREADS": str(n_threads), "TOKENIZERS_PARALLELISM": "false"}}
        cpu_share = tc.ray_num_cpus / (tc.actor_world_size + 1)
        rollout_cls = ray.remote(num_cpus=cpu_share, runtime_env=env)(RolloutWorker)
        self.rollout = rollout_cls.remote(
            self.model_path, self.config.rollout, self.config.data.max_prompt_length, self.config.reward.timeout_s,
            num_threads=n_threads, dtype=self.config.model.dtype, device=tc.device,
        )
        actor_cls = ray.remote(num_cpus=cpu_share, runtime_env=env)(ActorWorker)
        port = _free_port()
        self.actors = [
            actor_cls.remote(
                self.model_path, self.config.actor, tc.total_training_steps, rank=r, world_size=tc.actor_world_size,
                master_port=port, num_threads=n_threads, seed=tc.seed, dtype=self.config.model.dtype, device=tc.device,
            )
            for r in range(tc.actor_world_size)
        ]
        ray.get([a.__ray_ready__.remote() for a in self.actors] + [self.rollout.__ray_ready__.remote()])

    # ------------------------------------------------------------------ one step
    def _next_prompts(self, step: int) -> DataProto:
        indices = self.sampler.next_batch()
        items = [self.train_dataset[i] for i in indices]
        prompts = collate_prompts(items, self.tokenizer.pad_token_id)
        prompts.non_tensor_batch["uid"] = np.array([f"s{step}-i{i}" for i in indices], dtype=object)
        return prompts

    def _produce_batch(self, step: int) -> DataProto:
        prompts = self._next_prompts(step)
        seed = _rollout_seed(self.config.trainer.seed, step)
        return ray.get(self.rollout.generate_sequences.remote(prompts, "train", seed))

    def _update_actor(self, batch: DataProto) -> dict[str, float]:
        shards = batch.chunk_by_group(len(self.actors), key="uid") if len(self.actors) > 1 else [batch]
        results = ray.get([a.update_policy.remote(s) for a, s in zip(self.actors, shards)])
        return results[0]

    def _recompute_old_log_probs(self, batch: DataProto) -> DataProto:
        shards = batch.chunk(len(self.actors)) if len(self.actors) > 1 else [batch]
        outs = ray.get([a.compute_log_prob.remote(s) for a, s in zip(self.actors, shards)])
        return batch.union(DataProto.concat(outs))

    def _sync_weights(self, version: int) -> float:
        t0 = time.perf_counter()
        weights = self.actors[0].get_weights.remote()
        ray.get(self.rollout.update_weights.remote(weights, version))
        return time.perf_counter() - t0

    def train_step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        batch = self._produce_batch(step)
        batch.meta_info["global_steps"] = step
        batch = compute_advantage(batch, self.config.algorithm)
        if self.config.actor.recompute_old_log_prob:
            batch = self._recompute_old_log_probs(batch)
        metrics = {k: v for k, v in batch.meta_info.items() if isinstance(v, (int, float)) and "/" in k}
        metrics.update(self._update_actor(batch))
        metrics["timing/param_sync_s"] = self._sync_weights(version=step)
        metrics.update(compute_data_metrics(batch))
        metrics["timing/step_s"] = time.perf_counter() - t0
        return metrics

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict[str, float]:
        if self.val_dataset is None:
            return {}
        t0 = time.perf_counter()
        limit = self.config.data.val_max_samples
        count = len(self.val_dataset) if limit == -1 else min(limit, len(self.val_dataset))
        items = [self.val_dataset[i] for i in range(count)]
        prompts = collate_prompts(items, self.tokenizer.pad_token_id)
        prompts.non_tensor_batch["uid"] = np.array([f"val-{i}" for i in range(count)], dtype=object)
        seed = _rollout_seed(self.config.trainer.seed, 0, salt=17)
        modes = {"greedy_acc": "greedy"}
        if (n := self.config.rollout.val_kwargs.mean_at_n_samples) > 0:
            modes[f"mean_at_{n}_acc"] = "mean_at_n"
        metrics: dict[str, float] = {}
        for label, mode in modes.items():
            out = ray.get(self.rollout.generate_sequences.remote(prompts, mode, seed))
            scores = out.batch["token_level_scores"].sum(dim=1).numpy()
            metrics[f"val/{label}"] = float(scores.mean())
            by_source: dict[str, list[float]] = defaultdict(list)
            for src, s in zip(out.non_tensor_batch["data_source"], scores):
                by_source[str(src)].append(float(s))
            if len(by_source) > 1:
                for src, vals in by_source.items():
                    metrics[f"val/{src}/{label}"] = float(np.mean(vals))
        metrics["timing/val_s"] = time.perf_counter() - t0
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_dirs(self) -> list[Path]:
        if not self.ckpt_root.exists():
            return []
        dirs = [d for d in self.ckpt_root.iterdir() if d.name.startswith(CHECKPOINT_PREFIX) and (d / COMPLETE_MARKER).exists()]
        return sorted(dirs, key=lambda d: int(d.name[len(CHECKPOINT_PREFIX):]))

    def save_checkpoint(self, step: int) -> Path:
        directory = self.ckpt_root / f"{CHECKPOINT_PREFIX}{step}"
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        ray.get([a.save_checkpoint.remote(str(directory)) for a in self.actors])
        state = {"global_step": step, "sampler": self.sampler.state_dict()}
        (directory / "trainer_state.json").write_text(json.dumps(state))
        (directory / COMPLETE_MARKER).write_text("")  # written last: a half-written checkpoint is ignored
        for old in self._checkpoint_dirs()[: -self.config.trainer.max_checkpoints_to_keep]:
            shutil.rmtree(old, ignore_errors=True)
        return directory

    def maybe_resume(self) -> int:
        mode = self.config.trainer.resume
        if mode == "disable":
            return 0
        if mode == "auto":
            dirs = self._checkpoint_dirs()
            if not dirs:
                return 0
            directory = dirs[-1]
        else:
            directory = Path(mode)
            if not (directory / COMPLETE_MARKER).exists():
                raise FileNotFoundError(f"trainer.resume={mode!r}: no complete checkpoint there")
        ray.get([a.load_checkpoint.remote(str(directory)) for a in self.actors])
        state = json.loads((directory / "trainer_state.json").read_text())
        self.sampler.load_state_dict(state["sampler"])
        step = int(state["global_step"])
        self._sync_weights(version=step)
        return step

    # ------------------------------------------------------------------ main loop
    def fit(self) -> dict[str, float]:
        tc = self.config.trainer
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(self.config)))
        self.init_workers()
        start = self.maybe_resume()
        tracker = Tracking(
            self.run_dir, tc.logger, config=asdict(self.config), total_steps=tc.total_training_steps,
            initial_step=start, project_name=tc.project_name, experiment_name=tc.experiment_name,
        )
        if start:
            tracker.message(f"resumed from step {start} ({self.run_dir})")
        last_val: dict[str, float] = {}
        wall0 = time.perf_counter()
        try:
            if start == 0 and tc.val_before_train and self.val_dataset is not None:
                last_val = self.validate()
                tracker.log({**last_val, "time/wall_s": 0.0}, step=0)
            for step in range(start + 1, tc.total_training_steps + 1):
                metrics = self.train_step(step)
                is_last = step == tc.total_training_steps
                if self.val_dataset is not None and ((tc.val_freq and step % tc.val_freq == 0) or is_last):
                    last_val = self.validate()
                    metrics.update(last_val)
                metrics["time/wall_s"] = time.perf_counter() - wall0
                tracker.log(metrics, step=step)
                if (tc.save_freq and step % tc.save_freq == 0) or is_last:
                    self.save_checkpoint(step)
                self.global_step = step
        finally:
            tracker.close()
            self.shutdown()
        return last_val

    def shutdown(self) -> None:
        for worker in [*getattr(self, "actors", []), getattr(self, "rollout", None)]:
            if worker is not None:
                ray.kill(worker)
        self.actors, self.rollout = [], None


def compute_data_metrics(batch: DataProto) -> dict[str, float]:
    """Per-step batch statistics: rewards, advantages, response lengths, versions."""
    b = batch.batch
    mask = b["response_mask"]
    scores = b["token_level_scores"].sum(dim=1)
    lengths = mask.sum(dim=1)
    max_len = mask.shape[1]
    valid_adv = torch.masked_select(b["advantages"], mask.bool())
    nt = batch.non_tensor_batch
    out = {
        "critic/score/mean": scores.mean().item(),
        "critic/score/max": scores.max().item(),
        "critic/score/min": scores.min().item(),
        "critic/advantages/mean": valid_adv.mean().item() if valid_adv.numel() else 0.0,
        "critic/advantages/max": valid_adv.max().item() if valid_adv.numel() else 0.0,
        "critic/advantages/min": valid_adv.min().item() if valid_adv.numel() else 0.0,
        "response_length/mean": lengths.mean().item(),
        "response_length/max": lengths.max().item(),
        "response_length/clip_ratio": (lengths >= max_len).float().mean().item(),
        "rollout/num_trajectories": float(len(batch)),
    }
    if "param_version_start" in nt:
        step = batch.meta_info.get("global_steps")
        if step is not None:
            lag = (step - 1) - np.asarray(nt["param_version_start"], dtype=np.int64)
            out["staleness/start_lag_max"] = float(lag.max())
            out["staleness/start_lag_mean"] = float(lag.mean())
    return out


def summarize_run(run_dir: str | Path) -> dict[str, Any]:
    """The final validation metrics of a finished run, read back from its metrics log."""
    from verl.utils.tracking import read_metrics

    records = [r for r in read_metrics(run_dir) if "val/greedy_acc" in r]
    return {"first": records[0] if records else {}, "last": records[-1] if records else {}}
