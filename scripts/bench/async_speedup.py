"""Benchmark: synchronous (k = 0) against asynchronous (k > 0) training on the CPU testbed (fully-async pipeline).

Rollout and training get separate resources, one core and one torch thread each: at k = 0
each side idles while the other works; at k > 0 they overlap. From the synchronous run's
mean per-step rollout time r (the trainer's wait for its batch) and train time t (the rest
of the step) the ideal overlap speedup is (r + t) / max(r, t); the async runs' steps/s are
compared with it. A second synchronous run gives both cores to each phase in turn (two
torch threads per worker), the strong baseline on a 2-core machine. Every run uses the same
data, model (the cached warm start of the Countdown task), seed and loss: ``task=countdown`` with
``method=sync`` at k = 0 and ``method=tis`` (bypass, sequence TIS C = 8, partial rollouts) at k > 0;
all runs share one Ray cluster in one process.

    PYTHONPATH=. python scripts/bench/async_speedup.py --steps 60 --ks 1,2,4,8
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from verl.trainer.config import TrainerConfig, load_config
from verl.trainer.main_ppo import run
from verl.utils.tracking import read_metrics


def _config(out: Path, name: str, steps: int, val_freq: int, val_samples: int, k: int, threads: int) -> TrainerConfig:
    """The Countdown testbed with method ``sync`` at k = 0 and ``tis`` (the same loss plus partial
    rollouts) at k > 0; greedy validation only, no checkpoints."""
    return load_config([
        "task=countdown", f"method={'sync' if k == 0 else 'tis'}", f"async_training.staleness_threshold={k}",
        f"async_training.num_threads_per_worker={threads}", f"trainer.total_training_steps={steps}",
        f"trainer.test_freq={val_freq}", f"data.val_max_samples={val_samples}", "trainer.save_freq=-1",
        "actor_rollout_ref.rollout.val_kwargs.do_sample=false", "trainer.logger=[jsonl]",
        f"trainer.default_local_dir={out / name}", "trainer.resume_mode=disable",
    ])


def summarize(run_dir: Path, warmup: int) -> dict[str, float]:
    """Steady-state means over steps after ``warmup``: step time, rollout wait r, train time t."""
    records = [r for r in read_metrics(run_dir) if r["step"] > warmup and "timing/step_s" in r]
    step_s = np.array([r["timing/step_s"] for r in records])
    wait_s = np.array([r["timing/queue_wait_s"] for r in records])
    vals = [(r["time/wall_s"], r["val/greedy_acc"]) for r in read_metrics(run_dir) if "val/greedy_acc" in r]
    return {
        "steps_per_s": float(1.0 / step_s.mean()),
        "step_s": float(step_s.mean()),
        "rollout_wait_s": float(wait_s.mean()),
        "train_s": float((step_s - wait_s).mean()),
        "trainer_idle": float(np.mean([r["trainer/idle_ratio"] for r in records])),
        "rollouter_idle": float(np.mean([r["rollouter/idle_ratio"] for r in records])),
        "max_lag": float(max(r["staleness/start_lag_max"] for r in records)),
        "final_acc": vals[-1][1] if vals else float("nan"),
        "val_curve": vals,
    }


def wall_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((wall for wall, acc in curve if acc >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument("--val-freq", type=int, default=20)
    parser.add_argument("--val-samples", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the steady-state means")
    parser.add_argument("--out", default="runs/bench_async_speedup")
    args = parser.parse_args()
    out = Path(args.out)
    plan = [("sync_1thread", 0, 1)] + [(f"async_k{k}", int(k), 1) for k in args.ks.split(",")] + \
        [("sync_2threads", 0, 2)]
    results: dict[str, dict] = {}
    load_before = os.getloadavg()
    for name, k, threads in plan:
        t0 = time.perf_counter()
        run(_config(out, name, args.steps, args.val_freq, args.val_samples, k, threads))
        results[name] = summarize(out / name, args.warmup)
        results[name]["run_wall_s"] = time.perf_counter() - t0
    base = results["sync_1thread"]
    r, t = base["rollout_wait_s"], base["train_s"]
    ideal = (r + t) / max(r, t)
    print(f"\nsync 1-thread: r = {r:.3f} s rollout, t = {t:.3f} s train per step; ideal overlap "
          f"speedup (r + t) / max(r, t) = {ideal:.2f}x; load average before {load_before[0]:.2f}, "
          f"after {os.getloadavg()[0]:.2f}\n")
    print("| run | k | threads/worker | steps/s | speedup vs sync 1-thread | % of ideal | trainer idle | "
          "rollouter idle | max lag | final greedy acc | wall s to reach sync final acc |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, k, threads in plan:
        res = results[name]
        speedup = res["steps_per_s"] / base["steps_per_s"]
        reach = wall_to_reach(res["val_curve"], base["final_acc"])
        print(f"| {name} | {k} | {threads} | {res['steps_per_s']:.2f} | {speedup:.2f}x | "
              f"{100 * speedup / ideal:.0f}% | {res['trainer_idle']:.2f} | {res['rollouter_idle']:.2f} | "
              f"{res['max_lag']:.0f} | {res['final_acc']:.3f} | {'-' if reach is None else f'{reach:.0f}'} |")
    (out / "summary.json").write_text(json.dumps({"ideal_speedup": ideal, "r": r, "t": t, "runs": results},
                                                 indent=1))


if __name__ == "__main__":
    main()
