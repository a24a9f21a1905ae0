"""Property test of the bounded-lag pipeline through the trainer's entry point.

Random relative speeds (seeded sleeps in the real rollouter and trainer), random k, one or two
rollout replicas: every
trained trajectory's start lag is within [0, k], each prompt group is trained exactly once at
step floor(j / G) + 1, and at k = 0 the trainer's recomputed log-probs equal the behaviour
log-probs (|log w| < 1e-4) and a seeded run is reproducible.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from tests.trainer.fully_async.conftest import small_config
from verl.trainer.main_ppo import run
from verl.utils.tracking import read_metrics

STEPS = 5
GROUPS_PER_STEP = 4


def _ledger(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "trajectories.jsonl").read_text().splitlines()]


def _run(assets, run_dir, k: int, partial: bool, rollout_delay: float, train_delay: float, replicas: int = 1):
    run(small_config(
        assets, run_dir, f"async_training.staleness_threshold={k}",
        f"async_training.partial_rollout={str(partial).lower()}", f"rollout.n_gpus_per_node={replicas}",
        f"async_training.test_rollout_delay_max_s={rollout_delay}",
        f"async_training.test_train_delay_max_s={train_delay}",
        # Recompute the old log-probs (PPO clip, no IS correction) so the ledger records each log w.
        "async_training.skip_recompute_old_log_prob=false", "async_training.compute_prox_log_prob=true",
        "algorithm.rollout_correction.rollout_is=null",
        f"trainer.total_training_steps={STEPS}", f"trainer.save_freq={STEPS}",
    ))
    return _ledger(run_dir)


def _assert_each_group_once_in_order(ledger: list[dict], n: int) -> None:
    per_uid = Counter(r["uid"] for r in ledger)
    assert len(per_uid) == STEPS * GROUPS_PER_STEP and set(per_uid.values()) == {n}
    for r in ledger:
        j = int(r["uid"].split("-")[0][1:])
        assert r["step"] == j // GROUPS_PER_STEP + 1, r
        assert r["param_version_trained"] == r["step"] - 1


@pytest.mark.slow
def test_k0_is_on_policy_and_reproducible(pipeline_assets, ray_cluster, tmp_path):
    a = _run(pipeline_assets, tmp_path / "a", k=0, partial=False, rollout_delay=0.05, train_delay=0.0)
    _assert_each_group_once_in_order(a, n=4)
    assert all(r["param_version_start"] == r["param_version_end"] == r["step"] - 1 for r in a)
    assert max(abs(r["log_is_weight"]) for r in a) < 1e-4
    # Different sleeps, same seed: the same trajectories bit for bit.
    b = _run(pipeline_assets, tmp_path / "b", k=0, partial=False, rollout_delay=0.0, train_delay=0.05)
    assert a == b
    ma, mb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    for key in ("batch/score/mean", "actor/pg_loss", "actor/grad_norm", "response_length/mean"):
        assert [m[key] for m in ma] == [m[key] for m in mb], key


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [1, 2])
def test_random_speeds_never_exceed_lag_k(pipeline_assets, ray_cluster, tmp_path, replicas):
    rng = random.Random(1000 + replicas)
    k, partial = rng.choice([1, 2, 3]), replicas == 1
    rollout_delay, train_delay = rng.uniform(0.0, 0.1), rng.uniform(0.05, 0.3)
    ledger = _run(pipeline_assets, tmp_path / "run", k, partial, rollout_delay, train_delay, replicas)
    _assert_each_group_once_in_order(ledger, n=4)
    lags = [r["param_version_trained"] - r["param_version_start"] for r in ledger]
    assert 0 <= min(lags) and max(lags) <= k, (k, Counter(lags))
    # The trainer was slower than the rollouter, so staleness really occurred.
    assert max(lags) >= 1, (k, partial, rollout_delay, train_delay)
    metrics = read_metrics(tmp_path / "run")
    assert max(m["staleness/start_lag_max"] for m in metrics) == max(lags)
    for m in metrics:
        hist = {key: v for key, v in m.items() if key.startswith("staleness/start_lag_hist/")}
        assert sum(hist.values()) == GROUPS_PER_STEP * 4
