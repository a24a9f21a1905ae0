"""The stability experiment: grid planning, per-method overrides, and the aggregation (AUC, worst
point, windowed ESS minimum, time to target, collapse flag) on hand-made metrics."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from verl.experiments.stability import analysis, cli, plan, report, runner
from verl.utils.config import ConfigError

REPO = Path(__file__).parents[2]


# ---------------------------------------------------------------------------------- pure functions
def test_normalised_auc_is_the_trapezoid_area_over_the_step_span():
    steps, accs = np.array([0, 10, 20]), np.array([0.2, 0.4, 0.1])
    # 10 * (0.2 + 0.4) / 2 + 10 * (0.4 + 0.1) / 2 = 3.0 + 2.5, over 20 steps
    assert analysis.normalised_auc(steps, accs) == pytest.approx(5.5 / 20)
    # uneven spacing: 5 * (0.1 + 0.3) / 2 + 15 * (0.3 + 0.3) / 2 = 1.0 + 4.5, over 20 steps
    assert analysis.normalised_auc(np.array([0, 5, 20]), np.array([0.1, 0.3, 0.3])) == pytest.approx(5.5 / 20)
    assert analysis.normalised_auc(np.array([0, 50]), np.array([0.25, 0.25])) == pytest.approx(0.25)


def test_with_start_point_prepends_the_shared_warm_start_only_when_missing():
    s, a = analysis.with_start_point(np.array([10, 20]), np.array([0.3, 0.4]), 0.19)
    assert s.tolist() == [0, 10, 20] and a.tolist() == [0.19, 0.3, 0.4]
    s, a = analysis.with_start_point(np.array([0, 10]), np.array([0.18, 0.3]), 0.19)
    assert s.tolist() == [0, 10] and a.tolist() == [0.18, 0.3]


def test_worst_after_start_ignores_step_zero():
    steps = np.array([0, 10, 20, 30])
    assert analysis.worst_after_start(steps, np.array([0.2, 0.4, 0.07, 0.3])) == pytest.approx(0.07)
    assert analysis.worst_after_start(steps, np.array([0.01, 0.4, 0.25, 0.3])) == pytest.approx(0.25)


def test_windowed_min_is_the_lowest_rolling_mean():
    v = np.array([1.0, 1.0, 0.1, 0.1, 1.0, 1.0])
    assert analysis.windowed_min(v, 2) == pytest.approx(0.1)
    # windows of 3: 0.7, 0.4, 0.4, 0.7
    assert analysis.windowed_min(v, 3) == pytest.approx(0.4)
    # window longer than the series: the plain mean; NaNs (a skipped step) are left out
    assert analysis.windowed_min(np.array([0.5, np.nan, 0.3]), 10) == pytest.approx(0.4)


def test_time_to_target_is_the_first_evaluation_at_or_above_it():
    wall, accs = np.array([0.0, 5.0, 9.0, 14.0]), np.array([0.2, 0.25, 0.31, 0.29])
    assert analysis.time_to_target(wall, accs, 0.3) == 9.0
    assert analysis.time_to_target(wall, accs, 0.25) == 5.0
    assert analysis.time_to_target(wall, accs, 0.32) is None


def test_collapse_drop_is_five_points_or_two_and_a_half_standard_errors():
    # p = 0.19 on 500 problems: SE = sqrt(0.19 * 0.81 / 500) = 0.01754, 2.5 SE = 0.0439 < 0.05
    assert analysis.collapse_drop_threshold(0.19, 500) == pytest.approx(0.05)
    # on 100 problems: SE = 0.03923, 2.5 SE = 0.0981
    assert analysis.collapse_drop_threshold(0.19, 100) == pytest.approx(2.5 * math.sqrt(0.19 * 0.81 / 100))


def test_collapse_flag_by_worst_point_or_area():
    assert analysis.is_collapsed(0.13, 0.19, 0.95, drop=0.05, auc_floor=0.8)       # dipped 6 points
    assert not analysis.is_collapsed(0.15, 0.19, 0.95, drop=0.05, auc_floor=0.8)   # 4 points: noise
    assert analysis.is_collapsed(0.18, 0.19, 0.75, drop=0.05, auc_floor=0.8)       # area too small
    assert not analysis.is_collapsed(0.18, 0.19, None, drop=0.05, auc_floor=0.8)   # no sync reference


def test_smooth_is_a_trailing_mean():
    out = analysis.smooth(np.array([1.0, 3.0, 5.0, np.nan, 7.0]), 2)
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
    c = analysis.curves_from_records(_records([0.3, 0.4], 2, 1.0, [0, 0, 0, 0], val_s0=7.0))
    assert c.val_steps.tolist() == [0, 2, 4]
    np.testing.assert_allclose(c.val_wall_s, [0.0, 4.0, 8.0])
    np.testing.assert_allclose(c.mean_at_n, [0.1, 0.15, 0.2])
    assert c.train_steps.tolist() == [1, 2, 3, 4]


def test_summaries_against_the_synchronous_reference():
    grid = plan.GridConfig(methods=["sync", "tis", "vcpo"], ks=[2], seeds=1, steps=4, ess_window=2)
    warm = 0.2
    curves = {
        ("sync", 0, 1): analysis.curves_from_records(_records([0.3, 0.4], 2, 1.0, [0, 0, 0, 0], val_s0=5.0)),
        ("tis", 2, 1): analysis.curves_from_records(_records([0.1, 0.3], 2, 0.1, [0, 1, 2, 2])),
        ("vcpo", 2, 1): analysis.curves_from_records(_records([0.3, 0.45], 2, 0.5, [0, 1, 2, 2], step_s=1.0)),
    }
    summaries, ref = analysis.summarize_runs(curves, warm, grid, num_val=500)
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

    table = report.results_table(summaries, 1, grid, warm, 0.1, ref, 500, failed=["m2po_k2_seed1"])
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0:2] for r in rows] == [["| sync", "0"], ["| tis", "2"], ["| vcpo", "2"]]
    tis_cells = [c.strip() for c in rows[1].strip("|").split("|")]
    assert tis_cells[5] == "0.100" and tis_cells[7] == "58" and tis_cells[12] == "3" and tis_cells[-1] == "1/1"
    assert "m2po_k2_seed1" in table and "5.0 points" in table


# ---------------------------------------------------------------------------------- the grid
def test_plan_runs_sync_once_per_seed_at_k0_and_async_methods_at_each_positive_k():
    grid = plan.GridConfig(methods=["sync", "tis", "m2po", "vcpo"], ks=[0, 4, 16], seeds=2)
    specs = plan.plan_grid(grid)
    assert [(s.method, s.k, s.seed) for s in specs[:7]] == [
        ("sync", 0, 1), ("tis", 4, 1), ("m2po", 4, 1), ("vcpo", 4, 1), ("tis", 16, 1), ("m2po", 16, 1), ("vcpo", 16, 1)]
    assert len(specs) == 14 and len({s.name for s in specs}) == 14
    assert [s.measures_warm_start for s in specs].count(True) == 1 and specs[0].measures_warm_start


def test_grid_validation_names_the_key():
    with pytest.raises(ConfigError, match="stability.methods"):
        plan.GridConfig(methods=["ppo"]).validate("stability")
    with pytest.raises(ConfigError, match="stability.ks"):
        plan.GridConfig(methods=["tis"], ks=[0]).validate("stability")


def test_methods_are_the_method_config_files_with_the_grid_order_first(tmp_path):
    files = {p.stem for p in (REPO / "configs" / "method").glob("*.yaml")}
    assert set(plan.METHODS) == files and set(plan.GRID_METHODS) <= files
    assert plan.METHODS[:4] == ("sync", "tis", "m2po", "vcpo")
    for name in ("vcpo", "gspo", "sync", "aaa"):
        (tmp_path / f"{name}.yaml").write_text("# @package _global_\n")
    assert plan.available_methods(tmp_path) == ("sync", "vcpo", "aaa", "gspo")
    with pytest.raises(ConfigError, match="stability.methods"):
        plan.GridConfig(methods=["sync", "gspo"]).validate("stability")  # no configs/method/gspo.yaml


def test_a_method_that_pins_the_lag_at_zero_runs_at_k0_only(tmp_path, monkeypatch):
    (tmp_path / "sync2.yaml").write_text("# @package _global_\nasync_training:\n  staleness_threshold: 0\n")
    (tmp_path / "tis2.yaml").write_text("# @package _global_\nasync_training:\n  partial_rollout: true\n")
    assert plan.is_synchronous("sync2", tmp_path) and not plan.is_synchronous("tis2", tmp_path)
    assert "sync" in plan.SYNC_METHODS and not {"tis", "m2po", "vcpo"} & set(plan.SYNC_METHODS)
    monkeypatch.setattr(plan, "METHODS", (*plan.GRID_METHODS, "sync2"))
    monkeypatch.setattr(plan, "SYNC_METHODS", ("sync", "sync2"))
    grid = plan.GridConfig(methods=["sync2", "vcpo", "sync"], ks=[0, 4])
    assert grid.plan_keys() == [("sync", 0), ("sync2", 0), ("vcpo", 4)]


def test_quick_is_a_preset_of_defaults_that_explicit_flags_override():
    grid, _ = cli.parse_args(["--quick"])
    assert (grid.methods, grid.ks, grid.seeds, grid.steps, grid.val_samples) == (list(plan.GRID_METHODS), [16], 1, 50, 200)
    assert [(s.method, s.k) for s in plan.plan_grid(grid)] == [("sync", 0), ("tis", 16), ("m2po", 16), ("vcpo", 16)]
    grid, _ = cli.parse_args(["--quick", "--seeds", "2", "--ks", "0,32"])
    assert (grid.seeds, grid.ks, grid.steps) == (2, [0, 32], 50)
    grid, _ = cli.parse_args([])
    assert (grid.methods, grid.ks, grid.seeds, grid.steps) == (list(plan.GRID_METHODS), [0, 4, 16, 32], 3, 250)


def _overrides(method: str, k: int, tmp_path: Path, grid: plan.GridConfig | None = None) -> dict[str, str]:
    grid = grid or plan.GridConfig(steps=30, val_freq=10, val_samples=100, lr=2e-4)
    spec = plan.RunSpec(method, k, 3, measures_warm_start=False)
    cmd = plan.run_command(spec, grid, tmp_path / spec.name)
    assert cmd[:3] == [sys.executable, "-m", "verl.trainer.main_ppo"]
    keys = [o.split("=", 1)[0] for o in cmd[3:]]
    assert len(keys) == len(set(keys)), f"{method}: a key is given twice"
    return dict(o.split("=", 1) for o in cmd[3:])


def _leaf_keys(node, prefix: str = "") -> set[str]:
    if not isinstance(node, dict):
        return {prefix}
    return set().union(*(_leaf_keys(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in node.items()))


@pytest.mark.parametrize("method,k", [("sync", 0), ("tis", 16), ("m2po", 32), ("vcpo", 4)])
def test_overrides_compose_the_task_and_method_and_restate_none_of_the_method_keys(method, k, tmp_path):
    got = _overrides(method, k, tmp_path)
    want = {"task": "countdown", "method": method, "async_training.staleness_threshold": str(k),
            "actor_rollout_ref.actor.optim.lr": "0.0002", "trainer.seed": "3", "trainer.total_training_steps": "30",
            "trainer.test_freq": "10", "trainer.val_before_train": "false", "data.val_max_samples": "100",
            "actor_rollout_ref.rollout.val_kwargs.do_sample": "true", "actor_rollout_ref.rollout.val_kwargs.n": "4",
            "trainer.experiment_name": f"stability_{method}_k{k}_seed3",
            "trainer.default_local_dir": str(tmp_path / f"{method}_k{k}_seed3"), "trainer.logger": "[jsonl]",
            "trainer.resume_mode": "disable", "trainer.save_freq": "-1"}
    assert {key: got.get(key) for key in want} == want
    # What the method file defines is its own; the grid sets only the lag on top of it.
    method_keys = _leaf_keys(OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "method" / f"{method}.yaml")))
    assert method_keys & set(got) <= {"async_training.staleness_threshold"}
    assert "async_training.partial_rollout" in method_keys


# method -> (partial rollouts, ESS scaling, OPOB, rollout_is level, M2PO mask): the grid's table.
INTENDED = {
    "sync": (False, False, False, "sequence", False),
    "tis": (True, False, False, "sequence", False),
    "m2po": (True, False, False, "token", True),
    "vcpo": (True, True, True, "sequence", False),
}


@pytest.mark.parametrize("method,k", [("sync", 0), ("tis", 16), ("m2po", 16), ("vcpo", 32)])
def test_each_method_run_resolves_to_its_intended_settings(method, k, tmp_path):
    config = plan.run_config(plan.RunSpec(method, k, 1, True), plan.GridConfig(), tmp_path)
    partial, ess, opob, tis_level, m2po = INTENDED[method]
    at, actor, correction = config.async_training, config.actor, config.algorithm.rollout_correction
    assert at.k == k and at.partial_rollout == partial
    assert actor.ess_scaling.enable == ess and actor.grad_baselining.enable == opob
    assert correction.rollout_is == tis_level and correction.rollout_is_threshold == 8.0
    assert (correction.rollout_rs == "m2po") == m2po
    spec = config.policy_loss_spec()
    assert spec.mode == "bypass" and spec.tis_level == tis_level and spec.tis_cap == 8.0 and spec.m2po == m2po
    if m2po:
        assert spec.m2po_threshold == pytest.approx(0.04)
    if ess:
        assert actor.ess_scaling.scaling_rule == "sqrt"
    if opob:
        assert actor.grad_baselining.scope == "group" and actor.grad_baselining.norm_by_std


@pytest.mark.parametrize("method,k", [("sync", 0), ("tis", 16), ("vcpo", 32), ("m2po", 16)])
def test_overrides_resolve_through_the_product_config(method, k, tmp_path):
    grid = plan.GridConfig(steps=30, val_freq=10, val_samples=100, lr=2e-4)
    config = plan.run_config(plan.RunSpec(method, k, 2, True), grid, tmp_path)
    # the task's testbed: 16 prompts x 8, one optimizer step per trainer step and weight sync, GRPO
    assert config.data.train_batch_size == 16 and config.rollout_engine.n == 8
    assert config.policy_update_config().ppo_mini_batch_size == 128
    assert config.async_training.trigger_parameter_sync_step == 1 and config.algorithm.adv_estimator == "grpo"
    assert config.actor.loss_agg_mode == "seq-mean-token-mean" and config.model.warm_start.enable
    # admission, not the queue, bounds the lag
    assert config.async_training.queue_capacity(config.data.train_batch_size) == (k + 1) * 16
    # the grid's settings
    assert config.actor.optim.lr == pytest.approx(2e-4) and config.trainer.seed == 2
    assert config.trainer.total_training_steps == 30 and config.val_freq == 10 and config.trainer.val_before_train
    assert config.data.val_max_samples == 100
    val = config.rollout_engine.val_kwargs
    assert val.do_sample and val.n == 4 and val.report_greedy
    assert config.trainer.save_freq <= 0 and config.trainer.resume_mode == "disable"
    assert config.trainer.logger == ["jsonl"] and config.run_dir == str(tmp_path)


def test_mean_at_zero_validates_greedy_only(tmp_path):
    grid = plan.GridConfig(mean_at_n=0)
    got = _overrides("vcpo", 4, tmp_path, grid)
    assert got["actor_rollout_ref.rollout.val_kwargs.do_sample"] == "false"
    assert "actor_rollout_ref.rollout.val_kwargs.n" not in got
    val = plan.run_config(plan.RunSpec("vcpo", 4, 1, False), grid, tmp_path).rollout_engine.val_kwargs
    assert not val.do_sample


def test_dry_run_resolves_every_cell_and_prints_its_command(tmp_path, capsys):
    cli.main(["--quick", "--dry-run", "--out", str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" method=")[1].split()[0] for line in lines] == list(plan.GRID_METHODS)
    assert all(" task=countdown " in line for line in lines) and not (tmp_path / "grid.json").exists()


def test_run_is_complete_needs_the_marker_and_the_last_step(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for r in _records([0.3, 0.4], 2, 1.0, [0, 0, 0, 0]):
            f.write(json.dumps(r) + "\n")
    assert not runner.run_is_complete(run, 4)  # no marker: killed before the script recorded it
    (run / runner.RUN_MARKER).write_text(json.dumps({"returncode": 0}))
    assert runner.run_is_complete(run, 4)
    assert not runner.run_is_complete(run, 6)
    (run / runner.RUN_MARKER).write_text(json.dumps({"returncode": 1}))
    assert not runner.run_is_complete(run, 4)


def _complete_run(run: Path, steps: int) -> None:
    run.mkdir(parents=True)
    with open(run / "metrics.jsonl", "w") as f:
        for r in _records([0.3, 0.4], steps // 2, 1.0, [0] * steps):
            f.write(json.dumps(r) + "\n")
    (run / runner.RUN_MARKER).write_text(json.dumps({"returncode": 0}))


def test_sync_from_links_the_reference_runs_and_leaves_the_rest_to_run(tmp_path):
    grid = plan.GridConfig(methods=["sync", "tis"], ks=[0, 32], seeds=2, steps=4)
    specs = plan.plan_grid(grid)
    source, out = tmp_path / "main", tmp_path / "control"
    _complete_run(source / "runs" / "sync_k0_seed1", 4)
    with pytest.raises(FileNotFoundError, match="sync_k0_seed2"):
        runner.link_reference_runs(specs, out, source, 4)
    _complete_run(source / "runs" / "sync_k0_seed2", 4)
    left = runner.link_reference_runs(specs, out, source, 4)
    assert [s.name for s in left] == ["tis_k32_seed1", "tis_k32_seed2"]
    linked = out / "runs" / "sync_k0_seed2"
    assert linked.is_symlink() and runner.run_is_complete(linked, 4)
    # linking again (a resumed control) is fine; a real run in the way is not overwritten
    assert len(runner.link_reference_runs(specs, out, source, 4)) == 2
    linked.unlink()
    _complete_run(linked, 4)
    with pytest.raises(FileExistsError, match="sync_k0_seed2"):
        runner.link_reference_runs(specs, out, source, 4)


def test_plots_one_png_per_metric(tmp_path):
    curves = {
        ("sync", 0, 1): analysis.curves_from_records(_records([0.3, 0.4], 2, 1.0, [0, 0, 0, 0], val_s0=1.0)),
        ("tis", 4, 1): analysis.curves_from_records(_records([0.1, 0.3], 2, 0.1, [0, 1, 2, 3])),
        ("vcpo", 16, 1): analysis.curves_from_records(_records([0.3, 0.45], 2, 0.5, [0, 1, 2, 3])),
    }
    paths = report.plot_grid(curves, 0.2, tmp_path)
    assert sorted(p.name for p in paths) == sorted(f"{m[0]}.png" for m in report.PLOT_METRICS)
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
    assert all((out / f"{m[0]}.png").stat().st_size > 5000 for m in report.PLOT_METRICS)
    # only the first run measured the warm start
    first = [json.loads(line) for line in open(out / "runs" / "sync_k0_seed1" / "metrics.jsonl")]
    second = [json.loads(line) for line in open(out / "runs" / "vcpo_k4_seed1" / "metrics.jsonl")]
    assert first[0]["step"] == 0 and second[0]["step"] == 1

    again = subprocess.run([*args, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("complete, skipped") == 2
