"""Reads the stability runs back: metrics.jsonl as curves, AUC, worst point, collapse flag, summaries."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from verl.experiments.stability.plan import METHODS, SYNC, GridConfig, RunSpec
from verl.utils.tracking import read_metrics

GREEDY = "val/greedy_acc"
MEAN_AT_N = re.compile(r"^val/mean_at_(\d+)_acc$")
ESS_RATIO = "actor/ess_ratio"
GRAD_NORM = "actor/grad_norm"
ROLLOUT_KL = "actor/rollout_kl_k3"
START_LAG_MEAN = "staleness/start_lag_mean"
START_LAG_MAX = "staleness/start_lag_max"


@dataclass
class RunCurves:
    """What one run logged, as arrays: validation points and per-step training diagnostics."""

    val_steps: np.ndarray
    greedy: np.ndarray
    mean_at_n: np.ndarray  # NaN where not measured
    val_wall_s: np.ndarray
    train_steps: np.ndarray
    train_wall_s: np.ndarray
    ess_ratio: np.ndarray
    grad_norm: np.ndarray
    rollout_kl: np.ndarray
    start_lag_mean: np.ndarray
    start_lag_max: np.ndarray


def curves_from_records(records: Sequence[dict]) -> RunCurves:
    """Turn ``metrics.jsonl`` records into arrays. Wall time is measured from the first training
    step: the run that validated at step 0 has that validation's time taken out, so every run's
    clock starts at the same point."""
    val = [r for r in records if GREEDY in r]
    train = [r for r in records if r["step"] > 0]
    offset = next((r.get("timing/val_s", 0.0) for r in records if r["step"] == 0), 0.0)

    def mean_at(r: dict) -> float:
        return next((float(v) for key, v in r.items() if MEAN_AT_N.match(key)), math.nan)

    def series(rows: Sequence[dict], key: str) -> np.ndarray:
        return np.array([float(r.get(key, math.nan)) for r in rows], dtype=np.float64)

    return RunCurves(
        val_steps=np.array([r["step"] for r in val], dtype=np.int64),
        greedy=series(val, GREEDY),
        mean_at_n=np.array([mean_at(r) for r in val], dtype=np.float64),
        val_wall_s=np.maximum(series(val, "time/wall_s") - offset, 0.0),
        train_steps=np.array([r["step"] for r in train], dtype=np.int64),
        train_wall_s=np.maximum(series(train, "time/wall_s") - offset, 0.0),
        ess_ratio=series(train, ESS_RATIO),
        grad_norm=series(train, GRAD_NORM),
        rollout_kl=series(train, ROLLOUT_KL),
        start_lag_mean=series(train, START_LAG_MEAN),
        start_lag_max=series(train, START_LAG_MAX),
    )


def with_start_point(steps: np.ndarray, accs: np.ndarray, start_acc: float) -> tuple[np.ndarray, np.ndarray]:
    """Prepend the shared warm-start accuracy at step 0 when the run did not measure it itself."""
    if len(steps) and steps[0] == 0:
        return steps, accs
    return np.concatenate([[0], steps]), np.concatenate([[start_acc], accs])


def normalised_auc(steps: np.ndarray, accs: np.ndarray) -> float:
    """Area under the accuracy-vs-step curve over its step span (trapezoids), i.e. the curve's mean
    height: AUC = (1 / (s_last - s_0)) * sum_j (s_{j+1} - s_j) * (a_j + a_{j+1}) / 2."""
    if len(steps) < 2:
        return float(accs[0]) if len(accs) else math.nan
    s, a = steps.astype(np.float64), accs.astype(np.float64)
    return float(np.sum(np.diff(s) * (a[1:] + a[:-1]) / 2.0) / (s[-1] - s[0]))


def worst_after_start(steps: np.ndarray, accs: np.ndarray) -> float:
    """min_j a_j over evaluations at step > 0 (the dip a collapse leaves, whatever the end)."""
    later = accs[steps > 0]
    return float(later.min()) if len(later) else math.nan


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` points (NaNs carried as their neighbours' mean)."""
    if window <= 1:
        return values
    v = np.where(np.isfinite(values), values, 0.0)
    ok = np.isfinite(values).astype(np.float64)
    csum, ccount = np.cumsum(np.insert(v, 0, 0.0)), np.cumsum(np.insert(ok, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    counts = ccount[idx] - ccount[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, (csum[idx] - csum[lo]) / counts, np.nan)


def windowed_min(values: np.ndarray, window: int) -> float:
    """min over t of the mean of values[t : t + window] (NaNs skipped); the raw minimum of the ESS
    ratio sits near 1/B in every stale run, a windowed mean shows sustained drops."""
    v = values[np.isfinite(values)]
    if not len(v):
        return math.nan
    w = min(window, len(v))
    return float(smooth(v, w)[w - 1:].min())  # full windows only


def time_to_target(wall_s: np.ndarray, accs: np.ndarray, target: float) -> float | None:
    """Wall time of the first evaluation with accuracy >= target; None if never reached."""
    hit = np.nonzero(accs >= target)[0]
    return float(wall_s[hit[0]]) if len(hit) else None


def first_step_at_lag(steps: np.ndarray, lag_max: np.ndarray, k: int) -> int | None:
    """First training step whose batch held a trajectory of lag k (None if the lag never got there)."""
    hit = np.nonzero(lag_max >= k)[0]
    return int(steps[hit[0]]) if len(hit) else None


def collapse_drop_threshold(warm_acc: float, num_val: int) -> float:
    """The drop below the warm start that counts as a collapse: max(5 points, 2.5 standard errors of
    one evaluation, sqrt(p (1 - p) / n)). One evaluation on 500 problems at p ~ 0.19 has SE ~ 1.8
    points; the worst of ~10 evaluations of a flat curve sits ~1.5-2 SE below it, so 2.5 SE keeps
    noise out, while the calibration's TIS collapses fell 10-15 points."""
    se = math.sqrt(max(warm_acc * (1.0 - warm_acc), 0.0) / num_val)
    return max(0.05, 2.5 * se)


def is_collapsed(worst: float, warm_acc: float, auc_ratio: float | None, drop: float, auc_floor: float) -> bool:
    """collapsed = worst greedy after step 0 < warm start - drop, or AUC < auc_floor x sync's AUC."""
    below = math.isfinite(worst) and worst < warm_acc - drop
    return below or (auc_ratio is not None and math.isfinite(auc_ratio) and auc_ratio < auc_floor)


@dataclass
class RunSummary:
    method: str
    k: int
    seed: int
    final_greedy: float
    final_mean_at_n: float
    worst_greedy: float
    auc: float
    auc_ratio: float | None
    time_to_sync_final_s: float | None
    ess_mean: float
    ess_windowed_min: float
    lag_mean: float  # over steps > k, where the lag can reach k
    lag_max: float
    first_step_at_k: int | None  # the rollouter builds its lead over ~k r / (r - 1) steps at r x the trainer's speed
    kl_mean: float
    collapsed: bool


def summarize_runs(curves: dict[tuple[str, int, int], RunCurves], warm_acc: float, grid: GridConfig,
                   num_val: int) -> tuple[list[RunSummary], dict[str, float]]:
    """Per-run summaries against the synchronous reference (the mean over sync seeds of its AUC and
    final greedy accuracy); returns them with the reference and thresholds used."""
    aucs: dict[tuple[str, int, int], float] = {}
    for key, c in curves.items():
        aucs[key] = normalised_auc(*with_start_point(c.val_steps, c.greedy, warm_acc))
    sync_keys = [key for key in curves if key[0] == SYNC]
    sync_auc = float(np.mean([aucs[key] for key in sync_keys])) if sync_keys else math.nan
    sync_final = float(np.mean([curves[key].greedy[-1] for key in sync_keys])) if sync_keys else math.nan
    drop = grid.collapse_drop if grid.collapse_drop >= 0 else collapse_drop_threshold(warm_acc, num_val)
    out = []
    for (method, k, seed), c in sorted(curves.items(), key=lambda kv: (kv[0][1], METHODS.index(kv[0][0]), kv[0][2])):
        auc = aucs[(method, k, seed)]
        ratio = auc / sync_auc if math.isfinite(sync_auc) and sync_auc > 0 else None
        worst = worst_after_start(c.val_steps, c.greedy)
        steady = c.train_steps > k
        lag = c.start_lag_mean[steady] if steady.any() else c.start_lag_mean
        out.append(RunSummary(
            method=method, k=k, seed=seed, final_greedy=float(c.greedy[-1]), final_mean_at_n=float(c.mean_at_n[-1]),
            worst_greedy=worst, auc=auc, auc_ratio=ratio,
            time_to_sync_final_s=time_to_target(c.val_wall_s, c.greedy, sync_final) if math.isfinite(sync_final) else None,
            ess_mean=float(np.nanmean(c.ess_ratio)) if np.isfinite(c.ess_ratio).any() else math.nan,
            ess_windowed_min=windowed_min(c.ess_ratio, grid.ess_window),
            lag_mean=float(np.nanmean(lag)) if np.isfinite(lag).any() else math.nan,
            lag_max=float(np.nanmax(c.start_lag_max)) if np.isfinite(c.start_lag_max).any() else math.nan,
            first_step_at_k=first_step_at_lag(c.train_steps, c.start_lag_max, k),
            kl_mean=float(np.nanmean(c.rollout_kl)) if np.isfinite(c.rollout_kl).any() else math.nan,
            collapsed=is_collapsed(worst, warm_acc, ratio, drop, grid.collapse_auc_ratio),
        ))
    return out, {"sync_auc": sync_auc, "sync_final_greedy": sync_final, "collapse_drop": drop}


def warm_start_point(specs: Sequence[RunSpec], runs_dir: Path) -> tuple[float, float, int]:
    """(greedy, mean@n, number of validation problems) of the step-0 validation, from the first
    planned run that has one."""
    for spec in specs:
        for r in read_metrics(runs_dir / spec.name):
            if r["step"] == 0 and GREEDY in r:
                mean_at = next((float(v) for key, v in r.items() if MEAN_AT_N.match(key)), math.nan)
                return float(r[GREEDY]), mean_at, _num_val(runs_dir / spec.name)
    raise FileNotFoundError(f"no step-0 validation in any run under {runs_dir} (the first run of the plan measures it)")


def _num_val(run_dir: Path) -> int:
    from omegaconf import OmegaConf

    return int(OmegaConf.load(run_dir / "config.yaml").data.val_max_samples)
