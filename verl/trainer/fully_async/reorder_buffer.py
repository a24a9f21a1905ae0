"""The reorder buffer between rollouter and trainer: groups keyed by start index, released in start order.

rollouter --put(j, group)--> [ReorderBuffer] --get_groups(first, count)--> trainer.

Groups finish out of order (short responses first, several replicas); releasing them in the
order they were started is what makes the lag bound of ``staleness.py`` hold: group j is
always trained at step floor(j / G) + 1. Runs as a threaded Ray actor so a blocked
``get_groups`` does not stop ``put``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from verl.protocol import DataProto


class ReorderBuffer:
    """Finished groups keyed by start index; at most ``capacity`` held at once.

    Admission control bounds the finished-but-untrained groups by (k + 1) G, so a ``put``
    beyond ``capacity`` means that bound is broken: it raises rather than block, since a
    blocked producer could never deliver the group the trainer is waiting for.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"ReorderBuffer: capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._groups: dict[int, tuple[DataProto, dict[str, float]]] = {}
        self._next = 0  # the next group index the trainer will take
        self._cv = threading.Condition()
        self._max_size = 0

    def reset(self, next_group: int) -> None:
        """Drop everything and expect group ``next_group`` next (resume at a step boundary)."""
        with self._cv:
            self._groups.clear()
            self._next = next_group
            self._cv.notify_all()

    def put(self, group_index: int, group: DataProto, metrics: dict[str, float] | None = None) -> int:
        """Store a finished group; returns how many groups it holds after the put."""
        with self._cv:
            if group_index < self._next or group_index in self._groups:
                raise ValueError(f"ReorderBuffer.put: group {group_index} was already delivered or taken "
                                 f"(next expected {self._next})")
            if len(self._groups) >= self.capacity:
                raise RuntimeError(f"ReorderBuffer.put: {len(self._groups)} groups already held, capacity "
                                   f"{self.capacity}; admission control should make this impossible")
            self._groups[group_index] = (group, dict(metrics or {}))
            self._max_size = max(self._max_size, len(self._groups))
            self._cv.notify_all()
            return len(self._groups)

    def get_groups(self, first: int, count: int, timeout_s: float) -> tuple[DataProto, list[dict[str, float]], dict[str, float]] | None:
        """Take groups ``first .. first + count - 1`` once all are present (``first`` must be the
        next undelivered index); None after ``timeout_s`` without them. Returns the concatenated
        batch (groups in start order), each group's rollout metrics, and the buffer's ``queue/*`` metrics."""
        deadline = time.monotonic() + timeout_s
        wanted = range(first, first + count)
        with self._cv:
            if first != self._next:
                raise ValueError(f"ReorderBuffer.get_groups: asked for group {first}, next in order is {self._next}")
            while not all(j in self._groups for j in wanted):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cv.wait(remaining)
            length_before = len(self._groups)
            taken = [self._groups.pop(j) for j in wanted]
            self._next = first + count
            stats = {"queue/length_before_get": float(length_before), "queue/length_after_get": float(len(self._groups)),
                     "queue/max_length": float(self._max_size)}
            self._max_size = len(self._groups)
        batch = DataProto.concat([g for g, _ in taken])
        return batch, [m for _, m in taken], stats

    def size(self) -> int:
        with self._cv:
            return len(self._groups)

    def describe(self) -> dict[str, Any]:
        with self._cv:
            return {"next": self._next, "held": sorted(self._groups), "capacity": self.capacity}
