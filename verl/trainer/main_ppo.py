"""Entry point: ``python -m verl.trainer.main_ppo [hydra overrides]``.

Validates the config before anything starts, prepares data and the model (preset build,
cached SFT warm start), starts Ray and runs the trainer; ends with a report in the run dir.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from verl.trainer.config import TrainerConfig, register_configs, to_trainer_config
from verl.utils.config import ConfigError

register_configs()


def log(msg: str) -> None:
    print(f"[vcpo-rl] {msg}", file=sys.stderr, flush=True)


DEFAULT_COUNTDOWN_DIR = Path("data/countdown")


def prepare_data(config: TrainerConfig) -> None:
    """Generate the Countdown files on first use when they are the (missing) defaults."""
    from verl.utils.dataset.countdown import write_countdown_parquet

    cd = config.data.countdown
    wanted = [Path(f) for f in [*config.data.train_files, *config.data.val_files]]
    missing = [f for f in wanted if not f.exists()]
    if not missing:
        return
    generatable = {Path(f).resolve() for f in (DEFAULT_COUNTDOWN_DIR / "train.parquet", DEFAULT_COUNTDOWN_DIR / "test.parquet")}
    if not cd.generate_if_missing or any(f.resolve() not in generatable for f in missing):
        raise FileNotFoundError(
            f"data files not found: {', '.join(map(str, missing))} "
            "(prepare them with scripts/data/prepare_*.py, or use the default Countdown paths to have them generated)"
        )
    log(f"generating Countdown data in {DEFAULT_COUNTDOWN_DIR} ({cd.train_size} train / {cd.test_size} test)")
    write_countdown_parquet(
        DEFAULT_COUNTDOWN_DIR, train_size=cd.train_size, test_size=cd.test_size, seed=cd.seed,
        num_numbers=cd.num_numbers, min_value=cd.min_value, max_value=cd.max_value, operators=cd.operators,
        min_target=cd.min_target, max_target=cd.max_target,
    )


def prepare_model(config: TrainerConfig) -> str:
    """Resolve ``model.path`` to a local HF checkpoint, building the preset and warm start if asked."""
    from verl.models.presets import build_tiny_model_dir
    from verl.trainer.sft_trainer import cached_warm_start

    path, cache = config.model.path, Path(config.trainer.cache_dir)
    if path.startswith("preset:"):
        preset = path.split(":", 1)[1]
        identity = f"{path}@seed{config.model.init_seed}"
        base = cache / f"{preset}-seed{config.model.init_seed}"
        if not (base / "config.json").exists():
            build_tiny_model_dir(str(base), preset=preset, seed=config.model.init_seed)
        path = str(base)
    else:
        if not (Path(path) / "config.json").exists():
            raise ConfigError("model.path", path, "must be 'preset:<name>' or a local HF checkpoint directory with config.json")
        identity = str(Path(path).resolve())
    if config.model.warm_start.enable:
        path = str(cached_warm_start(path, identity, config.data.train_files, config.model.warm_start, cache, log))
    return path


def run(config: TrainerConfig) -> dict[str, float]:
    import ray

    from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    from verl.utils.report import write_report

    t0 = time.perf_counter()
    prepare_data(config)
    model_path = prepare_model(config)
    trainer = RayPPOTrainer(config, model_path)  # loads and checks the data before Ray starts
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            # Attaching to a running cluster (scripts/slurm/): its resources are already declared.
            ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False)
        else:
            ray.init(num_cpus=config.trainer.ray_num_cpus, include_dashboard=False, log_to_driver=True,
                     configure_logging=False)
    log(f"training {config.trainer.total_training_steps} steps; run dir {config.trainer.run_dir}")
    final = trainer.fit()
    report = write_report(config.trainer.run_dir)
    log(f"done in {time.perf_counter() - t0:.0f} s; report: {report}")
    return final


@hydra.main(config_path="../../configs", config_name="ppo_trainer", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        config = to_trainer_config(cfg)
    except ConfigError as e:
        log(f"error: {e}")
        sys.exit(2)
    if os.environ.get("VCPO_DRY_RUN"):
        print(OmegaConf.to_yaml(OmegaConf.structured(config)))
        return
    run(config)


if __name__ == "__main__":
    main()
