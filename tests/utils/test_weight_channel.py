"""The collective weight channel on real gloo processes: exact tensors and versions arrive at
every receiver, mixed dtypes travel bit-exact across several buckets, the default process group
is left alone, and a missing peer raises TimeoutError within the timeout instead of hanging."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from verl.utils.distributed import find_free_port
from verl.utils.weight_channel import WeightChannel, plan_buckets

# Small buckets so one send spans several, including a tensor alone in its own bucket.
BUCKET_BYTES = 4096


def _weights(version: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(version)
    return {
        "model.embed_tokens.weight": torch.randn(40, 16, generator=g),  # 2560 B
        "model.layers.0.mlp.up_proj.weight": torch.randn(32, 48, generator=g).to(torch.bfloat16),  # 3072 B
        "lm_head.weight": torch.randn(2000, generator=g),  # 8000 B > one bucket
        "model.norm.weight": torch.randn(7, generator=g).half(),  # 14 B: forces alignment padding
        "step_counter": torch.tensor(version * 1000 + 3, dtype=torch.int64),  # 0-dim
        "mask": torch.rand(5, 3, generator=g) > 0.5,
        "ids": torch.randint(-(2**31), 2**31 - 1, (9,), generator=g, dtype=torch.int32),
        "transposed": torch.randn(6, 4, generator=g).t(),  # non-contiguous source
    }


def _exchange(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # Each process owns a separate default group (as an actor rank or a vLLM worker would);
    # the channel must work beside it and leave it as it was.
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/default_pg_{rank}", rank=0, world_size=1)
    channel = WeightChannel(rank, world_size, "127.0.0.1", port, "gloo", timeout_s=30, bucket_bytes=BUCKET_BYTES)
    received = []
    for version in (3, 4):
        if rank == 0:
            stats = channel.send(_weights(version), version)
            received.append(stats)
        else:
            tensors, got_version = channel.receive()
            received.append({"version": got_version, "tensors": {k: v.clone() for k, v in tensors.items()}})
    torch.save({"received": received, "default_world": dist.get_world_size()}, f"{out_dir}/rank{rank}.pt")
    channel.close()
    dist.destroy_process_group()


def test_every_receiver_gets_exact_tensors_and_version(tmp_path):
    world_size = 3
    mp.start_processes(_exchange, args=(world_size, find_free_port(), str(tmp_path)), nprocs=world_size,
                       start_method="fork")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    assert all(r["default_world"] == 1 for r in results)
    for version, sent in zip((3, 4), results[0]["received"]):
        expected = _weights(version)
        places, sizes = plan_buckets([t.numel() * t.element_size() for t in expected.values()], BUCKET_BYTES)
        assert len(sizes) >= 3
        # The lone 8000-byte tensor goes out unpadded; every other bucket as planned.
        assert sent["bytes"] == sum(sizes) - (sizes[places[2][0]] - 8000)
        for rank in (1, 2):
            got = results[rank]["received"][version - 3]
            assert got["version"] == version
            assert list(got["tensors"]) == list(expected)
            for name, tensor in expected.items():
                out = got["tensors"][name]
                assert out.dtype == tensor.dtype and out.shape == tensor.shape, name
                assert torch.equal(out, tensor), name


def test_plan_buckets_packs_in_order_aligned_and_bounded():
    places, sizes = plan_buckets([10, 20, 100, 5000, 1], bucket_bytes=128)
    # 10 -> 16 B, 20 -> 32 B, 100 -> 112 B: the third overflows 128 B and opens bucket 1.
    assert places == [(0, 0), (0, 16), (1, 0), (2, 0), (3, 0)]
    assert sizes == [48, 112, 5008, 16]
    assert all(offset % 16 == 0 for _, offset in places)


def _lonely_receiver(rank: int, port: int, out_dir: str) -> None:
    channel = WeightChannel(rank, 2, "127.0.0.1", port, "gloo", timeout_s=1.0)
    if rank == 1:
        t0 = time.perf_counter()
        try:
            channel.receive()
            outcome = "received"
        except TimeoutError as err:
            outcome = f"{time.perf_counter() - t0:.3f} {err}"
        with open(f"{out_dir}/outcome.txt", "w") as f:
            f.write(outcome)
    else:
        time.sleep(1.5)  # joined, but never sends
    channel.close()


def test_receive_without_a_send_raises_timeout(tmp_path):
    mp.start_processes(_lonely_receiver, args=(find_free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    seconds, message = (tmp_path / "outcome.txt").read_text().split(" ", 1)
    assert 0.9 <= float(seconds) < 2.0
    assert "weight channel rank 1 of 2 (gloo)" in message and "timeout_s=1" in message


def test_joining_alone_raises_timeout():
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError, match="joining at 127.0.0.1"):
        WeightChannel(0, 2, "127.0.0.1", find_free_port(), "gloo", timeout_s=1.0)
    assert time.perf_counter() - t0 < 5.0


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="backend 'mpi'"):
        WeightChannel(0, 2, "127.0.0.1", 1, "mpi")
    with pytest.raises(ValueError, match="world_size >= 2"):
        WeightChannel(0, 1, "127.0.0.1", 1, "gloo")
