"""GSM8K reward as veRL scores it (reward step after rollout); data sources ``openai/gsm8k``, ``gsm8k``.

The rule, restated from veRL's ``verl/utils/reward_score/gsm8k.py`` (the VCPO release uses it
unchanged); the tests in ``tests/utils/reward_score/test_gsm8k.py`` pin each point:

- only the response's last ``CLIP_CHARS`` characters are searched: an answer further back scores 0;
- ``strict``: the last ``#### `` (exactly one space) followed by ``-?[0-9.,]+``, with commas and
  ``$`` removed; ``####42`` has no answer;
- ``flexible``: the last run of ``-?[0-9.,]+`` that is not ``.``; commas are kept;
- the answer is compared with ``ground_truth`` as a string, so ``42.``, ``42.0`` and ``042`` are
  not ``42``, and ``1,234`` (flexible) is not ``1234``.

Our earlier rule, which compares numbers as decimals, is the ``gsm8k_lenient`` data source.
"""

from __future__ import annotations

import re
from typing import Any

CLIP_CHARS = 300

_STRICT_ANSWER = re.compile(r"#### (-?[0-9.,]+)")
_ANY_NUMBER = re.compile(r"-?[0-9.,]+")


def extract_solution(solution_str: str, method: str = "strict") -> str | None:
    """The answer string of a response under ``method`` (see the module docstring), or ``None``."""
    if method not in ("strict", "flexible"):
        raise ValueError(f"gsm8k: unknown extraction method {method!r}; use 'strict' or 'flexible'")
    tail = solution_str[-CLIP_CHARS:]
    if method == "strict":
        found = _STRICT_ANSWER.findall(tail)
        return found[-1].replace(",", "").replace("$", "") if found else None
    found = _ANY_NUMBER.findall(tail)
    valid = [number for number in found if number != "."]
    if valid:
        return valid[-1]
    # veRL's loop ends on the first match when no match is valid: a lone "." then.
    return found[0] if found else None


def reference_answer(answer_field: str) -> str:
    """The ground truth of a GSM8K ``answer`` field: the text after ``####``, commas removed
    (what veRL's GSM8K preprocessing stores)."""
    if "####" not in answer_field:
        raise ValueError(f"gsm8k: answer has no '####' final-answer line: {answer_field[-80:]!r}")
    return answer_field.rsplit("####", 1)[1].strip().replace(",", "")


def compute_score(solution_str: str, ground_truth: Any, method: str = "strict", format_score: float = 0.0,
                  score: float = 1.0) -> float:
    """``score`` if the extracted answer equals ``ground_truth`` as a string, ``format_score`` if an
    answer was found but differs, 0 if none was found."""
    answer = extract_solution(solution_str, method)
    if answer is None:
        return 0.0
    return float(score) if answer == ground_truth else float(format_score)
