"""Pause / resume / abort bookkeeping shared by every rollout engine (rollouter -> engine).

An engine runs one ``generate`` at a time; other threads (the rollouter serving a weight
update) may pause it between steps, or abort it and collect the unfinished requests as
partial trajectories. The engine's step loop calls ``wait_while_paused`` between steps.
"""

from __future__ import annotations

import threading
from typing import Callable

from verl.workers.rollout.base import Trajectory

RunBody = Callable[[int, list[Trajectory]], list[Trajectory]]


class RunControl:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._paused = False
        self._abort_requested = False
        self._run_id = 0
        self._running = False
        self._aborted_runs: dict[int, list[Trajectory]] = {}
        self._generate_lock = threading.Lock()

    def pause(self) -> None:
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def abort_all(self) -> list[Trajectory]:
        """Ask the running ``run`` to stop at its next step; wait for and return the
        trajectories it aborted. ``[]`` when nothing runs. A paused engine stays paused."""
        with self._cond:
            if not self._running:
                return []
            run_id = self._run_id
            self._abort_requested = True
            self._cond.notify_all()
            while run_id not in self._aborted_runs:
                self._cond.wait()
            return self._aborted_runs.pop(run_id)

    def run(self, body: RunBody) -> list[Trajectory]:
        """Run ``body(run_id, aborted)`` as the one active generate call. ``body`` appends the
        trajectories it leaves unfinished to ``aborted``, which ``abort_all`` then receives."""
        with self._generate_lock:
            with self._cond:
                self._run_id += 1
                run_id = self._run_id
                self._running = True
                self._abort_requested = False
            aborted: list[Trajectory] = []
            try:
                return body(run_id, aborted)
            finally:
                with self._cond:
                    self._running = False
                    if self._abort_requested:
                        self._aborted_runs[run_id] = aborted
                    self._cond.notify_all()

    def wait_while_paused(self) -> bool:
        """Block while paused; True when an abort was requested (the step loop must stop)."""
        with self._cond:
            while self._paused and not self._abort_requested:
                self._cond.wait()
            return self._abort_requested
