"""The rollouter: one engine replica generating prompt groups in the background, under admission control.

dataset prompts (fed by the controller) -> [Rollouter: engine + reward] -> ReorderBuffer -> trainer;
ParamSync -> ``update_weights`` (object store) or ``receive_weights`` (collective weight
channel). Runs as a threaded Ray actor: the generation loop lives in
a background thread, so ``update_weights``, ``submit``, ``validate`` and ``stats`` are served
while it generates.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import ray
import torch

from verl.protocol import DataProto
from verl.trainer.fully_async.staleness import admission_limit
from verl.utils.weight_channel import WeightChannel
from verl.workers.rollout.base import GenerationRequest, Trajectory
from verl.workers.rollout_worker import RolloutWorker, request_seed


@dataclass
class _Group:
    """One started prompt group: its prompt row, finished trajectories and resumable partials."""

    prompt: DataProto
    requests: list[GenerationRequest]
    done: dict[int, Trajectory] = field(default_factory=dict)
    partial: dict[int, GenerationRequest] = field(default_factory=dict)


class Rollouter:
    """Generates the groups assigned to this replica, starting group j only when
    j < (version + k + 1) * groups_per_step, and puts finished groups on the queue.

    ``partial_rollout``: a weight update pauses the engine, aborts in-flight requests, loads
    the weights and resumes them as requests that carry their tokens, log-probs and versions;
    otherwise the update waits until the current generate call has finished.
    """

    def __init__(self, worker_kwargs: dict[str, Any], queue: Any, k: int, groups_per_step: int,
                 partial_rollout: bool, seed: int, delay_max_s: float = 0.0, replica_rank: int = 0,
                 max_groups_in_flight: int | None = None):
        self.worker = RolloutWorker(**worker_kwargs)
        self.engine = self.worker.engine
        self.queue = queue
        self.k, self.groups_per_step, self.partial_rollout = k, groups_per_step, partial_rollout
        self.seed = seed
        # async_training.bsz_per_dp_rank: prompt groups one generate call may hold (None: no cap).
        self.max_groups_in_flight = max_groups_in_flight
        self.delay_max_s = delay_max_s
        self._delay_rng = random.Random(seed * 7_919 + replica_rank)
        self._cv = threading.Condition()
        self._pending: dict[int, DataProto] = {}  # submitted, not started
        self._started: dict[int, _Group] = {}
        self._holds = 0  # > 0: do not start a generate call (weight load, validation)
        self._generating = False
        self._stop = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._weight_channel: WeightChannel | None = None
        self._t_start = time.perf_counter()
        self._idle_since: float | None = None
        self._stats = {"idle_s": 0.0, "busy_s": 0.0, "groups_done": 0.0, "aborted_requests": 0.0,
                       "resumed_requests": 0.0, "generated_tokens": 0.0, "update_wait_s": 0.0}

    # ------------------------------------------------------------------ controller API
    def start(self) -> None:
        """Start the generation loop (after the first weight sync of a resumed run)."""
        self._t_start = time.perf_counter()
        self._thread = threading.Thread(target=self._loop_guarded, name="rollouter-loop", daemon=True)
        self._thread.start()

    def submit(self, groups: list[tuple[int, DataProto]]) -> None:
        """Hand over prompt groups (start index, one-row prompt batch with ``uid``)."""
        with self._cv:
            for j, prompt in groups:
                self._pending[j] = prompt
            self._cv.notify_all()

    def update_weights(self, named_tensors: dict[str, torch.Tensor], version: int) -> dict[str, float]:
        """Load weights ``version``: aborting and later resuming in-flight requests with
        ``partial_rollout``, else after the current generate call ends. Returns
        ``{"load_s", "wait_s"}`` (time loading, time waiting for the engine)."""
        t0 = time.perf_counter()
        with self._cv:
            self._holds += 1
        try:
            if self.partial_rollout:
                # Paused before aborting: a generate call that starts after the abort blocks at
                # its first step and then runs entirely on the new weights.
                self.engine.pause()
                self.engine.abort_all()
            else:
                with self._cv:
                    while self._generating:
                        self._cv.wait()
            t1 = time.perf_counter()
            self.worker.update_weights(named_tensors, version)
            t2 = time.perf_counter()
        finally:
            if self.partial_rollout:
                self.engine.resume()
            with self._cv:
                self._holds -= 1
                self._cv.notify_all()
        with self._cv:
            self._stats["update_wait_s"] += t1 - t0
        return {"load_s": t2 - t1, "wait_s": t1 - t0}

    def open_weight_channel(self, master_addr: str, master_port: int, rank: int, world_size: int,
                            backend: str, timeout_s: float) -> None:
        """Join the collective weight channel as receiving ``rank`` (``param_sync_backend=collective``)."""
        self._weight_channel = WeightChannel(rank, world_size, master_addr, master_port, backend, timeout_s)

    def receive_weights(self) -> dict[str, float]:
        """Receive the next broadcast from the weight channel and load it exactly as
        ``update_weights`` does; generation goes on while the bytes arrive. Returns
        ``update_weights``' figures plus ``recv_s`` and the received ``version``."""
        if self._weight_channel is None:
            raise RuntimeError("receive_weights: no weight channel (open_weight_channel first)")
        t0 = time.perf_counter()
        named_tensors, version = self._weight_channel.receive()
        recv_s = time.perf_counter() - t0
        return {**self.update_weights(named_tensors, version), "recv_s": recv_s, "version": float(version)}

    def validate(self, prompts: DataProto, mode: str, seed: int) -> DataProto:
        """Generate validation responses with the engine's current weights, between loop calls."""
        with self._cv:
            self._holds += 1
            while self._generating:
                self._cv.wait()
        try:
            return self.worker.generate_sequences(prompts, mode, seed)
        finally:
            with self._cv:
                self._holds -= 1
                self._cv.notify_all()

    def version(self) -> int:
        return self.engine.version

    def stats(self) -> dict[str, float]:
        """Cumulative counters since ``start`` (seconds idle/busy, groups, requests, tokens)."""
        with self._cv:
            now = time.perf_counter()
            out = dict(self._stats)
            if self._idle_since is not None:  # count the wait in progress, so per-step deltas are exact
                out["idle_s"] += now - self._idle_since
        out["wall_s"] = now - self._t_start
        return out

    def error(self) -> str | None:
        """The loop's exception, if it died (the controller checks while it waits)."""
        return None if self._error is None else f"{type(self._error).__name__}: {self._error}"

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self.engine.pause()
        self.engine.abort_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._weight_channel is not None:
            self._weight_channel.close()
            self._weight_channel = None

    # ------------------------------------------------------------------ generation loop
    def _loop_guarded(self) -> None:
        try:
            self._loop()
        except BaseException as err:  # surfaced to the controller through error()
            self._error = err

    def _next_work(self) -> tuple[list[GenerationRequest], list[tuple[int, int]]] | None:
        """Under the lock: the requests of the next generate call, or None to stop. Partials are
        resumed first; new groups come from the lowest admissible trainer batch."""
        t0 = self._idle_since = time.perf_counter()
        while True:
            if self._stop:
                return None
            if self._holds == 0:
                requests, keys = [], []
                for j in sorted(self._started):
                    for s, request in sorted(self._started[j].partial.items()):
                        requests.append(request)
                        keys.append((j, s))
                limit = admission_limit(self.engine.version, self.k, self.groups_per_step)
                admissible = sorted(j for j in self._pending if j < limit)
                if admissible:
                    batch_of_first = admissible[0] // self.groups_per_step
                    in_flight = len({j for j, _ in keys})
                    for j in admissible:
                        if j // self.groups_per_step != batch_of_first:
                            break
                        if self.max_groups_in_flight is not None and in_flight >= self.max_groups_in_flight:
                            break
                        in_flight += 1
                        prompt = self._pending.pop(j)
                        group = _Group(prompt, self.worker.make_requests(prompt, "train", self.seed)[0])
                        self._started[j] = group
                        for s, request in enumerate(group.requests):
                            requests.append(request)
                            keys.append((j, s))
                if requests:
                    self._generating = True
                    self._stats["idle_s"] += time.perf_counter() - t0
                    self._idle_since = None
                    for j, s in keys:
                        self._started[j].partial.pop(s, None)
                    return requests, keys
            self._cv.wait()

    def _loop(self) -> None:
        while True:
            with self._cv:
                work = self._next_work()
            if work is None:
                return
            requests, keys = work
            t0 = time.perf_counter()
            try:
                if self.delay_max_s:
                    time.sleep(self._delay_rng.uniform(0.0, self.delay_max_s))
                tokens_before = self.engine.generated_tokens
                trajectories = self.engine.generate(requests)
                tokens = self.engine.generated_tokens - tokens_before
            finally:
                with self._cv:
                    self._generating = False
                    self._cv.notify_all()
            finished = self._record(keys, trajectories)
            for j in finished:
                self._deliver(j)
            with self._cv:
                self._stats["busy_s"] += time.perf_counter() - t0
                self._stats["generated_tokens"] += tokens

    def _record(self, keys: list[tuple[int, int]], trajectories: list[Trajectory]) -> list[int]:
        """File each trajectory under its group; aborted ones become resumable partials.
        Returns the groups now complete, in start order."""
        n = self.worker.config.n
        touched = set()
        with self._cv:
            for (j, s), traj in zip(keys, trajectories):
                group = self._started[j]
                if traj.finish_reason == "abort":
                    base = group.requests[s]
                    group.partial[s] = replace(
                        base, response_ids=list(traj.response_ids), response_logprobs=list(traj.response_logprobs),
                        response_versions=list(traj.response_versions),
                        sampling=replace(base.sampling,
                                         seed=request_seed(self.seed, base.request_id, len(traj.response_ids))),
                    )
                    self._stats["aborted_requests"] += 1
                    if traj.response_ids:
                        self._stats["resumed_requests"] += 1
                else:
                    group.done[s] = traj
                touched.add(j)
            return sorted(j for j in touched if len(self._started[j].done) == n)

    def _deliver(self, j: int) -> None:
        with self._cv:
            group = self._started.pop(j)
        n = self.worker.config.n
        trajectories = [group.done[s] for s in range(n)]
        batch = self.worker.assemble(trajectories, group.prompt, [0] * n, "train")
        # A group's tokens come from several generate calls; the rollouter's own counters
        # (stats) time generation, so only the per-group reward figures travel with it.
        metrics = {k: float(v) for k, v in batch.meta_info.items()
                   if isinstance(v, (int, float)) and k.startswith("reward/")}
        batch.meta_info = {"temperature": batch.meta_info["temperature"]}
        ray.get(self.queue.put.remote(j, batch, metrics))
        with self._cv:
            self._stats["groups_done"] += 1

