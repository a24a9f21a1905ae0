"""The GPU check (scripts/gpu/check.py) works before GPU time is spent on it: its CPU dry run runs
every item at toy sizes and reports each ok with its numbers, and an item that fails or overruns
its budget is recorded (status, traceback or the output so far) while the summary is still written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
CHECK = REPO / "scripts" / "gpu" / "check.py"
ITEMS = ["actor", "megatron", "engine", "vcpo_cost", "channel"]
# Per item, numbers the docs quote; each must be present and finite.
NUMBERS = {
    "actor": ["fp32_logprob_max_abs_diff", "fp32_param_max_abs_diff", "bf16_logprob", "bf16_grad_1_minus_cos",
              "cpu_bf16_logprob", "bf16_ess_ratio"],
    "megatron": ["fp32_logprob_max_abs_diff_vs_hf", "fp32_weight_max_abs_diff_vs_torch_actor", "bf16_logprob",
                 "bf16_grad_1_minus_cos", "hf_bf16_logprob"],
    "engine": ["greedy_rows_equal_hf", "behaviour_logprob_max_abs_diff_vs_hf", "engine_tokens_per_s",
               "hf_tokens_per_s", "engine_over_hf"],
    "vcpo_cost": ["toy_B4_plain_step_s", "toy_B4_opob_batched_step_s", "toy_B4_opob_per_traj_step_s",
                  "toy_B4_plain_peak_gib", "toy_B4_opob_batched_peak_gib", "toy_B4_batched_over_plain",
                  "toy_B4_per_traj_over_plain"],
    "channel": ["gloo_pair_bytes", "gloo_pair_gb_per_s", "gloo_pair_device_sources_bytes", "loopback_bytes"],
}


def run_check(out: Path, *args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    done = subprocess.run([sys.executable, str(CHECK), "--out", str(out), *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)
    return done, json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    return (*run_check(out, "--cpu-dry-run"), out)


def test_dry_run_reports_every_item_ok(dry_run):
    done, summary, _ = dry_run
    assert summary["mode"] == "cpu-dry-run"
    assert list(summary["items"]) == ITEMS
    for name, item in summary["items"].items():
        assert item["status"] == "ok", (name, item.get("error"), item.get("traceback"), item.get("output_tail"))
        assert item["checks"] and all(check["passed"] for check in item["checks"]), name
    assert done.returncode == 0, done.stdout[-3000:]


@pytest.mark.parametrize("name", ITEMS)
def test_dry_run_records_the_numbers_each_item_reports(dry_run, name):
    numbers = dry_run[1]["items"][name]["numbers"]
    for key in NUMBERS[name]:
        assert isinstance(numbers.get(key), (int, float)) and math.isfinite(numbers[key]), (key, numbers.get(key))


def test_dry_run_exercises_the_out_of_memory_fallback(dry_run):
    numbers = dry_run[1]["items"]["vcpo_cost"]["numbers"]
    assert "simulated" in numbers["toy_B8_opob_batched_oom"]
    assert "toy_B8_batched_over_plain" not in numbers and "toy_B4_batched_over_plain" in numbers


def test_dry_run_writes_markdown_and_log(dry_run):
    _, _, out = dry_run
    markdown = (out / "summary.md").read_text()
    assert all(f"## {name}" in markdown for name in ITEMS)
    assert "status ok" in (out / "check.log").read_text()


def test_item_past_its_budget_is_killed_and_summarised(tmp_path):
    done, summary = run_check(tmp_path, "--cpu-dry-run", "--items", "megatron", "--item-budget-s", "1", timeout=120)
    item = summary["items"]["megatron"]
    assert done.returncode == 1
    assert item["status"] == "timeout" and "killed after 2 s" in item["error"]
    assert "output_tail" in item


def test_item_that_raises_is_recorded_with_its_traceback(tmp_path):
    """Without --cpu-dry-run on a machine without CUDA every item raises; the run still finishes."""
    if _has_cuda():
        pytest.skip("a CUDA device is visible: the item would run")
    done, summary = run_check(tmp_path, "--items", "engine", timeout=120)
    item = summary["items"]["engine"]
    assert done.returncode == 1
    assert item["status"] == "error" and "no CUDA device" in item["error"] and "Traceback" in item["traceback"]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
