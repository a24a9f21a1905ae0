"""Runs the stability grid: one main_ppo subprocess per run, markers for --resume, --sync-from links."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from verl.experiments.stability.analysis import GREEDY
from verl.experiments.stability.plan import SYNC, GridConfig, RunSpec, run_command
from verl.utils.tracking import read_metrics

REPO = Path(__file__).resolve().parents[3]
RUN_MARKER = "stability_run.json"  # written by the runner after the subprocess exits


def run_is_complete(run_dir: Path, steps: int) -> bool:
    marker = run_dir / RUN_MARKER
    if not marker.exists() or json.loads(marker.read_text()).get("returncode") != 0:
        return False
    records = read_metrics(run_dir)
    return bool(records) and records[-1]["step"] == steps and GREEDY in records[-1]


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
