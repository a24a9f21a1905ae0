"""A collective weight channel: actor rank 0 broadcasts versioned weights to every rollouter replica.

trainer/actor --[WeightChannel.send]--> rollouters --update_weights--> engines (param sync,
``async_training.param_sync_backend=collective``).

The channel is a STANDALONE process group (its own ``TCPStore`` and ``ProcessGroupGloo`` /
``ProcessGroupNCCL`` object): it never touches the default process group, which the actor's
data-parallel ranks and vLLM's workers each initialise for themselves. Channel rank 0 is the
source (actor rank 0) and ranks 1..R are the rollouter replicas.

One ``send`` is two small broadcasts (header length, then a JSON header with names, shapes,
dtypes, byte offsets and the version) and one broadcast per byte bucket: tensors of every dtype
are laid out as raw bytes in a few flat ``uint8`` buffers, so bf16, fp32 and integer tensors
travel together, bit-exact, in few calls. CPU uses gloo (tested); GPU uses the same code with
backend ``nccl`` and CUDA buffers, which is NOT tested on this CPU-only machine.
"""

from __future__ import annotations

import json
import socket
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl")
# Each tensor starts at a multiple of this many bytes, so a dtype view of the bucket is aligned
# for every element size torch has.
_ALIGN_BYTES = 16
_DEFAULT_BUCKET_BYTES = 256 << 20


def _align(n: int) -> int:
    return (n + _ALIGN_BYTES - 1) // _ALIGN_BYTES * _ALIGN_BYTES


def plan_buckets(sizes: list[int], bucket_bytes: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Greedy, order-preserving packing of byte sizes into buckets of at most ``bucket_bytes``
    (a tensor larger than that gets a bucket of its own). Returns, per tensor, (bucket, offset),
    and the byte size of each bucket; offsets are multiples of 16."""
    places: list[tuple[int, int]] = []
    bucket_sizes: list[int] = []
    for size in sizes:
        aligned = _align(size)
        if not bucket_sizes or (bucket_sizes[-1] and bucket_sizes[-1] + aligned > bucket_bytes):
            bucket_sizes.append(0)
        places.append((len(bucket_sizes) - 1, bucket_sizes[-1]))
        bucket_sizes[-1] += aligned
    return places, bucket_sizes


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"weight channel header names an unknown dtype {name!r}")
    return dtype


def _channel_error(where: str, timeout_s: float, err: RuntimeError) -> Exception:
    """A timeout as ``TimeoutError`` saying what every rank must do; anything else as it came."""
    if "timed out" in str(err).lower():
        return TimeoutError(f"{where}: not done within timeout_s={timeout_s:g} (every rank must join, and every "
                            f"send needs a concurrent receive on each other rank): {err}")
    return RuntimeError(f"{where}: {err}")


def channel_address() -> tuple[str, int]:
    """This node's IP and a TCP port free on it: where a channel's rank 0 can host its store."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


class WeightChannel:
    """One end of a weight broadcast group of ``world_size`` ranks; rank 0 sends, the rest receive.

    Every rank must construct its end within ``timeout_s`` of the others (the store and the
    process group rendezvous block until all have joined), and every ``send`` must be met by a
    ``receive`` on each other rank; a side left alone raises after ``timeout_s``.
    """

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int,
                 backend: str = "gloo", timeout_s: float = 300.0, bucket_bytes: int = _DEFAULT_BUCKET_BYTES):
        if backend not in BACKENDS:
            raise ValueError(f"weight channel backend {backend!r}: expected one of {BACKENDS}")
        if world_size < 2 or not 0 <= rank < world_size:
            raise ValueError(f"weight channel rank {rank} of world_size {world_size}: need world_size >= 2 "
                             "and 0 <= rank < world_size")
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.timeout = timedelta(seconds=timeout_s)
        self.bucket_bytes = bucket_bytes
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        try:
            self._store = dist.TCPStore(master_addr, master_port, world_size, is_master=rank == 0,
                                        timeout=self.timeout, wait_for_workers=True)
            # A prefix keeps this group's rendezvous keys apart should the store ever be shared.
            store = dist.PrefixStore("weight_channel/", self._store)
            if backend == "gloo":
                self._group = dist.ProcessGroupGloo(store, rank, world_size, self.timeout)
            else:
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = self.timeout
                self._group = dist.ProcessGroupNCCL(store, rank, world_size, options)
        except RuntimeError as err:  # DistStoreError and gloo rendezvous failures
            raise _channel_error(f"weight channel rank {rank} of {world_size} ({backend}): joining at "
                                 f"{master_addr}:{master_port}", timeout_s, err) from err

    def _broadcast(self, tensor: torch.Tensor, what: str) -> None:
        try:
            self._group.broadcast(tensor, 0, self.timeout).wait()
        except RuntimeError as err:
            raise _channel_error(f"weight channel rank {self.rank} of {self.world_size} ({self.backend}): {what}",
                                 self.timeout.total_seconds(), err) from err

    def send(self, named_tensors: dict[str, torch.Tensor], version: int) -> dict[str, float]:
        """Broadcast ``named_tensors`` (any dtypes, any device) tagged with ``version`` from rank 0.
        Returns ``{"pack_s", "broadcast_s", "bytes"}``."""
        if self.rank != 0:
            raise RuntimeError(f"weight channel rank {self.rank} cannot send: only rank 0 is the source")
        t0 = time.perf_counter()
        names = list(named_tensors)
        raw = [_as_bytes(named_tensors[n]) for n in names]
        places, bucket_sizes = plan_buckets([r.numel() for r in raw], self.bucket_bytes)
        members = [[i for i, (b, _) in enumerate(places) if b == bucket] for bucket in range(len(bucket_sizes))]
        buckets = []
        for bucket, size in enumerate(bucket_sizes):
            only = members[bucket][0] if len(members[bucket]) == 1 else None
            if only is not None and raw[only].device == self.device:
                # A tensor alone in its bucket goes out as-is (the receiver ignores the padding).
                bucket_sizes[bucket] = raw[only].numel()
                buckets.append(raw[only])
                continue
            buf = torch.empty(size, dtype=torch.uint8, device=self.device)
            for i in members[bucket]:
                buf[places[i][1]:places[i][1] + raw[i].numel()].copy_(raw[i])
            buckets.append(buf)
        # Per tensor: name, dtype, shape, bucket, byte offset, byte count.
        entries = [[name, str(named_tensors[name].dtype), list(named_tensors[name].shape), b, offset, data.numel()]
                   for name, data, (b, offset) in zip(names, raw, places)]
        header = json.dumps({"version": int(version), "entries": entries, "bucket_sizes": bucket_sizes}).encode()
        t1 = time.perf_counter()
        self._broadcast(torch.tensor([len(header)], dtype=torch.int64, device=self.device), "header length")
        self._broadcast(torch.frombuffer(bytearray(header), dtype=torch.uint8).to(self.device), "header")
        for i, bucket in enumerate(buckets):
            self._broadcast(bucket, f"bucket {i + 1}/{len(buckets)}")
        return {"pack_s": t1 - t0, "broadcast_s": time.perf_counter() - t1, "bytes": float(sum(bucket_sizes))}

    def receive(self) -> tuple[dict[str, torch.Tensor], int]:
        """Wait for rank 0's next ``send``; returns the tensors (names, dtypes and shapes as sent,
        on this channel's device, views into the received buckets) and their version."""
        if self.rank == 0:
            raise RuntimeError("weight channel rank 0 is the source: it sends, it does not receive")
        length = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._broadcast(length, "header length")
        header_bytes = torch.empty(int(length.item()), dtype=torch.uint8, device=self.device)
        self._broadcast(header_bytes, "header")
        header = json.loads(header_bytes.cpu().numpy().tobytes())
        buckets = [torch.empty(size, dtype=torch.uint8, device=self.device) for size in header["bucket_sizes"]]
        for i, bucket in enumerate(buckets):
            self._broadcast(bucket, f"bucket {i + 1}/{len(buckets)}")
        out: dict[str, torch.Tensor] = {}
        for name, dtype, shape, bucket, offset, nbytes in header["entries"]:
            out[name] = buckets[bucket][offset:offset + nbytes].view(_dtype_from_name(dtype)).reshape(shape)
        return out, header["version"]

    def close(self) -> None:
        """Release the process group and the store (the other ends may already be gone)."""
        group, self._group = getattr(self, "_group", None), None
        if group is not None and hasattr(group, "shutdown"):
            try:
                group.shutdown()
            except RuntimeError:  # a peer that already left makes shutdown complain; nothing to free
                pass
        self._store = None


class WeightSender:
    """Mixin for an actor worker that owns ``get_weights()`` (full HF-named dict on the rank that
    feeds the engines, ``None`` on the others): gives it the channel source side of param sync.

    ParamSync calls ``open_weight_channel`` on the source rank only and ``send_weights`` on
    every rank, so a model-parallel worker may gather its shards collectively inside
    ``get_weights``.
    """

    _weight_channel: WeightChannel | None = None
    get_weights: Callable[[], dict[str, torch.Tensor] | None]

    def weight_channel_address(self) -> tuple[str, int]:
        return channel_address()

    def open_weight_channel(self, master_addr: str, master_port: int, world_size: int, backend: str,
                            timeout_s: float) -> None:
        self._weight_channel = WeightChannel(0, world_size, master_addr, master_port, backend, timeout_s)

    def send_weights(self, version: int) -> dict[str, float]:
        """Export the weights (every rank) and broadcast them as ``version`` (the source rank)."""
        t0 = time.perf_counter()
        weights = self.get_weights()
        if self._weight_channel is None:
            return {}
        if weights is None:
            raise RuntimeError("send_weights: the weight-channel source rank returned no weights from get_weights()")
        t1 = time.perf_counter()
        return {"get_weights_s": t1 - t0, **self._weight_channel.send(weights, version)}

    def close_weight_channel(self) -> None:
        if self._weight_channel is not None:
            self._weight_channel.close()
            self._weight_channel = None

