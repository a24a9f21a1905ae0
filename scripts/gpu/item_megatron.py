"""Item 2 of the GPU check: the Megatron actor on the device at TP = 1 (a one-rank NCCL world, the
local layer spec, since Transformer Engine is absent).

fp32: its log-probs equal an independent HF forward, and one VCPO update (bypass + sequence TIS +
ESS lr + group-scope OPOB, batched norms, SGD) leaves the weights the torch actor's update leaves.
bf16: the same update runs with fp32 main gradients and fp32 master parameters, and its log-probs
and applied gradient are no further from fp32 than ``bf16_bound`` of what bf16 does to the HF model
and the torch actor on the same device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
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
    rollout_batch,
    set_exact_fp32,
    vcpo_update_config,
)

FP32_LOGPROB_ATOL = 1e-5
FP32_WEIGHT_ATOL = 1e-5
# bf16 is held to what bf16 rounding does to the HF model and the torch actor on the same device
# (``bf16_bound``); on the CPU the tiny model gave 0.09 (log-probs) and 1 - cosine 0.002 (gradient).
BF16_FLOORS = {"logprob": 0.01, "grad_1_minus_cos": 1e-3}
LR, CLIP, NOISE = 0.5, 5.0, 0.3
METRICS = ("actor/ess_ratio", "actor/lr_scale", "actor/grad_norm", "actor/traj_grad_norm_mean")


def hf_log_probs(model: torch.nn.Module, data, device: torch.device) -> torch.Tensor:
    """Response log-probs from one full-sequence HF forward (float64 log_softmax), independent of the actors."""
    b = {k: v.to(device) for k, v in data.batch.items()}
    response_len = b["responses"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       position_ids=b["position_ids"]).logits
    logits = logits[:, -response_len - 1:-1].double() / data.meta_info["temperature"]
    return torch.log_softmax(logits, -1).gather(-1, b["responses"][..., None])[..., 0].float().cpu()


def _capture_main_grads(actor, model) -> dict[str, torch.Tensor]:
    """Wrap the optimizer's step so that the DDP main gradients (after the reduction, before the step)
    are copied out; returns the dict they land in (name -> fp32 CPU tensor) plus their dtypes."""
    captured: dict = {}
    step = actor.optimizer.step_with_ready_grads

    def capturing_step():
        captured["dtypes"] = sorted({str(p.main_grad.dtype) for p in model.parameters()})
        captured["grads"] = {n: p.main_grad.detach().float().cpu().clone() for n, p in model.named_parameters()}
        return step()

    actor.optimizer.step_with_ready_grads = capturing_step
    return captured


def _master_param_dtypes(optimizer) -> list[str]:
    """The dtypes of the parameters the optimizer really updates (fp32 copies under bf16)."""
    dtypes = set()
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        groups = getattr(inner, "fp32_from_float16_groups", None) or [g["params"] for g in inner.param_groups]
        dtypes |= {str(p.dtype) for group in groups for p in group}
    return sorted(dtypes)


def _megatron_step(hf, data, groups, parallel, config, dtype: torch.dtype) -> dict:
    from verl.workers.actor.megatron_actor import (
        MegatronPPOActor,
        build_megatron_model,
        build_megatron_optimizer_and_scheduler,
    )

    model = build_megatron_model(hf.config, parallel, groups, hf.state_dict(), dtype)
    optimizer, scheduler = build_megatron_optimizer_and_scheduler(model, config.optim, 1, params_dtype=dtype,
                                                                  optimizer="sgd")
    actor = MegatronPPOActor(config, model, optimizer, scheduler, groups, hf.config)
    captured = _capture_main_grads(actor, model)
    log_prob, _ = actor.compute_log_prob(data)
    metrics = actor.update_policy(data)
    return {"log_prob": log_prob.float().cpu(), "metrics": metrics, "weights": actor.get_weights(),
            "grads": captured.get("grads", {}), "main_grad_dtypes": captured.get("dtypes", []),
            "master_dtypes": _master_param_dtypes(optimizer), "optimizer": type(optimizer).__name__}


def _torch_step(hf, data, config, device: torch.device, dtype: torch.dtype) -> dict:
    """The torch actor's step from the same weights (SGD, gradients recorded) and HF log-probs."""
    import copy

    from verl.workers.actor.dp_actor import DataParallelPPOActor

    model = copy.deepcopy(hf).to(device=device, dtype=dtype)
    log_prob = hf_log_probs(model, data, device)
    optimizer = RecordingSGD(model.parameters(), lr=LR)
    metrics = DataParallelPPOActor(config, model, optimizer).update_policy(data)
    return {"log_prob": log_prob, "metrics": metrics, "grads": flat(optimizer.recorded),
            "weights": {k: v.float().cpu() for k, v in model.state_dict().items()}}


def run(ctx: Context, rec: Recorder) -> None:
    from verl.utils import distributed as vd
    from verl.utils.megatron.parallel import MegatronParallelConfig, destroy_megatron, initialize_megatron
    from verl.workers.actor.dp_actor import DataParallelPPOActor

    set_exact_fp32()
    shape, batch, micro, prompt_len, response_len = ("toy", 8, 4, 6, 10) if ctx.dry_run else ("tiny", 16, 4, 12, 20)
    backend = vd.backend_for_device(ctx.device.type)
    rec.number("shape", shape)
    rec.number("backend", backend)
    hf = build_model(shape, seed=0, distinct=True)
    data = rollout_batch(hf.config.vocab_size, batch, prompt_len, response_len, group_size=4, seed=1)
    log_prob, _ = DataParallelPPOActor(vcpo_update_config(batch, micro, None), hf).compute_log_prob(data)
    data = add_behaviour_log_probs(data, log_prob, NOISE, seed=2)
    config = vcpo_update_config(batch, micro, "batched", grad_clip=CLIP, lr=LR)
    config.strategy = "megatron"
    mask = data.batch["response_mask"] > 0

    ctx.log("torch-actor steps and HF log-probs, fp32 and bf16 (references)")
    ref32 = _torch_step(hf, data, config, ctx.device, torch.float32)
    ref16 = _torch_step(hf, data, config, ctx.device, torch.bfloat16)
    levels = {"logprob": float((ref16["log_prob"] - ref32["log_prob"])[mask].abs().max()),
              "grad_1_minus_cos": 1.0 - cosine(ref16["grads"], ref32["grads"])}
    for name, value in levels.items():
        rec.number(f"hf_bf16_{name}", value)

    ctx.log(f"{backend} world of 1, Megatron TP=1")
    vd.init_process_group(backend, 0, 1, master_port=vd.find_free_port(), timeout_s=120)
    try:
        parallel = MegatronParallelConfig()
        groups = initialize_megatron(parallel, seed=0)
        ctx.log("fp32 Megatron step")
        mc32 = _megatron_step(hf, data, groups, parallel, config, torch.float32)
        lp_diff = rec.number("fp32_logprob_max_abs_diff_vs_hf", (mc32["log_prob"] - ref32["log_prob"])[mask].abs().max())
        keys = sorted(set(ref32["weights"]) & set(mc32["weights"]))
        weight_diff = rec.number("fp32_weight_max_abs_diff_vs_torch_actor",
                                 max(float((mc32["weights"][k] - ref32["weights"][k]).abs().max()) for k in keys))
        metric_diff = rec.number("fp32_metric_max_rel_diff_vs_torch_actor", max(
            abs(mc32["metrics"][k] - ref32["metrics"][k]) / max(1.0, abs(ref32["metrics"][k])) for k in METRICS))
        rec.number("fp32_ess_ratio", mc32["metrics"]["actor/ess_ratio"])
        rec.check("fp32 log-probs equal the HF forward", lp_diff, f"<= {FP32_LOGPROB_ATOL}", lp_diff <= FP32_LOGPROB_ATOL)
        rec.check("fp32 weights after the VCPO step equal the torch actor's", weight_diff, f"<= {FP32_WEIGHT_ATOL}",
                  weight_diff <= FP32_WEIGHT_ATOL)
        rec.check("fp32 VCPO metrics equal the torch actor's (rel.)", metric_diff, f"<= {FP32_WEIGHT_ATOL}",
                  metric_diff <= FP32_WEIGHT_ATOL)

        ctx.log("bf16 Megatron step")
        mc16 = _megatron_step(hf, data, groups, parallel, config, torch.bfloat16)
        rec.number("bf16_optimizer", mc16["optimizer"])
        rec.number("bf16_main_grad_dtypes", ",".join(mc16["main_grad_dtypes"]))
        rec.number("bf16_master_param_dtypes", ",".join(mc16["master_dtypes"]))
        finite = all_finite(mc16["metrics"]) and all(bool(torch.isfinite(w).all()) for w in mc16["weights"].values())
        rec.check("bf16 step: metrics and weights finite", float(finite), "== 1", finite)
        rec.check("bf16 step: main gradients are fp32", float(mc16["main_grad_dtypes"] == ["torch.float32"]),
                  "== 1", mc16["main_grad_dtypes"] == ["torch.float32"])
        rec.check("bf16 step: master parameters are fp32", float(mc16["master_dtypes"] == ["torch.float32"]),
                  "== 1", mc16["master_dtypes"] == ["torch.float32"])
        names = sorted(mc32["grads"])
        deviations = {"logprob": float((mc16["log_prob"] - ref32["log_prob"])[mask].abs().max()),
                      "grad_1_minus_cos": 1.0 - cosine(flat([mc16["grads"][n] for n in names]),
                                                       flat([mc32["grads"][n] for n in names]))}
        for name, value in deviations.items():
            rec.number(f"bf16_{name}", value)
            bound = bf16_bound(levels[name], BF16_FLOORS[name])
            rec.check(f"bf16 {name} vs fp32 within bf16 rounding", value, f"<= {bound:.3g}", value <= bound)
        destroy_megatron()
    finally:
        dist.destroy_process_group()
