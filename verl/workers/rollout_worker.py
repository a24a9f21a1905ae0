"""The rollout side of the pipeline: one engine replica plus the single-turn agent loop and reward.

dataset prompts -> [RolloutWorker.generate_sequences] -> scored, padded trajectories -> trainer.
Runs inside a Ray actor; weights arrive through ``update_weights`` (param sync).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from typing import Any, Callable, Iterable

import torch

from verl.models.loader import load_model_and_tokenizer
from verl.protocol import DataProto, to_object_array
from verl.utils.reward_score import RewardManager, default_compute_score
from verl.workers.rollout import build_rollout_engine
from verl.workers.rollout.base import GenerationRequest, SamplingParams, Trajectory
from verl.workers.rollout.batch import trajectories_to_batch
from verl.workers.rollout.config import RolloutConfig


class RolloutWorker:
    def __init__(
        self,
        model_path: str,
        rollout_config: RolloutConfig,
        max_prompt_length: int,
        reward_timeout_s: float,
        reward_startup_timeout_s: float = 60.0,
        num_threads: int = 1,
        dtype: str = "float32",
        device: str = "cpu",
        compute_score: Callable[..., Any] | None = None,
    ):
        """``compute_score``: the scorer of every sample (a ``CustomRewardFunction``); ``None``
        scores by ``data_source`` (``default_compute_score``)."""
        torch.set_num_threads(num_threads)
        self.config = rollout_config
        self.max_prompt_length = max_prompt_length
        model, self.tokenizer = load_model_and_tokenizer(model_path, dtype=dtype)
        model.to(device).eval()
        self.engine = build_rollout_engine(rollout_config, model, self.tokenizer)
        self.reward = RewardManager(timeout_s=reward_timeout_s, startup_timeout_s=reward_startup_timeout_s,
                                    compute_score=compute_score or default_compute_score)

    def _sampling(self, mode: str) -> tuple[SamplingParams, int]:
        eos = self.tokenizer.eos_token_id
        stops = (eos,) if eos is not None else ()
        if mode == "train":
            return self.config.sampling_params(stops), self.config.n
        if mode == "greedy":
            return self.config.val_sampling_params(sampled=False, stop_token_ids=stops), 1
        if mode == "mean_at_n":
            return self.config.val_sampling_params(sampled=True, stop_token_ids=stops), self.config.val_kwargs.n
        raise ValueError(f"unknown sampling mode {mode!r}: expected 'train', 'greedy' or 'mean_at_n'")

    def make_requests(self, prompts: DataProto, mode: str = "train",
                      seed: int = 0) -> tuple[list[GenerationRequest], list[int]]:
        """One request per sampled response (``rollout.n`` per prompt in ``train`` mode) and, for
        each, the row of its prompt. Response j of prompt i gets ``request_id = f"{uid_i}/{j}"``
        and its own sampling seed ``request_seed(seed, request_id, 0)``, so what it samples does
        not depend on which other requests share the engine with it."""
        sampling, n = self._sampling(mode)
        nt = prompts.non_tensor_batch
        requests, rows = [], []
        for i in range(len(prompts)):
            for j in range(n):
                request_id = f"{nt['uid'][i]}/{j}"
                requests.append(GenerationRequest(
                    request_id=request_id, prompt_ids=list(nt["raw_prompt_ids"][i]),
                    sampling=replace(sampling, seed=request_seed(seed, request_id, 0)),
                ))
                rows.append(i)
        return requests, rows

    def assemble(self, trajectories: list[Trajectory], prompts: DataProto, rows: list[int],
                 mode: str = "train", gen_s: float = 0.0) -> DataProto:
        """Score finished trajectories and pad them into the training batch layout; trajectory i
        answers prompt row ``rows[i]`` of ``prompts``."""
        nt = prompts.non_tensor_batch
        info = {k: [nt[k][r] for r in rows] for k in ("uid", "data_source", "ground_truth", "extra_info")}
        temperature = self._sampling(mode)[0].temperature
        batch = trajectories_to_batch(
            trajectories, info, self.tokenizer.pad_token_id, self.max_prompt_length, self.config.max_new_tokens,
            meta_info={"temperature": temperature},
        )
        texts = [self.tokenizer.decode(t.response_ids, skip_special_tokens=True) for t in trajectories]
        t1 = time.perf_counter()
        scores, reward_stats = self.reward.score(
            info["data_source"], texts, info["ground_truth"], info["extra_info"]
        )
        batch.non_tensor_batch["response_text"] = to_object_array(texts)
        # Per-token weight versions (-1 on padding): a partial rollout spans several.
        versions = torch.full_like(batch.batch["responses"], -1)
        for i, traj in enumerate(trajectories):
            versions[i, :len(traj.response_versions)] = torch.tensor(traj.response_versions, dtype=torch.long)
        batch.batch["rollout_param_versions"] = versions
        batch.batch["token_level_scores"] = place_on_last_token(
            torch.as_tensor(scores, dtype=torch.float32), batch.batch["response_mask"]
        )
        # No KL-in-reward penalty in these recipes: the rewards are the scores.
        batch.batch["token_level_rewards"] = batch.batch["token_level_scores"]
        num_tokens = int(batch.batch["response_mask"].sum())
        batch.meta_info.update(
            {
                "timing/gen_s": gen_s,
                "timing/reward_s": time.perf_counter() - t1,
                "rollout/tokens_per_s": num_tokens / max(gen_s, 1e-9),
                "rollout/param_version": self.engine.version,
                # reward/mean, error and timeout counts, and reward/extra/<key>/mean of dict scores.
                **reward_stats,
            }
        )
        return batch

    def generate_sequences(self, prompts: DataProto, mode: str = "train", seed: int = 0) -> DataProto:
        """Sample responses for every prompt (``rollout.n`` of them in ``train`` mode), score
        them, and return the padded batch (request ids and seeds as in ``make_requests``)."""
        t0 = time.perf_counter()
        requests, rows = self.make_requests(prompts, mode, seed)
        trajectories = self.engine.generate(requests)
        return self.assemble(trajectories, prompts, rows, mode, gen_s=time.perf_counter() - t0)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, Any], version: int) -> float:
        t0 = time.perf_counter()
        items = named_tensors.items() if isinstance(named_tensors, dict) else named_tensors
        self.engine.update_weights(items, version)
        return time.perf_counter() - t0

    def version(self) -> int:
        return self.engine.version


def request_seed(base_seed: int, request_id: str, num_response_tokens: int) -> int:
    """The sampling seed of one request: a stable 63-bit hash of (run seed, request id, tokens
    already generated). A partial rollout resumed after ``m`` tokens gets a fresh stream
    (``m`` differs), so its later tokens do not reuse the noise of its first ones."""
    digest = hashlib.blake2b(f"{base_seed}/{request_id}/{num_response_tokens}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def place_on_last_token(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Token-level rewards: each trajectory's scalar score on its last response token."""
    out = torch.zeros_like(response_mask, dtype=torch.float32)
    lengths = response_mask.sum(dim=1).long()
    has_tokens = lengths > 0
    rows = torch.nonzero(has_tokens).squeeze(1)
    out[rows, lengths[rows] - 1] = scores[rows]
    return out
