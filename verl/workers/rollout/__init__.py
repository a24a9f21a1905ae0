"""Rollout engines: turn prompts into trajectories with behaviour log-probs for the rollouter.

Data flow: rollouter -> ``build_rollout_engine(config.rollout, ...)`` -> engine.generate ->
queue; param sync -> engine.update_weights.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel

from verl.utils.config import ConfigError
from verl.workers.rollout.base import GenerationRequest, RolloutEngine, SamplingParams, Trajectory
from verl.workers.rollout.config import RolloutConfig, ValKwargs
from verl.workers.rollout.torch_engine import TorchRolloutEngine

__all__ = ["GenerationRequest", "RolloutConfig", "RolloutEngine", "SamplingParams", "TorchRolloutEngine",
           "Trajectory", "ValKwargs", "build_rollout_engine"]


def build_rollout_engine(config: RolloutConfig, model: PreTrainedModel, tokenizer: Any,
                         prefix: str = "rollout") -> RolloutEngine:
    """The engine named by ``config.name`` over ``model`` (on the model's device)."""
    config.validate(prefix)
    if config.name == "vllm":
        raise ConfigError(f"{prefix}.name", config.name,
                          "the vLLM rollout backend is not installed in this build yet; use 'torch'")
    device = next(model.parameters()).device
    return TorchRolloutEngine(model, tokenizer, max_batch_size=config.max_batch_size,
                              max_seq_len=config.max_seq_len, seed=config.seed, device=device)
