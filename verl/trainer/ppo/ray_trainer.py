"""The single controller: drives the rollout pipeline and actor ranks (Ray actors) step by step.

dataset -> [AsyncRolloutPipeline: rollouters -> queue] -> advantages -> [ActorWorker x DP: update]
-> param sync back to the rollout engines. One code path for every lag bound: k = 0 is
synchronous training (the rollouter only starts a step's prompts once it holds that step's
weights); k > 0 overlaps rollout and training with every trajectory's lag <= k.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray
import torch

from verl.protocol import DataProto
from verl.trainer.config import TrainerConfig, to_yaml
from verl.trainer.fully_async.pipeline import AsyncRolloutPipeline
from verl.trainer.fully_async.staleness import trajectory_lags
from verl.trainer.ppo.core_algos import apply_kl_penalty, build_kl_controller, compute_advantage
from verl.utils.checkpoint import COMPLETE_MARKER
from verl.utils.dataset.rl_dataset import PromptSampler, RLDataset, collate_prompts
from verl.utils.distributed import find_free_port
from verl.utils.reward_score import check_data_sources
from verl.utils.tracking import Tracking
from verl.workers.actor_worker import ActorWorker

CHECKPOINT_PREFIX = "global_step_"
TRAJECTORY_LOG = "trajectories.jsonl"


def _rollout_seed(base_seed: int, step: int, salt: int = 0) -> int:
    # A reproducible base seed; each request derives its own stream from it and its request id.
    return (base_seed * 1_000_003 + step * 7_919 + salt) % (2**31 - 1)


class RayPPOTrainer:
    def __init__(self, config: TrainerConfig, model_path: str):
        self.config = config
        self.update_config = config.policy_update_config()
        self.model_path = model_path
        self.run_dir = Path(config.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.global_step = 0

        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        dc = config.data
        dataset_kwargs = dict(prompt_key=dc.prompt_key, truncation=dc.truncation,
                              filter_overlong_prompts=dc.filter_overlong_prompts)
        self.train_dataset = RLDataset(dc.train_files, self.tokenizer, dc.max_prompt_length, **dataset_kwargs)
        self.val_dataset = (
            RLDataset(dc.val_files, self.tokenizer, dc.max_prompt_length, **dataset_kwargs) if dc.val_files else None
        )
        if config.custom_reward_function.path is None:  # a custom function decides every data source itself
            check_data_sources(self.train_dataset.data_sources())
            if self.val_dataset is not None:
                check_data_sources(self.val_dataset.data_sources())
        self.sampler = PromptSampler(
            len(self.train_dataset), config.prompts_per_step, seed=config.trainer.seed, shuffle=dc.shuffle
        )
        self.total_training_steps = config.total_training_steps(len(self.train_dataset))
        algorithm = config.algorithm
        self.kl_ctrl = None
        if algorithm.use_kl_in_reward:
            kc = algorithm.kl_ctrl
            self.kl_ctrl = build_kl_controller(kc.type, kc.kl_coef, kc.target_kl, kc.horizon)

    # ------------------------------------------------------------------ workers
    def init_workers(self) -> None:
        tc, at = self.config.trainer, self.config.async_training
        n_threads = at.threads_per_worker(tc.num_threads_per_worker)
        env = {"env_vars": {"OMP_NUM_THREADS": str(n_threads), "TOKENIZERS_PARALLELISM": "false"}}
        world = tc.world_size
        cpu_share = self.config.ray_kwargs.ray_init.cpus() / (world + self.config.num_rollout_replicas)
        self.pipeline = AsyncRolloutPipeline(
            self.config, self.model_path, self.train_dataset, self.sampler, self.tokenizer.pad_token_id,
            num_threads=n_threads, cpu_share=cpu_share, env=env,
        )
        actor_cls = ray.remote(num_cpus=cpu_share, runtime_env=env)(_actor_worker_class(self.config.actor.strategy))
        port = find_free_port()
        self.actors = [
            actor_cls.remote(
                self.model_path, self.update_config, self.total_training_steps, rank=r, world_size=world,
                master_port=port, num_threads=n_threads, seed=tc.seed, dtype=self.config.actor.dtype, device=tc.device,
            )
            for r in range(world)
        ]
        ray.get([a.__ray_ready__.remote() for a in self.actors] + self.pipeline.ready())
        # Tensor/context/pipeline-parallel ranks of one data-parallel rank share its shard.
        self.actor_dp_ranks = ray.get([a.data_parallel_rank.remote() for a in self.actors])
        self.dp_size = max(self.actor_dp_ranks) + 1
        self._delay_rng = random.Random(tc.seed)

    # ------------------------------------------------------------------ one step
    def _update_actor(self, batch: DataProto) -> dict[str, float]:
        shards = batch.chunk_by_group(self.dp_size, key="uid") if self.dp_size > 1 else [batch]
        results = ray.get([a.update_policy.remote(shards[d]) for a, d in zip(self.actors, self.actor_dp_ranks)])
        return results[0]

    def _log_probs_on_actors(self, batch: DataProto, method: str) -> DataProto:
        """``batch`` joined with what actor method ``method`` (``compute_log_prob`` or
        ``compute_ref_log_prob``) returns, each data-parallel rank computing its shard."""
        shards = batch.chunk(self.dp_size) if self.dp_size > 1 else [batch]
        outs = ray.get([getattr(a, method).remote(shards[d]) for a, d in zip(self.actors, self.actor_dp_ranks)])
        # Every model-parallel rank of a data-parallel rank returns the same log-probs: keep one each.
        first_of_dp = {d: i for i, d in reversed(list(enumerate(self.actor_dp_ranks)))}
        return batch.union(DataProto.concat([outs[first_of_dp[d]] for d in range(self.dp_size)]))

    def train_step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        at = self.config.async_training
        batch, metrics = self.pipeline.next_batch(step)
        batch.meta_info["global_steps"] = step
        if self.config.needs_reference_policy:
            t_ref = time.perf_counter()
            batch = self._log_probs_on_actors(batch, "compute_ref_log_prob")
            metrics["timing/ref_s"] = time.perf_counter() - t_ref
        if self.kl_ctrl is not None:
            batch, kl_metrics = apply_kl_penalty(batch, self.kl_ctrl, self.config.algorithm.kl_penalty)
            metrics.update(kl_metrics)
        batch = compute_advantage(batch, self.config.algorithm)
        if self.config.algorithm.test_flip_advantage_sign:
            batch.batch["advantages"] = -batch.batch["advantages"]
        if self.update_config.recompute_old_log_prob:
            batch = self._log_probs_on_actors(batch, "compute_log_prob")
        if at.test_train_delay_max_s:
            time.sleep(self._delay_rng.uniform(0.0, at.test_train_delay_max_s))
        t_update = time.perf_counter()
        metrics.update(self._update_actor(batch))
        metrics["timing/train_s"] = time.perf_counter() - t_update
        if step % at.trigger_parameter_sync_step == 0:
            metrics.update(self.pipeline.sync_weights(version=step))
        metrics.update(compute_data_metrics(batch))
        self._log_trajectories(step, batch)
        step_s = time.perf_counter() - t0
        num_tokens = float(batch.batch["response_mask"].sum())
        metrics.update({
            "timing/step_s": step_s,
            "trainer/idle_ratio": metrics["timing/queue_wait_s"] / step_s,
            "perf/samples_per_s": len(batch) / step_s,
            "perf/tokens_per_s": num_tokens / step_s,
        })
        return metrics

    def _log_trajectories(self, step: int, batch: DataProto) -> None:
        """Append one record per trained trajectory to ``trajectories.jsonl`` (the uid ledger a
        resume is checked against), with its versions and, when old log-probs were recomputed,
        its sequence log IS weight log w = sum_t (log pi_theta - log mu) under the trained weights.
        With ``trainer.rollout_data_dir``, also the readable dump ``<dir>/<step>.jsonl``: prompt,
        response, score, data source and the lag of each trajectory."""
        nt, b = batch.non_tensor_batch, batch.batch
        log_w = None
        if "old_log_probs" in b:
            log_w = ((b["old_log_probs"] - b["rollout_log_probs"]) * b["response_mask"]).sum(dim=1).tolist()
        records = []
        for i in range(len(batch)):
            record = {"step": step, "uid": str(nt["uid"][i]), "request_id": str(nt["request_id"][i]),
                      "param_version_start": int(nt["param_version_start"][i]),
                      "param_version_end": int(nt["param_version_end"][i]),
                      "param_version_trained": int(nt["param_version_trained"][i])}
            if log_w is not None:
                record["log_is_weight"] = log_w[i]
            records.append(record)
        with open(self.run_dir / TRAJECTORY_LOG, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        if self.config.trainer.rollout_data_dir:
            self._dump_rollouts(step, batch, records)

    def _dump_rollouts(self, step: int, batch: DataProto, records: list[dict]) -> None:
        nt, b = batch.non_tensor_batch, batch.batch
        prompt_len = b["prompts"].shape[1]
        prompt_mask = b["attention_mask"][:, :prompt_len].bool()
        scores = b["token_level_scores"].sum(dim=1).tolist()
        lags = trajectory_lags(step, nt["param_version_start"])
        out_dir = Path(self.config.trainer.rollout_data_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / f"{step}.jsonl", "w") as f:
            for i, record in enumerate(records):
                prompt = self.tokenizer.decode(b["prompts"][i][prompt_mask[i]].tolist(), skip_special_tokens=False)
                f.write(json.dumps({**record, "input": prompt, "output": str(nt["response_text"][i]),
                                    "score": scores[i], "data_source": str(nt["data_source"][i]),
                                    "lag": int(lags[i])}) + "\n")

    # ------------------------------------------------------------------ validation
    def validate(self, step: int = 0, tracker: Tracking | None = None) -> dict[str, float]:
        """Score the held-out prompts with the engines' current weights (greedy and/or mean@n), and
        with ``trainer.log_val_generations`` write the chosen samples of the first mode to
        ``<run dir>/val_generations/<step>.jsonl`` and to ``tracker``'s loggers."""
        if self.val_dataset is None:
            return {}
        t0 = time.perf_counter()
        limit = self.config.data.val_max_samples
        count = len(self.val_dataset) if limit == -1 else min(limit, len(self.val_dataset))
        items = [self.val_dataset[i] for i in range(count)]
        prompts = collate_prompts(items, self.tokenizer.pad_token_id)
        prompts.non_tensor_batch["uid"] = np.array([f"val-{i}" for i in range(count)], dtype=object)
        seed = _rollout_seed(self.config.trainer.seed, 0, salt=17)
        val = self.config.actor_rollout_ref.rollout.val_kwargs
        modes = {}
        if not val.do_sample or val.report_greedy:
            modes["greedy_acc"] = "greedy"
        if val.do_sample:
            modes[f"mean_at_{val.n}_acc"] = "mean_at_n"
        logged_mode = next(iter(modes.values()))  # greedy when it runs
        metrics: dict[str, float] = {}
        for label, mode in modes.items():
            out = self.pipeline.validate(prompts, mode, seed)
            scores = out.batch["token_level_scores"].sum(dim=1).numpy()
            if self.config.trainer.log_val_generations and mode == logged_mode:
                self._log_val_generations(step, mode, prompts, out, scores, tracker)
            metrics[f"val/{label}"] = float(scores.mean())
            by_source: dict[str, list[float]] = defaultdict(list)
            for src, s in zip(out.non_tensor_batch["data_source"], scores):
                by_source[str(src)].append(float(s))
            if len(by_source) > 1:
                for src, vals in by_source.items():
                    metrics[f"val/{src}/{label}"] = float(np.mean(vals))
        metrics["timing/val_s"] = time.perf_counter() - t0
        return metrics

    def val_generation_indices(self, count: int) -> list[int]:
        """The held-out rows whose generations are logged: ``trainer.log_val_generations`` of the
        first ``count``, drawn once from ``trainer.seed``, so every evaluation shows the same prompts."""
        n = min(self.config.trainer.log_val_generations, count)
        return sorted(random.Random(self.config.trainer.seed).sample(range(count), n))

    def _log_val_generations(self, step: int, mode: str, prompts: DataProto, out: DataProto, scores: np.ndarray,
                             tracker: Tracking | None) -> None:
        # The first response of each chosen prompt (mean@n validation returns n per prompt).
        first_row: dict[str, int] = {}
        for row, uid in enumerate(out.non_tensor_batch["uid"]):
            first_row.setdefault(str(uid), row)
        nt = prompts.non_tensor_batch
        records = []
        for i in self.val_generation_indices(len(prompts)):
            row = first_row[f"val-{i}"]
            records.append({
                "step": step, "index": i, "mode": mode,
                "input": self.tokenizer.decode(list(nt["raw_prompt_ids"][i]), skip_special_tokens=False),
                "output": str(out.non_tensor_batch["response_text"][row]), "score": float(scores[row]),
                "data_source": str(out.non_tensor_batch["data_source"][row]),
            })
        out_dir = self.run_dir / "val_generations"
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / f"{step}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        if tracker is not None:
            tracker.log_generations(records, step)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_dirs(self) -> list[Path]:
        if not self.ckpt_root.exists():
            return []
        dirs = [d for d in self.ckpt_root.iterdir() if d.name.startswith(CHECKPOINT_PREFIX) and (d / COMPLETE_MARKER).exists()]
        return sorted(dirs, key=lambda d: int(d.name[len(CHECKPOINT_PREFIX):]))

    def _checkpoints_to_delete(self) -> list[Path]:
        keep = self.config.trainer.max_actor_ckpt_to_keep
        return self._checkpoint_dirs()[:-keep] if keep else []

    def save_checkpoint(self, step: int) -> Path:
        directory = self.ckpt_root / f"{CHECKPOINT_PREFIX}{step}"
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        save_contents = self.config.actor.checkpoint.save_contents
        ray.get([a.save_checkpoint.remote(str(directory), save_contents) for a in self.actors])
        state = {"global_step": step, "sampler": self.pipeline.data_state(step)}
        if self.kl_ctrl is not None:
            state["kl_ctrl"] = self.kl_ctrl.state_dict()
        (directory / "trainer_state.json").write_text(json.dumps(state))
        (directory / COMPLETE_MARKER).write_text("")  # written last: a half-written checkpoint is ignored
        for old in self._checkpoints_to_delete():
            shutil.rmtree(old, ignore_errors=True)
        return directory

    def maybe_resume(self) -> int:
        tc = self.config.trainer
        if tc.resume_mode == "disable":
            return 0
        if tc.resume_mode == "auto":
            dirs = self._checkpoint_dirs()
            if not dirs:
                return 0
            directory = dirs[-1]
        else:
            directory = Path(tc.resume_from_path)
            if not (directory / COMPLETE_MARKER).exists():
                raise FileNotFoundError(f"trainer.resume_from_path={tc.resume_from_path!r}: no complete checkpoint there")
        load_contents = self.config.actor.checkpoint.load_contents
        ray.get([a.load_checkpoint.remote(str(directory), load_contents) for a in self.actors])
        state = json.loads((directory / "trainer_state.json").read_text())
        self.sampler.load_state_dict(state["sampler"])
        if self.kl_ctrl is not None and "kl_ctrl" in state:
            self.kl_ctrl.load_state_dict(state["kl_ctrl"])
        step = int(state["global_step"])
        _truncate_trajectory_log(self.run_dir / TRAJECTORY_LOG, step)
        return step

    # ------------------------------------------------------------------ main loop
    def fit(self) -> dict[str, float]:
        tc = self.config.trainer
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(to_yaml(self.config))
        self.init_workers()
        start = self.maybe_resume()
        if start == 0:
            # A fresh run owns its ledger; a resumed one keeps the records up to its checkpoint.
            (self.run_dir / TRAJECTORY_LOG).unlink(missing_ok=True)
        self.pipeline.start(start, weight_sources=self.actors)
        tracker = Tracking(
            self.run_dir, tc.logger, config=asdict(self.config), total_steps=self.total_training_steps,
            initial_step=start, project_name=tc.project_name, experiment_name=tc.experiment_name,
            wandb_entity=tc.wandb_entity, wandb_group=tc.wandb_group,
        )
        if start:
            tracker.message(f"resumed from step {start} ({self.run_dir})")
        last_val: dict[str, float] = {}
        wall0 = time.perf_counter()
        try:
            if tc.val_only or (start == 0 and tc.val_before_train and self.val_dataset is not None):
                last_val = self.validate(start, tracker)
                # A resumed step's record keeps its wall time.
                tracker.log({**last_val, "time/wall_s": 0.0} if start == 0 else last_val, step=start)
            if tc.val_only:
                return last_val
            val_freq = self.config.val_freq
            for step in range(start + 1, self.total_training_steps + 1):
                metrics = self.train_step(step)
                is_last = step == self.total_training_steps
                if self.val_dataset is not None and ((val_freq and step % val_freq == 0) or is_last):
                    last_val = self.validate(step, tracker)
                    metrics.update(last_val)
                metrics["time/wall_s"] = time.perf_counter() - wall0
                tracker.log(metrics, step=step)
                if tc.save_freq > 0 and (step % tc.save_freq == 0 or is_last):
                    self.save_checkpoint(step)
                self.global_step = step
        finally:
            tracker.close()
            self.shutdown()
        return last_val

    def shutdown(self) -> None:
        if getattr(self, "pipeline", None) is not None:
            self.pipeline.shutdown()
            self.pipeline = None
        for worker in getattr(self, "actors", []):
            ray.kill(worker)
        self.actors = []


def _actor_worker_class(strategy: str) -> type:
    """The Ray worker class of ``actor.strategy``; Megatron is imported only when asked for."""
    if strategy == "megatron":
        from verl.workers.megatron_actor_worker import MegatronActorWorker

        return MegatronActorWorker
    return ActorWorker


def compute_data_metrics(batch: DataProto) -> dict[str, float]:
    """Per-step batch statistics: rewards, advantages, response lengths (staleness metrics come
    from the pipeline)."""
    b = batch.batch
    mask = b["response_mask"]
    scores = b["token_level_scores"].sum(dim=1)
    lengths = mask.sum(dim=1)
    max_len = mask.shape[1]
    valid_adv = torch.masked_select(b["advantages"], mask.bool())
    out = {
        "batch/score/mean": scores.mean().item(),
        "batch/score/max": scores.max().item(),
        "batch/score/min": scores.min().item(),
        "batch/advantages/mean": valid_adv.mean().item() if valid_adv.numel() else 0.0,
        "batch/advantages/max": valid_adv.max().item() if valid_adv.numel() else 0.0,
        "batch/advantages/min": valid_adv.min().item() if valid_adv.numel() else 0.0,
        "response_length/mean": lengths.mean().item(),
        "response_length/max": lengths.max().item(),
        "response_length/clip_ratio": (lengths >= max_len).float().mean().item(),
        "rollout/num_trajectories": float(len(batch)),
    }
    return out


def _truncate_trajectory_log(path: Path, last_step: int) -> None:
    """Keep the ledger records of steps <= ``last_step``: later steps were trained by weights the
    resume discards, so their groups are trained again and must be counted once."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))
