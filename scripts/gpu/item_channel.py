"""Item 5 of the GPU check: the collective weight channel's GPU paths, as far as one GPU allows.

1. ``loopback``: the NCCL-backend packing and unpacking of CUDA tensors in one process, with the
   process group replaced by an in-memory loopback: buckets, alignment, the as-is path for a tensor
   alone in its bucket, dtype views on the receiving side, all on the device, bit-exact.
2. ``gloo_pair_device_sources``: backend gloo between two processes, the sender's tensors on the GPU
   (the channel packs them into host buckets), checked bit-exact on the receiver.
3. ``nccl_pair``: ``WeightChannel`` with backend NCCL between two processes on the same GPU, two
   sends of mixed-dtype CUDA tensors (the second timed). NCCL may refuse two ranks on one device;
   then the refusal is recorded as the answer (it needs two GPUs) and 1. and 2. cover what remains.
In the CPU dry run gloo stands in for NCCL and the CPU for the device.
"""

from __future__ import annotations

import collections
import os
import queue as queue_mod
import time
import traceback
from datetime import timedelta

import torch
import torch.multiprocessing as mp
from common import Context, Recorder

PAIR_TIMEOUT_S = 40.0
VERSIONS = (6, 7)


def weights(device: str, big_mib: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Mixed dtypes, odd sizes (alignment), a 0-dim and a non-contiguous tensor, and one large bf16
    tensor; generated on ``device`` from ``seed`` so a receiver can regenerate the exact values."""
    g = torch.Generator(device=device).manual_seed(seed)
    big = int(big_mib * 2**20 // 2)
    return {
        "model.embed_tokens.weight": torch.randn(300, 64, generator=g, device=device).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(128, 96, generator=g, device=device),
        "model.norm.weight": torch.randn(7, generator=g, device=device).half(),
        "step": torch.tensor(1234, dtype=torch.int64, device=device),
        "mask": torch.rand(5, 3, generator=g, device=device) > 0.5,
        "transposed": torch.randn(6, 4, generator=g, device=device).t(),
        "model.layers.1.big.weight": torch.randn(big, generator=g, device=device).to(torch.bfloat16),
    }


def mismatches(received: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """Names whose dtype, shape or bits differ (or that are missing or extra)."""
    bad = sorted(set(received) ^ set(expected))
    for name in sorted(set(received) & set(expected)):
        got, want = received[name].cpu(), expected[name].cpu()
        if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
            bad.append(name)
    return bad


def _pair_rank(rank: int, port: int, backend: str, source_device: str, big_mib: float, bucket_bytes: int,
               results) -> None:
    """One end of a two-process channel: rank 0 sends ``VERSIONS``, rank 1 receives and verifies."""
    from verl.utils.weight_channel import WeightChannel

    try:
        if source_device == "cuda":
            torch.cuda.set_device(0)
        channel = WeightChannel(rank, 2, "127.0.0.1", port, backend, timeout_s=PAIR_TIMEOUT_S - 10,
                                bucket_bytes=bucket_bytes)
        expected = weights(source_device, big_mib)
        out: dict = {"sends": []}
        for version in VERSIONS:
            if rank == 0:
                out["sends"].append(channel.send(expected, version))
                if source_device == "cuda":
                    torch.cuda.synchronize()
            else:
                received, got_version = channel.receive()
                out.setdefault("mismatches", []).extend(mismatches(received, expected))
                out.setdefault("versions", []).append(got_version)
                out["receive_device"] = str(next(iter(received.values())).device)
        channel.close()
        results.put((rank, "ok", out))
    except BaseException as err:  # noqa: BLE001 - reported to the parent with the traceback
        results.put((rank, "error", {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}))


def run_pair(backend: str, source_device: str, big_mib: float, bucket_bytes: int) -> dict:
    """Both ends in spawned processes; per rank ("ok" | "error" | "no answer", details) and exit codes."""
    from verl.utils.distributed import find_free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = find_free_port()
    procs = [ctx.Process(target=_pair_rank, args=(r, port, backend, source_device, big_mib, bucket_bytes, results),
                         daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    answers: dict[int, tuple[str, dict]] = {}
    deadline = time.monotonic() + PAIR_TIMEOUT_S
    while len(answers) < 2 and time.monotonic() < deadline:
        try:
            rank, status, payload = results.get(timeout=1.0)
            answers[rank] = (status, payload)
        except queue_mod.Empty:
            if all(not p.is_alive() for p in procs) and results.empty():
                break
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
    return {"ranks": [answers.get(r, ("no answer", {})) for r in range(2)],
            "exit_codes": [p.exitcode for p in procs]}


def _record_pair(rec: Recorder, key: str, outcome: dict, refusal_ok: bool) -> None:
    (status0, sender), (status1, receiver) = outcome["ranks"]
    rec.number(f"{key}_exit_codes", ",".join(map(str, outcome["exit_codes"])))
    if status0 == status1 == "ok":
        last = sender["sends"][-1]
        rec.number(f"{key}_bytes", last["bytes"])
        rec.number(f"{key}_broadcast_s", round(last["broadcast_s"], 4))
        rec.number(f"{key}_gb_per_s", round(last["bytes"] / max(last["broadcast_s"], 1e-9) / 1e9, 2))
        rec.number(f"{key}_receive_device", receiver["receive_device"])
        exact = not receiver["mismatches"] and receiver["versions"] == list(VERSIONS)
        rec.check(f"{key}: tensors and versions arrive bit-exact", float(exact), "== 1", exact)
        return
    errors = " | ".join(p.get("error", s) for s, p in outcome["ranks"] if s != "ok") or "no answer"
    rec.number(f"{key}_error", errors[:500])
    # NCCL's refusal reads "Duplicate GPU detected" where torch passes NCCL's last error on, else only
    # "invalid usage" (NCCL_DEBUG=WARN then prints the reason into the log).
    refused = refusal_ok and any(s in errors.lower() for s in ("duplicate gpu", "invalid usage", "invalidusage"))
    if refused:
        rec.note(f"{key}: NCCL refused two ranks on one GPU ({errors[:160]}); the NCCL broadcast needs two GPUs, "
                 "and the CUDA-tensor paths are covered by the gloo pair and the loopback")
    rec.check(f"{key}: bit-exact, or refused by NCCL for a same-GPU pair", float(refused), "== 1", refused)


class _LoopbackEnd:
    """One end of an in-process stand-in for the channel's process group: rank 0's broadcasts are
    kept (cloned, in order), rank 1's are served from them."""

    def __init__(self, shared: collections.deque, rank: int):
        self.shared, self.rank = shared, rank

    def broadcast(self, tensor: torch.Tensor, root: int, timeout=None):
        if self.rank == root:
            self.shared.append(tensor.clone())
        else:
            tensor.copy_(self.shared.popleft())
        return self

    def wait(self) -> bool:
        return True


def _loopback_channel(rank: int, device: torch.device, bucket_bytes: int, shared: collections.deque):
    """A ``WeightChannel`` end on ``device`` whose group is the loopback (no rendezvous, no peer)."""
    from verl.utils.weight_channel import WeightChannel

    channel = WeightChannel.__new__(WeightChannel)
    channel.rank, channel.world_size = rank, 2
    channel.backend = "nccl" if device.type == "cuda" else "gloo"
    channel.timeout, channel.bucket_bytes, channel.device = timedelta(seconds=30), bucket_bytes, device
    channel._group, channel._store = _LoopbackEnd(shared, rank), None
    return channel


def _loopback(ctx: Context, rec: Recorder, big_mib: float, bucket_bytes: int) -> None:
    shared: collections.deque = collections.deque()
    # With its index, as WeightChannel names it: a tensor alone in its bucket on this very device
    # is sent as it is, without a copy.
    device = torch.device("cuda", torch.cuda.current_device()) if ctx.device.type == "cuda" else ctx.device
    sender = _loopback_channel(0, device, bucket_bytes, shared)
    receiver = _loopback_channel(1, device, bucket_bytes, shared)
    expected = weights(ctx.device.type, big_mib)
    ctx.sync()
    stats = sender.send(expected, version=9)
    ctx.sync()
    rec.number("loopback_broadcasts", len(shared))
    received, version = receiver.receive()
    bad = mismatches(received, expected)
    on_device = all(t.device.type == ctx.device.type for t in received.values())
    rec.number("loopback_bytes", stats["bytes"])
    rec.number("loopback_pack_s", round(stats["pack_s"], 4))
    ok = not bad and version == 9 and on_device and not shared
    rec.check(f"loopback on {ctx.device.type}: packed and unpacked bit-exact, on the device", float(ok), "== 1", ok)
    if bad:
        rec.number("loopback_mismatches", ",".join(bad))


def run(ctx: Context, rec: Recorder) -> None:
    device = ctx.device.type
    big_mib, bucket_bytes = (1.0, 64 << 10) if ctx.dry_run else (512.0, 256 << 20)
    rec.number("big_tensor_mib", big_mib)
    rec.number("bucket_bytes", bucket_bytes)
    backend = "gloo" if ctx.dry_run else "nccl"
    os.environ.setdefault("NCCL_DEBUG", "WARN")  # the spawned ends inherit it: NCCL says why it refuses
    # Cheapest first; the NCCL pair, which may hang until PAIR_TIMEOUT_S, last.
    ctx.log(f"loopback packing on {device}")
    _loopback(ctx, rec, big_mib, bucket_bytes)
    ctx.log(f"gloo pair, sender's tensors on {device}")
    _record_pair(rec, "gloo_pair_device_sources", run_pair("gloo", device, big_mib, bucket_bytes), refusal_ok=False)
    ctx.log(f"{backend} pair, two processes on one {device} device")
    _record_pair(rec, f"{backend}_pair", run_pair(backend, device, big_mib, bucket_bytes), refusal_ok=not ctx.dry_run)
