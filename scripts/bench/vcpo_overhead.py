"""Benchmark: step time and peak memory of the actor's update with and without VCPO (trainer/actor).

Side by side in one run, through the REAL ``DataParallelPPOActor.update_policy`` (one mini-batch,
one AdamW step, fp32, CPU, one thread):
- ``plain``: ``method=tis``, the VCPO recipe's loss without VCPO (bypass, sequence TIS,
  seq-mean-token-mean; the ESS diagnostics are still computed, as in every run);
- ``vcpo_batched``: ``method=vcpo``, ESS-scaled lr + OPOB (group scope, norm_by_std), batched
  per-trajectory norms with deferred weight gradients (the default);
- ``vcpo_per_traj``: the same with ``actor_rollout_ref.actor.update_policy_per_traj=true``, one
  forward/backward per trajectory for the norms (the release's way).
Each variant's update settings are resolved from ``task=countdown method=<m>`` (``load_config``).
With ``--assembly`` it also times the two ways of forming the OPOB gradient after the batched norms
on one micro-batch (second backward on the retained graph vs deferred weight gradients).

The machine may be shared, so timing interleaves the variants: one subprocess per (preset, B)
builds the model and batch once and runs plain, vcpo_batched, vcpo_per_traj, ... in turn for
``--repeats`` rounds (after one warm-up each); a cell is the fastest round. Peak memory comes from a
fresh subprocess per cell: the growth of the process's peak RSS (``ru_maxrss``) from just before
the first update through two updates, i.e. the extra memory the update needs over the loaded
model and batch (CPU has no allocator statistics; RSS is what the OS had to give).
Batches look like Countdown rollouts: groups of 8, prompts of 10-16 and responses of 4-16 tokens.

    PYTHONPATH=. python scripts/bench/vcpo_overhead.py --presets tiny,small --batches 64,256 --assembly
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Callable

import numpy as np
import torch
from transformers import Qwen2ForCausalLM

from verl.models.char_tokenizer import build_char_tokenizer
from verl.models.presets import round_up_vocab_size, tiny_qwen2_config
from verl.protocol import DataProto
from verl.trainer.config import load_config
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
from verl.workers.actor.config import PolicyUpdateConfig
from verl.workers.actor.dp_actor import DataParallelPPOActor, build_optimizer_and_scheduler
from verl.workers.actor.traj_grad_norms import PerTrajectoryGradNorms, trajectory_objective
from verl.workers.utils.vcpo import opob_loss_coefficients, opob_surrogate_loss

VARIANTS = ("plain", "vcpo_batched", "vcpo_per_traj")
ASSEMBLY = ("assembly_second_backward", "assembly_deferred")
GROUP, PROMPT, RESPONSE = 8, 16, 16


def build(preset: str, batch: int, seed: int) -> tuple[Qwen2ForCausalLM, DataProto]:
    tokenizer = build_char_tokenizer()
    vocab = round_up_vocab_size(len(tokenizer))
    torch.manual_seed(seed)
    config = tiny_qwen2_config(vocab, preset, pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.zeros(batch, PROMPT, dtype=torch.long)
    responses = torch.zeros(batch, RESPONSE, dtype=torch.long)
    response_mask = torch.zeros(batch, RESPONSE)
    for i in range(batch):
        p_len = int(torch.randint(10, PROMPT + 1, (1,), generator=gen))
        r_len = int(torch.randint(4, RESPONSE + 1, (1,), generator=gen))
        prompts[i, PROMPT - p_len:] = torch.randint(1, vocab, (p_len,), generator=gen)
        responses[i, :r_len] = torch.randint(1, vocab, (r_len,), generator=gen)
        response_mask[i, :r_len] = 1.0
    attention_mask = torch.cat([(prompts != 0).long(), response_mask.long()], 1)
    rewards = torch.zeros(batch, RESPONSE)
    rewards[torch.arange(batch), response_mask.sum(-1).long() - 1] = (torch.rand(batch, generator=gen) < 0.4).float()
    uids = np.array([f"g{i // GROUP}" for i in range(batch)], dtype=object)
    data = DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
                 "attention_mask": attention_mask,
                 "position_ids": torch.clamp(attention_mask.cumsum(-1) - 1, min=0),
                 "response_mask": response_mask, "token_level_rewards": rewards},
        non_tensors={"uid": uids}, meta_info={"temperature": 1.0})
    data.batch["advantages"] = compute_grpo_outcome_advantage(rewards, response_mask, uids).advantages
    log_probs, _ = make_actor(model, "plain", batch, batch).compute_log_prob(data)
    noise = 0.05 * torch.randn(log_probs.shape, generator=gen)  # a slightly stale behaviour policy
    data.batch["rollout_log_probs"] = (log_probs + noise) * response_mask
    return model, data


def update_config(variant: str, batch: int, micro: int) -> PolicyUpdateConfig:
    """The actor's update as a run of the Countdown task resolves it: ``method=tis`` for ``plain``
    and ``method=vcpo`` otherwise, one mini-batch of ``batch`` trajectories (``batch / GROUP``
    prompts) per step."""
    prompts = batch // GROUP
    return load_config([
        "task=countdown", f"method={'tis' if variant == 'plain' else 'vcpo'}",
        f"data.train_batch_size={prompts}", f"actor_rollout_ref.rollout.n={GROUP}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={prompts}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro}",
        f"actor_rollout_ref.actor.update_policy_per_traj={str(variant == 'vcpo_per_traj').lower()}",
        "actor_rollout_ref.actor.optim.lr=1e-5",
    ]).policy_update_config()


def make_actor(model: Qwen2ForCausalLM, variant: str, batch: int, micro: int) -> DataParallelPPOActor:
    config = update_config(variant, batch, micro)
    optimizer, scheduler = build_optimizer_and_scheduler(model, config.optim, total_steps=100)
    return DataParallelPPOActor(config, model, optimizer, scheduler)


def assembly_step(model: Qwen2ForCausalLM, data: DataProto, variant: str) -> None:
    """Norms then the OPOB gradient on one micro-batch (random coefficients), without the optimizer."""
    b = data.batch
    mask = b["response_mask"]
    actor = make_actor(model, "plain", len(data), len(data))
    coefficients = torch.linspace(-1.0, 1.0, len(data))
    w_trunc, lengths = torch.ones(len(data)), mask.sum(-1)
    model.zero_grad(set_to_none=True)
    micro = {k: b[k] for k in ("input_ids", "attention_mask", "position_ids", "responses")}
    with PerTrajectoryGradNorms(model) as ghost:
        with ghost.capture(b["attention_mask"]):
            log_probs, _ = actor._forward_micro_batch(micro, 1.0, False)
        if variant == "assembly_deferred":
            ghost.backward(trajectory_objective(log_probs, mask), keep_factors=True)
            ghost.accumulate_weighted_grads(opob_loss_coefficients(coefficients, w_trunc, lengths, len(data)))
        else:
            ghost.backward(trajectory_objective(log_probs, mask), retain_graph=True)
            opob_surrogate_loss(log_probs, mask, coefficients, w_trunc, len(data)).backward()


def step_fn(model: Qwen2ForCausalLM, data: DataProto, variant: str, micro: int) -> Callable[[], object]:
    if variant in ASSEMBLY:
        return lambda: assembly_step(model, data, variant)
    actor = make_actor(model, variant, len(data), micro)
    return lambda: actor.update_policy(data)


def time_worker(preset: str, batch: int, variants: list[str], micro: int, repeats: int, per_traj_repeats: int,
                seed: int) -> dict[str, float]:
    """Fastest update of each variant over interleaved rounds (all share one model and batch)."""
    torch.set_num_threads(1)
    model, data = build(preset, batch, seed)
    steps = {v: step_fn(model, data, v, micro) for v in variants}
    best = {v: float("inf") for v in variants}
    for v in variants:
        steps[v]()  # warm-up
    for round_index in range(repeats):
        for v in variants:
            if v == "vcpo_per_traj" and round_index >= per_traj_repeats:
                continue
            start = time.perf_counter()
            steps[v]()
            best[v] = min(best[v], time.perf_counter() - start)
    best["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    return best


def memory_worker(preset: str, batch: int, variant: str, micro: int, seed: int) -> dict[str, float]:
    torch.set_num_threads(1)
    model, data = build(preset, batch, seed)
    step = step_fn(model, data, variant, micro)
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(2):
        step()
    return {"peak_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib) / 1024}


def run_worker(args: argparse.Namespace, *worker_args: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", *worker_args, "--micro", str(args.micro), "--repeats",
           str(args.repeats), "--per-traj-repeats", str(args.per_traj_repeats), "--seed", str(args.seed)]
    out = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--micro", type=int, default=128, help="ppo_micro_batch_size_per_gpu (capped at the batch)")
    parser.add_argument("--repeats", type=int, default=4, help="interleaved timing rounds")
    parser.add_argument("--per-traj-repeats", type=int, default=1, help="rounds that include vcpo_per_traj")
    parser.add_argument("--assembly", action="store_true", help="also time second backward vs deferred grads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", nargs=4, metavar=("KIND", "PRESET", "BATCH", "VARIANTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, preset, batch, variants = args.worker[0], args.worker[1], int(args.worker[2]), args.worker[3].split(",")
        micro = min(args.micro, batch)
        if kind == "time":
            result = time_worker(preset, batch, variants, micro, args.repeats, args.per_traj_repeats, args.seed)
        else:
            result = memory_worker(preset, batch, variants[0], micro, args.seed)
        print(json.dumps(result))
        return
    if any(int(b) % GROUP for b in args.batches.split(",")):
        parser.error(f"--batches {args.batches}: each must be a multiple of the group size {GROUP}")

    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores); one torch thread per process")
    print("| preset | B | variant | step s | × plain | peak RSS growth MiB |")
    print("|---|---|---|---|---|---|")
    variants = VARIANTS + (ASSEMBLY if args.assembly else ())
    for preset in args.presets.split(","):
        for batch in map(int, args.batches.split(",")):
            times = run_worker(args, "time", preset, str(batch), ",".join(variants))
            name = f"{preset} ({times['params_m']:.1f}M)"
            for variant in variants:
                memory = run_worker(args, "memory", preset, str(batch), variant)["peak_mib"]
                print(f"| {name} | {batch} | {variant} | {times[variant]:.3f} | "
                      f"{times[variant] / times['plain']:.2f} | {memory:.0f} |", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
