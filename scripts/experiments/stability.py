"""The stability experiment (issue 7): synchronous GRPO against async TIS, M2PO and VCPO at lag k.

Sits on top of the whole pipeline (dataset -> rollouter -> queue -> trainer/actor -> param sync ->
engines): every run of the grid is one ``python -m verl.trainer.main_ppo`` subprocess on the CPU
Countdown testbed, all from the same cached SFT warm start; this script plans the grid, runs it
one run at a time (a run already uses both cores), then reads each run's ``metrics.jsonl`` back
into ``results.md`` (one row per method and k, over seeds) and PNG plots.

    PYTHONPATH=. python scripts/experiments/stability.py --out runs/stability            # full grid
    PYTHONPATH=. python scripts/experiments/stability.py --quick --out runs/stability_quick
    PYTHONPATH=. python scripts/experiments/stability.py --out runs/stability --resume   # after an interruption
    # a control at another lr, compared with the full grid's sync runs:
    PYTHONPATH=. python scripts/experiments/stability.py --methods sync,tis --ks 0,32 --lr 6.3e-5 \
        --sync-from runs/stability --out runs/stability_lr_control
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from verl.utils.config import ConfigError, check_choice, check_positive, check_range  # noqa: E402
from verl.utils.tracking import read_metrics  # noqa: E402

# The CPU testbed shared by every run (recipe/fully_async_policy/shell/vcpo/countdown/): tiny
# Qwen2 with its cached warm start, 16 prompts x 8 responses, GRPO, one optimizer step per
# weight sync, and the bypass loss with sequence TIS C = 8, so the methods differ only in what
# they add on top of it. M2PO alone swaps sequence TIS for the token-level TIS it was designed
# around (docs/losses.md).
TESTBED_OVERRIDES = (
    "model.path=preset:tiny",
    "data.train_batch_size=16",
    "rollout.n=8",
    "rollout.temperature=1.0",
    "data.max_response_length=16",
    "algorithm.adv_estimator=grpo",
    "actor.ppo_mini_batch_size=128",
    "actor.loss_agg_mode=seq-mean-token-mean",
    "actor.policy_loss.mode=bypass",
    "actor.policy_loss.tis_level=sequence",
    "actor.policy_loss.tis_cap=8",
    "async_training.trigger_parameter_sync_step=1",
    # 0 sizes the queue at (k + 1) x groups per step, so admission, not the queue, bounds the lag.
    "async_training.queue_max_groups=0",
)

_NO_VCPO = ("actor.ess_scaling.enable=false", "actor.grad_baselining.enable=false")

# method -> what it adds to the testbed. `sync` runs at k = 0 only; the others at every k > 0.
METHOD_OVERRIDES: dict[str, tuple[str, ...]] = {
    "sync": _NO_VCPO,
    "tis": _NO_VCPO,
    "m2po": _NO_VCPO + (
        "actor.policy_loss.tis_level=token",
        "actor.policy_loss.m2po=true",
        "actor.policy_loss.m2po_threshold=0.04",
    ),
    "vcpo": (
        "actor.ess_scaling.enable=true",
        "actor.ess_scaling.scaling_rule=sqrt",
        "actor.grad_baselining.enable=true",
        "actor.grad_baselining.scope=group",
        "actor.grad_baselining.norm_by_std=true",
    ),
}
METHODS = tuple(METHOD_OVERRIDES)
SYNC = "sync"

RUN_MARKER = "stability_run.json"  # written by this script after the subprocess exits
GREEDY = "val/greedy_acc"
MEAN_AT_N = re.compile(r"^val/mean_at_(\d+)_acc$")
ESS_RATIO = "actor/ess_ratio"
GRAD_NORM = "actor/grad_norm"
ROLLOUT_KL = "actor/rollout_kl_k3"
START_LAG_MEAN = "staleness/start_lag_mean"
START_LAG_MAX = "staleness/start_lag_max"


@dataclass
class GridConfig:
    """The grid and the per-run budget. ``collapse_drop`` < 0 picks the drop from the noise of
    one evaluation (see ``collapse_drop_threshold``)."""

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    ks: list[int] = field(default_factory=lambda: [4, 16, 32])
    seeds: int = 3
    steps: int = 250
    val_freq: int = 20
    val_samples: int = 500
    mean_at_n: int = 4
    lr: float = 1e-4
    ess_window: int = 10
    collapse_drop: float = -1.0
    collapse_auc_ratio: float = 0.8
    out: str = "runs/stability"

    def validate(self, prefix: str) -> None:
        if not self.methods:
            raise ConfigError(f"{prefix}.methods", self.methods, f"at least one of {', '.join(METHODS)}")
        for m in self.methods:
            check_choice(f"{prefix}.methods", m, METHODS)
        for k in self.ks:
            check_positive(f"{prefix}.ks", k, allow_zero=True)
        check_positive(f"{prefix}.seeds", self.seeds)
        check_positive(f"{prefix}.steps", self.steps)
        check_positive(f"{prefix}.val_freq", self.val_freq)
        check_positive(f"{prefix}.val_samples", self.val_samples)
        check_positive(f"{prefix}.mean_at_n", self.mean_at_n, allow_zero=True)
        check_positive(f"{prefix}.lr", self.lr)
        check_positive(f"{prefix}.ess_window", self.ess_window)
        if self.collapse_drop >= 1.0:
            raise ConfigError(f"{prefix}.collapse_drop", self.collapse_drop, "must be < 1 (negative: automatic)")
        check_range(f"{prefix}.collapse_auc_ratio", self.collapse_auc_ratio, 0.0, 1.0)
        if not self.plan_keys():
            raise ConfigError(f"{prefix}.ks", self.ks, "needs a k > 0 for the async methods (sync runs at k = 0)")

    def plan_keys(self) -> list[tuple[str, int]]:
        """(method, k) cells in run order: sync first (it is the reference), then by k, then method."""
        keys = [(SYNC, 0)] if SYNC in self.methods else []
        async_ks = sorted({k for k in self.ks if k > 0})
        keys += [(m, k) for k in async_ks for m in METHODS if m != SYNC and m in self.methods]
        return keys


QUICK = dict(methods=list(METHODS), ks=[16], seeds=1, steps=50, val_freq=10, val_samples=200, mean_at_n=4)


@dataclass
class RunSpec:
    method: str
    k: int
    seed: int
    measures_warm_start: bool  # only the first run validates at step 0: all share the warm start

    @property
    def name(self) -> str:
        return f"{self.method}_k{self.k}_seed{self.seed}"


def plan_grid(grid: GridConfig) -> list[RunSpec]:
    """Seeds outermost, so an interrupted grid has whole comparisons for its first seeds."""
    specs = [RunSpec(m, k, seed, False) for seed in range(1, grid.seeds + 1) for m, k in grid.plan_keys()]
    if specs:
        specs[0].measures_warm_start = True
    return specs


def _override_key(override: str) -> str:
    return override.split("=", 1)[0]


def run_overrides(spec: RunSpec, grid: GridConfig, run_dir: Path) -> list[str]:
    # A method's setting replaces the testbed's (Hydra rejects a key given twice).
    method = METHOD_OVERRIDES[spec.method]
    replaced = {_override_key(o) for o in method}
    return [
        *(o for o in TESTBED_OVERRIDES if _override_key(o) not in replaced),
        *method,
        f"actor.optim.lr={grid.lr}",
        f"async_training.k={spec.k}",
        # Partial rollouts keep the rollouter busy across weight updates; at k = 0 no update can
        # arrive mid-batch, and the paper's synchronous baseline has none.
        f"async_training.partial_rollout={str(spec.k > 0).lower()}",
        f"trainer.seed={spec.seed}",
        f"trainer.total_training_steps={grid.steps}",
        f"trainer.val_freq={grid.val_freq}",
        f"trainer.val_before_train={str(spec.measures_warm_start).lower()}",
        f"data.val_max_samples={grid.val_samples}",
        f"rollout.val_kwargs.mean_at_n_samples={grid.mean_at_n}",
        f"trainer.experiment_name=stability_{spec.name}",
        f"trainer.run_dir={run_dir}",
        "trainer.logger=[jsonl]",
        # An interrupted run restarts from scratch: a resumed run's wall clock and lags would not
        # be comparable with an uninterrupted one.
        "trainer.resume=disable",
        "trainer.save_freq=0",
        "trainer.max_checkpoints_to_keep=1",
    ]


def run_command(spec: RunSpec, grid: GridConfig, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "verl.trainer.main_ppo", *run_overrides(spec, grid, run_dir)]


def run_is_complete(run_dir: Path, steps: int) -> bool:
    marker = run_dir / RUN_MARKER
    if not marker.exists() or json.loads(marker.read_text()).get("returncode") != 0:
        return False
    records = read_metrics(run_dir)
    return bool(records) and records[-1]["step"] == steps and GREEDY in records[-1]


# ---------------------------------------------------------------------------------- aggregation
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


def _spread(values: Sequence[float], digits: int = 3) -> str:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{np.mean(v):.{digits}f} ({min(v):.{digits}f}–{max(v):.{digits}f})"


def _first_steps(steps: Sequence[int | None]) -> str:
    return ", ".join("never" if s is None else str(s) for s in steps)


def results_table(summaries: Sequence[RunSummary], planned_seeds: int, grid: GridConfig, warm_acc: float,
                  warm_mean_at_n: float, reference: dict[str, float], num_val: int,
                  failed: Sequence[str] = ()) -> str:
    """The markdown of results.md: one row per (method, k) over seeds, then the definitions."""
    n = grid.mean_at_n
    lines = [
        f"| method | k | seeds | final greedy | final mean@{n} | worst greedy after step 0 (min over seeds) | "
        "AUC/step | AUC % of sync | wall s to sync's final greedy (reached/seeds) | ESS ratio mean | "
        f"ESS ratio min of {grid.ess_window}-step mean | lag mean (steps > k) / max | first step at lag k | "
        "KL(rollout‖policy) mean | "
        "collapsed |",
        "|---" * 15 + "|",
    ]
    cells: dict[tuple[str, int], list[RunSummary]] = {}
    for s in summaries:
        cells.setdefault((s.method, s.k), []).append(s)
    for (method, k), rows in cells.items():
        reached = [r.time_to_sync_final_s for r in rows if r.time_to_sync_final_s is not None]
        ratio = [r.auc_ratio * 100 for r in rows if r.auc_ratio is not None]
        lines.append(
            f"| {method} | {k} | {len(rows)}/{planned_seeds} | {_spread([r.final_greedy for r in rows])} | "
            f"{_spread([r.final_mean_at_n for r in rows])} | {min(r.worst_greedy for r in rows):.3f} | "
            f"{_spread([r.auc for r in rows])} | {_spread(ratio, 0)} | "
            f"{(f'{np.median(reached):.0f}' if reached else '-')} ({len(reached)}/{len(rows)}) | "
            f"{_spread([r.ess_mean for r in rows], 2)} | {min(r.ess_windowed_min for r in rows):.3f} | "
            f"{np.mean([r.lag_mean for r in rows]):.1f} / {max(r.lag_max for r in rows):.0f} | "
            f"{_first_steps([r.first_step_at_k for r in rows])} | "
            f"{np.mean([r.kl_mean for r in rows]):.2g} | {sum(r.collapsed for r in rows)}/{len(rows)} |"
        )
    drop = reference["collapse_drop"]
    lines += [
        "",
        f"Warm start (step-0 validation, measured once, shared by every run): greedy {warm_acc:.3f}, "
        f"mean@{n} {warm_mean_at_n:.3f}, on {num_val} held-out problems (one evaluation's standard error "
        f"≈ {100 * math.sqrt(warm_acc * (1 - warm_acc) / num_val):.1f} points).",
        f"Synchronous reference (mean over sync seeds): AUC/step {reference['sync_auc']:.3f}, final greedy "
        f"{reference['sync_final_greedy']:.3f}.",
        "",
        "Definitions. Cells are mean (min–max) over seeds. Accuracies are held-out greedy and mean@n "
        "(temperature 1). AUC/step is the area under the greedy-accuracy-vs-step curve (trapezoids, step 0 = "
        "the warm start) divided by the number of steps, i.e. the curve's mean height; % of sync divides "
        "by the synchronous AUC. Wall time counts from the first training step (validation included) and is "
        "the median over the seeds that reached the target. ESS ratio = ESS / B per step; its windowed "
        f"minimum is the lowest {grid.ess_window}-step mean (the raw minimum sits near 1/B in every stale "
        "run). Lag = trainer version − the version that started a trajectory; its mean is over steps > k "
        "(before step k + 1 the lag cannot reach k); the first step at lag k (per seed) shows when the "
        "rollouter's lead saturated: running r times faster than the trainer it gains 1 − 1/r versions per "
        "step, so the lag reaches k near step k·r / (r − 1).",
        f"**collapsed** = a seed whose worst greedy accuracy after step 0 is below the warm start by more "
        f"than {100 * drop:.1f} points (max of 5 points and 2.5 standard errors of one evaluation), or whose "
        f"AUC is below {100 * grid.collapse_auc_ratio:.0f}% of the synchronous AUC. Judged by the worst point "
        "and the area, not the final value: in the calibration every TIS-only run at k ≥ 16 fell 10–15 "
        "points below its start while ESS-scaled runs stayed within 3, and one collapsed run recovered to "
        "a normal final accuracy.",
    ]
    if failed:
        lines += ["", f"Failed runs (not in the table): {', '.join(failed)}."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- plots
PLOT_METRICS = (
    # (file stem, y label, curve attribute, x attribute, smoothing window, log y)
    ("accuracy_vs_step", "held-out greedy accuracy", "greedy", "val_steps", 1, False),
    ("accuracy_vs_wall", "held-out greedy accuracy", "greedy", "val_wall_s", 1, False),
    ("ess_ratio", "ESS ratio (10-step mean)", "ess_ratio", "train_steps", 10, False),
    ("grad_norm", "gradient norm (10-step mean)", "grad_norm", "train_steps", 10, True),
    ("rollout_kl", "KL(rollout‖policy), k3 (10-step mean)", "rollout_kl", "train_steps", 10, True),
)
METHOD_COLOURS = {"sync": "black", "tis": "tab:red", "m2po": "tab:orange", "vcpo": "tab:blue"}


def plot_grid(curves: dict[tuple[str, int, int], RunCurves], warm_acc: float, out_dir: Path) -> list[Path]:
    """One PNG per metric, one panel per async k (sync drawn in every panel as the reference);
    methods as colours, seeds as thin lines, the seed mean of accuracy as a thick line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({k for _, k, _ in curves if k > 0}) or [0]
    paths = []
    for stem, ylabel, attr, xattr, window, logy in PLOT_METRICS:
        fig, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks), 3.4), squeeze=False, sharey=True)
        for ax, k in zip(axes[0], ks):
            for method in METHODS:
                runs = [c for (m, kk, _), c in sorted(curves.items()) if m == method and (kk == k or m == SYNC)]
                if not runs:
                    continue
                colour = METHOD_COLOURS[method]
                style = "--" if method == SYNC and k > 0 else "-"
                stacked = []
                for c in runs:
                    x, y = getattr(c, xattr).astype(np.float64), getattr(c, attr)
                    if attr == "greedy":
                        steps, y = with_start_point(c.val_steps, y, warm_acc)
                        # the shared warm-start point sits at step 0 and wall time 0
                        x = steps.astype(np.float64) if xattr == "val_steps" else np.concatenate([[0.0], x])[-len(y):]
                    y = smooth(y, window)
                    stacked.append(y)
                    ax.plot(x, y, color=colour, linewidth=0.8, alpha=0.5, linestyle=style)
                # Seeds share the step axis, so their mean is drawn thick; wall-clock axes differ per seed.
                if not xattr.endswith("wall_s") and len({len(s) for s in stacked}) == 1:
                    ax.plot(x, np.nanmean(stacked, axis=0), color=colour, linewidth=2.0, linestyle=style, label=method)
                else:
                    ax.plot([], [], color=colour, linewidth=2.0, linestyle=style, label=method)
            if attr == "greedy":
                ax.axhline(warm_acc, color="grey", linewidth=0.6, linestyle=":")
            if logy:
                ax.set_yscale("log")
            ax.set_title(f"k = {k}", fontsize=10)
            ax.set_xlabel("wall time (s)" if xattr.endswith("wall_s") else "step", fontsize=9)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(ylabel, fontsize=9)
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------- driver
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


def aggregate(grid: GridConfig, specs: Sequence[RunSpec], out: Path) -> Path:
    """Read every complete run, write results.md, summary.json and the PNGs; returns results.md."""
    runs_dir = out / "runs"
    curves, failed = {}, []
    for spec in specs:
        if run_is_complete(runs_dir / spec.name, grid.steps):
            curves[(spec.method, spec.k, spec.seed)] = curves_from_records(read_metrics(runs_dir / spec.name))
        else:
            failed.append(spec.name)
    warm_acc, warm_mean_at_n, num_val = warm_start_point(specs, runs_dir)
    summaries, reference = summarize_runs(curves, warm_acc, grid, num_val)
    table = results_table(summaries, grid.seeds, grid, warm_acc, warm_mean_at_n, reference, num_val, failed)
    pngs = plot_grid(curves, warm_acc, out)
    body = [f"# Stability grid: {', '.join(grid.methods)} at k ∈ {{{', '.join(map(str, grid.ks))}}}", "",
            f"{grid.seeds} seed(s), {grid.steps} steps, validation every {grid.val_freq} steps on {num_val} "
            f"held-out problems, base lr {grid.lr}.", "", table, ""]
    body += [f"![{p.stem}]({p.name})" for p in pngs]
    path = out / "results.md"
    path.write_text("\n".join(body) + "\n")
    (out / "summary.json").write_text(json.dumps({"grid": asdict(grid), "reference": reference,
                                                  "warm_start": {"greedy": warm_acc, "mean_at_n": warm_mean_at_n},
                                                  "runs": [asdict(s) for s in summaries], "failed": failed},
                                                 indent=1))
    return path


def _fmt_s(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def execute(grid: GridConfig, specs: Sequence[RunSpec], out: Path, resume: bool) -> None:
    runs_dir, logs_dir = out / "runs", out / "logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    durations: list[float] = []
    t_grid = time.perf_counter()
    # Decided once: only the run being executed changes state during the loop.
    kept = {s.name for s in specs if resume and run_is_complete(runs_dir / s.name, grid.steps)}
    for i, spec in enumerate(specs, 1):
        run_dir = runs_dir / spec.name
        tag = f"[{i}/{len(specs)}] {spec.method} k={spec.k} seed {spec.seed}"
        if spec.name in kept:
            print(f"{tag}: complete, skipped", flush=True)
            continue
        if run_dir.exists():
            shutil.rmtree(run_dir)
        remaining = sum(1 for s in specs[i - 1:] if s.name not in kept)
        eta = f", ETA {_fmt_s(np.mean(durations) * remaining)} for {remaining} run(s)" if durations else ""
        print(f"{tag}: running{eta}", flush=True)
        t0 = time.perf_counter()
        with open(logs_dir / f"{spec.name}.log", "w") as log:
            proc = subprocess.run(run_command(spec, grid, run_dir.resolve()), cwd=REPO, env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - t0
        durations.append(wall)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_MARKER).write_text(json.dumps({"returncode": proc.returncode, "wall_s": wall,
                                                      "command": run_command(spec, grid, run_dir.resolve())}))
        if proc.returncode != 0:
            print(f"{tag}: FAILED (exit {proc.returncode}) after {_fmt_s(wall)}; log {logs_dir / f'{spec.name}.log'}",
                  flush=True)
            continue
        last = [r for r in read_metrics(run_dir) if GREEDY in r][-1]
        print(f"{tag}: done in {_fmt_s(wall)}, final greedy {last[GREEDY]:.3f}", flush=True)
    print(f"grid finished in {_fmt_s(time.perf_counter() - t_grid)}", flush=True)


def link_reference_runs(specs: Sequence[RunSpec], out: Path, source: Path, steps: int) -> list[RunSpec]:
    """Link the synchronous runs of another grid (``source``, its ``--out``) into ``out/runs`` so
    they are this grid's reference; returns the specs left to run. For controls that change one
    setting (e.g. ``--lr``) of the async runs but must be compared with the original sync runs."""
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        if spec.method != SYNC:
            continue
        src = (source / "runs" / spec.name).resolve()
        if not run_is_complete(src, steps):
            raise FileNotFoundError(f"--sync-from: {src} is not a complete {steps}-step run")
        dst = runs_dir / spec.name
        if dst.exists() and not dst.is_symlink():
            raise FileExistsError(f"--sync-from: {dst} is a run of this grid; remove it or drop --sync-from")
        dst.unlink(missing_ok=True)
        dst.symlink_to(src)
    return [spec for spec in specs if spec.method != SYNC]


def parse_args(argv: Sequence[str] | None = None) -> tuple[GridConfig, argparse.Namespace]:
    default = GridConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(default.methods), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--ks", default=",".join(map(str, [0, *default.ks])),
                   help="lags; sync always runs at k = 0 and the async methods at each k > 0 (add 64 for the stress point)")
    p.add_argument("--seeds", type=int, default=default.seeds)
    p.add_argument("--steps", type=int, default=default.steps)
    p.add_argument("--val-freq", type=int, default=default.val_freq)
    p.add_argument("--val-samples", type=int, default=default.val_samples)
    p.add_argument("--mean-at-n", type=int, default=default.mean_at_n)
    p.add_argument("--lr", type=float, default=default.lr)
    p.add_argument("--collapse-drop", type=float, default=default.collapse_drop,
                   help="accuracy drop below the warm start that counts as a collapse (negative: automatic)")
    p.add_argument("--collapse-auc-ratio", type=float, default=default.collapse_auc_ratio)
    p.add_argument("--out", default=default.out)
    p.add_argument("--quick", action="store_true",
                   help="defaults for a < 15 min check: one seed, sync + tis/m2po/vcpo at k = 16, 50 steps, "
                        "validation every 10 on 200 problems (flags given explicitly still win)")
    p.add_argument("--resume", action="store_true", help="keep finished runs in --out and run only the rest")
    p.add_argument("--sync-from", default=None, metavar="DIR",
                   help="take the synchronous reference runs from another grid's --out (linked, not rerun), "
                        "e.g. for a control at another --lr")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument("--aggregate-only", action="store_true", help="rebuild results.md and plots from --out")
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(**{key: ",".join(map(str, v)) if isinstance(v, list) else v for key, v in QUICK.items()})
        args = p.parse_args(argv)
    grid = GridConfig(
        methods=[m for m in args.methods.split(",") if m], ks=[int(k) for k in args.ks.split(",") if k],
        seeds=args.seeds, steps=args.steps, val_freq=args.val_freq, val_samples=args.val_samples,
        mean_at_n=args.mean_at_n, lr=args.lr, collapse_drop=args.collapse_drop,
        collapse_auc_ratio=args.collapse_auc_ratio, out=args.out,
    )
    grid.validate("stability")
    if args.sync_from and SYNC not in grid.methods:
        p.error(f"--sync-from needs {SYNC!r} in --methods: the linked runs are the reference")
    return grid, args


def main(argv: Sequence[str] | None = None) -> None:
    try:
        grid, args = parse_args(argv)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    out = Path(grid.out)
    specs = plan_grid(grid)
    if args.dry_run:
        for spec in specs:
            cmd = run_command(spec, grid, (out / "runs" / spec.name).resolve())
            print(" ".join(cmd))
        return
    if not args.aggregate_only:
        out.mkdir(parents=True, exist_ok=True)
        (out / "grid.json").write_text(json.dumps(asdict(grid), indent=1))
        to_run = specs
        if args.sync_from:
            try:
                to_run = link_reference_runs(specs, out, Path(args.sync_from), grid.steps)
            except (FileNotFoundError, FileExistsError) as e:
                sys.exit(f"error: {e}")
        execute(grid, to_run, out, resume=args.resume)
    print(f"results: {aggregate(grid, specs, out)}", flush=True)


if __name__ == "__main__":
    main()
