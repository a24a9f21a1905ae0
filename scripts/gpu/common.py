"""Shared pieces of the GPU check (``scripts/gpu/check.py``): the item's run context and result
recorder, the model shapes, synthetic rollout batches and the VCPO update configs the items use.

Imports only torch, transformers and ``verl`` modules that need neither Ray, Hydra nor vLLM, so
it runs on a bare GPU machine with the carried wheels (``scripts/gpu/wheels.sh``).
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Qwen2.5 shapes (the published configs; weights are random here, nothing is downloaded).
# ``toy`` stands in for every size in the CPU dry run.
SHAPES: dict[str, dict[str, Any]] = {
    "toy": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512),
    "tiny": dict(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1e6, rms_norm_eps=1e-6),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1e6, rms_norm_eps=1e-6),
}
PAD_ID = 0
TIS_CAP = 2.0


@dataclass
class Context:
    """What an item runs with: the device, whether this is the CPU dry run, and its deadline."""

    item: str
    dry_run: bool
    device: torch.device
    deadline: float  # time.monotonic() by which the item must have finished
    started: float = field(default_factory=time.monotonic)

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, message: str) -> None:
        print(f"[{self.item} {time.monotonic() - self.started:6.1f}s] {message}", flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class Recorder:
    """An item's result, rewritten to ``path`` after every change so a killed item keeps its numbers.

    ``numbers``: measured values (float, int, str or None); ``checks``: named pass/fail comparisons,
    each with the value and the bound it was held to; ``notes``: what a reader must know.
    """

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {"numbers": {}, "checks": [], "notes": []}
        self.flush()

    def number(self, key: str, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)  # JSON has no inf/nan; the string keeps it visible
        self.data["numbers"][key] = value
        self.flush()
        return value

    def check(self, name: str, value: float, bound: str, passed: bool) -> bool:
        self.data["checks"].append({"name": name, "value": _plain(value), "bound": bound, "passed": bool(passed)})
        self.flush()
        return bool(passed)

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def set_exact_fp32() -> None:
    """fp32 matmuls in full precision on CUDA (no TF32), so GPU fp32 can be held to CPU fp32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def qwen2_config(shape: str) -> Any:
    """A Qwen2 config of ``shape`` (``SHAPES``), tied embeddings, no eos (generation runs to its length)."""
    from verl.models.presets import tiny_qwen2_config

    fields = dict(SHAPES[shape])
    vocab = fields.pop("vocab_size")
    eps = fields.pop("rms_norm_eps", 1e-6)
    config = tiny_qwen2_config(vocab, "tiny", tie_word_embeddings=True, rms_norm_eps=eps, pad_token_id=PAD_ID,
                               eos_token_id=None, bos_token_id=None, **fields)
    return config


def build_model(shape: str, seed: int = 0, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, distinct: bool = False) -> torch.nn.Module:
    """A seeded random-init Qwen2ForCausalLM of ``shape``, initialised directly on ``device``
    (a 0.5B model initialises in seconds on a GPU, minutes on a CPU).

    ``distinct``: weights with std 0.1, random biases and norm weights, as in the engine's tests.
    HF's default init (std 0.02, zero biases, unit norms) gives near-uniform logits, where a
    rounding-level difference can flip a greedy argmax, and leaves the bias and norm paths untested.
    """
    from transformers import Qwen2ForCausalLM

    config = qwen2_config(shape)
    if distinct:
        config.initializer_range = 0.1
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
            if distinct:
                with torch.no_grad():
                    for name, param in model.named_parameters():
                        if name.endswith("bias"):
                            param.normal_(0.0, 0.3)
                        elif "norm" in name:
                            param.copy_(1.0 + 0.2 * torch.randn_like(param))
    model = model.to(dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_ID
    return model


def rollout_batch(vocab: int, n: int, prompt_len: int, response_len: int, group_size: int, seed: int,
                  uneven: bool = True) -> Any:
    """A DataProto shaped like rollouts: left-padded prompts, right-padded responses, one reward per
    trajectory on its last token, GRPO advantages per uid group, no behaviour log-probs yet
    (``add_behaviour_log_probs``). ``uneven``: prompt and response lengths vary per row."""
    from verl.protocol import DataProto

    g = torch.Generator().manual_seed(seed)
    prompts = torch.full((n, prompt_len), PAD_ID, dtype=torch.long)
    responses = torch.full((n, response_len), PAD_ID, dtype=torch.long)
    response_mask = torch.zeros(n, response_len)
    for i in range(n):
        p_len = prompt_len - (i * 3) % max(1, prompt_len // 2) if uneven else prompt_len
        r_len = response_len - (i * 5) % max(1, response_len // 2) if uneven else response_len
        prompts[i, prompt_len - p_len:] = torch.randint(1, vocab, (p_len,), generator=g)
        responses[i, :r_len] = torch.randint(1, vocab, (r_len,), generator=g)
        response_mask[i, :r_len] = 1.0
    attention_mask = torch.cat([(prompts != PAD_ID).long(), response_mask.long()], dim=1)
    rewards = (torch.rand(n, generator=g) < 0.5).float()
    token_rewards = torch.zeros(n, response_len)
    token_rewards[torch.arange(n), response_mask.sum(-1).long() - 1] = rewards
    grouped = rewards.view(-1, group_size)
    advantages = ((grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + 1e-6)).view(-1)
    uids = np.array([f"g{i // group_size}" for i in range(n)], dtype=object)
    tensors = {
        "prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": attention_mask, "position_ids": torch.clamp(attention_mask.cumsum(-1) - 1, min=0),
        "response_mask": response_mask, "token_level_rewards": token_rewards,
        "advantages": advantages[:, None] * response_mask,
    }
    return DataProto.from_dict(tensors=tensors, non_tensors={"uid": uids}, meta_info={"temperature": 1.0})


def add_behaviour_log_probs(data: Any, log_probs: torch.Tensor, noise: float, seed: int) -> Any:
    """Stale behaviour log-probs: the model's own plus Gaussian noise, so ESS < 1 and some IS
    weights exceed the TIS cap."""
    g = torch.Generator().manual_seed(seed)
    mask = data.batch["response_mask"]
    data.batch["rollout_log_probs"] = (log_probs.float().cpu() + noise * torch.randn(mask.shape, generator=g)) * mask
    return data


def vcpo_update_config(batch: int, micro: int, opob: str | None, ess: bool = True, grad_clip: float = 1.0,
                       lr: float = 1e-6) -> Any:
    """The VCPO recipe's update: bypass loss, sequence TIS (cap ``TIS_CAP``), ESS-scaled lr when
    ``ess``, group-scope OPOB with ``opob`` per-trajectory norms ("batched" / "per_traj"), or
    none (``opob=None``); one optimizer step over the ``batch`` trajectories."""
    from verl.workers.actor.config import OptimConfig, PolicyLossSpec, PolicyUpdateConfig
    from verl.workers.utils.vcpo import ESSScalingConfig, GradBaseliningConfig

    config = PolicyUpdateConfig(
        ppo_mini_batch_size=batch, ppo_micro_batch_size_per_gpu=micro, log_prob_micro_batch_size_per_gpu=micro,
        grad_clip=grad_clip, grad_norm_method=opob or "batched",
        policy_loss=PolicyLossSpec(mode="bypass", tis_level="sequence", tis_cap=TIS_CAP),
        optim=OptimConfig(lr=lr, weight_decay=0.0),
        ess_scaling=ESSScalingConfig(enable=ess),
        grad_baselining=GradBaseliningConfig(enable=opob is not None, scope="group"),
    )
    config.check_grad_baselining("actor_rollout_ref.actor.grad_baselining.enable")
    return config


class RecordingSGD(torch.optim.SGD):
    """Plain SGD that keeps an fp32 copy of the (clipped) gradients it applies: the update's direction."""

    recorded: list[torch.Tensor] = []

    def step(self, closure=None):
        self.recorded = [p.grad.detach().float().cpu().clone() for group in self.param_groups for p in group["params"]
                         if p.grad is not None]
        return super().step(closure)


def flat(tensors: list[torch.Tensor] | dict[str, torch.Tensor]) -> torch.Tensor:
    values = tensors.values() if isinstance(tensors, dict) else tensors
    return torch.cat([t.detach().float().cpu().reshape(-1) for t in values])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()).clamp(min=1e-30))


# bf16 results are held to the deviation bf16 rounding itself causes on the same model, measured on
# the CPU (or through the HF model) in the same run: at most BF16_FACTOR times it, or the floor.
BF16_FACTOR = 3.0


def bf16_bound(level: float, floor: float) -> float:
    return max(BF16_FACTOR * level, floor)


def all_finite(values: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in values.values() if isinstance(v, float))


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory since the last ``reset_peak_memory``; on CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def environment() -> dict[str, Any]:
    """Versions and the device, for the summary header."""
    import transformers

    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                            "transformers": transformers.__version__, "cuda": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(0)
        info["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as err:  # noqa: BLE001 - a missing NCCL is itself the information
            info["nccl"] = f"unavailable: {err}"
    try:
        from importlib.metadata import version

        info["megatron_core"] = version("megatron-core")
    except Exception as err:  # noqa: BLE001
        info["megatron_core"] = f"unavailable: {err}"
    return info
