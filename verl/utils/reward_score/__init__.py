"""Rule-based and custom rewards by ``data_source`` (the reward step between rollout and the queue).

``default_compute_score`` dispatches a sample to its data source's rule, the release's routing
(``dispatch.py`` has the table: veRL's GSM8K and MATH rules, DAPO's +/-1 rule, the release's
Countdown, and our lenient variants under their own names); ``check_data_sources`` lets the
trainer reject unknown data sources at start-up; ``CustomRewardFunction`` is a user's scorer
loaded by file path (``custom_reward_function``); ``RewardManager`` scores whole batches so that
a scorer which raises or hangs costs that sample 0 and a counter, never the run.
"""

from verl.utils.reward_score.custom import CustomRewardFunction
from verl.utils.reward_score.dispatch import (
    DATA_SOURCE_PREFIXES,
    DATA_SOURCES,
    RULES,
    check_data_sources,
    default_compute_score,
    rule_name,
)
from verl.utils.reward_score.manager import RewardManager

__all__ = [
    "DATA_SOURCES",
    "DATA_SOURCE_PREFIXES",
    "RULES",
    "CustomRewardFunction",
    "RewardManager",
    "check_data_sources",
    "default_compute_score",
    "rule_name",
]
