"""The admission rule and lag accounting, checked against a brute-force simulation of the
pipeline's schedule (no Ray): groups start only when admitted, finish in random order, are
released in start order, and every start lag stays within k."""

from __future__ import annotations

import random

import numpy as np
import pytest

from verl.trainer.fully_async.staleness import (
    admission_limit,
    check_lag_bound,
    consumption_step,
    staleness_metrics,
)


def _simulate(k: int, groups_per_step: int, steps: int, sync_every: int, seed: int) -> list[tuple[int, int]]:
    """Random interleaving of rollouter and trainer events; returns (trainer step, start version)
    for every trained group."""
    rng = random.Random(seed)
    version, next_start, trained_step = 0, 0, 0
    running: dict[int, int] = {}  # group -> version it started at
    finished: dict[int, int] = {}
    out = []
    while trained_step < steps:
        choices = []
        if next_start < admission_limit(version, k, groups_per_step):
            choices.append("start")
        if running:
            choices.append("finish")
        first = trained_step * groups_per_step
        if all(j in finished for j in range(first, first + groups_per_step)):
            choices.append("train")
        assert choices, "deadlock"
        event = rng.choice(choices)
        if event == "start":
            running[next_start] = version
            next_start += 1
        elif event == "finish":
            j = rng.choice(sorted(running))
            finished[j] = running.pop(j)
        else:
            trained_step += 1
            for j in range(first, first + groups_per_step):
                assert consumption_step(j, groups_per_step) == trained_step
                out.append((trained_step, finished.pop(j)))
            if trained_step % sync_every == 0:
                version = trained_step
    return out


# k >= sync_every - 1: smaller k is rejected by config validation (the pipeline would deadlock).
@pytest.mark.parametrize("k, sync_every", [(0, 1), (1, 1), (2, 1), (3, 1), (7, 1), (1, 2), (3, 2), (7, 2)])
def test_admission_bounds_every_lag_by_k(k, sync_every):
    lags = []
    for seed in range(20):
        for step, v_start in _simulate(k, groups_per_step=3, steps=12, sync_every=sync_every, seed=seed):
            lags.append((step - 1) - v_start)
    assert 0 <= min(lags) and max(lags) <= k
    assert max(lags) == k  # the bound is reached, so it is tight


def test_lag_check_and_metrics():
    start, end = np.array([4, 3, 2, 4]), np.array([4, 4, 3, 4])
    check_lag_bound(6, start, k=3, uids=np.array(["a", "b", "c", "d"]))
    with pytest.raises(RuntimeError, match="uid 'c'.*lag 3"):
        check_lag_bound(6, start, k=2, uids=np.array(["a", "b", "c", "d"]))
    with pytest.raises(RuntimeError, match="lag -1"):
        check_lag_bound(4, start, k=5, uids=np.array(["a", "b", "c", "d"]))
    m = staleness_metrics(6, start, end)
    assert m["staleness/start_lag_hist/1"] == 2 and m["staleness/start_lag_hist/2"] == 1
    assert m["staleness/start_lag_hist/3"] == 1 and m["staleness/start_lag_max"] == 3
    assert m["staleness/start_lag_mean"] == pytest.approx(1.75)
    assert m["staleness/end_lag_max"] == 2 and m["rollout/partial/num_trajectories"] == 2
    assert m["rollout/partial/span_max"] == 1 and m["rollout/partial/span_mean"] == pytest.approx(0.5)
