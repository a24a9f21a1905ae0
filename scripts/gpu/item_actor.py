"""Item 1 of the GPU check: the torch actor's VCPO update on the device equals the CPU fp32 one.

One ``DataParallelPPOActor.update_policy`` (bypass loss + sequence TIS + ESS-scaled lr + group-scope
OPOB with batched per-trajectory norms; plain SGD so the update is the clipped gradient times the
lr) from the same weights and batch: CPU fp32 (the reference), device fp32 (held to ``FP32_ATOL``),
CPU bf16 (how far bf16 rounding alone moves the step) and device bf16 (finite, and no further from
the reference than ``bf16_bound`` of the CPU bf16 deviation).
"""

from __future__ import annotations

import contextlib
import copy

import torch
from common import (
    Context,
    Recorder,
    RecordingSGD,
    add_behaviour_log_probs,
    all_finite,
    bf16_bound,
    build_model,
    cosine,
    flat,
    rel_err,
    rollout_batch,
    set_exact_fp32,
    vcpo_update_config,
)

FP32_ATOL = 1e-5
# bf16 keeps 8 mantissa bits, so the device's bf16 step is held to what bf16 rounding does on the
# CPU to the same step (``bf16_bound``: 3x the CPU bf16 deviation from CPU fp32, or the floor). On
# the CPU, the tiny model's bf16 step gave log-probs within 0.10, gradient cosine 0.998 and ESS
# ratio within 0.02 of fp32.
BF16_FLOORS = {"logprob": 0.01, "grad_1_minus_cos": 1e-3, "ess_ratio": 0.005}
LR, CLIP, NOISE = 0.1, 1.0, 0.3
METRICS = ("actor/ess_ratio", "actor/lr_scale", "actor/grad_norm", "actor/traj_grad_norm_mean",
           "actor/opob_baseline_mean", "actor/pg_loss")


def _update(model: torch.nn.Module, data, device: torch.device, dtype: torch.dtype, batch: int, micro: int,
            math_attention: bool = False) -> dict:
    """Log-probs before, the clipped gradient applied, the parameters after and the metrics of one step.
    ``math_attention``: scaled-dot-product attention by its plain-matmul backend only."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from verl.workers.actor.dp_actor import DataParallelPPOActor

    module = copy.deepcopy(model).to(device=device, dtype=dtype)
    optimizer = RecordingSGD(module.parameters(), lr=LR)
    actor = DataParallelPPOActor(vcpo_update_config(batch, micro, "batched", grad_clip=CLIP, lr=LR), module, optimizer)
    with sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext():
        log_prob, _ = actor.compute_log_prob(data)
        metrics = actor.update_policy(data)
    return {"log_prob": log_prob.float().cpu(), "grads": flat(optimizer.recorded),
            "params": flat(list(module.parameters())), "metrics": metrics}


def run(ctx: Context, rec: Recorder) -> None:
    from verl.workers.actor.dp_actor import DataParallelPPOActor

    set_exact_fp32()
    shape, batch, micro, prompt_len, response_len = ("toy", 8, 4, 6, 10) if ctx.dry_run else ("tiny", 16, 4, 12, 20)
    rec.number("shape", shape)
    rec.number("trajectories", batch)
    model = build_model(shape, seed=0, distinct=True)
    data = rollout_batch(model.config.vocab_size, batch, prompt_len, response_len, group_size=4, seed=1)
    log_prob, _ = DataParallelPPOActor(vcpo_update_config(batch, micro, None), model).compute_log_prob(data)
    data = add_behaviour_log_probs(data, log_prob, NOISE, seed=2)

    ctx.log("CPU fp32 reference update")
    ref = _update(model, data, torch.device("cpu"), torch.float32, batch, micro)
    rec.number("ref_ess_ratio", ref["metrics"]["actor/ess_ratio"])
    rec.number("ref_grad_norm", ref["metrics"]["actor/grad_norm"])
    mask = data.batch["response_mask"] > 0

    ctx.log(f"{ctx.device} fp32 update")
    fp32 = _update(model, data, ctx.device, torch.float32, batch, micro)
    lp_diff = rec.number("fp32_logprob_max_abs_diff", (fp32["log_prob"] - ref["log_prob"])[mask].abs().max())
    param_diff = rec.number("fp32_param_max_abs_diff", (fp32["params"] - ref["params"]).abs().max())
    rec.number("fp32_update_rel_err", rel_err(fp32["params"] - flat(list(model.parameters())),
                                              ref["params"] - flat(list(model.parameters()))))
    metric_diff = max(abs(fp32["metrics"][k] - ref["metrics"][k]) / max(1.0, abs(ref["metrics"][k])) for k in METRICS)
    rec.number("fp32_metric_max_rel_diff", metric_diff)
    rec.check("fp32 log-probs equal CPU fp32", lp_diff, f"<= {FP32_ATOL}", lp_diff <= FP32_ATOL)
    rec.check("fp32 parameters after the step equal CPU fp32", param_diff, f"<= {FP32_ATOL}", param_diff <= FP32_ATOL)
    rec.check("fp32 VCPO metrics equal CPU fp32 (rel.)", metric_diff, f"<= {FP32_ATOL}", metric_diff <= FP32_ATOL)

    # Not a check: if the one above fails, this says whether the fused attention kernels account for it.
    ctx.log(f"{ctx.device} fp32 update, math attention backend only")
    fp32_math = _update(model, data, ctx.device, torch.float32, batch, micro, math_attention=True)
    rec.number("fp32_math_attention_logprob_max_abs_diff", (fp32_math["log_prob"] - ref["log_prob"])[mask].abs().max())
    rec.number("fp32_math_attention_param_max_abs_diff", (fp32_math["params"] - ref["params"]).abs().max())

    ctx.log("CPU bf16 update (what bf16 rounding alone does)")
    levels = _deviations(_update(model, data, torch.device("cpu"), torch.bfloat16, batch, micro), ref, mask)
    for name, value in levels.items():
        rec.number(f"cpu_bf16_{name}", value)
    ctx.log(f"{ctx.device} bf16 update")
    bf16 = _update(model, data, ctx.device, torch.bfloat16, batch, micro)
    finite = all_finite(bf16["metrics"]) and bool(torch.isfinite(bf16["params"]).all())
    rec.check("bf16 metrics and parameters finite", float(finite), "== 1", finite)
    for name, value in _deviations(bf16, ref, mask).items():
        rec.number(f"bf16_{name}", value)
        bound = bf16_bound(levels[name], BF16_FLOORS[name])
        rec.check(f"bf16 {name} vs CPU fp32 within bf16 rounding", value, f"<= {bound:.3g}", value <= bound)
    rec.number("bf16_grad_norm_rel_diff", abs(bf16["metrics"]["actor/grad_norm"] / ref["metrics"]["actor/grad_norm"] - 1))


def _deviations(bf16: dict, ref: dict, mask: torch.Tensor) -> dict[str, float]:
    """How far a bf16 step is from the fp32 reference: log-probs, gradient direction, ESS ratio."""
    return {"logprob": float((bf16["log_prob"] - ref["log_prob"])[mask].abs().max()),
            "grad_1_minus_cos": 1.0 - cosine(bf16["grads"], ref["grads"]),
            "ess_ratio": abs(bf16["metrics"]["actor/ess_ratio"] - ref["metrics"]["actor/ess_ratio"])}
