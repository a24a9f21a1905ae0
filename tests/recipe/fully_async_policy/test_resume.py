"""Pipeline checkpoint/resume under SIGKILL: the controller is killed mid-run, the same command
resumes from the newest complete checkpoint, and the uid ledger shows every prompt group of
the run trained exactly once, at its own step, with the step counter continuing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from tests.trainer.fully_async.conftest import small_overrides
from verl.utils.tracking import read_metrics

STEPS, GROUPS_PER_STEP, N = 8, 4, 4


def _command(assets, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "verl.trainer.main_ppo", *small_overrides(
        assets, run_dir, f"trainer.total_training_steps={STEPS}", f"trainer.cache_dir={run_dir / 'cache'}",
        "async_training.staleness_threshold=2", "async_training.partial_rollout=true", "trainer.save_freq=1",
        "async_training.test_train_delay_max_s=0.4")]


def _clean_env() -> dict[str, str]:
    """The environment a user runs the entry point in: no PYTHONPATH, one thread per op."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return env


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the controller, then the Ray processes it started (by pid)."""
    children = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=30)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_trains_each_group_once(pipeline_assets, tmp_path):
    run_dir = tmp_path / "run"
    repo = Path(__file__).resolve().parents[3]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_command(pipeline_assets, run_dir), cwd=repo, env=_clean_env(),
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if len(read_metrics(run_dir)) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    time.sleep(0.3)  # land somewhere inside a step
    _kill_tree(proc)
    killed_at = max(m["step"] for m in read_metrics(run_dir))
    assert killed_at < STEPS

    second = subprocess.run(_command(pipeline_assets, run_dir), cwd=repo, env=_clean_env(),
                            capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed_from = int(re.search(r"resumed from step (\d+)", second.stderr).group(1))
    assert 3 <= resumed_from <= killed_at

    ledger = [json.loads(line) for line in (run_dir / "trajectories.jsonl").read_text().splitlines()]
    per_uid = Counter(r["uid"] for r in ledger)
    expected_groups = {f"g{j}" for j in range(STEPS * GROUPS_PER_STEP)}
    assert {uid.split("-")[0] for uid in per_uid} == expected_groups  # nothing lost
    assert set(per_uid.values()) == {N}  # nothing trained twice
    assert sorted({r["step"] for r in ledger}) == list(range(1, STEPS + 1))
    assert all(r["step"] == int(r["uid"].split("-")[0][1:]) // GROUPS_PER_STEP + 1 for r in ledger)
    assert all(r["param_version_trained"] - r["param_version_start"] <= 2 for r in ledger)
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, STEPS + 1))
