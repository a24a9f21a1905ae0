"""The reorder buffer in-process: groups released strictly in start order, whatever order
they arrive in; a consumer blocks until its groups exist; overflow and replays are errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from verl.protocol import DataProto
from verl.trainer.fully_async.reorder_buffer import ReorderBuffer


def _group(j: int) -> DataProto:
    return DataProto.from_dict({"x": torch.full((2, 1), float(j))}, {"uid": np.array([f"g{j}"] * 2, dtype=object)})


def test_release_in_start_order_and_blocking_get():
    buffer = ReorderBuffer(capacity=6)
    for j in (3, 1, 5, 0):
        buffer.put(j, _group(j), {"m": float(j)})
    batch, metrics, stats = buffer.get_groups(0, 2, timeout_s=1.0)
    assert batch.batch["x"].squeeze(1).tolist() == [0, 0, 1, 1] and [m["m"] for m in metrics] == [0, 1]
    assert stats["queue/length_before_get"] == 4 and stats["queue/length_after_get"] == 2
    assert buffer.get_groups(2, 2, timeout_s=0.05) is None  # group 2 missing
    threading.Timer(0.1, lambda: buffer.put(2, _group(2))).start()
    batch, _, _ = buffer.get_groups(2, 2, timeout_s=5.0)
    assert list(batch.non_tensor_batch["uid"]) == ["g2", "g2", "g3", "g3"]


def test_overflow_replay_and_out_of_order_get_raise():
    buffer = ReorderBuffer(capacity=2)
    buffer.put(0, _group(0))
    buffer.put(1, _group(1))
    with pytest.raises(RuntimeError, match="capacity 2"):
        buffer.put(2, _group(2))
    with pytest.raises(ValueError, match="next in order is 0"):
        buffer.get_groups(1, 1, timeout_s=0.01)
    buffer.get_groups(0, 1, timeout_s=0.01)
    with pytest.raises(ValueError, match="already delivered"):
        buffer.put(0, _group(0))
    buffer.reset(10)
    assert buffer.size() == 0 and buffer.describe()["next"] == 10
