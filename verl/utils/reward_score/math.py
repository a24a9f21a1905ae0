"""MATH-style reward via math-verify, plus ``\\boxed{}`` extraction (reward step after rollout;
the extraction also serves the MATH data preparer); data source ``math_lenient``.

Our own rule, kept as an option beside veRL's (``math_reward.py``, string equality after
normalization): math-verify accepts any equivalent form (``0.5`` for ``\\frac{1}{2}``,
``(x+1)^2`` for ``x^2+2x+1``) where veRL's string match gives 0.

``compute_score`` never raises: any parser or verifier failure scores 0. math-verify guards
itself with ``signal.alarm`` timeouts, which only work in a process's main thread; elsewhere
(e.g. a Ray actor's worker thread) its timeouts are switched off and the caller's timeout, the
``RewardManager`` worker process, is the guard.
"""

from __future__ import annotations

import threading

from verl.utils.reward_score.latex import balanced_brace_end

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed_only_string(text: str) -> str | None:
    """The last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed x`` without braces) in ``text``,
    command included, with braces matched so nested ones stay inside; ``None`` if absent or unclosed."""
    start = max(text.rfind(command) for command in _BOX_COMMANDS)
    if start < 0:
        return None
    command = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    cursor = start + len(command)
    if text.startswith(" ", cursor):
        argument = text[cursor:].strip().split("$")[0].split()
        return f"{command} {argument[0]}" if argument else None
    if not text.startswith("{", cursor):
        return None
    end = balanced_brace_end(text, cursor)
    return None if end is None else text[start:end + 1]


def remove_boxed(boxed: str) -> str:
    """The argument of a string returned by ``last_boxed_only_string``."""
    command = next(c for c in _BOX_COMMANDS if boxed.startswith(c))
    rest = boxed[len(command):]
    return rest[1:-1] if rest.startswith("{") else rest.strip()


def extract_boxed_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{}`` in ``text``, or ``None``."""
    boxed = last_boxed_only_string(text)
    return remove_boxed(boxed) if boxed is not None else None


def compute_score(solution_str: str, ground_truth: str, score: float = 1.0, timeout_s: int = 5) -> float:
    """``score`` if math-verify finds the response's final answer equivalent to ``ground_truth``
    (e.g. ``\\frac{1}{2}`` and ``0.5``), else 0. The reference is parsed as ``\\boxed{ground_truth}``."""
    try:
        from math_verify import parse, verify

        # math-verify's own timeouts use signal.alarm, which raises outside the main thread.
        guard = timeout_s if threading.current_thread() is threading.main_thread() else None
        gold = parse(f"\\boxed{{{ground_truth}}}", parsing_timeout=guard)
        predicted = parse(solution_str, parsing_timeout=guard)
        if not gold or not predicted:
            return 0.0
        return score if verify(gold, predicted, timeout_seconds=guard) else 0.0
    except Exception:
        return 0.0
