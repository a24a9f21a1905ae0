"""Parameter sync: the actor's weights -> every rollouter replica, tagged with a version.

trainer/actor --[ParamSync: WeightTransport]--> rollouters --update_weights(weights, version)--> engines.
One transport per ``async_training.param_sync_backend``, looked up in ``WEIGHT_TRANSPORTS``:

- ``object_store``: actor rank 0's ``get_weights`` result travels once through Ray's
  (shared-memory) object store and every replica reads it.
- ``collective``: a standalone broadcast group (``verl.utils.weight_channel``) between actor
  rank 0 (channel rank 0) and replicas 1..R, gloo on CPU and NCCL when ``trainer.device=cuda``
  (the NCCL path is the same code and is untested on this CPU-only build). It never touches
  the default process groups of the actor ranks or of vLLM.

Every actor rank is asked for its weights, because a model-parallel actor gathers its shards
collectively; rank 0 (``sources[0]``) is the one whose weights reach the engines.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import ray

from verl.trainer.config import PARAM_SYNC_BACKENDS
from verl.utils.distributed import backend_for_device

# Extra seconds the controller waits beyond the channel's own timeout, so that when a
# broadcast stalls the channel's clearer error (which rank, which step) arrives first.
_CONTROLLER_GRACE_S = 30.0


class WeightTransport(ABC):
    """One way of moving the actor's weights to the rollouters.

    ``open`` once before the first ``push``; ``push(version)`` returns when every replica has
    loaded ``version``, with at least ``timing/param_sync_load_s`` (the slowest copy into an
    engine) and ``timing/param_sync_wait_s`` (the longest a replica waited for its engine);
    ``close`` releases what ``open`` set up. Every wait is bounded by ``timeout_s`` plus a grace.
    """

    name: ClassVar[str]

    def __init__(self, sources: list[Any], targets: list[Any], device: str, timeout_s: float):
        self.sources, self.targets = sources, targets
        self.device, self.timeout_s = device, timeout_s

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def push(self, version: int) -> dict[str, float]: ...

    @abstractmethod
    def close(self) -> None: ...

    def _get(self, refs: list[Any], what: str) -> list[Any]:
        limit_s = self.timeout_s + _CONTROLLER_GRACE_S
        try:
            return ray.get(refs, timeout=limit_s)
        except ray.exceptions.GetTimeoutError as err:
            raise TimeoutError(f"param sync ({self.name}): {what} not done within {limit_s:g} s "
                               f"(async_training.param_sync_timeout_s={self.timeout_s:g} + {_CONTROLLER_GRACE_S:g})") from err


def _load_metrics(replica_results: list[dict[str, float]]) -> dict[str, float]:
    return {
        "timing/param_sync_load_s": max(r["load_s"] for r in replica_results),
        "timing/param_sync_wait_s": max(r["wait_s"] for r in replica_results),
    }


class ObjectStoreTransport(WeightTransport):
    """Rank 0's weights go through Ray's object store; each rollouter's ``update_weights`` reads them."""

    name = "object_store"

    def open(self) -> None:
        """Nothing to set up: every push is a fresh object in the store."""

    def push(self, version: int) -> dict[str, float]:
        exports = [s.get_weights.remote() for s in self.sources]
        loads = [t.update_weights.remote(exports[0], version) for t in self.targets]
        results = self._get(loads + exports[1:], f"object-store sync of version {version}")
        return _load_metrics(results[:len(self.targets)])

    def close(self) -> None:
        """Nothing to release: Ray frees the pushed weights once no replica holds them."""


class CollectiveTransport(WeightTransport):
    """A broadcast channel from actor rank 0 to the rollouters; adds ``timing/param_sync_send_s``
    (rank 0's broadcast) and ``timing/param_sync_recv_s`` (the slowest replica's receive)."""

    name = "collective"

    def __init__(self, sources: list[Any], targets: list[Any], device: str, timeout_s: float):
        super().__init__(sources, targets, device, timeout_s)
        self.channel_backend = backend_for_device(device)
        self._channel_open = False

    def open(self) -> None:
        """Form the channel. Actor rank 0 hosts its store on a port free on its own node; every
        member is asked to join at once, as the rendezvous waits for all."""
        if self._channel_open:
            return
        addr, port = self._get([self.sources[0].weight_channel_address.remote()], "finding a channel port")[0]
        world_size = 1 + len(self.targets)
        joins = [self.sources[0].open_weight_channel.remote(addr, port, world_size, self.channel_backend,
                                                            self.timeout_s)]
        joins += [t.open_weight_channel.remote(addr, port, r + 1, world_size, self.channel_backend, self.timeout_s)
                  for r, t in enumerate(self.targets)]
        self._get(joins, f"opening the {self.channel_backend} weight channel at {addr}:{port}")
        self._channel_open = True

    def push(self, version: int) -> dict[str, float]:
        if not self._channel_open:
            raise RuntimeError("param sync (collective): the weight channel is not open; call ParamSync.open() first")
        # A broadcast completes only when every member takes part: issue the sends and all
        # receives before waiting on any of them.
        sends = [s.send_weights.remote(version) for s in self.sources]
        receives = [t.receive_weights.remote() for t in self.targets]
        out = self._get(receives + sends, f"collective sync of version {version}")
        results, sent = out[:len(self.targets)], out[len(self.targets)]
        got = [int(r["version"]) for r in results]
        if any(v != version for v in got):
            raise RuntimeError(f"param sync sent version {version} but the replicas received {got}")
        return {"timing/param_sync_send_s": sent["broadcast_s"],
                "timing/param_sync_recv_s": max(r["recv_s"] for r in results),
                **_load_metrics(results)}

    def close(self) -> None:
        """Release the actor's end of the channel (each rollouter closes its own on ``stop``)."""
        if self._channel_open:
            self._channel_open = False
            self._get([self.sources[0].close_weight_channel.remote()], "closing the weight channel")


WEIGHT_TRANSPORTS: dict[str, type[WeightTransport]] = {
    transport.name: transport for transport in (ObjectStoreTransport, CollectiveTransport)
}


class ParamSync:
    """Pushes the actor's weights to the rollouters through the transport named by ``backend``;
    ``open`` once before the first ``sync``.

    ``timeout_s`` bounds a channel broadcast and (plus a grace period) the whole ``sync``: a
    missing peer raises ``TimeoutError`` instead of hanging the run.
    """

    def __init__(self, sources: list[Any], targets: list[Any], backend: str = "object_store",
                 device: str = "cpu", timeout_s: float = 600.0):
        if backend not in PARAM_SYNC_BACKENDS:
            raise ValueError(f"param sync backend {backend!r}: expected one of {PARAM_SYNC_BACKENDS}")
        if not sources or not targets:
            raise ValueError("param sync needs at least one actor rank (sources) and one rollouter (targets)")
        self.backend, self.timeout_s = backend, timeout_s
        self.transport = WEIGHT_TRANSPORTS[backend](sources, targets, device, timeout_s)

    def open(self) -> None:
        self.transport.open()

    def sync(self, version: int) -> dict[str, float]:
        """Push the actor's weights as ``version`` and wait until every replica loaded them.

        ``timing/param_sync_s`` is the whole call; the transport adds its own timings."""
        t0 = time.perf_counter()
        metrics = self.transport.push(version)
        metrics["timing/param_sync_s"] = time.perf_counter() - t0
        return metrics

    def close(self) -> None:
        self.transport.close()
