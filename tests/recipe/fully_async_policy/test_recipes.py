"""The launch scripts as users run them (bash, from any directory, no PYTHONPATH): every recipe
resolves to the settings it promises under ``VCPO_DRY_RUN=1``, and the countdown demo trains end
to end, shortened through its Hydra "$@" overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from verl.trainer.config import load_config, to_yaml
from verl.utils.tracking import read_metrics

REPO = Path(__file__).resolve().parents[3]
SCRIPTS = REPO / "recipe" / "fully_async_policy" / "shell" / "vcpo"

# script -> (task, lag k, prompts per step, responses per prompt, prompt/response tokens, actor TP)
GPU_RECIPES = {
    "gsm8k/synchronous.sh": ("gsm8k", 0, 8, 8, (2048, 2048), 2),
    "gsm8k/vcpo_k=12.sh": ("gsm8k", 12, 8, 8, (2048, 2048), 2),
    "math/synchronous.sh": ("math", 0, 32, 16, (1024, 2048), 4),
    **{f"math/vcpo_k={k}.sh": ("math", k, 32, 16, (1024, 2048), 4) for k in (10, 16, 32, 64, 128)},
}
# The countdown scripts are exactly these settings on the default tree.
COUNTDOWN_RECIPES = {
    "countdown/vcpo_k=4.sh": ["task=countdown", "method=vcpo", "async_training.staleness_threshold=4",
                              "trainer.total_training_steps=250", "trainer.test_freq=25",
                              "trainer.experiment_name=countdown_vcpo_k4"],
    "countdown/synchronous.sh": ["task=countdown", "method=sync", "actor_rollout_ref.actor.optim.lr=5e-5",
                                 "trainer.total_training_steps=300", "trainer.test_freq=25",
                                 "trainer.experiment_name=countdown_synchronous"],
}
GPU_PATHS = {"MODEL_PATH": "/models/policy", "TRAIN_FILE": "/data/train.parquet",
             "TEST_FILE": "/data/test.parquet"}


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VCPO_DRY_RUN", *GPU_PATHS)}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)
    return env


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every recipe under ``VCPO_DRY_RUN=1``, started together (each spends its time importing),
    from an unrelated directory, with the GPU paths from the environment."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    env = _clean_env(VCPO_DRY_RUN="1", **GPU_PATHS)
    procs = {script: subprocess.Popen(["bash", str(SCRIPTS / script)], cwd=cwd, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for script in [*GPU_RECIPES, *COUNTDOWN_RECIPES]}
    runs = {}
    for script, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        runs[script] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return runs


def _resolved(run: subprocess.CompletedProcess):
    assert run.returncode == 0, run.stderr[-2000:]
    return OmegaConf.create(run.stdout)


def test_every_gpu_recipe_is_checked():
    on_disk = {str(p.relative_to(SCRIPTS)) for d in ("gsm8k", "math") for p in (SCRIPTS / d).glob("[!_]*.sh")}
    assert on_disk == set(GPU_RECIPES)


@pytest.mark.parametrize("script", GPU_RECIPES)
def test_gpu_recipe_resolves_to_the_paper_settings(dry_runs, script):
    task, k, prompts, n, (prompt_len, response_len), tp = GPU_RECIPES[script]
    cfg = _resolved(dry_runs[script])
    arr, at = cfg.actor_rollout_ref, cfg.async_training
    actor, rollout = arr.actor, arr.rollout
    assert "+ exec " in dry_runs[script].stderr.splitlines()[0]  # the script prints what it runs

    # Task (configs/task/<task>.yaml) and the paths the script takes from the environment.
    assert arr.model.path == GPU_PATHS["MODEL_PATH"] and not arr.model.warm_start.enable
    assert cfg.data.train_files == [GPU_PATHS["TRAIN_FILE"]]
    assert cfg.data.val_files == [GPU_PATHS["TEST_FILE"]]
    assert cfg.data.train_batch_size == 0 and at.require_batches == 1 and actor.ppo_mini_batch_size == prompts
    assert rollout.n == n
    assert (cfg.data.max_prompt_length, cfg.data.max_response_length) == (prompt_len, response_len)
    assert cfg.data.truncation == "left" and cfg.data.filter_overlong_prompts
    assert actor.strategy == "megatron" and actor.megatron.tensor_model_parallel_size == tp
    assert actor.megatron.sequence_parallel and actor.megatron.dtype == "bfloat16"
    assert rollout.name == "vllm" and rollout.dtype == "bfloat16" and cfg.trainer.device == "cuda"
    assert actor.optim.lr == 1e-6 and actor.optim.lr_decay_style == "constant"
    assert actor.optim.lr_warmup_steps == 0
    assert actor.optim.weight_decay == 0.1 and actor.optim.clip_grad == 1.0
    assert actor.loss_agg_mode == "seq-mean-token-mean" and actor.entropy_coeff == 0.0
    assert rollout.temperature == 1.0 and rollout.top_p == 1.0
    val = rollout.val_kwargs
    assert val.do_sample and (val.temperature, val.top_p, val.n) == (0.8, 0.7, 3)

    # Method: sequence TIS C = 8 always; VCPO in bypass, or the release's synchronous baseline.
    assert cfg.algorithm.adv_estimator == "grpo"
    assert cfg.algorithm.rollout_correction.rollout_is == "sequence"
    assert cfg.algorithm.rollout_correction.rollout_is_threshold == 8.0
    assert at.staleness_threshold == k and at.partial_rollout == (k > 0)
    assert at.trigger_parameter_sync_step == 1
    vcpo = k > 0
    assert actor.ess_scaling.enable == actor.grad_baselining.enable == vcpo
    if vcpo:
        assert actor.ess_scaling.scaling_rule == "sqrt" and actor.grad_baselining.scope == "group"
        assert actor.grad_baselining.norm_by_std
    assert at.skip_recompute_old_log_prob == vcpo and at.compute_prox_log_prob == (not vcpo)

    # Run: one 8-GPU node split between the engines and the actor, the paper's budget.
    assert cfg.trainer.n_gpus_per_node + cfg.rollout.n_gpus_per_node == 8
    assert cfg.trainer.nnodes == cfg.rollout.nnodes == 1
    assert cfg.trainer.total_training_steps == 400
    assert cfg.trainer.experiment_name == (f"{task}_vcpo_k{k}" if vcpo else f"{task}_synchronous")


@pytest.mark.parametrize("script", COUNTDOWN_RECIPES)
def test_countdown_recipe_is_exactly_its_stated_settings(dry_runs, script):
    expected = OmegaConf.create(to_yaml(load_config(COUNTDOWN_RECIPES[script], "ppo_trainer")))
    cfg = _resolved(dry_runs[script])
    assert cfg == expected
    # ... which are the CPU default's: tiny model, warm start, torch engine and actor, 16 x 8 per step.
    assert cfg.actor_rollout_ref.model.path == "preset:tiny" and cfg.actor_rollout_ref.model.warm_start.enable
    assert cfg.actor_rollout_ref.actor.strategy == "torch" and cfg.actor_rollout_ref.rollout.name == "torch"
    assert cfg.trainer.device == "cpu" and cfg.data.train_batch_size == 16
    assert cfg.actor_rollout_ref.rollout.n == 8
    assert cfg.actor_rollout_ref.actor.optim.lr == (1e-4 if "vcpo" in script else 5e-5)


def _short_run_overrides(assets, run_dir: Path, steps: int) -> list[str]:
    return [
        f"actor_rollout_ref.model.path={assets['model']}", "actor_rollout_ref.model.warm_start.enable=false",
        f"data.train_files=[{assets['train']}]", f"data.val_files=[{assets['test']}]",
        "data.train_batch_size=4", "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16",
        "actor_rollout_ref.rollout.val_kwargs.do_sample=false",  # greedy validation only
        f"trainer.total_training_steps={steps}", f"trainer.test_freq={steps}", "trainer.logger=[jsonl]",
        f"trainer.default_local_dir={run_dir}", f"trainer.cache_dir={run_dir / 'cache'}",
    ]


@pytest.mark.slow
def test_vcpo_k4_script_runs_to_completion(pipeline_assets, tmp_path):
    run_dir, steps = tmp_path / "vcpo_k4", 8
    script = SCRIPTS / "countdown" / "vcpo_k=4.sh"
    proc = subprocess.run(
        ["bash", str(script), *_short_run_overrides(pipeline_assets, run_dir, steps)],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "async_training.staleness_threshold=4" in proc.stderr.splitlines()[0]  # it prints what it runs
    metrics = read_metrics(run_dir)
    train = [m for m in metrics if m["step"] > 0]
    assert [m["step"] for m in train] == list(range(1, steps + 1))
    assert all(m["staleness/start_lag_max"] <= 4 for m in train)
    assert max(m["staleness/start_lag_max"] for m in train) >= 1  # really asynchronous
    assert all("actor/ess_ratio" in m for m in train)  # VCPO's ESS scaling was on
    assert "val/greedy_acc" in metrics[-1] and (run_dir / "report.md").exists()
