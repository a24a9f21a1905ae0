"""Item 4 of the GPU check: what VCPO's OPOB costs at a realistic size.

One ``update_policy`` (one AdamW step over B trajectories, bf16 weights, micro-batches of 8) at the
Qwen2.5-0.5B shape (then 1.5B if the budget allows), B = 64 trajectories of 128 prompt + 896
response tokens, three ways:
- ``plain``: the VCPO recipe's loss without VCPO (bypass, sequence TIS);
- ``opob_batched``: ESS-scaled lr + group-scope OPOB, batched per-trajectory norms (the default);
- ``opob_per_traj``: the same with one forward/backward per trajectory for the norms (the release's way).
Reported per variant: step time (after a warm-up step of each on one micro-batch) and peak allocated GPU memory; then the
ratios to ``plain``. Batched OPOB keeps every layer's inputs and output gradients of the whole
mini-batch until the coefficients are known; where a variant runs out of memory, that is recorded
and all three are measured again at B / 2.
"""

from __future__ import annotations

import gc
import time

import torch
from common import (
    Context,
    Recorder,
    add_behaviour_log_probs,
    all_finite,
    build_model,
    peak_memory_gib,
    reset_peak_memory,
    rollout_batch,
    vcpo_update_config,
)

VARIANTS = {"plain": None, "opob_batched": "batched", "opob_per_traj": "per_traj"}


def factor_gib_estimate(config, batch: int, seq_len: int, response_len: int) -> float:
    """Bytes batched OPOB keeps until its coefficients are known, in GiB: fp32 layer inputs (one per
    distinct input: q/k/v share one, gate/up share one) and output gradients of every decoder Linear
    over all positions, the lm_head's input and vocabulary-wide output gradient over the response
    positions, and the embedding's output gradient."""
    h, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = (h + h + h + inter) + (h + kv + kv + h + inter + inter + h)
    values = batch * seq_len * (per_layer * config.num_hidden_layers + h) + batch * (response_len + 1) * (h + vocab)
    return values * 4 / 2**30


def _step(ctx: Context, model, optimizer, data, opob: str | None, micro: int, simulate_oom: bool) -> dict:
    from verl.workers.actor.dp_actor import DataParallelPPOActor

    config = vcpo_update_config(len(data), micro, opob, ess=opob is not None)
    actor = DataParallelPPOActor(config, model, optimizer)
    gc.collect()
    reset_peak_memory(ctx.device)
    before = torch.cuda.memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda" else 0.0
    ctx.sync()
    start = time.perf_counter()
    if simulate_oom:
        raise torch.cuda.OutOfMemoryError("out of memory (simulated in the dry run, to exercise the fallback to B / 2)")
    metrics = actor.update_policy(data)
    ctx.sync()
    return {"step_s": time.perf_counter() - start, "peak_gib": peak_memory_gib(ctx.device),
            "allocated_before_gib": before, "finite": all_finite(metrics)}


def _measure_shape(ctx: Context, rec: Recorder, shape: str, batches: list[int], prompt_len: int,
                   response_len: int, micro: int, group: int) -> None:
    """All variants at the largest B of ``batches`` that fits; recorded as ``{shape}_B{b}_{variant}_*``."""
    from verl.workers.actor.dp_actor import DataParallelPPOActor

    model = build_model(shape, seed=0, device=ctx.device, dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    full = rollout_batch(model.config.vocab_size, batches[0], prompt_len, response_len, group, seed=1, uneven=False)
    log_prob, _ = DataParallelPPOActor(vcpo_update_config(len(full), micro, None), model).compute_log_prob(full)
    full = add_behaviour_log_probs(full, log_prob, noise=0.02, seed=2)  # stale enough for ESS < 1
    del log_prob
    ctx.log(f"{shape}: warm-up, one step of each variant on {micro} trajectories")
    for opob in VARIANTS.values():
        _step(ctx, model, optimizer, full[:micro], opob, micro, False)
    longest = 0.0
    for b in batches:
        rec.number(f"{shape}_B{b}_opob_factor_gib_estimate",
                   round(factor_gib_estimate(model.config, b, prompt_len + response_len, response_len), 3))
        complete = True
        for variant, opob in VARIANTS.items():
            key = f"{shape}_B{b}_{variant}"
            if ctx.remaining_s() < 2 * longest + 10:
                rec.note(f"{key}: not run, {ctx.remaining_s():.0f} s left of the budget")
                return
            ctx.log(f"{key}: one update over {b} x {prompt_len + response_len} tokens")
            try:
                result = _step(ctx, model, optimizer, full[:b], opob, micro,
                               simulate_oom=ctx.dry_run and opob == "batched" and b == batches[0])
            except RuntimeError as err:  # torch.cuda.OutOfMemoryError, or one re-raised from an autograd hook
                if "out of memory" not in str(err).lower():
                    raise
                rec.number(f"{key}_oom", str(err).splitlines()[0][:200])
                complete = False
                continue
            finally:
                model.zero_grad(set_to_none=True)
                gc.collect()
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()
            longest = max(longest, result["step_s"])
            for name in ("step_s", "peak_gib", "allocated_before_gib"):
                rec.number(f"{key}_{name}", round(result[name], 3))
            rec.check(f"{key} metrics finite", float(result["finite"]), "== 1", result["finite"])
            ctx.log(f"{key}: {result['step_s']:.2f} s, peak {result['peak_gib']:.1f} GiB")
        if complete:
            numbers = rec.data["numbers"]
            plain = numbers[f"{shape}_B{b}_plain_step_s"]
            rec.number(f"{shape}_B{b}_batched_over_plain", round(numbers[f"{shape}_B{b}_opob_batched_step_s"] / plain, 3))
            rec.number(f"{shape}_B{b}_per_traj_over_plain",
                       round(numbers[f"{shape}_B{b}_opob_per_traj_step_s"] / plain, 3))
            return
    rec.note(f"{shape}: no B in {batches} fitted every variant")


def run(ctx: Context, rec: Recorder) -> None:
    if ctx.dry_run:
        shapes, batches, prompt_len, response_len, micro, group = ["toy"], [8, 4], 8, 24, 4, 4
    else:
        shapes, batches, prompt_len, response_len, micro, group = (
            ["qwen2.5-0.5b", "qwen2.5-1.5b"], [64, 32, 16], 128, 896, 8, 8)
    rec.number("tokens_per_trajectory", prompt_len + response_len)
    rec.number("micro_batch", micro)
    if ctx.device.type != "cuda":
        rec.note("peak_gib on the CPU is the process's peak RSS (no allocator statistics), not comparable to GPU memory")
    spent = 0.0
    for i, shape in enumerate(shapes):
        started = time.monotonic()
        if i > 0 and ctx.remaining_s() < 3 * spent:
            rec.note(f"{shape}: skipped, {ctx.remaining_s():.0f} s left and the previous shape took {spent:.0f} s")
            break
        _measure_shape(ctx, rec, shape, batches, prompt_len, response_len, micro, group)
        spent = time.monotonic() - started
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    complete = [k for k in rec.data["numbers"] if k.endswith("_batched_over_plain")]
    rec.check("ratios measured for at least one shape", len(complete), ">= 1", len(complete) >= 1)
