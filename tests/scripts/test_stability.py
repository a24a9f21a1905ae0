"""The stability experiment: grid planning, per-method overrides, and the aggregation (AUC, worst
point, windowed ESS minimum, time to target, collapse flag) on hand-made metrics."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from verl.trainer.config import register_configs, to_trainer_config
from verl.utils.config import ConfigError

REPO = Path(__file__).parents[2]
_spec = importlib.util.spec_from_file_location("stability", REPO / "scripts" / "experiments" / "stability.py")
stability = importlib.util.module_from_spec(_spec)
sys.modules["stability"] = stability
_spec.loader.exec_module(stability)


# ---------------------------------------------------------------------------------- pure functions
def test_normalised_auc_is_the_trapezoid_area_over_the_step_span():
    steps, accs = np.array([0, 10, 20]), np.array([0.2, 0.4, 0.1])
    # 10 * (0.2 + 0.4) / 2 + 10 * (0.4 + 0.1) / 2 = 3.0 + 2.5, over 20 steps
    assert stability.normalised_auc(steps, accs) == pytest.approx(5.5 / 20)
    # uneven spacing: 5 * (0.1 + 0.3) / 2 + 15 * (0.3 + 0.3) / 2 = 1.0 + 4.5, over 20 steps
    assert stability.normalised_auc(np.array([0, 5, 20]), np.array([0.1, 0.3, 0.3])) == pytest.approx(5.5 / 20)
    assert stability.normalised_auc(np.array([0, 50]), np.array([0.25, 0.25])) == pytest.approx(0.25)


def test_with_start_point_prepends_the_shared_warm_start_only_when_missing():
    s, a = stability.with_start_point(np.array([10, 20]), np.array([0.3, 0.4]), 0.19)
    assert s.tolist() == [0, 10, 20] and a.tolist() == [0.19, 0.3, 0.4]
    s, a = stability.with_start_point(np.array([0, 10]), np.array([0.18, 0.3]), 0.19)
    assert s.tolist() == [0, 10] and a.tolist() == [0.18, 0.3]


def test_worst_after_start_ignores_step_zero():
    steps = np.array([0, 10, 20, 30])
    assert stability.worst_after_start(steps, np.array([0.2, 0.4, 0.07, 0.3])) == pytest.approx(0.07)
    assert stability.worst_after_start(steps, np.array([0.01, 0.4, 0.25, 0.3])) == pytest.approx(0.25)


def test_windowed_min_is_the_lowest_rolling_mean():
    v = np.array([1.0, 1.0, 0.1, 0.1, 1.0, 1.0])
    assert stability.windowed_min(v, 2) == pytest.approx(0.1)
    # windows of 3: 0.7, 0.4, 0.4, 0.7
    assert stability.windowed_min(v, 3) == pytest.approx(0.4)
    # window longer than the series: the plain mean; NaNs (a skipped step) are left out
    assert stability.windowed_min(np.array([0.5, np.nan, 0.3]), 10) == pytest.approx(0.4)


def test_time_to_target_is_the_first_evaluation_at_or_above_it():
    wall, accs = np.array([0.0, 5.0, 9.0, 14.0]), np.array([0.2, 0.25, 0.31, 0.29])
    assert stability.time_to_target(wall, accs, 0.3) == 9.0
    assert stability.time_to_target(wall, accs, 0.25) == 5.0
    assert stability.time_to_target(wall, accs, 0.32) is None


def test_collapse_drop_is_five_points_or_two_and_a_half_standard_errors():
    # p = 0.19 on 500 problems: SE = sqrt(0.19 * 0.81 / 500) = 0.01754, 2.5 SE = 0.0439 < 0.05
    assert stability.collapse_drop_threshold(0.19, 500) == pytest.approx(0.05)
    # on 100 problems: SE = 0.03923, 2.5 SE = 0.0981
    assert stability.collapse_drop_threshold(0.19, 100) == pytest.approx(2.5 * math.sqrt(0.19 * 0.81 / 100))


def test_collapse_flag_by_worst_point_or_area():
    assert stability.is_collapsed(0.13, 0.19, 0.95, drop=0.05, auc_floor=0.8)       # dipped 6 points
    assert not stability.is_collapsed(0.15, 0.19, 0.95, drop=0.05, auc_floor=0.8)   # 4 points: noise
    assert stability.is_collapsed(0.18, 0.19, 0.75, drop=0.05, auc_floor=0.8)       # area too small
    assert not stability.is_collapsed(0.18, 0.19, None, drop=0.05, auc_floor=0.8)   # no sync reference


def test_smooth_is_a_trailing_mean():
    out = stability.smooth(np.array([1.0, 3.0, 5.0, np.nan, 7.0]), 2)
    np.testing.assert_allclose(out, [1.0, 2.0, 4.0, 5.0, 7.0])


# ---------------------------------------------------------------------------------- summaries
def _records(accs: list[float], step_every: int, ess: float, lags: list[float], val_s0: float | None = None,
             step_s: float = 2.0) -> list[dict]:
    """Synthetic metrics.jsonl: one record per step, validation every ``step_every`` steps."""
    steps = len(lags)
    recs = []
    if val_s0 is not None:
        recs.append({"step": 0, "val/greedy_acc": 0.2, "val/mean_at_4_acc": 0.1, "timing/val_s": val_s0,
                     "time/wall_s": 0.0})
    for t in range(1, steps + 1):
        r = {"step": t, "actor/ess_ratio": ess, "actor/grad_norm": 1.0, "actor/rollout_kl_k3": 0.01,
             "staleness/start_lag_mean": lags[t - 1], "staleness/start_lag_max": lags[t - 1],
             "time/wall_s": (val_s0 or 0.0) + step_s * t}
        if t % step_every == 0:
            r["val/greedy_acc"] = accs[t // step_every - 1]
            r["val/mean_at_4_acc"] = accs[t // step_every - 1] / 2
        recs.append(r)
    return recs


def test_curves_from_records_take_the_step0_validation_out_of_the_clock():
    c = stability.curves_from_records(_records([0.3, 0.4], 2, 1.0, [0, 0, 0, 0], val_s0=7.0))
    assert c.val_steps.tolist() == [0, 2, 4]
    np.testing.assert_allclose(c.val_wall_s, [0.0, 4.0, 8.0])
    np.testing.assert_allclose(c.mean_at_n, [0.1, 0.15, 0.2])
    assert c.train_steps.tolist() == [1, 2, 3, 4]


def test_summaries_against_the_synchronous_reference():
    grid = stability.GridConfig(methods=["sync", "tis", "vcpo"], ks=[2], seeds=1, steps=4, ess_window=2)
    warm = 0.2
    curves = {
        ("sync", 0, 1): stability.curves_from_records(_records([0.3, 0.4], 2, 1.0, [0, 0, 0, 0], val_s0=5.0)),
        ("tis", 2, 1): stability.curves_from_records(_records([0.1, 0.3], 2, 0.1, [0, 1, 2, 2])),
        ("vcpo", 2, 1): stability.curves_from_records(_records([0.3, 0.45], 2, 0.5, [0, 1, 2, 2], step_s=1.0)),
    }
    summaries, ref = stability.summarize_runs(curves, warm, grid, num_val=500)
    by = {s.method: s for s in summaries}
    # sync AUC over [0, 2, 4] with [0.2, 0.3, 0.4]: (2 * 0.25 + 2 * 0.35) / 4 = 0.3
    assert ref["sync_auc"] == pytest.approx(0.3) and ref["sync_final_greedy"] == pytest.approx(0.4)
    assert ref["collapse_drop"] == pytest.approx(0.05)
    # tis AUC: (2 * 0.15 + 2 * 0.2) / 4 = 0.175, 58% of sync; worst 0.1 < 0.2 - 0.05
    assert by["tis"].auc == pytest.approx(0.175) and by["tis"].auc_ratio == pytest.approx(0.175 / 0.3)
    assert by["tis"].worst_greedy == pytest.approx(0.1) and by["tis"].collapsed
    assert by["tis"].time_to_sync_final_s is None
    # lag mean over steps > k = 2: steps 3 and 4, both at lag 2
    assert by["tis"].lag_mean == pytest.approx(2.0) and by["tis"].lag_max == 2.0
    assert by["tis"].first_step_at_k == 3 and by["sync"].first_step_at_k == 1
    # vcpo AUC: (2 * 0.25 + 2 * 0.375) / 4 = 0.3125; reaches 0.4 at step 4 = 4 s
    assert by["vcpo"].auc == pytest.approx(0.3125) and not by["vcpo"].collapsed
    assert by["vcpo"].time_to_sync_final_s == pytest.approx(4.0)
    assert by["vcpo"].ess_mean == pytest.approx(0.5) and by["vcpo"].ess_windowed_min == pytest.approx(0.5)
    assert by["sync"].time_to_sync_final_s == pytest.approx(8.0)  # 5 s of step-0 validation taken out
    assert [s.method for s in summaries] == ["sync", "tis", "vcpo"]

    table = stability.results_table(summaries, 1, grid, warm, 0.1, ref, 500, failed=["m2po_k2_seed1"])
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0:2] for r in rows] == [["| sync", "0"], ["| tis", "2"], ["| vcpo", "2"]]
    tis_cells = [c.strip() for c in rows[1].strip("|").split("|")]
    assert tis_cells[5] == "0.100" and tis_cells[7] == "58" and tis_cells[12] == "3" and tis_cells[-1] == "1/1"
    assert "m2po_k2_seed1" in table and "5.0 points" in table


# ---------------------------------------------------------------------------------- the grid
def test_plan_runs_sync_once_per_seed_at_k0_and_async_methods_at_each_positive_k():
    grid = stability.GridConfig(methods=["sync", "tis", "m2po", "vcpo"], ks=[0, 4, 16], seeds=2)
    specs = stability.plan_grid(grid)
    assert [(s.method, s.k, s.seed) for s in specs[:7]] == [
        ("sync", 0, 1), ("tis", 4, 1), ("m2po", 4, 1), ("vcpo", 4, 1), ("tis", 16, 1), ("m2po", 16, 1), ("vcpo", 16, 1)]
    assert len(specs) == 14 and len({s.name for s in specs}) == 14
    assert [s.measures_warm_start for s in specs].count(True) == 1 and specs[0].measures_warm_start


def test_grid_validation_names_the_key():
    with pytest.raises(ConfigError, match="stability.methods"):
        stability.GridConfig(methods=["ppo"]).validate("stability")
    with pytest.raises(ConfigError, match="stability.ks"):
        stability.GridConfig(methods=["tis"], ks=[0]).validate("stability")


def test_quick_is_a_preset_of_defaults_that_explicit_flags_override():
    grid, _ = stability.parse_args(["--quick"])
    assert (grid.methods, grid.ks, grid.seeds, grid.steps, grid.val_samples) == (list(stability.METHODS), [16], 1, 50, 200)
    assert [(s.method, s.k) for s in stability.plan_grid(grid)] == [("sync", 0), ("tis", 16), ("m2po", 16), ("vcpo", 16)]
    grid, _ = stability.parse_args(["--quick", "--seeds", "2", "--ks", "0,32"])
    assert (grid.seeds, grid.ks, grid.steps) == (2, [0, 32], 50)
    grid, _ = stability.parse_args([])
    assert (grid.ks, grid.seeds, grid.steps) == ([0, 4, 16, 32], 3, 250)


def _overrides(method: str, k: int, tmp_path: Path) -> dict[str, str]:
    grid = stability.GridConfig(steps=30, val_freq=10, val_samples=100, lr=2e-4)
    spec = stability.RunSpec(method, k, 3, measures_warm_start=False)
    cmd = stability.run_command(spec, grid, tmp_path / spec.name)
    assert cmd[:3] == [sys.executable, "-m", "verl.trainer.main_ppo"]
    return dict(o.split("=", 1) for o in cmd[3:])


def test_overrides_per_method_are_the_table_of_the_task(tmp_path):
    common = {"actor.policy_loss.mode": "bypass", "actor.policy_loss.tis_level": "sequence",
              "actor.policy_loss.tis_cap": "8", "actor.optim.lr": "0.0002", "trainer.seed": "3",
              "trainer.total_training_steps": "30", "data.val_max_samples": "100",
              "async_training.trigger_parameter_sync_step": "1", "trainer.val_before_train": "false"}
    expected = {
        ("sync", 0): {"async_training.k": "0", "async_training.partial_rollout": "false",
                      "actor.ess_scaling.enable": "false", "actor.grad_baselining.enable": "false"},
        ("tis", 16): {"async_training.k": "16", "async_training.partial_rollout": "true",
                      "actor.ess_scaling.enable": "false", "actor.grad_baselining.enable": "false"},
        ("m2po", 32): {"async_training.k": "32", "actor.ess_scaling.enable": "false",
                       "actor.grad_baselining.enable": "false", "actor.policy_loss.m2po": "true",
                       "actor.policy_loss.m2po_threshold": "0.04", "actor.policy_loss.tis_level": "token"},
        ("vcpo", 4): {"async_training.k": "4", "actor.ess_scaling.enable": "true",
                      "actor.ess_scaling.scaling_rule": "sqrt", "actor.grad_baselining.enable": "true",
                      "actor.grad_baselining.scope": "group", "actor.grad_baselining.norm_by_std": "true"},
    }
    for (method, k), want in expected.items():
        got = _overrides(method, k, tmp_path)
        assert {key: got.get(key) for key in {**common, **want}} == {**common, **want}, method
        cmd_keys = [o.split("=", 1)[0] for o in stability.run_command(
            stability.RunSpec(method, k, 3, False), stability.GridConfig(), tmp_path)[3:]]
        assert len(cmd_keys) == len(set(cmd_keys)), f"{method}: a key is given twice"
        if method != "m2po":
            assert "actor.policy_loss.m2po" not in got


@pytest.mark.parametrize("method,k", [("sync", 0), ("tis", 16), ("vcpo", 32), ("m2po", 16)])
def test_overrides_resolve_through_the_product_config(method, k, tmp_path):
    register_configs()
    overrides = stability.run_overrides(stability.RunSpec(method, k, 1, True), stability.GridConfig(), tmp_path)
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        config = to_trainer_config(compose(config_name="ppo_trainer", overrides=overrides))
    assert config.async_training.k == k
    assert config.async_training.queue_capacity(config.data.train_batch_size) == (k + 1) * 16
    assert config.actor.ess_scaling.enable == (method == "vcpo")
    assert config.actor.grad_baselining.enable == (method == "vcpo")
    assert config.actor.policy_loss.tis_level == ("token" if method == "m2po" else "sequence")
    assert config.actor.policy_loss.mode == "bypass" and config.actor.policy_loss.m2po == (method == "m2po")
    assert config.trainer.run_dir == str(tmp_path)


def test_run_is_complete_needs_the_marker_and_the_last_step(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for r in _records([0.3, 0.4], 2, 1.0, [0, 0, 0, 0]):
            f.write(json.dumps(r) + "\n")
    assert not stability.run_is_complete(run, 4)  # no marker: killed before the script recorded it
    (run / stability.RUN_MARKER).write_text(json.dumps({"returncode": 0}))
    assert stability.run_is_complete(run, 4)
    assert not stability.run_is_complete(run, 6)
    (run / stability.RUN_MARKER).write_text(json.dumps({"returncode": 1}))
    assert not stability.run_is_complete(run, 4)


def _complete_run(run: Path, steps: int) -> None:
    run.mkdir(parents=True)
    with open(run / "metrics.jsonl", "w") as f:
        for r in _records([0.3, 0.4], steps // 2, 1.0, [0] * steps):
            f.write(json.dumps(r) + "\n")
    (run / stability.RUN_MARKER).write_text(json.dumps({"returncode": 0}))


def test_sync_from_links_the_reference_runs_and_leaves_the_rest_to_run(tmp_path):
    grid = stability.GridConfig(methods=["sync", "tis"], ks=[0, 32], seeds=2, steps=4)
    specs = stability.plan_grid(grid)
    source, out = tmp_path / "main", tmp_path / "control"
    _complete_run(source / "runs" / "sync_k0_seed1", 4)
    with pytest.raises(FileNotFoundError, match="sync_k0_seed2"):
        stability.link_reference_runs(specs, out, source, 4)
    _complete_run(source / "runs" / "sync_k0_seed2", 4)
    left = stability.link_reference_runs(specs, out, source, 4)
    assert [s.name for s in left] == ["tis_k32_seed1", "tis_k32_seed2"]
    linked = out / "runs" / "sync_k0_seed2"
    assert linked.is_symlink() and stability.run_is_complete(linked, 4)
    # linking again (a resumed control) is fine; a real run in the way is not overwritten
    assert len(stability.link_reference_runs(specs, out, source, 4)) == 2
    linked.unlink()
    _complete_run(linked, 4)
    with pytest.raises(FileExistsError, match="sync_k0_seed2"):
        stability.link_reference_runs(specs, out, source, 4)


def test_plots_one_png_per_metric(tmp_path):
    curves = {
        ("sync", 0, 1): stability.curves_from_records(_records([0.3, 0.4], 2, 1.0, [0, 0, 0, 0], val_s0=1.0)),
        ("tis", 4, 1): stability.curves_from_records(_records([0.1, 0.3], 2, 0.1, [0, 1, 2, 3])),
        ("vcpo", 16, 1): stability.curves_from_records(_records([0.3, 0.45], 2, 0.5, [0, 1, 2, 3])),
    }
    paths = stability.plot_grid(curves, 0.2, tmp_path)
    assert sorted(p.name for p in paths) == sorted(f"{m[0]}.png" for m in stability.PLOT_METRICS)
    assert all(p.stat().st_size > 5000 for p in paths)


# ---------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_micro_grid_end_to_end(tmp_path):
    out = tmp_path / "grid"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    args = [sys.executable, str(REPO / "scripts" / "experiments" / "stability.py"), "--methods", "sync,vcpo",
            "--ks", "0,4", "--seeds", "1", "--steps", "6", "--val-freq", "3", "--val-samples", "32",
            "--mean-at-n", "2", "--out", str(out)]
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[2/2] vcpo k=4 seed 1: running, ETA" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    runs = {(r["method"], r["k"]): r for r in summary["runs"]}
    assert set(runs) == {("sync", 0), ("vcpo", 4)} and summary["failed"] == []
    assert runs[("sync", 0)]["lag_max"] == 0
    # steps 5 and 6 may train groups started 4 versions back; the rollouter outpaces the trainer
    assert 0 < runs[("vcpo", 4)]["lag_max"] <= 4
    assert runs[("sync", 0)]["auc_ratio"] == pytest.approx(1.0)
    assert 0.0 < runs[("vcpo", 4)]["ess_mean"] <= 1.0
    table = (out / "results.md").read_text()
    assert "| sync | 0 | 1/1 |" in table and "| vcpo | 4 | 1/1 |" in table
    assert all((out / f"{m[0]}.png").stat().st_size > 5000 for m in stability.PLOT_METRICS)
    # only the first run measured the warm start
    first = [json.loads(line) for line in open(out / "runs" / "sync_k0_seed1" / "metrics.jsonl")]
    second = [json.loads(line) for line in open(out / "runs" / "vcpo_k4_seed1" / "metrics.jsonl")]
    assert first[0]["step"] == 0 and second[0]["step"] == 1

    again = subprocess.run([*args, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("complete, skipped") == 2
