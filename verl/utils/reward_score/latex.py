"""LaTeX helpers shared by the math scorers (reward step after rollout)."""

from __future__ import annotations


def balanced_brace_end(text: str, begin: int) -> int | None:
    """Index of the ``}`` that closes the first ``{`` at or after ``begin`` (braces counted from
    ``begin``), or ``None`` when the braces never balance."""
    depth = 0
    for position in range(begin, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return position
    return None
