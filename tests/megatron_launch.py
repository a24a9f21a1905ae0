"""Run a function on N gloo ranks in spawned processes and collect each rank's return value (multi-process tests)."""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from verl.utils import distributed as vd


def _rank_entry(fn: Callable, rank: int, world_size: int, port: int, results: Any, args: tuple) -> None:
    torch.set_num_threads(1)
    try:
        vd.init_process_group("gloo", rank, world_size, master_port=port, timeout_s=120.0)
        value = fn(rank, world_size, *args)
        # Plain pickle copies tensors by value; the queue's shared-memory path would need this
        # process alive until the parent reads it.
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the traceback
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class _PortTaken(RuntimeError):
    """Another process bound the rendezvous port between choosing it and listening on it."""


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 180.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the results in rank order.

    ``fn`` must be importable (a module-level function). The default process group is
    initialised before ``fn`` runs, one torch thread per rank. If any rank raises, the others
    are killed and a ``RuntimeError`` carries that rank's traceback; so does a timeout. A
    rendezvous port taken by a concurrent test run is retried with a fresh port (3 tries).
    """
    tries_left = 3
    while True:
        try:
            return _launch(fn, world_size, args, timeout_s, vd.find_free_port())
        except _PortTaken:
            tries_left -= 1
            if tries_left == 0:
                raise


def _launch(fn: Callable[..., Any], world_size: int, args: tuple, timeout_s: float, port: int) -> list[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    saved_omp = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        procs = [ctx.Process(target=_rank_entry, args=(fn, rank, world_size, port, results, args), daemon=True)
                 for rank in range(world_size)]
        for p in procs:
            p.start()
    finally:
        if saved_omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_omp
    collected: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(collected) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"ranks {sorted(set(range(world_size)) - set(collected))} "
                                   f"did not finish within {timeout_s} s")
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in collected]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} and no result") from None
                continue
            if status == "error" and "EADDRINUSE" in payload and not collected:
                raise _PortTaken(payload)
            if status == "error":
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{payload}")
            collected[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=10 if len(collected) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    return [collected[r] for r in range(world_size)]
