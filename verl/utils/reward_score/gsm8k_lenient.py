"""GSM8K reward that compares numbers, not strings (reward step after rollout); data source ``gsm8k_lenient``.

Our own rule, kept as an option beside veRL's (``gsm8k.py``): ``strict`` takes the number after
the last ``####`` (any spaces, so ``####42`` counts); ``flexible`` takes the last number anywhere
in the response. The whole response is searched, and numbers compare as decimals after removing
thousands separators and a trailing period, so ``1,000`` == ``1000`` == ``1000.0`` == ``1000.``.
Where veRL gives 0 for these formats, this rule gives 1.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_STRICT_ANSWER = re.compile(r"#### *(-?[0-9.,]+)")
_ANY_NUMBER = re.compile(r"-?[0-9][0-9.,]*")


def normalize_number(text: str) -> Decimal | None:
    """``text`` as a decimal after dropping commas and a trailing period, or ``None``."""
    cleaned = text.replace(",", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def extract_final_answer(solution_str: str, method: str = "strict") -> str | None:
    """The final-answer number of a response as written (commas kept), or ``None``."""
    if method == "strict":
        matches = _STRICT_ANSWER.findall(solution_str)
    elif method == "flexible":
        matches = _ANY_NUMBER.findall(solution_str)
    else:
        raise ValueError(f"gsm8k: unknown extraction method {method!r}; use 'strict' or 'flexible'")
    return matches[-1] if matches else None


def compute_score(solution_str: str, ground_truth: str, method: str = "strict", format_score: float = 0.0,
                  score: float = 1.0) -> float:
    """``score`` if the extracted number equals ``ground_truth`` numerically, ``format_score`` if a
    number was extracted but differs, 0 if none was found."""
    answer = extract_final_answer(solution_str, method)
    if answer is None:
        return 0.0
    predicted, reference = normalize_number(answer), normalize_number(str(ground_truth))
    if predicted is None or reference is None:
        return format_score
    return score if predicted == reference else format_score
