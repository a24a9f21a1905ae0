"""Parameter sync: actor rank 0's weights -> every rollouter replica, tagged with a version.

trainer/actor --get_weights--> [ParamSync] --update_weights(weights, version)--> rollouters -> engines.
On CPU the weights travel once through the Ray object store (one object, read by every
replica); a GPU backend (NCCL broadcast) slots in behind the same ``sync`` call.
"""

from __future__ import annotations

import time
from typing import Any

import ray


class ParamSync:
    def __init__(self, source: Any, targets: list[Any]):
        self.source, self.targets = source, targets

    def sync(self, version: int) -> dict[str, float]:
        """Push the source's weights as ``version`` and wait until every replica loaded them.

        ``timing/param_sync_s`` is the whole call; ``..._load_s`` the slowest copy into an
        engine; ``..._wait_s`` the longest a replica waited for its engine (without partial
        rollouts an update waits for the running generate call)."""
        t0 = time.perf_counter()
        weights = self.source.get_weights.remote()
        results = ray.get([t.update_weights.remote(weights, version) for t in self.targets])
        return {
            "timing/param_sync_s": time.perf_counter() - t0,
            "timing/param_sync_load_s": max(r["load_s"] for r in results),
            "timing/param_sync_wait_s": max(r["wait_s"] for r in results),
        }
