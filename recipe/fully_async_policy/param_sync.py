"""Parameter sync: the actor's weights -> every rollouter replica, tagged with a version.

trainer/actor --[ParamSync]--> rollouters --update_weights(weights, version)--> engines.
Two backends (``async_training.param_sync_backend``):

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
from typing import Any

import ray

from verl.trainer.config import PARAM_SYNC_BACKENDS

# Extra seconds the controller waits beyond the channel's own timeout, so that when a
# broadcast stalls the channel's clearer error (which rank, which step) arrives first.
_CONTROLLER_GRACE_S = 30.0


class ParamSync:
    """Pushes the actor's weights to the rollouters; ``open`` once before the first ``sync``.

    ``timeout_s`` bounds a channel broadcast and (plus a grace period) the whole ``sync``: a
    missing peer raises ``TimeoutError`` instead of hanging the run.
    """

    def __init__(self, sources: list[Any], targets: list[Any], backend: str = "object_store",
                 device: str = "cpu", timeout_s: float = 600.0):
        if backend not in PARAM_SYNC_BACKENDS:
            raise ValueError(f"param sync backend {backend!r}: expected one of {PARAM_SYNC_BACKENDS}")
        if not sources or not targets:
            raise ValueError("param sync needs at least one actor rank (sources) and one rollouter (targets)")
        self.sources, self.targets = sources, targets
        self.backend, self.timeout_s = backend, timeout_s
        self.channel_backend = "nccl" if device == "cuda" else "gloo"
        self._channel_open = False

    def open(self) -> None:
        """``collective``: form the channel. Actor rank 0 hosts its store on a port free on its
        own node; every member is asked to join at once, as the rendezvous waits for all."""
        if self.backend != "collective" or self._channel_open:
            return
        addr, port = self._get([self.sources[0].weight_channel_address.remote()], "finding a channel port")[0]
        world_size = 1 + len(self.targets)
        joins = [self.sources[0].open_weight_channel.remote(addr, port, world_size, self.channel_backend,
                                                            self.timeout_s)]
        joins += [t.open_weight_channel.remote(addr, port, r + 1, world_size, self.channel_backend, self.timeout_s)
                  for r, t in enumerate(self.targets)]
        self._get(joins, f"opening the {self.channel_backend} weight channel at {addr}:{port}")
        self._channel_open = True

    def sync(self, version: int) -> dict[str, float]:
        """Push the actor's weights as ``version`` and wait until every replica loaded them.

        ``timing/param_sync_s`` is the whole call; ``..._load_s`` the slowest copy into an
        engine; ``..._wait_s`` the longest a replica waited for its engine (without partial
        rollouts an update waits for the running generate call); with ``collective`` also
        ``..._send_s`` (rank 0's broadcast) and ``..._recv_s`` (the slowest replica's receive)."""
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        if self.backend == "object_store":
            exports = [s.get_weights.remote() for s in self.sources]
            loads = [t.update_weights.remote(exports[0], version) for t in self.targets]
            results = self._get(loads + exports[1:], f"object-store sync of version {version}")[:len(self.targets)]
        else:
            assert self._channel_open, "ParamSync.open() first"
            # A broadcast completes only when every member takes part: issue the sends and all
            # receives before waiting on any of them.
            sends = [s.send_weights.remote(version) for s in self.sources]
            receives = [t.receive_weights.remote() for t in self.targets]
            out = self._get(receives + sends, f"collective sync of version {version}")
            results, sent = out[:len(self.targets)], out[len(self.targets)]
            got = [int(r["version"]) for r in results]
            if any(v != version for v in got):
                raise RuntimeError(f"param sync sent version {version} but the replicas received {got}")
            metrics["timing/param_sync_send_s"] = sent["broadcast_s"]
            metrics["timing/param_sync_recv_s"] = max(r["recv_s"] for r in results)
        metrics.update({
            "timing/param_sync_s": time.perf_counter() - t0,
            "timing/param_sync_load_s": max(r["load_s"] for r in results),
            "timing/param_sync_wait_s": max(r["wait_s"] for r in results),
        })
        return metrics

    def close(self) -> None:
        """Release the actor's end of the channel (each rollouter closes its own on ``stop``)."""
        if self._channel_open:
            self._channel_open = False
            self._get([self.sources[0].close_weight_channel.remote()], "closing the weight channel")

    def _get(self, refs: list[Any], what: str) -> list[Any]:
        try:
            return ray.get(refs, timeout=self.timeout_s + _CONTROLLER_GRACE_S)
        except ray.exceptions.GetTimeoutError as err:
            raise TimeoutError(f"param sync ({self.backend}): {what} not done within "
                               f"{self.timeout_s + _CONTROLLER_GRACE_S:g} s (async_training.queue_timeout_s="
                               f"{self.timeout_s:g} + {_CONTROLLER_GRACE_S:g})") from err
