"""Batch reward scoring that survives bad scorers (reward step between rollout and the queue).

The rule: every sample gets a finite score. A scorer that raises, returns something that is not
a finite number (or a dict whose ``score`` is not one), or crashes its process scores 0 and
counts in ``reward/num_errors``; one that runs longer than ``timeout_s`` scores 0 and counts in
``reward/num_timeouts``. Nothing a scorer does stops the batch. A dict's other numeric entries
are averaged over the samples that returned them, as ``reward/extra/<key>/mean``.

Samples go one at a time to a persistent worker subprocess; on a timeout the worker is killed
and the next sample starts a fresh one. This works from any thread (the trainer runs inside a
Ray actor), unlike ``signal.alarm``. Data sources whose scorers are pure, bounded-time string
code (every built-in rule but math-verify's) are scored in-process, still under try/except; a
custom reward function always runs in the worker.
A worker that cannot start or cannot import the scorer raises RuntimeError: that is a
configuration error, not one sample's fault.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np

from verl.utils.config import check_positive
from verl.utils.reward_score.dispatch import default_compute_score, scored_in_process
from verl.utils.reward_score.worker import HEADER, split_result, write_frame

logger = logging.getLogger(__name__)


class _WorkerTimeout(Exception):
    pass


class _WorkerDied(Exception):
    pass


class _ScoringWorker:
    """One ``verl.utils.reward_score.worker`` subprocess and its pipes."""

    def __init__(self, pickled_compute_score: bytes, startup_timeout_s: float):
        env = dict(os.environ)
        # The child must import whatever module defines the scorer, so it gets our sys.path.
        env["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path)
        # "-c" rather than "-m": the package already imports the worker module, and runpy warns
        # when asked to run an imported module as __main__.
        command = [sys.executable, "-c", "from verl.utils.reward_score.worker import main; main()"]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0)
        self._poller = select.poll()
        self._poller.register(self.process.stdout.fileno(), select.POLLIN)
        try:
            status, message = self.request(pickled_compute_score, startup_timeout_s)
        except (_WorkerTimeout, _WorkerDied) as exc:
            self.kill()
            raise RuntimeError(f"reward worker did not start: {exc!r}") from exc
        if status != "ready":
            self.kill()
            raise RuntimeError(f"reward worker could not load the scoring function: {message}")

    def request(self, payload: bytes, timeout_s: float) -> tuple[str, Any]:
        """Send one message and wait at most ``timeout_s`` for the reply."""
        try:
            write_frame(self.process.stdin.fileno(), payload)
        except OSError as exc:
            raise _WorkerDied(repr(exc)) from exc
        deadline = time.monotonic() + timeout_s
        header = self._read_exactly(HEADER.size, deadline)
        return pickle.loads(self._read_exactly(HEADER.unpack(header)[0], deadline))

    def _read_exactly(self, size: int, deadline: float) -> bytes:
        fd = self.process.stdout.fileno()
        buffer = bytearray()
        while len(buffer) < size:
            remaining_ms = (deadline - time.monotonic()) * 1000.0
            # poll, not select: select fails on descriptors >= 1024, common in a busy Ray worker.
            if remaining_ms <= 0 or not self._poller.poll(remaining_ms):
                raise _WorkerTimeout()
            chunk = os.read(fd, size - len(buffer))
            if not chunk:
                raise _WorkerDied(f"exit code {self.process.poll()}")
            buffer += chunk
        return bytes(buffer)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()

    def close(self) -> None:
        """Let the worker exit on end of input; kill it if it does not within a second."""
        self.process.stdin.close()
        try:
            self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


class RewardManager:
    """Scores batches of decoded responses with ``compute_score(data_source, solution_str,
    ground_truth, extra_info) -> float | dict`` under the rule in this module's docstring.

    ``compute_score`` must be picklable (a module-level function, a ``functools.partial`` of one,
    or a ``CustomRewardFunction``) because the worker process receives it. ``in_process_sources``
    lists data sources scored without the worker; by default those whose built-in rule is
    in-process when ``compute_score`` is ``default_compute_score``, none otherwise.
    """

    def __init__(self, timeout_s: float = 5.0,
                 compute_score: Callable[[str, str, Any, dict | None], float | dict] = default_compute_score,
                 in_process_sources: Collection[str] | None = None, startup_timeout_s: float = 60.0):
        check_positive("reward_model.timeout_s", timeout_s)
        check_positive("reward_model.startup_timeout_s", startup_timeout_s)
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.compute_score = compute_score
        self._pickled_compute_score = pickle.dumps(compute_score)
        self._in_process_sources = None if in_process_sources is None else frozenset(in_process_sources)
        self._worker: _ScoringWorker | None = None
        self._lock = threading.Lock()

    def _scores_in_process(self, data_source: str) -> bool:
        if self._in_process_sources is not None:
            return data_source in self._in_process_sources
        return self.compute_score is default_compute_score and scored_in_process(data_source)

    def _score_in_worker(self, args: tuple) -> tuple[str, Any]:
        try:
            payload = pickle.dumps(args)
        except Exception as exc:
            return "error", f"sample cannot be sent to the reward worker: {exc!r}"
        if self._worker is None:
            self._worker = _ScoringWorker(self._pickled_compute_score, self.startup_timeout_s)
        try:
            return self._worker.request(payload, self.timeout_s)
        except _WorkerTimeout:
            self._worker.kill()
            self._worker = None
            return "timeout", None
        except _WorkerDied as exc:
            self._worker.kill()
            self._worker = None
            return "error", f"reward worker died: {exc}"

    def score(self, data_sources: Sequence[str], responses: Sequence[str], ground_truths: Sequence[Any],
              extra_infos: Sequence[dict | None] | None = None) -> tuple[np.ndarray, dict[str, float]]:
        """Scores (float32, one per sample) and ``reward/*`` metrics for one batch, including
        ``reward/extra/<key>/mean`` for each extra a dict-returning scorer reported."""
        count = len(responses)
        if not (len(data_sources) == len(ground_truths) == count):
            raise ValueError(f"reward: {len(data_sources)} data sources, {count} responses, "
                             f"{len(ground_truths)} ground truths; all must match")
        extra_infos = [None] * count if extra_infos is None else extra_infos
        scores = np.zeros(count, dtype=np.float32)
        num_errors = num_timeouts = 0
        extras: dict[str, list[float]] = {}
        start = time.perf_counter()
        with self._lock:
            for i in range(count):
                args = (data_sources[i], responses[i], ground_truths[i], extra_infos[i])
                if self._scores_in_process(data_sources[i]):
                    try:
                        status, value = "ok", split_result(self.compute_score(*args))
                    except Exception as exc:
                        status, value = "error", repr(exc)[:500]
                else:
                    status, value = self._score_in_worker(args)
                if status == "ok" and not math.isfinite(value[0]):
                    status, value = "error", f"non-finite score {value[0]}"
                if status == "ok":
                    scores[i] = value[0]
                    for key, extra in value[1].items():
                        extras.setdefault(key, []).append(extra)
                elif status == "timeout":
                    num_timeouts += 1
                    logger.warning("reward timeout (> %.1f s) for sample %d, data_source=%r", self.timeout_s, i,
                                   data_sources[i])
                else:
                    num_errors += 1
                    logger.warning("reward error for sample %d, data_source=%r: %s", i, data_sources[i], value)
        stats = {
            "reward/mean": float(scores.mean()) if count else 0.0,
            "reward/num_errors": float(num_errors),
            "reward/num_timeouts": float(num_timeouts),
            "reward/time_s": time.perf_counter() - start,
        }
        stats.update({f"reward/extra/{key}/mean": float(np.mean(values)) for key, values in sorted(extras.items())})
        return scores, stats

    def close(self) -> None:
        with self._lock:
            if self._worker is not None:
                self._worker.close()
                self._worker = None

    def __enter__(self) -> RewardManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        worker = getattr(self, "_worker", None)
        if worker is not None:
            # At interpreter exit the process may already be reaped or modules torn down.
            with contextlib.suppress(Exception):
                worker.kill()
