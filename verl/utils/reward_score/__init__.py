"""Rule-based rewards by ``data_source`` (the reward step between rollout and the queue).

``default_compute_score`` dispatches a sample to its task's scorer (countdown, gsm8k, math via
math-verify); ``check_data_sources`` lets the trainer reject unknown data sources at start-up;
``RewardManager`` scores whole batches so that a scorer which raises or hangs costs that sample
0 and a counter, never the run.
"""

from verl.utils.reward_score.dispatch import (
    DATA_SOURCE_ALIASES,
    DATA_SOURCE_PREFIXES,
    check_data_sources,
    default_compute_score,
    reward_family,
)
from verl.utils.reward_score.manager import RewardManager

__all__ = [
    "DATA_SOURCE_ALIASES",
    "DATA_SOURCE_PREFIXES",
    "RewardManager",
    "check_data_sources",
    "default_compute_score",
    "reward_family",
]
