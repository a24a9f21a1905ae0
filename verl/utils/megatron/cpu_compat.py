"""CPU stand-ins for the CUDA pieces Megatron-Core assumes, so the Megatron actor runs on gloo.

Data flow: trainer -> Megatron actor -> ``initialize_megatron`` -> ``enable_cpu_compat`` (this
module); nothing here is active on a machine with CUDA. Every patch is one documented line of
behaviour: where Megatron would touch a GPU, the CPU answers instead.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_state = {"enabled": False}
_thread_state = threading.local()

# Megatron names three RNG streams; the model-parallel one is forked around dropout and init.
_DATA_PARALLEL_RNG = "data-parallel-rng"
_MODEL_PARALLEL_RNG = "model-parallel-rng"
_EXPERT_PARALLEL_RNG = "expert-parallel-rng"


class CpuRNGStatesTracker:
    """Megatron's named-RNG-stream tracker, kept on the CPU generator.

    Same interface as ``megatron.core.tensor_parallel.random.CudaRNGStatesTracker`` (``add``,
    ``fork``, ``get_states``, ``set_states``, ``reset``, ``is_initialized``); its CUDA version calls
    ``torch.cuda.get_rng_state``, which has no device to answer on a CPU machine.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._initialized = False

    def is_initialized(self) -> bool:
        return self._initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"rng seed {seed} is already tracked")
        if name in self.states_:
            raise ValueError(f"rng state {name!r} is already tracked")
        self._initialized = True
        self.seeds_.add(seed)
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = _MODEL_PARALLEL_RNG) -> Iterator[None]:
        if name not in self.states_:
            raise KeyError(f"rng state {name!r} was never added")
        outer_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer_state)


def seed_cpu_rng_tracker(seed: int, tp_rank: int, ep_rank: int = 0, etp_rank: int = 0) -> None:
    """Seed the default generator and the three named streams, as ``model_parallel_cuda_manual_seed`` does.

    data-parallel stream = seed (same on every TP rank); model-parallel = seed + 2718 + tp_rank
    (different TP shards draw different dropout masks); expert = seed + 1024 + 100 ep + etp.
    """
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    torch.manual_seed(seed)
    tracker.add(_DATA_PARALLEL_RNG, seed)
    tracker.add(_MODEL_PARALLEL_RNG, seed + 2718 + tp_rank)
    tracker.add(_EXPERT_PARALLEL_RNG, seed + 1024 + 100 * ep_rank + etp_rank)


class SequenceParallelRMSNorm(torch.nn.Module):
    """RMSNorm with HF's exact formula, usable under sequence parallelism: y = w * x / sqrt(mean(x^2) + eps).

    Built by the layer spec in place of Megatron's torch-norm wrapper (which refuses sequence
    parallelism) on every device, because it reproduces ``Qwen2RMSNorm``/``LlamaRMSNorm`` bit for
    bit (fp32 statistics, weight applied after the cast back). Under SP each TP rank sees a
    different slice of the sequence, so its weight gradient is partial: the ``sequence_parallel``
    attribute tells Megatron's ``finalize_model_grads`` to all-reduce it over TP.
    """

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **_: Any) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(hidden_states.dtype)


class _AllGatherSeq(torch.autograd.Function):
    """All-gather along dim 0 over ``group``; backward sums the gradients and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank's queries read the gathered keys, so the key gradient is the sum over ranks;
        # all_reduce + slice is used because gloo has no reduce_scatter.
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.chunk(world, dim=0)[rank], None


def load_balanced_positions(seq_len_local: int, cp_size: int, cp_rank: int, device: torch.device) -> torch.Tensor:
    """Global positions held by ``cp_rank``: chunks r and 2cp-1-r of the 2cp equal chunks of the sequence."""
    chunk = seq_len_local // 2
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second_start = (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([first, torch.arange(second_start, second_start + chunk, device=device)])


class ContextParallelCoreAttention(torch.nn.Module):
    """Causal core attention under context parallelism without Transformer Engine.

    Each CP rank holds its queries for chunks r and 2cp-1-r (Megatron's load-balanced split);
    keys and values are all-gathered over the CP group, put back in sequence order, and
    ``scaled_dot_product_attention`` runs with the causal mask on global positions
    (key position <= query position). Megatron's ``DotProductAttention`` asserts CP needs TE.
    Shapes as Megatron's core attention: q [sq, b, np, hn], k/v [sk, b, ng, hn] -> [sq, b, np*hn].
    """

    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection: Any = None) -> None:
        super().__init__()
        from megatron.core import parallel_state as mpu

        self.config = config
        self.cp_group = mpu.get_context_parallel_group()
        self.cp_size = mpu.get_context_parallel_world_size()
        self.cp_rank = mpu.get_context_parallel_rank()
        tp_size = mpu.get_tensor_model_parallel_world_size()
        self.heads_per_partition = config.num_attention_heads // tp_size
        self.groups_per_partition = config.num_query_groups // tp_size
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def _gather_in_order(self, local: torch.Tensor) -> torch.Tensor:
        # [2cp chunks as gathered: (0, 2cp-1), (1, 2cp-2), ...] -> natural order 0..2cp-1
        gathered = _AllGatherSeq.apply(local, self.cp_group)
        pieces = gathered.chunk(2 * self.cp_size, dim=0)
        order = [None] * (2 * self.cp_size)
        for rank in range(self.cp_size):
            order[rank] = pieces[2 * rank]
            order[2 * self.cp_size - 1 - rank] = pieces[2 * rank + 1]
        return torch.cat(order, dim=0)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: Any = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params: Any = None) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("the CPU context-parallel attention takes neither packed sequences nor an "
                             "attention bias (the actor passes padded, left-aligned rows)")
        key = self._gather_in_order(key)
        value = self._gather_in_order(value)
        sq = query.shape[0]
        q_pos = load_balanced_positions(sq, self.cp_size, self.cp_rank, query.device)
        k_pos = torch.arange(key.shape[0], device=query.device)
        allowed = k_pos[None, :] <= q_pos[:, None]
        repeat = self.heads_per_partition // self.groups_per_partition
        # [s, b, h, d] -> [b, h, s, d]
        q = query.permute(1, 2, 0, 3)
        k = key.repeat_interleave(repeat, dim=2).permute(1, 2, 0, 3)
        v = value.repeat_interleave(repeat, dim=2).permute(1, 2, 0, 3)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                             dropout_p=self.dropout_p if self.training else 0.0,
                                             scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, query.shape[1], self.heads_per_partition * self.head_dim)


_CUDA_TYPE_NAMES = {"torch.FloatTensor", "torch.HalfTensor", "torch.BFloat16Tensor", "torch.DoubleTensor",
                    "torch.IntTensor", "torch.LongTensor", "torch.ByteTensor", "torch.BoolTensor"}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int device means a CUDA ordinal.
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Routes Megatron's CUDA-only tensor calls to the CPU (active only while pushed on a thread)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        # Optimizer and grad clipping assert `param.type() == 'torch.cuda.FloatTensor'`.
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if name in _CUDA_TYPE_NAMES else name
        # `.cuda()` and pinning have no meaning without a device; the tensor already lives on CPU.
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def _patch_cuda_queries() -> None:
    # Buffers in tensor-parallel mappings, the global memory buffer and rotary embeddings are
    # allocated on `torch.cuda.current_device()`; on CPU that is the CPU device.
    torch.cuda.current_device = _cpu_device
    # Pipeline p2p synchronises the stream after batched sends; CPU ops are already complete.
    torch.cuda.synchronize = lambda device=None: None


def _install_cpu_rng_tracker() -> None:
    # Megatron forks its "model-parallel-rng" stream around dropout and weight init.
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def _push_mode_on_this_thread() -> None:
    # Torch function modes are thread-local: each thread that runs Megatron code needs its own.
    if getattr(_thread_state, "mode", None) is None:
        mode = CudaToCpuMode()
        mode.__enter__()
        _thread_state.mode = mode


def cpu_compat_active() -> bool:
    """True once ``enable_cpu_compat`` has patched this process."""
    return _state["enabled"]


def enable_cpu_compat() -> bool:
    """Install the CPU patches once per process (and the device mode once per thread).

    Returns False and changes nothing when CUDA is available. Call it before building a
    Megatron model, in every thread that runs Megatron code.
    """
    if torch.cuda.is_available():
        return False
    if not _state["enabled"]:
        _patch_cuda_queries()
        _install_cpu_rng_tracker()
        _state["enabled"] = True
    _push_mode_on_this_thread()
    return True
