"""Benchmark: param sync (actor -> rollout engines) through Ray's object store vs the collective channel.

Drives the real ``ParamSync`` between Ray actors on one machine: a source holding a weight dict
(the tiny or small preset's state dict, or a synthetic ~50 MB fp32 dict) and 1..R replicas that
copy what they receive into preallocated tensors of the same names (the torch engine's
``update_weights`` does the same ``copy_``). Each cell is the median of ``--repeats`` syncs after
one warm-up; ``sync`` is the controller's whole ``ParamSync.sync`` call.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/bench/param_sync.py --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray
import torch
from transformers import Qwen2ForCausalLM

from verl.models.char_tokenizer import build_char_tokenizer
from verl.models.presets import round_up_vocab_size, tiny_qwen2_config
from verl.trainer.config import load_config
from verl.trainer.fully_async.param_sync import ParamSync
from verl.utils.weight_channel import WeightChannel, WeightSender


def payload(name: str) -> dict[str, torch.Tensor]:
    """The weights one sync moves: a preset's HF state dict (tied embeddings under both names,
    as the actor exports them) or 12 fp32 tensors of 1M elements (~50 MB)."""
    if name == "synthetic50mb":
        g = torch.Generator().manual_seed(0)
        return {f"layer{i}.weight": torch.randn(1024, 1024, generator=g) for i in range(12)}
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_qwen2_config(round_up_vocab_size(len(tokenizer)), name))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Source(WeightSender):
    def __init__(self, weights: dict[str, torch.Tensor]):
        torch.set_num_threads(1)
        self.weights = weights

    def get_weights(self) -> dict[str, torch.Tensor]:
        return self.weights


class Replica:
    """Stands in for a Rollouter: the same two entry points, loading by ``copy_`` into its tensors."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        torch.set_num_threads(1)
        self.live = {k: torch.empty_like(v) for k, v in weights.items()}
        self.channel: WeightChannel | None = None

    def update_weights(self, named_tensors: dict[str, torch.Tensor], version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        for name, tensor in named_tensors.items():
            self.live[name].copy_(tensor)
        return {"load_s": time.perf_counter() - t0, "wait_s": 0.0}

    def open_weight_channel(self, master_addr: str, master_port: int, rank: int, world_size: int,
                            backend: str, timeout_s: float) -> None:
        self.channel = WeightChannel(rank, world_size, master_addr, master_port, backend, timeout_s)

    def receive_weights(self) -> dict[str, float]:
        t0 = time.perf_counter()
        named_tensors, version = self.channel.receive()
        recv_s = time.perf_counter() - t0
        return {**self.update_weights(named_tensors, version), "recv_s": recv_s, "version": float(version)}

    def checksum(self) -> float:
        return float(sum(v.double().sum() for v in self.live.values()))


def measure(weights: dict[str, torch.Tensor], replicas: int, backend: str, repeats: int,
            timeout_s: float) -> dict[str, float]:
    share = 1.0 / (1 + replicas)
    source = ray.remote(num_cpus=share)(Source).remote(weights)
    targets = [ray.remote(num_cpus=share, max_concurrency=2)(Replica).remote(weights) for _ in range(replicas)]
    sync = ParamSync([source], targets, backend=backend, timeout_s=timeout_s)
    t_open = time.perf_counter()
    sync.open()
    open_s = time.perf_counter() - t_open
    runs = [sync.sync(version) for version in range(repeats + 1)][1:]
    expected = float(sum(v.double().sum() for v in weights.values()))
    assert all(abs(c - expected) < 1e-6 * max(1.0, abs(expected)) for c in ray.get([t.checksum.remote() for t in targets]))
    sync.close()
    for actor in [source, *targets]:
        ray.kill(actor)
    out = {"sync_s": statistics.median(r["timing/param_sync_s"] for r in runs),
           "load_s": statistics.median(r["timing/param_sync_load_s"] for r in runs), "open_s": open_s}
    if backend == "collective":
        out["send_s"] = statistics.median(r["timing/param_sync_send_s"] for r in runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payloads", default="tiny,small,synthetic50mb")
    parser.add_argument("--replicas", default="1,2")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--timeout-s", type=float, default=None,
                        help="bound of one sync (default: async_training.param_sync_timeout_s of task=countdown "
                             "method=vcpo)")
    args = parser.parse_args()
    timeout_s = args.timeout_s or load_config(["task=countdown", "method=vcpo"]).async_training.param_sync_timeout_s
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    print("| payload | MB | replicas | object_store sync (ms) | collective sync (ms) | collective broadcast (ms) "
          "| load (ms) | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.payloads.split(","):
        weights = payload(name)
        megabytes = sum(v.numel() * v.element_size() for v in weights.values()) / 1e6
        for replicas in map(int, args.replicas.split(",")):
            store = measure(weights, replicas, "object_store", args.repeats, timeout_s)
            coll = measure(weights, replicas, "collective", args.repeats, timeout_s)
            print(f"| {name} | {megabytes:.1f} | {replicas} | {store['sync_s'] * 1e3:.1f} | {coll['sync_s'] * 1e3:.1f} "
                  f"| {coll['send_s'] * 1e3:.1f} | {store['load_s'] * 1e3:.1f} | {store['sync_s'] / coll['sync_s']:.2f}x |",
                  flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
