"""One data-parallel rank of the torch actor, run as a Ray actor (trainer -> actor -> param sync).

Owns the policy model, optimizer and lr schedule, and, when a KL term is on, the frozen reference
policy; ranks form one torch.distributed group (gloo on CPU, NCCL on GPU) so gradients average
across them inside ``update_policy``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from verl.models.hf_export import save_hf_model
from verl.models.loader import load_model_and_tokenizer
from verl.protocol import DataProto
from verl.utils.checkpoint import (
    DEFAULT_CHECKPOINT_CONTENTS,
    HF_SUBDIR,
    TORCH_ACTOR_FILE,
    check_contents,
    require_contents,
)
from verl.utils.distributed import backend_for_device, init_process_group
from verl.utils.torch_functional import onloaded
from verl.utils.weight_channel import WeightSender
from verl.workers.actor.config import PolicyUpdateConfig
from verl.workers.actor.dp_actor import DataParallelPPOActor, build_optimizer_and_scheduler


class ActorWorker(WeightSender):
    def __init__(
        self,
        model_path: str,
        actor_config: PolicyUpdateConfig,
        total_training_steps: int,
        rank: int = 0,
        world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int = 0,
        num_threads: int = 1,
        seed: int = 0,
        dtype: str = "float32",
        device: str = "cpu",
    ):
        torch.set_num_threads(num_threads)
        self.rank, self.world_size = rank, world_size
        if world_size > 1:
            init_process_group(backend_for_device(device), rank, world_size, master_addr, master_port)
        torch.manual_seed(seed)
        self.module, self.tokenizer = load_model_and_tokenizer(model_path, dtype=dtype)
        self.module.to(device)
        self.optimizer, self.lr_scheduler = build_optimizer_and_scheduler(
            self.module, actor_config.optim, total_training_steps
        )
        self.actor = DataParallelPPOActor(
            actor_config, self.module, self.optimizer, self.lr_scheduler,
            process_group=dist.group.WORLD if world_size > 1 else None,
        )
        self.ref_actor: DataParallelPPOActor | None = None
        self._ref_offload = actor_config.ref_param_offload and device != "cpu"
        self._device = device
        if actor_config.ref_log_prob_micro_batch_size_per_gpu is not None:
            # pi_ref = the actor's starting weights, frozen; forward only, so no optimizer.
            ref_module, _ = load_model_and_tokenizer(model_path, dtype=dtype)
            ref_module.requires_grad_(False).eval()
            ref_module.to("cpu" if self._ref_offload else device)
            ref_config = replace(actor_config,
                                 log_prob_micro_batch_size_per_gpu=actor_config.ref_log_prob_micro_batch_size_per_gpu)
            self.ref_actor = DataParallelPPOActor(ref_config, ref_module)

    def data_parallel_rank(self) -> int:
        """Every rank of the torch actor is a data-parallel rank (no model parallelism)."""
        return self.rank

    def data_parallel_size(self) -> int:
        return self.world_size

    def compute_log_prob(self, data: DataProto) -> DataProto:
        log_probs, _ = self.actor.compute_log_prob(data)
        return DataProto.from_dict(tensors={"old_log_probs": log_probs})

    def compute_ref_log_prob(self, data: DataProto) -> DataProto:
        """``ref_log_prob`` [B, R]: the responses' log-probs under the frozen reference policy."""
        if self.ref_actor is None:
            raise RuntimeError("this actor holds no reference policy: it is built only when "
                               "actor_rollout_ref.actor.use_kl_loss or algorithm.use_kl_in_reward is on")
        with onloaded(self.ref_actor.module, self._device, self._ref_offload):
            log_probs, _ = self.ref_actor.compute_log_prob(data)
        return DataProto.from_dict(tensors={"ref_log_prob": log_probs.cpu()})

    def update_policy(self, data: DataProto) -> dict[str, float]:
        t0 = time.perf_counter()
        metrics = self.actor.update_policy(data)
        metrics["timing/update_actor_s"] = time.perf_counter() - t0
        return metrics

    def get_weights(self) -> dict[str, torch.Tensor] | None:
        """Full HF-named weights for the rollout engines on rank 0; None on the other ranks
        (param sync asks every rank, as a model-parallel actor must gather collectively)."""
        if self.rank != 0:
            return None
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def save_checkpoint(self, directory: str, save_contents: Sequence[str] = DEFAULT_CHECKPOINT_CONTENTS) -> None:
        """Rank 0 writes ``actor.pt`` (HF-named ``model``, ``optimizer``, ``lr_scheduler``: the states
        ``save_contents`` names, ``extra`` being the lr schedule and RNG) and ``huggingface/`` (config,
        generation config, tokenizer; with ``hf_model`` also the weights); every rank writes its RNG
        state. Layout: ``verl.utils.checkpoint``."""
        contents = check_contents("actor_rollout_ref.actor.checkpoint.save_contents", save_contents)
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            state: dict[str, Any] = {}
            if "model" in contents:
                state["model"] = self.module.state_dict()
            if "optimizer" in contents:
                state["optimizer"] = self.optimizer.state_dict()
            if "extra" in contents:
                state["lr_scheduler"] = self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None
            torch.save(state, path / TORCH_ACTOR_FILE)
            weights = self.module.state_dict() if "hf_model" in contents else None
            save_hf_model(path / HF_SUBDIR, self.module.config, self.tokenizer,
                          getattr(self.module, "generation_config", None), weights)
        if "extra" in contents:
            torch.save(capture_rng_state(), path / f"actor_rng_rank{self.rank}.pt")

    def load_checkpoint(self, directory: str, load_contents: Sequence[str] = DEFAULT_CHECKPOINT_CONTENTS) -> None:
        """Restore the states ``load_contents`` names from ``save_checkpoint``'s files; a named state
        the checkpoint lacks raises ``ValueError``."""
        contents = check_contents("actor_rollout_ref.actor.checkpoint.load_contents", load_contents)
        path = Path(directory)
        state = torch.load(path / TORCH_ACTOR_FILE, map_location="cpu", weights_only=False)
        require_contents(path / TORCH_ACTOR_FILE, state, contents,
                         {"model": ("model",), "optimizer": ("optimizer",), "extra": ("lr_scheduler",)})
        if "model" in contents:
            self.module.load_state_dict(state["model"])
        if "optimizer" in contents:
            self.optimizer.load_state_dict(state["optimizer"])
        if "extra" in contents:
            if self.lr_scheduler is not None and state["lr_scheduler"] is not None:
                self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            rng_file = path / f"actor_rng_rank{self.rank}.pt"
            if rng_file.exists():
                set_rng_state(torch.load(rng_file, weights_only=False))

    def export_hf(self, directory: str) -> None:
        """Write the current policy as a Hugging Face checkpoint (model + tokenizer)."""
        if self.rank == 0:
            self.module.save_pretrained(directory)
            self.tokenizer.save_pretrained(directory)


def capture_rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
