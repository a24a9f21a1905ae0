"""One rank of the Megatron-Core actor, run as a Ray actor (trainer -> actor -> param sync).

The drop-in counterpart of ``actor_worker.ActorWorker`` for ``actor.strategy=megatron``: the same
constructor and methods, plus ``data_parallel_rank``/``data_parallel_size`` so the controller sends
each rank the batch shard of its data-parallel replica (the TP/CP/PP ranks of one replica receive
the same shard). All ranks form one torch.distributed group (gloo on CPU, NCCL on GPU) on which
Megatron builds its DP x TP x CP x PP groups; every method is called on every rank together.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from verl.models.hf_export import save_hf_model
from verl.models.loader import load_model_and_tokenizer
from verl.protocol import DataProto
from verl.utils.checkpoint import (
    DEFAULT_CHECKPOINT_CONTENTS,
    HF_SUBDIR,
    MegatronRankLayout,
    check_contents,
    megatron_rank_file,
    require_contents,
)
from verl.utils.distributed import backend_for_device, find_free_port, init_process_group
from verl.utils.megatron.parallel import initialize_megatron
from verl.utils.torch_functional import onloaded
from verl.utils.weight_channel import WeightSender
from verl.workers.actor.config import PolicyUpdateConfig
from verl.workers.actor.megatron_actor import (
    MegatronPPOActor,
    build_megatron_model,
    build_megatron_optimizer_and_scheduler,
)
from verl.workers.actor_worker import capture_rng_state, set_rng_state

# Distributed-optimizer and mixed-precision optimizers keep fp32 master copies outside the model.
_MAIN_PARAM_GROUPS = ("fp32_from_float16_groups", "shard_fp32_from_float16_groups")


class MegatronActorWorker(WeightSender):
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
        if not dist.is_initialized():
            # Megatron needs a process group even for one rank.
            port = master_port or (find_free_port() if world_size == 1 else 0)
            init_process_group(backend_for_device(device), rank, world_size, master_addr, port)
        if device == "cuda":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        torch.manual_seed(seed)
        hf_model, self.tokenizer = load_model_and_tokenizer(model_path, dtype="float32")
        self.hf_config = hf_model.config
        parallel = actor_config.megatron
        parallel.validate("actor_rollout_ref.actor.megatron", world_size, self.hf_config)
        self.groups = initialize_megatron(parallel, seed)
        params_dtype = getattr(torch, dtype)
        self.model = build_megatron_model(self.hf_config, parallel, self.groups, hf_model.state_dict(), params_dtype)
        self.ref_actor: MegatronPPOActor | None = None
        self._device = device
        self._ref_offload = actor_config.ref_param_offload and device != "cpu"
        if actor_config.ref_log_prob_micro_batch_size_per_gpu is not None:
            self.ref_actor = _build_reference_actor(actor_config, hf_model, self.groups, params_dtype,
                                                    offload=self._ref_offload)
        del hf_model
        self.optimizer, self.lr_scheduler = build_megatron_optimizer_and_scheduler(
            self.model, actor_config.optim, total_training_steps, parallel.use_distributed_optimizer, params_dtype,
        )
        self.actor = MegatronPPOActor(actor_config, self.model, self.optimizer, self.lr_scheduler,
                                      self.groups, self.hf_config)

    def data_parallel_rank(self) -> int:
        return self.groups.dp_rank

    def data_parallel_size(self) -> int:
        return self.groups.dp_size

    def compute_log_prob(self, data: DataProto) -> DataProto:
        log_probs, _ = self.actor.compute_log_prob(data)
        return DataProto.from_dict(tensors={"old_log_probs": log_probs})

    def compute_ref_log_prob(self, data: DataProto) -> DataProto:
        """``ref_log_prob`` [B, R] under the frozen reference policy; a collective over all ranks."""
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
        """Full HF-named weights on rank 0 (None elsewhere); a collective: call it on EVERY rank."""
        return self.actor.get_weights()

    def save_checkpoint(self, directory: str, save_contents: Sequence[str] = DEFAULT_CHECKPOINT_CONTENTS) -> None:
        """Each rank writes its own file: its model stage/shard, optimizer state, lr schedule and RNG
        (the states ``save_contents`` names, ``extra`` being the schedule and RNG) and its place in
        the parallel layout; rank 0 also writes ``huggingface/`` (config, generation config,
        tokenizer; with ``hf_model`` also the full weights, gathered collectively). A collective.
        Layout: ``verl.utils.checkpoint``."""
        contents = check_contents("actor_rollout_ref.actor.checkpoint.save_contents", save_contents)
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        state: dict[str, Any] = {
            "world_size": self.world_size,
            "layout": MegatronRankLayout.of(self.rank, self.world_size, self.groups).to_dict(),
        }
        if "model" in contents:
            state["model"] = self.model.module.state_dict()
        if "optimizer" in contents:
            state["optimizer"] = [_optimizer_shard_state(o) for o in _chained(self.optimizer)]
        if "extra" in contents:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
            state["rng"] = capture_rng_state()
        torch.save(state, path / megatron_rank_file(self.rank))
        weights = self.get_weights() if "hf_model" in contents else None
        if self.rank == 0:
            if weights is not None:
                # get_weights gives fp32; the export keeps the parameters' own dtype (exact either way).
                params_dtype = next(self.model.module.parameters()).dtype
                weights = {name: value.to(params_dtype) for name, value in weights.items()}
            save_hf_model(path / HF_SUBDIR, self.hf_config, self.tokenizer,
                          _source_generation_config(self.hf_config), weights)
        dist.barrier()

    def load_checkpoint(self, directory: str, load_contents: Sequence[str] = DEFAULT_CHECKPOINT_CONTENTS) -> None:
        """Restore this rank's shard (the states ``load_contents`` names); the checkpoint must come
        from the same parallel layout."""
        contents = check_contents("actor_rollout_ref.actor.checkpoint.load_contents", load_contents)
        file = Path(directory) / megatron_rank_file(self.rank)
        state = torch.load(file, map_location="cpu", weights_only=False)
        if state["world_size"] != self.world_size:
            raise ValueError(f"checkpoint {directory} was written by {state['world_size']} ranks, "
                             f"this actor has {self.world_size}: reload with the same actor.megatron layout")
        if "layout" in state:
            saved = MegatronRankLayout.from_dict(state["layout"])
            here = MegatronRankLayout.of(self.rank, self.world_size, self.groups)
            if (saved.tp_size, saved.pp_size, saved.cp_size) != (here.tp_size, here.pp_size, here.cp_size):
                raise ValueError(f"checkpoint {directory} has tp/pp/cp = {saved.tp_size}/{saved.pp_size}/"
                                 f"{saved.cp_size}, this actor {here.tp_size}/{here.pp_size}/{here.cp_size}: reload "
                                 "with the same actor.megatron layout, or export it (python -m verl.model_merger)")
        require_contents(file, state, contents,
                         {"model": ("model",), "optimizer": ("optimizer",), "extra": ("lr_scheduler", "rng")})
        if "model" in contents:
            self.model.module.load_state_dict(state["model"])
        if "optimizer" in contents:
            for optimizer, shard in zip(_chained(self.optimizer), state["optimizer"]):
                _load_optimizer_shard_state(optimizer, shard)
        if "extra" in contents:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            set_rng_state(state["rng"])

    def export_hf(self, directory: str) -> None:
        """Write the current policy as a Hugging Face checkpoint (model + tokenizer) from rank 0; collective."""
        from transformers import AutoModelForCausalLM

        weights = self.get_weights()
        if weights is None:
            return
        model = AutoModelForCausalLM.from_config(self.hf_config, dtype=torch.float32)
        model.load_state_dict(weights)
        model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)


def _build_reference_actor(actor_config: PolicyUpdateConfig, hf_model: torch.nn.Module, groups: Any,
                           params_dtype: torch.dtype, offload: bool) -> MegatronPPOActor:
    """pi_ref: the starting weights as a bare GPTModel in the actor's layout (no DDP wrapper, no
    gradient buffers, no optimizer), forward only, micro-batched by the reference's own size."""
    from verl.models.mcore.model import build_gpt_model
    from verl.models.mcore.weights import load_hf_weights

    model = build_gpt_model(hf_model.config, actor_config.megatron, groups, params_dtype)
    load_hf_weights(model, hf_model.state_dict(), hf_model.config, groups)
    model.requires_grad_(False)
    model.config.calculate_per_token_loss = True
    if offload:
        model.to("cpu")
    micro = actor_config.ref_log_prob_micro_batch_size_per_gpu
    ref_config = replace(actor_config, ppo_micro_batch_size_per_gpu=micro, log_prob_micro_batch_size_per_gpu=micro)
    return MegatronPPOActor(ref_config, model, None, None, groups, hf_model.config)


def _source_generation_config(hf_config: Any) -> Any:
    """The generation config of the model directory the actor was loaded from (None if it has none):
    the HF model object, which carries it, is not kept after the Megatron model is built."""
    from transformers import GenerationConfig

    source = Path(getattr(hf_config, "_name_or_path", "") or "")
    if not (source / "generation_config.json").is_file():
        return None
    return GenerationConfig.from_pretrained(source, local_files_only=True)


def _chained(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _optimizer_shard_state(optimizer: Any) -> dict[str, Any]:
    """This rank's inner torch optimizer state (over its own shard of parameters) and fp32 master copies."""
    masters = {name: [[p.detach().clone() for p in group] for group in getattr(optimizer, name)]
               for name in _MAIN_PARAM_GROUPS if hasattr(optimizer, name)}
    return {"inner": optimizer.optimizer.state_dict(), "masters": masters}


def _load_optimizer_shard_state(optimizer: Any, state: dict[str, Any]) -> None:
    optimizer.optimizer.load_state_dict(state["inner"])
    with torch.no_grad():
        for name, groups in state["masters"].items():
            for live_group, saved_group in zip(getattr(optimizer, name), groups):
                for live, saved in zip(live_group, saved_group):
                    live.copy_(saved)
