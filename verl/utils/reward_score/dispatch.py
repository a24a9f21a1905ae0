"""Reward dispatch by ``data_source``: which rule scores a sample (reward step after rollout).

Names are matched exactly (case-sensitive), the release's ``default_compute_score`` name for
name, so the release's data give the release's scores:

| data_source | rule | score |
|---|---|---|
| ``openai/gsm8k``, ``gsm8k`` | veRL's GSM8K (``gsm8k.py``) | 1 / 0 |
| ``lighteval/MATH``, ``DigitalLearningGmbH/MATH-lighteval``, ``HuggingFaceH4/MATH-500``, ``math-500``, ``deepscaler``, ``test-math-aime24``, ``test-math-aime25``, ``dapo_filter`` | veRL's MATH string match (``math_reward.py``) | 1 / 0 |
| ``math_dapo``, ``math``, ``math_dapo_reasoning``, ``aime*`` | DAPO (``math_dapo.py``) | +1 / -1, and ``acc`` |
| ``countdown`` | the release's Countdown (``countdown.py``) | 1 / 0 |
| ``countdown_lenient`` | our CPU task's Countdown (``countdown_lenient.py``) | 1 / 0 |
| ``gsm8k_lenient`` | numbers compared as decimals (``gsm8k_lenient.py``) | 1 / 0 |
| ``math_lenient`` | math-verify equivalence (``math.py``) | 1 / 0 |

``gsm8k`` is not one of the release's names; it is our GSM8K preparer's former default and gets
veRL's rule. The release's other sources (NuminaMath, code, geometry3k, Search-R1) need scorers
this build does not include: they fail at start-up, pointing to ``custom_reward_function``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from verl.utils.reward_score import countdown, countdown_lenient, gsm8k, gsm8k_lenient, math_dapo, math_reward
from verl.utils.reward_score import math as math_verify_reward


@dataclass(frozen=True)
class ScoringRule:
    """One rule: ``score(solution_str, ground_truth, extra_info)`` returns a float, or a dict whose
    ``score`` is the reward."""

    score: Callable[[str, Any, dict | None], float | dict]
    in_process: bool
    """Pure string code of bounded time, scored in the caller's process; the others (third-party
    parsers that can hang) go to the reward worker process."""


RULES: dict[str, ScoringRule] = {
    "gsm8k": ScoringRule(lambda text, truth, extra: gsm8k.compute_score(text, truth), in_process=True),
    "math_reward": ScoringRule(lambda text, truth, extra: math_reward.compute_score(text, truth), in_process=True),
    "math_dapo": ScoringRule(lambda text, truth, extra: math_dapo.compute_score(text, truth), in_process=True),
    "countdown": ScoringRule(countdown.compute_score, in_process=True),
    "countdown_lenient": ScoringRule(lambda text, truth, extra: countdown_lenient.compute_score(text, truth),
                                     in_process=True),
    "gsm8k_lenient": ScoringRule(lambda text, truth, extra: gsm8k_lenient.compute_score(text, truth),
                                 in_process=True),
    "math_lenient": ScoringRule(lambda text, truth, extra: math_verify_reward.compute_score(text, truth),
                                in_process=False),
}

# data_source -> rule, exact names first, then prefixes.
DATA_SOURCES: dict[str, str] = {
    "openai/gsm8k": "gsm8k",
    "gsm8k": "gsm8k",
    **dict.fromkeys(["lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500", "math-500",
                     "deepscaler", "test-math-aime24", "test-math-aime25", "dapo_filter"], "math_reward"),
    **dict.fromkeys(["math_dapo", "math", "math_dapo_reasoning"], "math_dapo"),
    "countdown": "countdown",
    "countdown_lenient": "countdown_lenient",
    "gsm8k_lenient": "gsm8k_lenient",
    "math_lenient": "math_lenient",
}
DATA_SOURCE_PREFIXES: dict[str, str] = {"aime": "math_dapo"}

# The release's data sources whose scorers are not in this build, with the scorer it uses.
NOT_INCLUDED: dict[str, str] = {
    **dict.fromkeys(["numina_aops_forum", "numina_synthetic_math", "numina_amc_aime", "numina_synthetic_amc",
                     "numina_cn_k12", "numina_olympiads"], "prime_math"),
    **dict.fromkeys(["codecontests", "apps", "codeforces", "taco"], "prime_code / sandbox_fusion"),
    "hiyouga/geometry3k": "geo3k",
    **dict.fromkeys(["searchR1_nq", "searchR1_triviaqa", "searchR1_popqa", "searchR1_hotpotqa",
                     "searchR1_2wikimultihopqa", "searchR1_musique", "searchR1_bamboogle"], "search_r1_like_qa_em"),
}


def rule_name(data_source: str) -> str:
    """The name of the rule (a key of ``RULES``) that scores ``data_source``; ValueError if none."""
    name = str(data_source)
    if name in DATA_SOURCES:
        return DATA_SOURCES[name]
    for prefix, rule in DATA_SOURCE_PREFIXES.items():
        if name.startswith(prefix):
            return rule
    if name in NOT_INCLUDED:
        raise ValueError(f"data_source={name!r}: the release scores it with its {NOT_INCLUDED[name]} scorer, which "
                         "this build does not include; pass a scorer with custom_reward_function.path")
    known = list(DATA_SOURCES) + [f"{prefix}*" for prefix in DATA_SOURCE_PREFIXES]
    close = difflib.get_close_matches(name, list(DATA_SOURCES), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(map(repr, close))}? names are case-sensitive)" if close else ""
    raise ValueError(f"no reward function for data_source={name!r}{hint}; known: {', '.join(known)}; "
                     "or pass a scorer with custom_reward_function.path")


def check_data_sources(sources: Iterable[str]) -> None:
    """Raise ValueError naming the first data source without a reward function."""
    for source in sorted(set(map(str, sources))):
        rule_name(source)


def scored_in_process(data_source: str) -> bool:
    """Whether ``default_compute_score`` may score this source in the caller's process. Unknown
    sources too: the call raises the unknown-source error there, and it is counted."""
    try:
        return RULES[rule_name(data_source)].in_process
    except ValueError:
        return True


def default_compute_score(data_source: str, solution_str: str, ground_truth: Any,
                          extra_info: dict | None = None) -> float | dict:
    """Score one decoded response with its data source's rule: a float, or (``math_dapo``) a dict
    whose ``score`` is the reward and whose other entries are metrics. Same signature as a
    ``custom_reward_function``."""
    result = RULES[rule_name(data_source)].score(solution_str, ground_truth, extra_info)
    return result if isinstance(result, dict) else float(result)
