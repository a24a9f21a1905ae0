"""Countdown reward for our CPU task (reward step after rollout); data source ``countdown_lenient``.

The CPU default's tiny model is warm-started on solver solutions written as bare expressions
(``12*3+7``, then the end token; ``verl/utils/dataset/countdown.py``), and this rule scores that
format: the answer is the last ``<answer>...</answer>`` if the response has an ``<answer>`` tag,
else the whole response. The release's rule (``countdown.py``, data source ``countdown``) reads
only ``\\boxed{}`` or ``<answer>`` answers and would score every bare expression 0, so the two
cannot share a data source. We chose a data source of its own over a config switch so that a
file says how it is scored, whatever config reads it: the generator writes ``countdown_lenient``,
and apart from that one column the generated files are the same as before, as are the scores
of the CPU task (tests/utils/reward_score/test_dispatch.py compares them with the rule as it was).

The expression is parsed with ``ast`` and evaluated node by node by our own walker; nothing is
ever handed to ``eval``. Accepted grammar: non-negative integer literals, binary ``+ - * /`` and
parentheses. Unary minus is rejected: Countdown combines the given numbers with binary
operators only, and the solver (hence SFT data) never writes it, so accepting it would only add
ways to game the multiset check such as ``--3``.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from typing import Any

MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 1e12
TOLERANCE = 1e-6

# Special tokens that may end a decoded response when it is decoded with special tokens kept.
END_MARKERS = ("<|end|>", "<|endoftext|>", "<|im_end|>", "</s>")

# Cheap pre-filter before parsing: it rejects names, calls, attributes, strings, floats, hex
# and underscores in one pass. ``**`` still passes and is rejected by the tree walk.
_EXPRESSION_CHARS = re.compile(r"[0-9+\-*/()\s]*")

_OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


class _Rejected(Exception):
    """The expression leaves the accepted grammar or its value leaves the magnitude cap."""


def extract_expression(solution_str: str) -> str | None:
    """The answer part of a response: the last ``<answer>...</answer>`` if the response has an
    ``<answer>`` tag (``None`` when it is unclosed), else the text before the first end marker;
    surrounding whitespace is dropped."""
    start = solution_str.rfind("<answer>")
    if start >= 0:
        start += len("<answer>")
        end = solution_str.find("</answer>", start)
        return solution_str[start:end].strip() if end >= 0 else None
    for marker in END_MARKERS:
        cut = solution_str.find(marker)
        if cut >= 0:
            solution_str = solution_str[:cut]
    return solution_str.strip()


def _leaf_numbers(node: ast.AST) -> list[int]:
    """The integer literals of an accepted tree, in order; raises ``_Rejected`` on any other node."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return [node.value]
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _leaf_numbers(node.left) + _leaf_numbers(node.right)
    raise _Rejected(type(node).__name__)


def _evaluate(node: ast.AST) -> float:
    """Value of an accepted tree in float arithmetic, every intermediate bounded by MAX_MAGNITUDE."""
    if isinstance(node, ast.Constant):
        value = float(node.value)
    else:
        left, right = _evaluate(node.left), _evaluate(node.right)
        op = _OPERATORS[type(node.op)]
        if op == "+":
            value = left + right
        elif op == "-":
            value = left - right
        elif op == "*":
            value = left * right
        elif right == 0.0:
            raise _Rejected("division by zero")
        else:
            value = left / right
    if abs(value) > MAX_MAGNITUDE:
        raise _Rejected("magnitude")
    return value


def parse_expression(expression: str) -> ast.expr | None:
    """The tree of an expression in the accepted grammar, or ``None``."""
    if len(expression) > MAX_EXPRESSION_CHARS or not _EXPRESSION_CHARS.fullmatch(expression):
        return None
    try:
        tree = ast.parse(expression, mode="eval").body
        _leaf_numbers(tree)
    except (SyntaxError, ValueError, RecursionError, MemoryError, _Rejected):
        return None
    return tree


def compute_score(solution_str: str, ground_truth: Mapping[str, Any], format_score: float = 0.0,
                  score: float = 1.0) -> float:
    """``score`` if the response's expression uses exactly the multiset ``ground_truth["numbers"]``
    and equals ``ground_truth["target"]`` (within TOLERANCE, for division); ``format_score`` if it is
    a well-formed expression that fails either check (or divides by zero, or exceeds the
    magnitude cap); 0 otherwise."""
    expression = extract_expression(solution_str)
    tree = parse_expression(expression) if expression is not None else None
    if tree is None:
        return 0.0
    numbers = sorted(int(n) for n in ground_truth["numbers"])
    if sorted(_leaf_numbers(tree)) != numbers:
        return format_score
    try:
        value = _evaluate(tree)
    except _Rejected:
        return format_score
    return score if abs(value - float(ground_truth["target"])) <= TOLERANCE else format_score
