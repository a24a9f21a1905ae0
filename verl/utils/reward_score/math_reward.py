"""MATH reward as veRL and the release score it (reward step after rollout): the last ``\\boxed``
answer, string-normalized, must equal the normalized ground truth (Hendrycks et al.'s MATH rule).

Data sources: ``lighteval/MATH``, ``DigitalLearningGmbH/MATH-lighteval``, ``HuggingFaceH4/MATH-500``,
``math-500``, ``deepscaler``, ``test-math-aime24``, ``test-math-aime25``, ``dapo_filter``. The rule,
restated from veRL's ``verl/utils/reward_score/math_reward.py`` (the release uses it unchanged);
``tests/utils/reward_score/test_math_reward.py`` pins it case by case:

- The answer: if the response contains ``\\boxed `` (with a space) anywhere, everything after the
  last ``\\boxed `` up to the next ``$``; otherwise the last ``\\boxed{...}`` with braces matched
  (a ``\\fbox{...}`` is found but never accepted, as in veRL). No answer, or an unclosed one, scores 0.
- Both strings are normalized (``normalize``): newlines, ``\\!``, ``\\left``/``\\right``, degree
  signs, ``\\$``, units after ``\\text{ ``, percent signs and spaces dropped; ``tfrac``/``dfrac``
  read as ``frac``; ``\\frac12`` -> ``\\frac{1}{2}``, ``\\sqrt3`` -> ``\\sqrt{3}``, ``1/2`` ->
  ``\\frac{1}{2}``, ``0.5`` -> ``\\frac{1}{2}``, ``.5`` -> ``0.5``; a leading ``x = `` (at most two
  characters before a single ``=``) dropped. Where normalizing one string fails (two ``\\text{ ``,
  a ``\\sqrt`` or ``\\frac`` with nothing after it), the raw strings are compared instead.
- 1.0 when the normalized strings are equal, else 0.0. No numeric or symbolic equivalence:
  ``\\frac{2}{4}`` is not ``\\frac{1}{2}`` (``math_lenient`` uses math-verify for that).
"""

from __future__ import annotations

from typing import Any

from verl.utils.reward_score.latex import balanced_brace_end


class _Malformed(Exception):
    """Where veRL's code fails an assertion or an index: the caller falls back as veRL does."""


def last_boxed_only_string(text: str) -> str | None:
    """The answer part of a response, ``\\boxed`` command included (first point of the module docstring)."""
    if "\\boxed " in text:
        return "\\boxed " + text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    end = balanced_brace_end(text, start)
    return None if end is None else text[start:end + 1]


def remove_boxed(boxed: str) -> str:
    """The argument of ``\\boxed x`` or ``\\boxed{x}``; ``_Malformed`` for anything else (``\\fbox``)."""
    if "\\boxed " in boxed:
        if not boxed.startswith("\\boxed "):
            raise _Malformed(boxed)
        return boxed[len("\\boxed "):]
    if not (boxed.startswith("\\boxed{") and boxed.endswith("}")):
        raise _Malformed(boxed)
    return boxed[len("\\boxed{"):-1]


def _brace_fracs(text: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}`` and ``\\frac1{2}`` -> ``\\frac{1}{2}``; a ``\\frac`` followed
    by a single character leaves the whole string as it was."""
    pieces = text.split("\\frac")
    out = pieces[0]
    for piece in pieces[1:]:
        out += "\\frac"
        if not piece:
            raise _Malformed("\\frac at the end")
        if piece[0] == "{":
            out += piece
        elif len(piece) < 2:
            return text
        elif piece[1] == "{":
            out += "{" + piece[0] + "}" + piece[1:]
        else:
            out += "{" + piece[0] + "}{" + piece[1] + "}" + piece[2:]
    return out


def _slash_to_frac(text: str) -> str:
    """``a/b`` with ``a`` and ``b`` integers written canonically -> ``\\frac{a}{b}``."""
    parts = text.split("/")
    if len(parts) != 2:
        return text
    try:
        numerator, denominator = int(parts[0]), int(parts[1])
    except ValueError:
        return text
    if text != f"{numerator}/{denominator}":
        return text
    return f"\\frac{{{numerator}}}{{{denominator}}}"


def _brace_sqrts(text: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}`` (one character)."""
    if "\\sqrt" not in text:
        return text
    pieces = text.split("\\sqrt")
    out = pieces[0]
    for piece in pieces[1:]:
        if not piece:
            raise _Malformed("\\sqrt at the end")
        out += "\\sqrt" + piece if piece[0] == "{" else "\\sqrt{" + piece[0] + "}" + piece[1:]
    return out


def normalize(text: str) -> str:
    """The normalized form of an answer (second point of the module docstring), step by step in
    veRL's order; raises ``_Malformed`` where veRL's normalization fails."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        text = text.replace(old, new)
    if "\\text{ " in text:  # units on the right
        pieces = text.split("\\text{ ")
        if len(pieces) != 2:
            raise _Malformed("two \\text{ ")
        text = pieces[0]
    text = text.replace("\\\\%", "").replace("\\%", "")
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        text = sides[1]
    text = _brace_sqrts(text)
    text = text.replace(" ", "")
    text = _brace_fracs(text)
    if text == "0.5":
        text = "\\frac{1}{2}"
    return _slash_to_frac(text)


def is_equiv(answer: str | None, reference: str | None) -> bool:
    """Equal after ``normalize``; compared raw when either fails to normalize."""
    if answer is None or reference is None:
        return answer is None and reference is None
    try:
        return normalize(answer) == normalize(reference)
    except _Malformed:
        return answer == reference


def compute_score(solution_str: str, ground_truth: Any) -> float:
    """1.0 if the response's boxed answer is equivalent to ``ground_truth`` under ``is_equiv``, else 0.0."""
    try:
        boxed = last_boxed_only_string(solution_str)
        if boxed is None:
            return 0.0
        return 1.0 if is_equiv(remove_boxed(boxed), ground_truth) else 0.0
    except Exception:  # veRL's scorer catches everything: a ground truth that is not a string scores 0
        return 0.0
