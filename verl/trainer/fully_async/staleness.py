"""Staleness accounting for the fully-async pipeline: admission bound, lag checks and lag metrics.

rollouter (admission: may group j start?) -> queue (release in start order) -> trainer
(consumption: every trajectory's lag <= k, histogram metrics).

Groups are numbered j = 0, 1, 2, ... in the order their prompts are drawn; trainer step t
(1-based) trains the G groups j in [(t - 1) G, t G) with weights version t - 1. A group may
start only when the engine's version v satisfies j < (v + k + 1) G, i.e. floor(j / G) <= v + k.
Every trajectory of it then has param_version_start >= v, so its lag at consumption is
(t - 1) - param_version_start = floor(j / G) - param_version_start <= floor(j / G) - v <= k.
"""

from __future__ import annotations

from collections import Counter

import numpy as np


def admission_limit(version: int, k: int, groups_per_step: int) -> int:
    """The first group index the rollouter may NOT start at weights ``version``: (v + k + 1) G."""
    return (version + k + 1) * groups_per_step


def consumption_step(group_index: int, groups_per_step: int) -> int:
    """The 1-based trainer step that trains group j: floor(j / G) + 1."""
    return group_index // groups_per_step + 1


def trajectory_lags(trainer_step: int, param_versions: np.ndarray) -> np.ndarray:
    """lag_i = (t - 1) - version_i: how many versions trainer weights t - 1 are ahead of version_i."""
    return (trainer_step - 1) - np.asarray(param_versions, dtype=np.int64)


def check_lag_bound(trainer_step: int, param_version_start: np.ndarray, k: int, uids: np.ndarray) -> None:
    """The safety net behind admission control: raise if any trajectory's start lag exceeds k
    or it claims a version the trainer has not produced yet (negative lag)."""
    lags = trajectory_lags(trainer_step, param_version_start)
    bad = np.flatnonzero((lags > k) | (lags < 0))
    if bad.size:
        i = int(bad[0])
        raise RuntimeError(
            f"staleness bound violated at trainer step {trainer_step}: trajectory of uid {str(uids[i])!r} started "
            f"at version {int(param_version_start[i])}, lag {int(lags[i])} not in [0, k={k}] "
            f"({bad.size} offending trajectories)"
        )


def staleness_metrics(trainer_step: int, param_version_start: np.ndarray,
                      param_version_end: np.ndarray) -> dict[str, float]:
    """Start/end lag histograms (flat keys ``staleness/start_lag_hist/<lag>``: trajectory counts),
    their max and mean, and the partial-rollout count and span (end - start versions)."""
    start = trajectory_lags(trainer_step, param_version_start)
    end = trajectory_lags(trainer_step, param_version_end)
    out: dict[str, float] = {}
    for name, lags in (("start_lag", start), ("end_lag", end)):
        for lag, count in sorted(Counter(lags.tolist()).items()):
            out[f"staleness/{name}_hist/{lag}"] = float(count)
        out[f"staleness/{name}_max"] = float(lags.max())
        out[f"staleness/{name}_mean"] = float(lags.mean())
    span = np.asarray(param_version_end, dtype=np.int64) - np.asarray(param_version_start, dtype=np.int64)
    out["rollout/partial/num_trajectories"] = float((span > 0).sum())
    out["rollout/partial/span_max"] = float(span.max())
    out["rollout/partial/span_mean"] = float(span.mean())
    return out
