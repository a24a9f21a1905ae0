"""The controller's handle on the rollout side: feeds prompts, takes bounded-lag batches, syncs weights.

dataset -> [AsyncRolloutPipeline.feed] -> Rollouter replicas -> ReorderBuffer ->
[AsyncRolloutPipeline.next_batch] -> trainer/actor -> [ParamSync] -> engines.

The same object serves k = 0 (synchronous: the rollouter may only start a step's groups once
it holds that step's weights) and k > 0; the trainer never asks which.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray

from verl.protocol import DataProto, to_object_array
from verl.trainer.config import TrainerConfig
from verl.trainer.fully_async.param_sync import ParamSync
from verl.trainer.fully_async.reorder_buffer import ReorderBuffer
from verl.trainer.fully_async.rollouter import Rollouter
from verl.trainer.fully_async.staleness import check_lag_bound, staleness_metrics
from verl.utils.dataset.rl_dataset import PromptSampler, RLDataset, collate_prompts
from verl.utils.reward_score import CustomRewardFunction

_POLL_S = 1.0


def group_uid(group_index: int, dataset_index: int) -> str:
    """The uid of prompt group j: unique per group even if a prompt is drawn again later."""
    return f"g{group_index}-i{dataset_index}"


class AsyncRolloutPipeline:
    """Owns the ReorderBuffer and Rollouter actors and the prompt feed.

    Group j (0-based, in sampler order) goes to replica j mod R and is trained at step
    floor(j / G) + 1, G = ``TrainerConfig.prompts_per_step``.
    """

    def __init__(self, config: TrainerConfig, model_path: str, dataset: RLDataset, sampler: PromptSampler,
                 pad_token_id: int, num_threads: int, cpu_share: float, env: dict[str, Any]):
        self.config = config
        self.at = config.async_training
        self.batch_size = config.prompts_per_step  # the sampler's batch: one trainer step's prompts
        self.groups_per_step = config.prompts_per_step
        self.dataset, self.sampler, self.pad_token_id = dataset, sampler, pad_token_id
        self._next_to_feed = 0
        self._sampler_states: dict[int, dict[str, Any]] = {}
        self.queue = ray.remote(num_cpus=0, max_concurrency=4)(ReorderBuffer).remote(
            self.at.queue_capacity(self.groups_per_step))
        rollout = config.actor_rollout_ref.rollout
        custom = config.custom_reward_function
        # Pickled as its path: each rollouter (and its reward worker) loads the file itself.
        compute_score = (CustomRewardFunction(custom.path, custom.name, custom.reward_kwargs)
                         if custom.path is not None else None)
        worker_kwargs = dict(model_path=model_path, rollout_config=rollout,
                             max_prompt_length=config.data.max_prompt_length,
                             reward_timeout_s=config.reward_model.timeout_s,
                             reward_startup_timeout_s=config.reward_model.startup_timeout_s, num_threads=num_threads,
                             dtype=rollout.dtype, device=config.trainer.device, compute_score=compute_score)
        rollouter_cls = ray.remote(num_cpus=cpu_share, max_concurrency=4, runtime_env=env)(Rollouter)
        self.rollouters = [
            rollouter_cls.remote(worker_kwargs, self.queue, self.at.k, self.groups_per_step,
                                 self.at.partial_rollout, config.trainer.seed, self.at.test_rollout_delay_max_s, r,
                                 self.at.bsz_per_dp_rank)
            for r in range(config.num_rollout_replicas)
        ]
        self.param_sync: ParamSync | None = None
        self._last_stats: list[dict[str, float]] = []

    def ready(self) -> list[Any]:
        return [r.__ray_ready__.remote() for r in self.rollouters] + [self.queue.__ray_ready__.remote()]

    def start(self, start_step: int, weight_sources: list[Any]) -> dict[str, float]:
        """Begin generating for step ``start_step + 1``; the sampler must already be positioned
        at that step's first group. ``weight_sources`` are all actor ranks, rank 0 first. A
        resumed run syncs its weights before the first group starts."""
        self.param_sync = ParamSync(weight_sources, self.rollouters, self.at.param_sync_backend,
                                    self.config.trainer.device, self.at.param_sync_timeout_s)
        self.param_sync.open()
        first = start_step * self.groups_per_step
        self._next_to_feed = first
        ray.get(self.queue.reset.remote(first))
        metrics = self.param_sync.sync(start_step) if start_step else {}
        ray.get([r.start.remote() for r in self.rollouters])
        self._last_stats = ray.get([r.stats.remote() for r in self.rollouters])
        return metrics

    # ------------------------------------------------------------------ prompts in
    def _feed(self, upto_group: int) -> None:
        """Draw sampler batches until every group below ``upto_group`` is submitted."""
        per_replica: list[list[tuple[int, DataProto]]] = [[] for _ in self.rollouters]
        while self._next_to_feed < upto_group:
            batch_index = self._next_to_feed // self.batch_size
            self._sampler_states[batch_index] = self.sampler.state_dict()
            indices = self.sampler.next_batch()
            items = [self.dataset[i] for i in indices]
            prompts = collate_prompts(items, self.pad_token_id)
            groups = list(range(self._next_to_feed, self._next_to_feed + len(indices)))
            prompts.non_tensor_batch["uid"] = to_object_array(group_uid(j, i) for j, i in zip(groups, indices))
            for row, j in enumerate(groups):
                per_replica[j % len(self.rollouters)].append((j, prompts[row:row + 1]))
            self._next_to_feed += len(indices)
        # One submit per replica, so a step's groups become visible to the rollouter together.
        ray.get([r.submit.remote(groups) for r, groups in zip(self.rollouters, per_replica) if groups])

    def data_state(self, step: int) -> dict[str, Any]:
        """The sampler state positioned at the first group of step ``step + 1``."""
        batch_index = step * self.groups_per_step // self.batch_size
        for old in [b for b in self._sampler_states if b < batch_index]:
            del self._sampler_states[old]
        return self._sampler_states.get(batch_index, self.sampler.state_dict())

    # ------------------------------------------------------------------ batches out
    def next_batch(self, step: int) -> tuple[DataProto, dict[str, float]]:
        """The G groups of trainer step ``step`` (weights version step - 1), each trajectory
        checked against the lag bound, with staleness, queue and rollouter metrics."""
        g = self.groups_per_step
        self._feed((step + self.at.k + 1) * g)
        t0 = time.perf_counter()
        deadline = t0 + self.at.queue_timeout_s
        while True:
            got = ray.get(self.queue.get_groups.remote((step - 1) * g, g, _POLL_S))
            if got is not None:
                break
            errors = [e for e in ray.get([r.error.remote() for r in self.rollouters]) if e]
            if errors:
                raise RuntimeError(f"rollouter failed: {errors[0]}")
            if time.perf_counter() > deadline:
                raise TimeoutError(f"step {step}: no batch after async_training.queue_timeout_s="
                                   f"{self.at.queue_timeout_s} s (queue {ray.get(self.queue.describe.remote())})")
        wait_s = time.perf_counter() - t0
        batch, group_metrics, queue_metrics = got
        nt = batch.non_tensor_batch
        check_lag_bound(step, nt["param_version_start"], self.at.k, nt["uid"])
        nt["param_version_trained"] = np.full(len(batch), step - 1, dtype=np.int64)
        metrics = staleness_metrics(step, nt["param_version_start"], nt["param_version_end"])
        metrics.update(queue_metrics)
        metrics["timing/queue_wait_s"] = wait_s
        # Keys from every group: a group whose samples all failed reports no reward/extra/* keys.
        for key in dict.fromkeys(key for m in group_metrics for key in m):
            values = [m[key] for m in group_metrics if key in m]
            # Counts add up over groups; rates, means and times of shared generate calls do not.
            metrics[key] = float(np.sum(values) if key.startswith("reward/num_") else np.mean(values))
        metrics.update(self._rollouter_metrics())
        return batch, metrics

    def _rollouter_metrics(self) -> dict[str, float]:
        stats = ray.get([r.stats.remote() for r in self.rollouters])
        idle, wall, tokens, aborted, resumed = 0.0, 0.0, 0.0, 0.0, 0.0
        for now, before in zip(stats, self._last_stats):
            idle += now["idle_s"] - before["idle_s"]
            wall += now["wall_s"] - before["wall_s"]
            tokens += now["generated_tokens"] - before["generated_tokens"]
            aborted += now["aborted_requests"] - before["aborted_requests"]
            resumed += now["resumed_requests"] - before["resumed_requests"]
        self._last_stats = stats
        return {
            "rollouter/idle_ratio": idle / wall if wall > 0 else 0.0,
            "rollouter/tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "rollouter/aborted_requests": aborted,
            "rollouter/resumed_partial_requests": resumed,
        }

    # ------------------------------------------------------------------ weights, validation, end
    def sync_weights(self, version: int) -> dict[str, float]:
        assert self.param_sync is not None, "start() first"
        return self.param_sync.sync(version)

    def validate(self, prompts: DataProto, mode: str, seed: int) -> DataProto:
        return ray.get(self.rollouters[0].validate.remote(prompts, mode, seed))

    def shutdown(self) -> None:
        if self.param_sync is not None:
            try:
                self.param_sync.close()
            except Exception:  # the actor may already be gone; its channel end goes with it
                pass
            self.param_sync = None
        for r in self.rollouters:
            try:
                ray.get(r.stop.remote(), timeout=30)
            except Exception:  # a dead replica has nothing left to stop
                pass
            ray.kill(r)
        ray.kill(self.queue)
        self.rollouters = []
