"""Reward worker process: scores one sample at a time for ``RewardManager`` (reward step after rollout).

``RewardManager`` starts a Python process that calls ``main``. Protocol over stdin/stdout, each
message a little-endian u64 length followed by a pickle: first the scoring function, answered
by ``("ready", None)`` (or ``("error", message)`` when it cannot be unpickled, e.g. a custom
reward file that no longer imports); then argument tuples, each answered by
``("ok", (score, extras))`` (``split_result`` of what the scorer returned) or ``("error", message)``.
The parent kills this process when a sample overruns its timeout.
"""

from __future__ import annotations

import math
import numbers
import os
import pickle
import struct
import sys
import traceback
from typing import Any

import numpy as np

HEADER = struct.Struct("<Q")


def split_result(result: Any) -> tuple[float, dict[str, float]]:
    """A scorer's return value as (score, extras). A number is the score; a dict's ``score`` is,
    and its other entries that are finite real numbers (bools included) are extras, logged as
    metrics; others (strings such as DAPO's ``pred``) are dropped. Raises on a dict without
    ``score`` or a score that is not a number (``None``, a string that is not one)."""
    if isinstance(result, dict):
        if "score" not in result:
            raise ValueError(f"reward dict has no 'score' (keys: {sorted(map(str, result))})")
        extras = {str(key): float(value) for key, value in result.items()
                  if key != "score" and isinstance(value, (numbers.Real, np.bool_)) and math.isfinite(value)}
        return float(result["score"]), extras
    return float(result), {}


def write_frame(fd: int, payload: bytes) -> None:
    data = memoryview(HEADER.pack(len(payload)) + payload)
    while data:
        written = os.write(fd, data)
        data = data[written:]


def read_frame(fd: int) -> bytes | None:
    """One message, or ``None`` at end of input (the parent closed the pipe)."""
    header = _read_exactly(fd, HEADER.size)
    if header is None:
        return None
    return _read_exactly(fd, HEADER.unpack(header)[0])


def _read_exactly(fd: int, size: int) -> bytes | None:
    buffer = bytearray()
    while len(buffer) < size:
        chunk = os.read(fd, size - len(buffer))
        if not chunk:
            return None
        buffer += chunk
    return bytes(buffer)


def _error_message(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()[:500]


def main() -> None:
    # Scorers may print: keep private copies of the protocol pipes and point fds 0/1 elsewhere,
    # so nothing a scorer writes to stdout can corrupt a message.
    channel_in, channel_out = os.dup(0), os.dup(1)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    first = read_frame(channel_in)
    if first is None:
        return
    try:
        compute_score = pickle.loads(first)
    except Exception as exc:
        write_frame(channel_out, pickle.dumps(("error", _error_message(exc))))
        return
    write_frame(channel_out, pickle.dumps(("ready", None)))

    while (frame := read_frame(channel_in)) is not None:
        try:
            reply = ("ok", split_result(compute_score(*pickle.loads(frame))))
        except Exception as exc:
            reply = ("error", _error_message(exc))
        write_frame(channel_out, pickle.dumps(reply))
