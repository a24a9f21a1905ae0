"""The typed configuration of a training run, registered with Hydra's ConfigStore.

Every section is a dataclass owned by the component it configures (actor, rollout, vcpo);
this module composes them, registers the schema so an unknown key fails in Hydra before
anything starts, and cross-checks sections against each other in ``TrainerConfig.validate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from verl.trainer.ppo.core_algos import ADV_ESTIMATORS
from verl.utils.config import ConfigError, check_choice, check_divisible, check_positive
from verl.utils.dataset.countdown import CountdownConfig
from verl.utils.reward_score import RewardConfig
from verl.utils.tracking import check_loggers
from verl.workers.actor.config import ActorConfig
from verl.workers.rollout.config import RolloutConfig


@dataclass
class CountdownDataConfig:
    """Countdown problems generated locally when the default data files are missing."""

    generate_if_missing: bool = True
    train_size: int = 20000
    test_size: int = 500
    num_numbers: int = 3
    min_value: int = 1
    max_value: int = 20
    operators: str = "+-*"
    min_target: int = 0
    max_target: int = 999
    seed: int = 1234

    def problem_config(self) -> CountdownConfig:
        return CountdownConfig(
            num_numbers=self.num_numbers, min_value=self.min_value, max_value=self.max_value,
            operators=self.operators, min_target=self.min_target, max_target=self.max_target,
        )

    def validate(self, prefix: str) -> None:
        check_positive(f"{prefix}.train_size", self.train_size)
        check_positive(f"{prefix}.test_size", self.test_size)
        self.problem_config().validate(prefix)


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=lambda: ["data/countdown/train.parquet"])
    val_files: list[str] = field(default_factory=lambda: ["data/countdown/test.parquet"])
    train_batch_size: int = 16  # prompts per step; each is sampled rollout.n times
    max_prompt_length: int = 32
    max_response_length: int = 16
    val_max_samples: int = 500  # -1: the whole validation set
    shuffle: bool = True
    truncation: str = "error"
    countdown: CountdownDataConfig = field(default_factory=CountdownDataConfig)

    def validate(self, prefix: str) -> None:
        if not self.train_files:
            raise ConfigError(f"{prefix}.train_files", self.train_files, "at least one parquet file is required")
        check_positive(f"{prefix}.train_batch_size", self.train_batch_size)
        check_positive(f"{prefix}.max_prompt_length", self.max_prompt_length)
        check_positive(f"{prefix}.max_response_length", self.max_response_length)
        check_choice(f"{prefix}.truncation", self.truncation, ("error", "left", "right"))
        if self.val_max_samples == 0 or self.val_max_samples < -1:
            raise ConfigError(f"{prefix}.val_max_samples", self.val_max_samples, "must be -1 (all) or > 0")
        self.countdown.validate(f"{prefix}.countdown")


@dataclass
class WarmStartConfig:
    """Supervised warm start on solver solutions, cached by its settings so it runs once."""

    enable: bool = True
    steps: int = 150  # ~30 s on 2 cores: ~18% greedy, leaving RL room to show
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0

    def validate(self, prefix: str) -> None:
        check_positive(f"{prefix}.steps", self.steps)
        check_positive(f"{prefix}.batch_size", self.batch_size)
        check_positive(f"{prefix}.lr", self.lr)
        check_positive(f"{prefix}.weight_decay", self.weight_decay, allow_zero=True)


@dataclass
class ModelConfig:
    # "preset:<name>" builds a random-init tiny Qwen2 + char tokenizer; anything else is a
    # local Hugging Face checkpoint directory (Qwen2.5, Llama, ...).
    path: str = "preset:tiny"
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    init_seed: int = 0
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)

    def validate(self, prefix: str) -> None:
        check_choice(f"{prefix}.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check_choice(f"{prefix}.attn_implementation", self.attn_implementation, ("sdpa", "eager", "flash_attention_2"))
        self.warm_start.validate(f"{prefix}.warm_start")


@dataclass
class AlgorithmConfig:
    adv_estimator: str = "grpo"
    norm_adv_by_std_in_grpo: bool = True

    def validate(self, prefix: str) -> None:
        check_choice(f"{prefix}.adv_estimator", self.adv_estimator, sorted(ADV_ESTIMATORS))


@dataclass
class TrainerLoopConfig:
    project_name: str = "vcpo-rl"
    experiment_name: str = "countdown_grpo_sync"
    run_dir: str = "runs/${trainer.experiment_name}"
    total_training_steps: int = 200
    val_freq: int = 25  # validate every N steps (and at the end); 0 disables
    val_before_train: bool = True
    save_freq: int = 50  # checkpoint every N steps (and at the end); 0: only at the end
    max_checkpoints_to_keep: int = 2
    resume: str = "auto"  # auto: continue from the newest checkpoint in run_dir; disable; or a path
    seed: int = 1
    logger: list[str] = field(default_factory=lambda: ["console", "jsonl", "tensorboard"])
    cache_dir: str = ".cache/vcpo-rl"
    # Torch threads per worker process. Synchronous training runs rollout and training in
    # turn, so each phase may use every core.
    num_threads_per_worker: int = 2
    ray_num_cpus: int = 2
    actor_world_size: int = 1  # data-parallel actor ranks
    device: str = "cpu"

    def validate(self, prefix: str) -> None:
        check_positive(f"{prefix}.total_training_steps", self.total_training_steps)
        check_positive(f"{prefix}.val_freq", self.val_freq, allow_zero=True)
        check_positive(f"{prefix}.save_freq", self.save_freq, allow_zero=True)
        check_positive(f"{prefix}.max_checkpoints_to_keep", self.max_checkpoints_to_keep)
        if self.resume not in ("auto", "disable") and not self.resume:
            raise ConfigError(f"{prefix}.resume", self.resume, "must be 'auto', 'disable' or a checkpoint path")
        check_loggers(f"{prefix}.logger", self.logger)
        check_positive(f"{prefix}.num_threads_per_worker", self.num_threads_per_worker)
        check_positive(f"{prefix}.ray_num_cpus", self.ray_num_cpus)
        check_positive(f"{prefix}.actor_world_size", self.actor_world_size)
        check_choice(f"{prefix}.device", self.device, ("cpu", "cuda"))


# How ParamSync moves weights to the engines (recipe/fully_async_policy/param_sync.py).
PARAM_SYNC_BACKENDS = ("object_store", "collective")


@dataclass
class AsyncTrainingConfig:
    """The fully-async pipeline (rollouter -> queue -> trainer -> param sync).

    ``k`` is the maximum sampler-learner lag: a trajectory trained at trainer step t (weights
    version t - 1) was started at version >= t - 1 - k. k = 0 is synchronous training through
    the same pipeline. ``require_batches`` data batches (of ``data.train_batch_size`` prompts)
    make one trainer step; ``trigger_parameter_sync_step`` trainer steps pass between weight
    syncs. ``queue_max_groups`` = 0 sizes the queue at its proven bound (k + 1) * groups per
    step. ``num_threads_per_worker`` = 0 keeps ``trainer.num_threads_per_worker`` when k = 0
    (phases alternate) and uses one torch thread per actor when k > 0 (phases overlap).
    ``param_sync_backend``: ``collective`` (a standalone gloo group on CPU, NCCL on GPU, between
    actor rank 0 and the replicas; 1.3-2.6x faster than the object store on CPU, see
    docs/benchmarks.md) or ``object_store`` (Ray's shared-memory object store);
    ``queue_timeout_s`` also bounds one weight sync.
    The ``test_*_delay_max_s`` hooks sleep a uniform random time (seeded) before each rollout
    generate call and each trainer update; they exist so tests can vary relative speeds.
    """

    k: int = 0
    partial_rollout: bool = False
    trigger_parameter_sync_step: int = 1
    require_batches: int = 1
    num_rollout_replicas: int = 1
    queue_max_groups: int = 0
    num_threads_per_worker: int = 0
    queue_timeout_s: float = 600.0
    param_sync_backend: str = "collective"
    test_rollout_delay_max_s: float = 0.0
    test_train_delay_max_s: float = 0.0

    def validate(self, prefix: str) -> None:
        check_positive(f"{prefix}.k", self.k, allow_zero=True)
        check_positive(f"{prefix}.trigger_parameter_sync_step", self.trigger_parameter_sync_step)
        check_positive(f"{prefix}.require_batches", self.require_batches)
        check_positive(f"{prefix}.num_rollout_replicas", self.num_rollout_replicas)
        check_positive(f"{prefix}.queue_max_groups", self.queue_max_groups, allow_zero=True)
        check_positive(f"{prefix}.num_threads_per_worker", self.num_threads_per_worker, allow_zero=True)
        check_positive(f"{prefix}.queue_timeout_s", self.queue_timeout_s)
        check_choice(f"{prefix}.param_sync_backend", self.param_sync_backend, PARAM_SYNC_BACKENDS)
        check_positive(f"{prefix}.test_rollout_delay_max_s", self.test_rollout_delay_max_s, allow_zero=True)
        check_positive(f"{prefix}.test_train_delay_max_s", self.test_train_delay_max_s, allow_zero=True)
        # The batch of step t needs weights of version >= t - 1 - k, and with a sync every s
        # steps the rollouter may be s - 1 versions behind: k < s - 1 would wait forever.
        if self.k < self.trigger_parameter_sync_step - 1:
            raise ConfigError(f"{prefix}.trigger_parameter_sync_step", self.trigger_parameter_sync_step,
                              f"must be <= {prefix}.k + 1 = {self.k + 1} (the rollouter could never start "
                              "the next batch within the lag bound)")

    def groups_per_step(self, train_batch_size: int) -> int:
        return train_batch_size * self.require_batches

    def queue_capacity(self, train_batch_size: int) -> int:
        return self.queue_max_groups or (self.k + 1) * self.groups_per_step(train_batch_size)

    def threads_per_worker(self, sync_threads: int) -> int:
        if self.num_threads_per_worker:
            return self.num_threads_per_worker
        return sync_threads if self.k == 0 else 1


@dataclass
class TrainerConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    trainer: TrainerLoopConfig = field(default_factory=TrainerLoopConfig)
    async_training: AsyncTrainingConfig = field(default_factory=AsyncTrainingConfig)

    def validate(self) -> "TrainerConfig":
        self.data.validate("data")
        self.model.validate("model")
        self.actor.validate("actor")
        self.rollout.validate("rollout")
        self.algorithm.validate("algorithm")
        self.reward.validate("reward")
        self.trainer.validate("trainer")
        self.async_training.validate("async_training")
        self._validate_cross_section()
        return self

    def _validate_cross_section(self) -> None:
        if self.rollout.max_new_tokens != self.data.max_response_length:
            raise ConfigError("rollout.max_new_tokens", self.rollout.max_new_tokens,
                              f"must equal data.max_response_length={self.data.max_response_length} "
                              "(the yaml interpolates it; override data.max_response_length instead)")
        needed = self.data.max_prompt_length + self.data.max_response_length
        if self.rollout.max_seq_len < needed:
            raise ConfigError("rollout.max_seq_len", self.rollout.max_seq_len,
                              f"must be >= data.max_prompt_length + data.max_response_length = {needed}")
        if self.algorithm.adv_estimator in ("grpo", "rloo", "drgrpo") and self.rollout.n < 2:
            raise ConfigError(
                "rollout.n", self.rollout.n,
                f"must be >= 2 with algorithm.adv_estimator={self.algorithm.adv_estimator} (group baselines need 2+ samples)",
            )
        num_trajectories = self.async_training.groups_per_step(self.data.train_batch_size) * self.rollout.n
        check_divisible("actor.ppo_mini_batch_size", num_trajectories, self.actor.ppo_mini_batch_size,
                        "actor.ppo_mini_batch_size")
        mini = self.actor.ppo_mini_batch_size
        if mini % self.rollout.n:
            raise ConfigError("actor.ppo_mini_batch_size", mini,
                              f"must be a multiple of rollout.n={self.rollout.n} so groups stay whole")
        world, dp_what = self.trainer.actor_world_size, "trainer.actor_world_size"
        if self.actor.strategy == "megatron":
            # Model-parallel ranks share their data-parallel rank's shard; only DP splits the batch.
            self.actor.megatron.validate("actor.megatron", world_size=world)
            mp = self.actor.megatron.model_parallel_size
            world, dp_what = self.actor.megatron.data_parallel_size(world), f"the data-parallel size (world / {mp})"
        if mini % world:
            raise ConfigError("actor.ppo_mini_batch_size", mini,
                              f"must be divisible by {dp_what}={world} (data-parallel ranks)")
        if num_trajectories % world:
            raise ConfigError("data.train_batch_size", self.data.train_batch_size,
                              f"train_batch_size*require_batches*rollout.n={num_trajectories} must be divisible "
                              f"by {dp_what}={world}")
        at = self.async_training
        needed_queue = (at.k + 1) * at.groups_per_step(self.data.train_batch_size)
        if at.queue_max_groups and at.queue_max_groups < needed_queue:
            raise ConfigError("async_training.queue_max_groups", at.queue_max_groups,
                              f"must be 0 (auto) or >= (k + 1) * train_batch_size * require_batches = {needed_queue}, "
                              "the most groups admission control lets finish ahead of the trainer")


def register_configs() -> None:
    ConfigStore.instance().store(name="trainer_schema", node=TrainerConfig)


def to_trainer_config(cfg: DictConfig | dict[str, Any]) -> TrainerConfig:
    """Turn a Hydra/OmegaConf config into the typed, validated TrainerConfig."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    merged = OmegaConf.merge(OmegaConf.structured(TrainerConfig), cfg)
    config: TrainerConfig = OmegaConf.to_object(merged)
    return config.validate()
