"""Rollout engines: turn prompts into trajectories with behaviour log-probs for the rollouter.

Data flow: rollouter -> ``build_rollout_engine(config.rollout, ...)`` -> engine.generate ->
queue; param sync -> engine.update_weights.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel

from verl.workers.rollout.base import GenerationRequest, RolloutEngine, SamplingParams, Trajectory
from verl.workers.rollout.config import RolloutConfig, ValKwargs
from verl.workers.rollout.torch_engine import TorchRolloutEngine

__all__ = ["GenerationRequest", "RolloutConfig", "RolloutEngine", "SamplingParams", "TorchRolloutEngine",
           "Trajectory", "ValKwargs", "build_rollout_engine"]


def build_rollout_engine(config: RolloutConfig, model: PreTrainedModel, tokenizer: Any,
                         prefix: str = "actor_rollout_ref.rollout", model_path: str | None = None) -> RolloutEngine:
    """The engine named by ``config.name`` over ``model`` (on the model's device).

    ``vllm`` loads its own copy of the weights from ``model_path`` (the directory ``model`` came
    from); without one, ``model`` is saved to a temporary directory first. vLLM is imported only
    here, and a missing or mismatched install raises ``VLLMUnavailableError`` naming the fix.
    """
    config.validate(prefix)
    if config.name == "vllm":
        from verl.workers.rollout.vllm_rollout import VLLMRolloutEngine

        if model_path is None:
            return VLLMRolloutEngine.from_model(model, tokenizer, config)
        return VLLMRolloutEngine(model_path, tokenizer, config)
    device = next(model.parameters()).device
    return TorchRolloutEngine(model, tokenizer, max_batch_size=config.max_num_seqs,
                              max_seq_len=config.max_seq_len, seed=config.seed, device=device)
