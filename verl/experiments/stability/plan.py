"""Plans the stability grid: the grid config, the methods, the runs and each run's overrides."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from verl.trainer.config import CONFIG_DIR, TrainerConfig, load_config
from verl.utils.config import ConfigError, check_choice, check_positive, check_range

# The CPU testbed shared by every run is the `task` group configs/task/countdown.yaml (tiny Qwen2
# with its cached warm start, 16 prompts x 8 responses, GRPO, one optimizer step per weight
# sync); each method is a `method` group, configs/method/<name>.yaml, the one definition of what
# the method adds (bypass loss, IS level, ESS / OPOB, partial rollouts). The grid only composes
# them and sets what it varies.
TASK = "countdown"
METHOD_DIR = CONFIG_DIR / "method"
SYNC = "sync"  # the synchronous reference every async run is compared with
# The paper's order: the synchronous reference, the unstable baseline, then the two fixes.
GRID_METHODS = (SYNC, "tis", "m2po", "vcpo")


def available_methods(method_dir: Path = METHOD_DIR) -> tuple[str, ...]:
    """Every method a grid may run: one per ``<method_dir>/<name>.yaml``, the grid's own first."""
    names = {p.stem for p in method_dir.glob("*.yaml")}
    return tuple(sorted(names, key=lambda m: (GRID_METHODS.index(m) if m in GRID_METHODS else len(GRID_METHODS), m)))


def is_synchronous(method: str, method_dir: Path = METHOD_DIR) -> bool:
    """A method whose file pins ``async_training.staleness_threshold`` at 0 (``sync``, or a
    synchronous variant of it) runs at k = 0 only; every other method at each k > 0."""
    from omegaconf import OmegaConf

    return OmegaConf.select(OmegaConf.load(method_dir / f"{method}.yaml"), "async_training.staleness_threshold") == 0


METHODS = available_methods()
SYNC_METHODS = tuple(m for m in METHODS if is_synchronous(m))


@dataclass
class GridConfig:
    """The grid and the per-run budget. ``collapse_drop`` < 0 picks the drop from the noise of
    one evaluation (see ``analysis.collapse_drop_threshold``)."""

    methods: list[str] = field(default_factory=lambda: list(GRID_METHODS))
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
        """(method, k) cells in run order: the synchronous methods at k = 0 first (sync, the
        reference, leads), then by k, then method."""
        keys = [(m, 0) for m in SYNC_METHODS if m in self.methods]
        async_ks = sorted({k for k in self.ks if k > 0})
        keys += [(m, k) for k in async_ks for m in METHODS if m not in SYNC_METHODS and m in self.methods]
        return keys


# --quick: defaults for a short check; flags given explicitly still win.
QUICK = dict(methods=list(GRID_METHODS), ks=[16], seeds=1, steps=50, val_freq=10, val_samples=200, mean_at_n=4)


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


def run_overrides(spec: RunSpec, grid: GridConfig, run_dir: Path) -> list[str]:
    """The task and the method as config groups, then what the grid sets per run (each key once;
    ``partial_rollout`` and the loss come from the method file)."""
    val_kwargs = "actor_rollout_ref.rollout.val_kwargs"
    # mean@n at the task's validation temperature, or greedy only when mean_at_n is 0.
    val = ([f"{val_kwargs}.do_sample=true", f"{val_kwargs}.n={grid.mean_at_n}"] if grid.mean_at_n
           else [f"{val_kwargs}.do_sample=false"])
    return [
        f"task={TASK}",
        f"method={spec.method}",
        f"async_training.staleness_threshold={spec.k}",
        f"actor_rollout_ref.actor.optim.lr={grid.lr}",
        f"trainer.seed={spec.seed}",
        f"trainer.total_training_steps={grid.steps}",
        f"trainer.test_freq={grid.val_freq}",
        f"trainer.val_before_train={str(spec.measures_warm_start).lower()}",
        f"data.val_max_samples={grid.val_samples}",
        *val,
        # The analysis reads val/greedy_acc at every evaluation (also with mean@n sampling).
        f"{val_kwargs}.report_greedy=true",
        f"trainer.experiment_name=stability_{spec.name}",
        f"trainer.default_local_dir={run_dir}",
        "trainer.logger=[jsonl]",
        # An interrupted run restarts from scratch: a resumed run's wall clock and lags would not
        # be comparable with an uninterrupted one, so no run needs a checkpoint.
        "trainer.resume_mode=disable",
        "trainer.save_freq=-1",
    ]


def run_config(spec: RunSpec, grid: GridConfig, run_dir: Path) -> TrainerConfig:
    """The validated config the run's subprocess will train with (``ConfigError`` names a bad key)."""
    return load_config(run_overrides(spec, grid, run_dir))


def run_command(spec: RunSpec, grid: GridConfig, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "verl.trainer.main_ppo", *run_overrides(spec, grid, run_dir)]
