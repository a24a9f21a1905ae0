"""Benchmark: cost of OPOB's per-trajectory gradient norms relative to a plain training step (trainer/actor).

One micro-batch of B trajectories (prompt P, response R tokens, fp32, CPU) through the tiny/small
Qwen2 presets; each row is the fastest of ``--repeats`` runs, and the last column divides by the
plain step (forward + backward of the bypass loss):
- batched norms only: ``per_trajectory_sq_grad_norms`` (its own forward, backward to the embeddings);
- norms + second backward: one forward, norms with ``retain_graph``, then the weighted loss backward;
- norms + deferred grads: one forward, norms with ``keep_factors``, then ``accumulate_weighted_grads``;
- two-pass: batched norms, then an ordinary training step (any micro-batch split);
- per_traj norms + step: the VCPO release's method (one forward/backward per trajectory).

    PYTHONPATH=. python scripts/bench/vcpo_overhead.py --preset tiny --batch 64 --prompt 32 --response 16
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
from transformers import Qwen2ForCausalLM

from verl.models.char_tokenizer import build_char_tokenizer
from verl.models.presets import round_up_vocab_size, tiny_qwen2_config
from verl.workers.actor.traj_grad_norms import (
    PerTrajectoryGradNorms,
    per_trajectory_sq_grad_norms,
    response_log_probs,
    trajectory_objective,
)
from verl.workers.utils.vcpo import opob_loss_coefficients, opob_surrogate_loss


def fastest(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first calls pay for lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=("tiny", "small"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--response", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = build_char_tokenizer()
    vocab = round_up_vocab_size(len(tokenizer))
    config = tiny_qwen2_config(vocab, args.preset, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    gen = torch.Generator().manual_seed(args.seed)
    batch = args.batch
    input_ids = torch.randint(1, vocab, (batch, args.prompt + args.response), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    position_ids = attention_mask.cumsum(-1) - 1
    responses = input_ids[:, args.prompt:]
    response_mask = torch.ones(batch, args.response)
    coefficients = torch.randn(batch, generator=gen)
    w_trunc = torch.ones(batch)
    lengths = response_mask.sum(-1)

    def forward() -> torch.Tensor:
        return response_log_probs(model, input_ids, attention_mask, position_ids, responses)

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        opob_surrogate_loss(forward(), response_mask, coefficients, w_trunc, batch).backward()

    def norms_only() -> None:
        per_trajectory_sq_grad_norms(model, input_ids, attention_mask, position_ids, responses, response_mask)

    def second_backward() -> None:
        model.zero_grad(set_to_none=True)
        with PerTrajectoryGradNorms(model) as ghost:
            with ghost.capture(attention_mask):
                log_probs = forward()
            ghost.backward(trajectory_objective(log_probs, response_mask), retain_graph=True)
            opob_surrogate_loss(log_probs, response_mask, coefficients, w_trunc, batch).backward()

    def deferred() -> None:
        model.zero_grad(set_to_none=True)
        with PerTrajectoryGradNorms(model) as ghost:
            with ghost.capture(attention_mask):
                log_probs = forward()
            ghost.backward(trajectory_objective(log_probs, response_mask), keep_factors=True)
            ghost.accumulate_weighted_grads(opob_loss_coefficients(coefficients, w_trunc, lengths, batch))

    def per_traj() -> None:
        per_trajectory_sq_grad_norms(model, input_ids, attention_mask, position_ids, responses, response_mask,
                                     method="per_traj")
        train_step()

    rows = {"plain step (fwd + bwd)": fastest(train_step, args.repeats)}
    rows["batched norms only"] = fastest(norms_only, args.repeats)
    rows["norms + second backward"] = fastest(second_backward, args.repeats)
    rows["norms + deferred grads"] = fastest(deferred, args.repeats)
    rows["two-pass (norms, then step)"] = rows["batched norms only"] + rows["plain step (fwd + bwd)"]
    rows["per_traj norms + step"] = fastest(per_traj, max(1, args.repeats // 2))
    params = sum(p.numel() for p in model.parameters())
    print(f"preset={args.preset} ({params / 1e6:.2f}M params) B={batch} T={args.prompt + args.response} "
          f"threads={args.threads}")
    base = rows["plain step (fwd + bwd)"]
    for name, seconds in rows.items():
        print(f"  {name:30s} {seconds:7.3f} s  {seconds / base:5.2f}x")


if __name__ == "__main__":
    main()
