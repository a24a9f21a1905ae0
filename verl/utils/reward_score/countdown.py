"""Countdown reward as the VCPO release scores it (reward step after rollout); data source ``countdown``.

The rule, restated from the release's ``verl/utils/reward_score/countdown.py``; the tests in
``tests/utils/reward_score/test_countdown_release.py`` pin each point:

1. The response is cut after its first ``Assistant:`` (else its first ``<|im_start|>assistant``).
2. The answer is the content of the last ``\\boxed{...}`` (no nested braces), else of the last
   ``<answer>...</answer>`` on one line, stripped. With neither, the score is 0: a bare
   expression scores 0.
3. The target is ``ground_truth["target"]`` or else ``["target_number"]``, the numbers
   ``ground_truth["numbers"]`` or else ``["nums"]``, each taken only when truthy (so a target of 0
   is not found); failing that, ``extra_info["target"]``/``["numbers"]``, then
   ``extra_info["metadata"]``. Without a target and numbers, the answer scores ``score`` only if
   it equals a string ``ground_truth`` once whitespace is removed, else 0.
4. The answer's integers (runs of digits, so ``2.5`` counts 2 and 5) must be the numbers as a
   multiset, else ``format_score``.
5. The answer must consist of digits, ``+ - * / ( ) .`` and whitespace and evaluate as Python
   arithmetic (so unary minus, ``**``, ``//`` and decimals count, ``/`` is true division),
   else ``format_score``.
6. ``score`` if the value is within 1e-5 of the target, else ``format_score``.

The release evaluates with ``eval``. Here the expression is parsed with ``ast`` and only number
literals, unary ``+``/``-`` and the binary operators that character set can spell are evaluated,
with Python's own operators, so every value is the one ``eval`` gives. The one departure: a power
whose result would have more than ``MAX_POWER_DIGITS`` digits is not computed (the release would
spend minutes or all memory on ``9**9**9``); it and anything built on it count as not equal to
the target, so score ``format_score``.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Mapping
from typing import Any

TOLERANCE = 1e-5
MAX_POWER_DIGITS = 10_000

_BOXED = re.compile(r"\\boxed\{([^}]*)\}")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>")
_ALLOWED = re.compile(r"^[\d+\-*/().\s]+$")
_INTEGERS = re.compile(r"\d+")
_WHITESPACE = re.compile(r"\s+")

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class _Unevaluable(Exception):
    """``eval`` would raise on this expression (syntax, a call, division by zero, overflow...)."""


class _TooLarge(Exception):
    """The expression needs a power with more than MAX_POWER_DIGITS digits."""


def extract_solution(solution_str: str) -> str | None:
    """The answer of a response (points 1 and 2 of the module docstring), or ``None``."""
    for marker in ("Assistant:", "<|im_start|>assistant"):
        if marker in solution_str:
            solution_str = solution_str.split(marker, 1)[1]
            break
    for pattern in (_BOXED, _ANSWER_TAG):
        found = pattern.findall(solution_str)
        if found:
            return found[-1].strip()
    return None


def _present(value: Any) -> bool:
    """Python truthiness, the release's ``a or b`` test; an array counts when it is non-empty
    (the release's ``or`` raises on a NumPy array of several numbers)."""
    if hasattr(value, "__len__") and not isinstance(value, (str, bytes, Mapping)):
        return len(value) > 0
    return bool(value)


def _either(mapping: Mapping, first: str, second: str) -> Any:
    """``mapping.get(first) or mapping.get(second)``, with ``_present`` as the truth test."""
    value = mapping.get(first)
    return value if _present(value) else mapping.get(second)


def target_and_numbers(ground_truth: Any, extra_info: Mapping | None) -> tuple[Any, Any]:
    """Point 3 of the module docstring: (target, numbers), or (None, None)."""
    if isinstance(ground_truth, Mapping):
        target = _either(ground_truth, "target", "target_number")
        numbers = _either(ground_truth, "numbers", "nums")
        if target is not None and numbers is not None:
            return target, numbers
    if isinstance(extra_info, Mapping) and extra_info:
        target, numbers = extra_info.get("target"), extra_info.get("numbers")
        metadata = extra_info.get("metadata") or {}
        if target is None:
            target = metadata.get("target")
        if numbers is None:
            numbers = metadata.get("numbers")
        if target is not None and numbers is not None:
            return target, numbers
    return None, None


def uses_exactly(expression: str, numbers: Any) -> bool:
    """Point 4: the expression's digit runs, as integers, are ``numbers`` as a multiset."""
    try:
        return sorted(int(n) for n in _INTEGERS.findall(expression)) == sorted(numbers)
    except Exception:  # unsortable or mixed-type numbers: the release's check fails the same way
        return False


def _power(base: Any, exponent: Any) -> Any:
    if (type(base) is int and type(exponent) is int and exponent > 0 and abs(base) > 1
            and exponent * math.log10(abs(base)) > MAX_POWER_DIGITS):
        raise _TooLarge()
    return operator.pow(base, exponent)


def _evaluate(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        return _BINARY[type(node.op)](left, right)
    raise _Unevaluable(type(node).__name__)


def evaluate_expression(expression: str) -> Any:
    """Point 5: the value ``eval`` gives the expression; raises ``_Unevaluable`` where ``eval``
    would raise (or the characters are not allowed) and ``_TooLarge`` past the power cap."""
    if not _ALLOWED.match(expression):
        raise _Unevaluable("characters")
    try:
        # eval drops leading spaces and tabs before parsing; ast.parse would call them an indent.
        tree = ast.parse(expression.lstrip(" \t"), mode="eval").body
        return _evaluate(tree)
    except (SyntaxError, ValueError, RecursionError, MemoryError, ArithmeticError, TypeError) as exc:
        raise _Unevaluable(repr(exc)) from exc


def compute_score(solution_str: str, ground_truth: Any, extra_info: Mapping | None = None,
                  format_score: float = 0.0, score: float = 1.0) -> float:
    """The release's countdown score of one response (the module docstring, points 1-6)."""
    target, numbers = target_and_numbers(ground_truth, extra_info)
    expression = extract_solution(solution_str)
    if expression is None:
        return 0.0
    if target is None or numbers is None:
        answer = _WHITESPACE.sub("", expression)
        truth = _WHITESPACE.sub("", ground_truth) if isinstance(ground_truth, str) else ""
        return float(score) if truth and answer == truth else 0.0
    if not uses_exactly(expression, numbers):
        return float(format_score)
    try:
        value = evaluate_expression(expression)
        return float(score) if abs(value - target) < TOLERANCE else float(format_score)
    except (_Unevaluable, _TooLarge, ArithmeticError, TypeError):
        return float(format_score)
