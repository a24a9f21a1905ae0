"""DAPO's math reward, +1 right / -1 wrong (reward step after rollout); data sources ``math_dapo``,
``math``, ``math_dapo_reasoning`` and every name starting with ``aime``.

The rule, restated from veRL's ``verl/utils/reward_score/math_dapo.py`` (the release uses it
unchanged); ``tests/utils/reward_score/test_math_dapo.py`` pins it case by case:

- Only the response's last ``CLIP_CHARS`` characters count.
- The prediction is the text after the last ``Answer:`` (any case, spaces around the colon) up
  to the end of its line; ``[INVALID]`` when there is none. A ``\\boxed{}`` answer without an
  ``Answer:`` line is therefore wrong.
- Prediction and ground truth are normalized (``normalize_final_answer``, Minerva's rule): the
  text after the last ``=``; articles, ``\\$``, spaces, listed unit words and TeX spacing
  dropped; ``\\text{}``, ``\\textbf{}``, ``\\overline{}``, ``\\boxed{}`` unwrapped; ``\\fracab`` and
  ``\\sqrta`` braced; ``$`` dropped; thousands separators dropped from whole numbers.
- ``score`` is 1.0 if they are equal, else -1.0; the result is a dict ``{"score", "acc", "pred"}``
  (``acc`` the bool, ``pred`` the normalized prediction), whose ``acc`` the reward manager logs
  as ``reward/extra/acc/mean``.

``strict_box_verify=True`` is DAPO's other mode: the last ``\\boxed{...}`` within the last 100
characters must equal the ground truth exactly.
"""

from __future__ import annotations

import re
from typing import Any

from verl.utils.reward_score.latex import balanced_brace_end

CLIP_CHARS = 300
STRICT_BOX_CHARS = 100

_ANSWER_LINE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")

# Applied in this order, each to the whole string (so "an " and "a " go from inside words too).
_SUBSTITUTIONS = (("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
                  (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"))
# Removed in this order after the substitutions.
_REMOVED = ("square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
            "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
            "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
            "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;",
            ",\\!", "{,}", '"', "\\dots")
_REWRITES = (
    (re.compile(r"(.*?)(\$)(.*?)(\$)(.*)"), "$\\3$"),     # keep only the first $...$
    (re.compile(r"(\\text\{)(.*?)(\})"), "\\2"),
    (re.compile(r"(\\textbf\{)(.*?)(\})"), "\\2"),
    (re.compile(r"(\\overline\{)(.*?)(\})"), "\\2"),
    (re.compile(r"(\\boxed\{)(.*)(\})"), "\\2"),
    (re.compile(r"(frac)([^{])(.)"), "frac{\\2}{\\3}"),   # \fracab -> \frac{a}{b}
    (re.compile(r"(sqrt)([^{])"), "sqrt{\\2}"),            # \sqrta -> \sqrt{a}
)


def normalize_final_answer(final_answer: str) -> str:
    """Minerva's normalization of a final answer (third point of the module docstring)."""
    final_answer = final_answer.split("=")[-1]
    for old, new in _SUBSTITUTIONS:
        final_answer = final_answer.replace(old, new)
    for removed in _REMOVED:
        final_answer = final_answer.replace(removed, "")
    for pattern, replacement in _REWRITES:
        final_answer = pattern.sub(replacement, final_answer)
    final_answer = final_answer.replace("$", "")
    if final_answer.replace(",", "").isdigit():
        final_answer = final_answer.replace(",", "")
    return final_answer.strip()


def last_boxed_only_string(text: str) -> str | None:
    """The last ``\\boxed{...}`` of ``text`` with braces matched, or ``None`` (also when unclosed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    end = balanced_brace_end(text, start)
    return None if end is None else text[start:end + 1]


def is_correct_minerva(solution_str: str, ground_truth: str) -> tuple[bool, str]:
    """(prediction == ground truth after normalization, normalized prediction)."""
    lines = _ANSWER_LINE.findall(solution_str)
    prediction = normalize_final_answer(lines[-1] if lines else "[INVALID]")
    return prediction == normalize_final_answer(ground_truth), prediction


def is_correct_strict_box(solution_str: str, ground_truth: str) -> tuple[bool, str | None]:
    """(the last boxed answer in the last STRICT_BOX_CHARS characters equals ``ground_truth``, that answer)."""
    boxed = last_boxed_only_string(solution_str[-STRICT_BOX_CHARS:])
    prediction = boxed[len("\\boxed{"):-1] if boxed is not None else None
    return prediction == ground_truth, prediction


def compute_score(solution_str: str, ground_truth: Any, strict_box_verify: bool = False) -> dict[str, Any]:
    """``{"score": 1.0 or -1.0, "acc": bool, "pred": normalized prediction}`` for one response."""
    tail = solution_str[-CLIP_CHARS:]
    check = is_correct_strict_box if strict_box_verify else is_correct_minerva
    correct, prediction = check(tail, ground_truth)
    return {"score": 1.0 if correct else -1.0, "acc": bool(correct), "pred": prediction}
