"""Actors: compute log-probs and update the policy (trainer -> actor -> param sync)."""

from verl.workers.actor.config import ActorConfig, OptimConfig, PolicyLossConfig
from verl.workers.actor.dp_actor import DataParallelPPOActor, build_optimizer_and_scheduler

__all__ = [
    "ActorConfig",
    "DataParallelPPOActor",
    "OptimConfig",
    "PolicyLossConfig",
    "build_optimizer_and_scheduler",
]
