"""Reward dispatch by ``data_source``: which rule scores a sample (reward step after rollout)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from verl.utils.reward_score import countdown, gsm8k
from verl.utils.reward_score import math as math_reward

# Exact data_source names (matched case-insensitively) and the scorer family each uses.
DATA_SOURCE_ALIASES: dict[str, str] = {
    "countdown": "countdown",
    "gsm8k": "gsm8k",
    "openai/gsm8k": "gsm8k",
    "math": "math",
    "lighteval/MATH": "math",
    "DigitalLearningGmbH/MATH-lighteval": "math",
    "HuggingFaceH4/MATH-500": "math",
}
# data_source prefixes (lower-case): AIME and DAPO sets have many names (aime2024, dapo_math_17k...).
DATA_SOURCE_PREFIXES: dict[str, str] = {"aime": "math", "dapo": "math"}
_ALIASES_LOWER = {name.lower(): family for name, family in DATA_SOURCE_ALIASES.items()}


def reward_family(data_source: str) -> str:
    """The scorer family (``countdown``, ``gsm8k``, ``math``) of a data source; ValueError if unknown."""
    name = str(data_source).lower()
    if name in _ALIASES_LOWER:
        return _ALIASES_LOWER[name]
    for prefix, family in DATA_SOURCE_PREFIXES.items():
        if name.startswith(prefix):
            return family
    known = list(DATA_SOURCE_ALIASES) + [f"{prefix}*" for prefix in DATA_SOURCE_PREFIXES]
    raise ValueError(f"no reward function for data_source={data_source!r}; known: {', '.join(known)}")


def check_data_sources(sources: Iterable[str]) -> None:
    """Raise ValueError naming the first data source without a reward function."""
    for source in sorted(set(map(str, sources))):
        reward_family(source)


def default_compute_score(data_source: str, solution_str: str, ground_truth: Any,
                          extra_info: dict | None = None) -> float:
    """Score one decoded response with its task's rule; ``extra_info`` is accepted for custom
    scorers with the same signature and unused here."""
    family = reward_family(data_source)
    if family == "countdown":
        return countdown.compute_score(solution_str, ground_truth)
    if family == "gsm8k":
        return gsm8k.compute_score(solution_str, ground_truth)
    return math_reward.compute_score(solution_str, ground_truth)

