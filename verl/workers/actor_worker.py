"""One data-parallel rank of the torch actor, run as a Ray actor (trainer -> actor -> param sync).

Owns the policy model, optimizer and lr schedule; ranks form one torch.distributed group
(gloo on CPU, NCCL on GPU) so gradients average across them inside ``update_policy``.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from verl.models.loader import load_model_and_tokenizer
from verl.protocol import DataProto
from verl.utils.distributed import backend_for_device, init_process_group
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

    def data_parallel_rank(self) -> int:
        """Every rank of the torch actor is a data-parallel rank (no model parallelism)."""
        return self.rank

    def data_parallel_size(self) -> int:
        return self.world_size

    def compute_log_prob(self, data: DataProto) -> DataProto:
        log_probs, _ = self.actor.compute_log_prob(data)
        return DataProto.from_dict(tensors={"old_log_probs": log_probs})

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

    def save_checkpoint(self, directory: str) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            torch.save(
                {
                    "model": self.module.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
                },
                path / "actor.pt",
            )
        torch.save(capture_rng_state(), path / f"actor_rng_rank{self.rank}.pt")

    def load_checkpoint(self, directory: str) -> None:
        path = Path(directory)
        state = torch.load(path / "actor.pt", map_location="cpu", weights_only=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
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
