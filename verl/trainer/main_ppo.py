"""Entry point: ``python -m verl.trainer.main_ppo [--config-name=NAME] [hydra overrides]``.

Validates the config before anything starts (``load_config``: every key in veRL's spelling, a
typo fails with a suggestion), prepares data and the model (preset build, cached SFT warm
start), checks the model against the parallel layout, starts Ray and runs the trainer; ends
with a report in the run dir. ``VCPO_DRY_RUN=1`` prints the resolved config and exits.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from verl.trainer.config import TrainerConfig, load_config, parse_cli, to_yaml
from verl.utils.config import ConfigError


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
    write_countdown_parquet(DEFAULT_COUNTDOWN_DIR, train_size=cd.train_size, test_size=cd.test_size, seed=cd.seed,
                            **vars(cd.problem_config()))


def prepare_model(config: TrainerConfig) -> str:
    """Resolve ``actor_rollout_ref.model.path`` to a local HF checkpoint, building the preset and
    warm start if asked."""
    from verl.models.presets import build_tiny_model_dir
    from verl.trainer.sft_trainer import cached_warm_start

    model = config.model
    path, cache = model.path, Path(config.trainer.cache_dir)
    if path.startswith("preset:"):
        preset = path.split(":", 1)[1]
        identity = f"{path}@seed{model.init_seed}"
        base = cache / f"{preset}-seed{model.init_seed}"
        if not (base / "config.json").exists():
            build_tiny_model_dir(str(base), preset=preset, seed=model.init_seed)
        path = str(base)
    else:
        if not (Path(path) / "config.json").exists():
            raise ConfigError("actor_rollout_ref.model.path", path,
                              "must be 'preset:<name>' or a local HF checkpoint directory with config.json")
        identity = str(Path(path).resolve())
    if model.warm_start.enable:
        path = str(cached_warm_start(path, identity, config.data.train_files, model.warm_start, cache, log))
    return path


def check_model_layout(config: TrainerConfig, model_path: str) -> None:
    """Megatron's tensor/pipeline split against the model's heads, KV heads, layers and vocabulary,
    before any worker starts."""
    if config.actor.strategy != "megatron":
        return
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    config.actor.megatron.validate("actor_rollout_ref.actor.megatron", config.trainer.world_size, hf_config)


def start_ray(config: TrainerConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    init = config.ray_kwargs.ray_init
    kwargs = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    if init.runtime_env:
        kwargs["runtime_env"] = init.runtime_env
    if os.environ.get("RAY_ADDRESS"):
        # Attaching to a running cluster (scripts/slurm/): its resources are already declared.
        ray.init(**kwargs)
    else:
        ray.init(num_cpus=init.cpus(), **kwargs)


def run(config: TrainerConfig) -> dict[str, float]:
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    from verl.utils.report import write_report

    t0 = time.perf_counter()
    prepare_data(config)
    model_path = prepare_model(config)
    check_model_layout(config, model_path)
    trainer = RayPPOTrainer(config, model_path)  # loads and checks the data before Ray starts
    start_ray(config)
    steps = f"training {trainer.total_training_steps} steps"
    log(f"{'validating only (trainer.val_only)' if config.trainer.val_only else steps}; run dir {config.run_dir}")
    final = trainer.fit()
    report = write_report(config.run_dir)
    log(f"done in {time.perf_counter() - t0:.0f} s; report: {report}")
    return final


def main(argv: list[str] | None = None, default_config: str = "ppo_trainer") -> None:
    """Parse ``--config-name`` and overrides, validate, then dry-run or train. Exit 2 on a bad config."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        config_name, overrides = parse_cli(sys.argv[1:] if argv is None else argv, default_config)
        config = load_config(overrides, config_name)
    except ConfigError as e:
        log(f"error: {e}")
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as e:
        log(f"error: {type(e).__name__}: {e}")
        sys.exit(2)
    for note in config.startup_notes():
        log(f"note: {note}")
    if os.environ.get("VCPO_DRY_RUN"):
        print(to_yaml(config))
        return
    run(config)


if __name__ == "__main__":
    main()
