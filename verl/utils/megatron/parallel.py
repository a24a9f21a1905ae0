"""Megatron process groups for the actor: the DP x TP x SP x CP x PP layout and its start-up checks.

Data flow: trainer -> Megatron actor -> ``initialize_megatron`` (this module) -> model builder,
log-prob and gradient-norm code, which all take the ``ParallelGroups`` it returns instead of
reading Megatron's globals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import PositiveInt

from verl.utils.config import ConfigError, config_section
from verl.utils.megatron.cpu_compat import enable_cpu_compat, seed_cpu_rng_tracker


@config_section
class MegatronParallelConfig:
    """``actor_rollout_ref.actor.megatron``: how the actor's ranks are split, world = DP x CP x TP x PP
    (Megatron order tp-cp-dp-pp), and the Megatron actor's precision."""

    tensor_model_parallel_size: PositiveInt = 1
    """TP: each layer's weights split over this many ranks (heads, KV heads and vocab must divide)."""
    pipeline_model_parallel_size: PositiveInt = 1
    """PP: the layers split into this many stages (1F1B schedule)."""
    context_parallel_size: PositiveInt = 1
    """CP: each sequence split over this many ranks."""
    sequence_parallel: bool = False
    """Split activations along the sequence over the TP ranks (needs TP > 1)."""
    use_distributed_optimizer: bool = False
    """Shard the optimizer state over data-parallel ranks."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype of the Megatron model (fp32 main gradients and optimizer state either way)."""
    use_remove_padding: bool = False
    """veRL's packed-sequence switch; this build computes on padded batches (same numbers, more memory)."""
    param_offload: bool = False
    """Offload parameters to host memory between steps (not available in this build)."""
    optimizer_offload: bool = False
    """Offload the optimizer state to host memory (not available in this build)."""
    grad_offload: bool = False
    """Offload gradients to host memory (not available in this build)."""

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one copy of the model's data: tp * pp * cp."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def validate(self, prefix: str, world_size: int | None = None, hf_config: Any = None) -> None:
        tp, pp, cp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size, self.context_parallel_size
        if self.sequence_parallel and tp == 1:
            raise ConfigError(f"{prefix}.sequence_parallel", self.sequence_parallel,
                              f"needs {prefix}.tensor_model_parallel_size > 1 (it splits the sequence over TP ranks)")
        if world_size is not None and world_size % self.model_parallel_size != 0:
            raise ConfigError("trainer.n_gpus_per_node", world_size,
                              f"must be divisible by tp*pp*cp = {tp}*{pp}*{cp} = {self.model_parallel_size}")
        if hf_config is None:
            return
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
        # Vocab-parallel embedding and output layer split the rows evenly; no padding rows are
        # added, so the HF <-> Megatron conversion stays exact.
        for what, count, size_key, size in (
            ("num_attention_heads", hf_config.num_attention_heads, "tensor_model_parallel_size", tp),
            ("num_key_value_heads", num_kv_heads, "tensor_model_parallel_size", tp),
            ("vocab_size", hf_config.vocab_size, "tensor_model_parallel_size", tp),
            ("num_hidden_layers", hf_config.num_hidden_layers, "pipeline_model_parallel_size", pp),
        ):
            if count % size:
                raise ConfigError(f"{prefix}.{size_key}", size,
                                  f"must divide the model's {what}={count} (actor_rollout_ref.model.path)")

    def data_parallel_size(self, world_size: int) -> int:
        """Number of data-parallel replicas (each with its own slice of the batch): world / (tp*pp*cp)."""
        self.validate("actor_rollout_ref.actor.megatron", world_size=world_size)
        return world_size // self.model_parallel_size


@dataclass
class ParallelGroups:
    """This rank's process groups and coordinates; pass it instead of reading Megatron's globals.

    ``dp`` is data parallelism without CP (ranks holding different batch slices and the same
    sequence chunk); ``dp_cp`` includes CP (the group gradients are averaged over); ``mp`` is
    Megatron's model-parallel group (tp x pp); ``embedding`` links the first and last pipeline
    stage when embeddings are tied (None on ranks outside it).
    """

    tp: dist.ProcessGroup
    pp: dist.ProcessGroup
    cp: dist.ProcessGroup
    dp: dist.ProcessGroup
    dp_cp: dist.ProcessGroup
    mp: dist.ProcessGroup
    embedding: dist.ProcessGroup | None
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    tp_size: int
    pp_size: int
    cp_size: int
    dp_size: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def current_parallel_groups() -> ParallelGroups:
    """The groups Megatron's ``initialize_model_parallel`` built for this rank."""
    from megatron.core import parallel_state as mpu

    tp, pp, cp = (mpu.get_tensor_model_parallel_group(), mpu.get_pipeline_model_parallel_group(),
                  mpu.get_context_parallel_group())
    dp = mpu.get_data_parallel_group(with_context_parallel=False)
    embedding = mpu.get_embedding_group(check_initialized=False)
    if embedding is not None and dist.get_rank() not in dist.get_process_group_ranks(embedding):
        embedding = None
    return ParallelGroups(
        tp=tp, pp=pp, cp=cp, dp=dp, dp_cp=mpu.get_data_parallel_group(with_context_parallel=True),
        mp=mpu.get_model_parallel_group(), embedding=embedding,
        tp_rank=dist.get_rank(tp), pp_rank=dist.get_rank(pp), cp_rank=dist.get_rank(cp), dp_rank=dist.get_rank(dp),
        tp_size=dist.get_world_size(tp), pp_size=dist.get_world_size(pp), cp_size=dist.get_world_size(cp),
        dp_size=dist.get_world_size(dp),
    )


def initialize_megatron(cfg: MegatronParallelConfig, seed: int) -> ParallelGroups:
    """Build Megatron's process groups on the already-initialised default group and seed its RNG streams.

    On a CPU machine this first switches on ``enable_cpu_compat``. The model-parallel RNG stream
    gets seed + 2718 + tp_rank and the data-parallel stream ``seed``, as Megatron does, so one seed
    fixes every dropout mask and initialisation.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("initialize_megatron needs torch.distributed initialised first (gloo on CPU, nccl on GPU)")
    cfg.validate("actor.megatron", world_size=dist.get_world_size())
    on_cpu = enable_cpu_compat()
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
    )
    groups = current_parallel_groups()
    if on_cpu:
        seed_cpu_rng_tracker(seed, tp_rank=groups.tp_rank)
    else:
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return groups


def destroy_megatron() -> None:
    """Drop Megatron's process groups (the default group stays); for tests that re-initialise."""
    from megatron.core import parallel_state as mpu

    mpu.destroy_model_parallel()
