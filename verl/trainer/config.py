"""The typed configuration of a training run, in veRL's key tree (config -> every component).

Sections follow veRL and the VCPO release: ``data``, ``actor_rollout_ref.{model,actor,rollout,ref}``,
``algorithm``, ``critic``, ``trainer``, ``async_training``, ``rollout`` (the release's rollouter
resources and budget), ``custom_reward_function``, ``reward_model``, ``ray_kwargs``. Each key is
defined once, here or in the section of the component it configures; derived values (the lag
bound, the rollout lengths, replica and rank counts, the resolved loss) are computed from them.
``load_config`` composes the Hydra config groups and overrides and returns the validated
``TrainerConfig``; every error names the key before anything starts.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BeforeValidator, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from verl.trainer.ppo.core_algos import ADV_ESTIMATORS, KLEstimator
from verl.utils.config import (
    ConfigError,
    UnknownKeyError,
    build_config,
    config_section,
    defaults_of,
    is_known_key,
    schema_keys,
)
from verl.utils.dataset.countdown import CountdownConfig
from verl.utils.tracking import SUPPORTED_LOGGERS, check_loggers
from verl.workers.actor.config import ActorConfig, PolicyLossSpec, PolicyUpdateConfig, RefConfig
from verl.workers.rollout.config import RolloutConfig


def _as_list(value: Any) -> Any:
    """veRL accepts one file as a string or several as a list."""
    return [value] if isinstance(value, str) else value


FileList = Annotated[list[str], BeforeValidator(_as_list)]
AdvEstimator = Literal[tuple(ADV_ESTIMATORS)]  # type: ignore[valid-type]
Logger = Literal[SUPPORTED_LOGGERS]  # type: ignore[valid-type]
# How ParamSync moves weights to the engines (verl/trainer/fully_async/param_sync.py).
ParamSyncBackend = Literal["collective", "object_store"]
PARAM_SYNC_BACKENDS: tuple[str, ...] = get_args(ParamSyncBackend)


# ------------------------------------------------------------------------------------ data


@config_section
class CountdownDataConfig(CountdownConfig):
    """``data.countdown``: the Countdown files generated on first use when the configured data
    files are the (missing) defaults ``data/countdown/{train,test}.parquet``."""

    generate_if_missing: bool = True
    """Generate the default Countdown files when they do not exist."""
    train_size: PositiveInt = 20000
    """Problems in the generated training split."""
    test_size: PositiveInt = 500
    """Problems in the generated held-out split."""
    seed: int = 1234
    """Seed of the generator."""

    def problem_config(self) -> CountdownConfig:
        return CountdownConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(CountdownConfig)})


@config_section
class DataConfig:
    """``data``: prompts in veRL's parquet schema (``data_source``, ``prompt``, ``reward_model``, ``extra_info``)."""

    train_files: FileList = field(default_factory=lambda: ["data/countdown/train.parquet"])
    """Training parquet file(s): one path or a list."""
    val_files: FileList = field(default_factory=lambda: ["data/countdown/test.parquet"])
    """Held-out parquet file(s) for validation (an empty list: no validation)."""
    prompt_key: str = "prompt"
    """Column holding the chat messages."""
    max_prompt_length: PositiveInt = 512
    """Prompt tokens at most (longer prompts: see ``truncation``/``filter_overlong_prompts``)."""
    max_response_length: PositiveInt = 512
    """New tokens per response at most."""
    train_batch_size: NonNegativeInt = 16
    """Prompts per trainer step; 0 (the release's async mode): ``ppo_mini_batch_size * async_training.require_batches``."""
    gen_batch_size: PositiveInt = 1
    """Prompts the rollouter takes at a time; ours admits one prompt group at a time, as the release does with 1."""
    val_max_samples: int = -1
    """Validation prompts used (-1: all)."""
    shuffle: bool = True
    """Shuffle the training prompts each epoch (seeded by ``trainer.seed``)."""
    truncation: Literal["error", "left", "right"] = "error"
    """What to do with a prompt longer than ``max_prompt_length``."""
    filter_overlong_prompts: bool = False
    """Drop prompts longer than ``max_prompt_length`` when loading (counted in the log)."""
    filter_overlong_prompts_workers: PositiveInt = 1
    """Processes for that filter in veRL; prompts here are filtered in-process."""
    return_raw_chat: bool = False
    """veRL's agent-loop switch; prompts here are tokenized once by the dataset."""
    countdown: CountdownDataConfig = field(default_factory=CountdownDataConfig)

    def validate(self, prefix: str) -> None:
        if not self.train_files:
            raise ConfigError(f"{prefix}.train_files", self.train_files, "at least one parquet file is required")
        if self.val_max_samples == 0 or self.val_max_samples < -1:
            raise ConfigError(f"{prefix}.val_max_samples", self.val_max_samples, "must be -1 (all) or > 0")
        self.countdown.validate(f"{prefix}.countdown")


# ------------------------------------------------------------------------------- model, actor


@config_section
class WarmStartConfig:
    """``actor_rollout_ref.model.warm_start``: a supervised warm start on solver solutions of the
    Countdown task, cached by its settings so it runs once (the CPU default's starting point)."""

    enable: bool = False
    """Run the SFT warm start before RL."""
    steps: PositiveInt = 150
    """SFT steps (~30 s on 2 cores: ~18% greedy, leaving RL room to show)."""
    batch_size: PositiveInt = 128
    """SFT batch size."""
    lr: PositiveFloat = 1e-3
    """SFT learning rate."""
    weight_decay: NonNegativeFloat = 0.0
    """SFT weight decay."""
    seed: int = 0
    """SFT data order and init seed."""


@config_section
class ModelConfig:
    """``actor_rollout_ref.model``: the policy's weights and tokenizer."""

    path: str = "preset:tiny"
    """``preset:<name>`` builds a random-init Qwen2 + character tokenizer; anything else is a local HF checkpoint directory."""
    use_remove_padding: bool = False
    """veRL's packed-sequence switch; this build computes on padded batches (same numbers, more memory)."""
    init_seed: int = 0
    """Seed of a preset's random init."""
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)


@config_section
class ActorRolloutRefConfig:
    """``actor_rollout_ref``: the policy model and its three roles."""

    hybrid_engine: bool = False
    """veRL's colocated actor+rollout worker; this trainer runs them as separate workers (false only)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ref: RefConfig = field(default_factory=RefConfig)


# ------------------------------------------------------------------------------- algorithm


@config_section
class KLControlConfig:
    """``algorithm.kl_ctrl``: the KL-in-reward coefficient controller (used only with ``use_kl_in_reward``)."""

    type: Literal["fixed", "adaptive"] = "fixed"
    """Fixed or adaptive coefficient."""
    kl_coef: NonNegativeFloat = 0.001
    """(Initial) KL coefficient."""
    horizon: PositiveInt = 10000
    """Adaptive controller horizon."""
    target_kl: PositiveFloat = 0.1
    """Adaptive controller target."""


@config_section
class RolloutCorrectionConfig:
    """``algorithm.rollout_correction``: how the actor corrects for the rollout policy mu.

    ``rollout_is``: truncated IS weight min(w, rollout_is_threshold), detached, per token or per
    sequence (w = prod_t pi/mu; the numerator is the current policy in bypass mode, the recomputed
    old policy otherwise). ``rollout_rs``: masked IS: drop tokens/sequences whose ratio (token,
    sequence, or per-token geometric mean) leaves [rollout_rs_threshold_lower, rollout_rs_threshold];
    ``m2po``: mask the largest (log pi - log mu)^2 until their mean over the global mini-batch is
    <= rollout_rs_threshold. Formulas: docs/losses.md."""

    rollout_is: Literal["token", "sequence"] | None = None
    """Truncated IS level (null: no IS weight)."""
    rollout_is_threshold: PositiveFloat = 2.0
    """The truncation cap C of the IS weight."""
    rollout_rs: Literal["token", "sequence", "geometric", "m2po"] | None = None
    """Rejection (masking) level (null: none)."""
    rollout_rs_threshold: PositiveFloat | None = None
    """Upper ratio bound (null: ``rollout_is_threshold``); for ``m2po`` the second-moment bound (null: 0.04)."""
    rollout_rs_threshold_lower: PositiveFloat | None = None
    """Lower ratio bound (null: 1 / upper)."""

    def spec_fields(self) -> dict[str, Any]:
        """The correction part of ``PolicyLossSpec``."""
        out: dict[str, Any] = {"tis_level": self.rollout_is or "none", "tis_cap": self.rollout_is_threshold}
        if self.rollout_rs == "m2po":
            out.update(m2po=True, m2po_threshold=self.rollout_rs_threshold or 0.04)
        elif self.rollout_rs is not None:
            high = self.rollout_rs_threshold or self.rollout_is_threshold
            out.update(rejection_level=self.rollout_rs, rejection_high=high,
                       rejection_low=self.rollout_rs_threshold_lower or 1.0 / high)
        return out

    def validate(self, prefix: str) -> None:
        if self.rollout_rs in ("token", "sequence", "geometric"):
            high = self.rollout_rs_threshold or self.rollout_is_threshold
            low = self.rollout_rs_threshold_lower or 1.0 / high
            # The bounds must bracket 1 so on-policy data (ratio 1) is never rejected.
            if high < 1.0:
                raise ConfigError(f"{prefix}.rollout_rs_threshold", high, "must be >= 1")
            if low > 1.0:
                raise ConfigError(f"{prefix}.rollout_rs_threshold_lower", low, "must be <= 1")


@config_section
class AlgorithmConfig:
    """``algorithm``: advantages and rollout correction."""

    adv_estimator: AdvEstimator = "grpo"
    """Critic-free advantage estimator."""
    norm_adv_by_std_in_grpo: bool = True
    """GRPO: divide by the group's reward std."""
    use_kl_in_reward: bool = False
    """Subtract beta * KL(mu || pi_ref) per token from the reward, beta from ``kl_ctrl`` (starts the reference policy)."""
    kl_penalty: Literal[KLEstimator, "full"] = "kl"  # type: ignore[valid-type]
    """KL estimator of the reward penalty (used only with ``use_kl_in_reward``; ``full`` is refused)."""
    kl_ctrl: KLControlConfig = field(default_factory=KLControlConfig)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    test_flip_advantage_sign: bool = False
    """Test only: negates the advantages, so the learning tests can prove they fail on a sign error."""


@config_section
class CriticConfig:
    """``critic``: accepted and unused, as in veRL, when the estimator needs no critic (every
    estimator here is critic-free)."""

    strategy: Literal["fsdp", "fsdp2", "megatron", "torch"] = "fsdp"
    """The critic's training strategy."""
    megatron: dict[str, Any] = field(default_factory=dict)
    """The critic's Megatron layout."""


# ------------------------------------------------------------------------------- trainer


@config_section
class TrainerLoopConfig:
    """``trainer``: the run, its resources, logging, validation and checkpoints."""

    project_name: str = "vcpo-rl"
    """Project name for the loggers."""
    experiment_name: str = "run"
    """Run name; names the run directory by default."""
    logger: list[Logger] = field(default_factory=lambda: ["console", "jsonl", "tensorboard"])  # type: ignore[valid-type]
    """Loggers: console, jsonl, tensorboard, wandb."""
    wandb_entity: str | None = None
    """wandb entity (team) of the run."""
    wandb_group: str | None = None
    """wandb group of the run."""
    nnodes: PositiveInt = 1
    """Nodes of the training pool."""
    n_gpus_per_node: PositiveInt = 1
    """Actor ranks per node (GPUs; processes on CPU). World = nnodes * n_gpus_per_node."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where actors and engines run."""
    total_epochs: PositiveInt = 30
    """Passes over the training prompts (the run stops at whichever budget ends first)."""
    total_training_steps: PositiveInt | None = None
    """Trainer steps (null: from ``rollout.total_rollout_steps`` or ``total_epochs``)."""
    test_freq: int = -1
    """Validate every N steps (<= 0: only at the end; ``rollout.test_freq`` takes precedence when set)."""
    val_before_train: bool = True
    """Validate the starting weights (step 0) before training; false skips it."""
    val_only: bool = False
    """Validate the starting weights (or the resumed checkpoint's), log them, write the report and exit
    without training."""
    save_freq: int = 50
    """Checkpoint every N steps and at the end (<= 0: never)."""
    max_actor_ckpt_to_keep: PositiveInt | None = 2
    """Checkpoints kept (null: all)."""
    default_local_dir: str = "runs/${trainer.experiment_name}"
    """The run directory: config, metrics, checkpoints, report."""
    resume_mode: Literal["auto", "disable", "resume_path"] = "auto"
    """``auto``: continue from the newest complete checkpoint in the run dir; ``resume_path``: from ``resume_from_path``."""
    resume_from_path: str | None = None
    """Checkpoint directory for ``resume_mode=resume_path``."""
    rollout_data_dir: str | None = None
    """Write each step's trajectories as ``<step>.jsonl`` here: prompt, response, score, versions, lag
    (and the log IS weight when old log-probs are recomputed)."""
    log_val_generations: NonNegativeInt = 0
    """Validation samples logged at each evaluation (the same prompts every time, drawn with ``seed``):
    prompt, response, score and step in ``<run dir>/val_generations/<step>.jsonl`` and to the loggers."""
    seed: int = 1
    """The run's one seed: data order, sampling, init."""
    cache_dir: str = ".cache/vcpo-rl"
    """Cache of built presets and warm starts."""
    num_threads_per_worker: PositiveInt = 2
    """Torch threads per worker when rollout and training alternate (k = 0); see ``async_training``."""

    @property
    def world_size(self) -> int:
        return self.nnodes * self.n_gpus_per_node

    def validate(self, prefix: str) -> None:
        check_loggers(f"{prefix}.logger", self.logger)
        if self.resume_mode == "resume_path" and not self.resume_from_path:
            raise ConfigError(f"{prefix}.resume_from_path", self.resume_from_path,
                              f"must name a checkpoint directory with {prefix}.resume_mode=resume_path")


@config_section
class AsyncTrainingConfig:
    """``async_training``: the fully-async pipeline (rollouter -> reorder buffer -> trainer -> param sync).

    ``staleness_threshold`` is the release's lag k as a whole number: every trajectory trained at
    trainer step t (weights version t - 1) was started at version >= t - 1 - k (a hard,
    per-trajectory bound, proven in docs/async.md); 0 is synchronous training through the same
    pipeline. ``trigger_parameter_sync_step`` trainer steps pass between weight syncs.
    """

    staleness_threshold: NonNegativeFloat = 0.0
    """Max sampler-learner lag k in weight versions (a whole number; 0 = synchronous)."""
    trigger_parameter_sync_step: PositiveInt = 1
    """Trainer steps between weight syncs."""
    require_batches: PositiveInt = 1
    """Mini-batches (of ``ppo_mini_batch_size`` prompts) per trainer step when ``data.train_batch_size=0``."""
    partial_rollout: bool = False
    """Interrupt in-flight generations at a weight update and resume them under the new weights."""
    use_rollout_log_probs: bool = True
    """Behaviour log-probs come from the engine (required here)."""
    skip_recompute_old_log_prob: bool = False
    """Bypass mode (the VCPO recipes): no old log-probs; ratio 1 with grad log pi, IS weight from the current policy."""
    compute_prox_log_prob: bool = False
    """Without bypass: recompute the old log-probs with the current weights (the release's proximal pass);
    false: the old log-probs are the rollout's, so the correction weight pi_old / mu is 1."""
    bsz_per_dp_rank: PositiveInt | None = None
    """Prompt groups one rollout replica generates at once (null: as many as ``actor_rollout_ref.rollout.max_num_seqs`` holds)."""
    queue_max_groups: NonNegativeInt = 0
    """Reorder-buffer capacity in groups (0: its proven bound, (k + 1) * groups per step)."""
    num_threads_per_worker: NonNegativeInt = 0
    """Torch threads per worker (0: ``trainer.num_threads_per_worker`` at k = 0, one when phases overlap)."""
    queue_timeout_s: PositiveFloat = 600.0
    """Longest the trainer waits for one step's groups."""
    param_sync_timeout_s: PositiveFloat = 600.0
    """Longest one weight sync may take."""
    param_sync_backend: ParamSyncBackend = "collective"
    """Weight channel: ``collective`` (standalone gloo/NCCL broadcast) or ``object_store`` (Ray's)."""
    test_rollout_delay_max_s: NonNegativeFloat = 0.0
    """Test hook: sleep up to this long (seeded) before each rollout generate call."""
    test_train_delay_max_s: NonNegativeFloat = 0.0
    """Test hook: sleep up to this long (seeded) before each trainer update."""

    @property
    def k(self) -> int:
        """The hard lag bound."""
        return int(self.staleness_threshold)

    def validate(self, prefix: str) -> None:
        if not float(self.staleness_threshold).is_integer():
            raise ConfigError(
                f"{prefix}.staleness_threshold", self.staleness_threshold,
                "must be a whole number of weight versions (the release's lag k, e.g. 2.0); veRL's fractional "
                "sample budget has no per-trajectory meaning, and this trainer bounds every trajectory's lag")
        if not self.use_rollout_log_probs:
            raise ConfigError(f"{prefix}.use_rollout_log_probs", False,
                              "must be true: the behaviour log-probs always come from the rollout engine here")
        if self.skip_recompute_old_log_prob and self.compute_prox_log_prob:
            raise ConfigError(f"{prefix}.compute_prox_log_prob", True,
                              f"contradicts {prefix}.skip_recompute_old_log_prob=true (bypass computes no old log-probs)")
        # The batch of step t needs weights of version >= t - 1 - k, and with a sync every s
        # steps the rollouter may be s - 1 versions behind: k < s - 1 would wait forever.
        if self.k < self.trigger_parameter_sync_step - 1:
            raise ConfigError(f"{prefix}.trigger_parameter_sync_step", self.trigger_parameter_sync_step,
                              f"must be <= {prefix}.staleness_threshold + 1 = {self.k + 1} (the rollouter could "
                              "never start the next batch within the lag bound)")

    def queue_capacity(self, groups_per_step: int) -> int:
        return self.queue_max_groups or (self.k + 1) * groups_per_step

    def threads_per_worker(self, sync_threads: int) -> int:
        if self.num_threads_per_worker:
            return self.num_threads_per_worker
        return sync_threads if self.k == 0 else 1


@config_section
class RolloutResourcesConfig:
    """``rollout``: the release's rollouter section: its resource pool and its budget."""

    nnodes: PositiveInt = 1
    """Nodes of the rollout pool."""
    n_gpus_per_node: PositiveInt = 1
    """Rollout GPUs per node (processes on CPU); replicas = nnodes * n_gpus_per_node / actor_rollout_ref.rollout.tensor_model_parallel_size."""
    total_rollout_steps: PositiveInt | None = None
    """Prompts the rollouter generates in all (null: no limit of its own)."""
    total_epochs: PositiveInt | None = None
    """Passes the rollouter makes over the prompts (null: ``trainer.total_epochs``)."""
    test_freq: int | None = None
    """Validate every N weight versions (null: ``trainer.test_freq``)."""


@config_section
class CustomRewardFunctionConfig:
    """``custom_reward_function``: a user's scorer by file path, called as
    ``name(data_source, solution_str, ground_truth, extra_info=None, **reward_kwargs)`` for every
    sample in place of the rules chosen by ``data_source``. It returns a float, or a dict whose
    ``score`` is the reward and whose other numeric entries are logged as
    ``reward/extra/<key>/mean``. It runs in the reward worker under ``reward_model.timeout_s``;
    one that raises scores 0 (``reward/num_errors``), one that hangs scores 0
    (``reward/num_timeouts``). A file or name that cannot be loaded fails at start-up."""

    path: str | None = None
    """Python file defining the scorer (null: score by ``data_source``, docs/rewards.md)."""
    name: str = "compute_score"
    """Function name in that file."""
    reward_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of every call (needs ``path``)."""


@config_section
class RewardModelConfig:
    """``reward_model``: rule-based scoring by ``data_source`` in an isolated worker."""

    enable: bool = False
    """A model-based reward (not in this build)."""
    reward_manager: Literal["naive"] = "naive"
    """How samples are scored: one by one, by ``data_source``."""
    timeout_s: PositiveFloat = 5.0
    """A scorer running longer scores 0 and is counted in ``reward/num_timeouts``."""
    startup_timeout_s: PositiveFloat = 60.0
    """Longest the scoring worker may take to start."""


@config_section
class RayInitConfig:
    """``ray_kwargs.ray_init``: arguments of ``ray.init`` when the trainer starts Ray itself."""

    num_cpus: PositiveFloat | None = None
    """CPUs Ray may schedule (null: all of this machine's); workers take fractional shares."""
    runtime_env: dict[str, Any] = field(default_factory=dict)
    """Ray runtime environment, e.g. ``env_vars`` for every worker."""

    def cpus(self) -> float:
        """The CPUs the trainer tells Ray about (and shares out to its workers)."""
        return self.num_cpus or float(os.cpu_count() or 1)


@config_section
class RayKwargsConfig:
    """``ray_kwargs``: how the trainer starts or joins Ray."""

    ray_init: RayInitConfig = field(default_factory=RayInitConfig)


# ------------------------------------------------------------------------------- the root


@config_section
class TrainerConfig:
    """The whole run. A bare ``TrainerConfig()`` is valid; ``configs/`` composes the CPU default
    (``task: countdown``, ``method: sync``) on top of it."""

    data: DataConfig = field(default_factory=DataConfig)
    actor_rollout_ref: ActorRolloutRefConfig = field(default_factory=ActorRolloutRefConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    trainer: TrainerLoopConfig = field(default_factory=TrainerLoopConfig)
    async_training: AsyncTrainingConfig = field(default_factory=AsyncTrainingConfig)
    rollout: RolloutResourcesConfig = field(default_factory=RolloutResourcesConfig)
    custom_reward_function: CustomRewardFunctionConfig = field(default_factory=CustomRewardFunctionConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    ray_kwargs: RayKwargsConfig = field(default_factory=RayKwargsConfig)

    # -------------------------------------------------------------- short names used everywhere
    @property
    def model(self) -> ModelConfig:
        return self.actor_rollout_ref.model

    @property
    def actor(self) -> ActorConfig:
        return self.actor_rollout_ref.actor

    @property
    def rollout_engine(self) -> RolloutConfig:
        """``actor_rollout_ref.rollout`` (not the release's top-level ``rollout`` resources section)."""
        return self.actor_rollout_ref.rollout

    # -------------------------------------------------------------- derived values
    @property
    def prompts_per_step(self) -> int:
        """Prompt groups one trainer step trains on."""
        if self.data.train_batch_size:
            return self.data.train_batch_size
        return self.actor.ppo_mini_batch_size * self.async_training.require_batches

    @property
    def trajectories_per_step(self) -> int:
        return self.prompts_per_step * self.rollout_engine.n

    @property
    def num_rollout_replicas(self) -> int:
        return self.rollout.nnodes * self.rollout.n_gpus_per_node // self.rollout_engine.tensor_model_parallel_size

    @property
    def data_parallel_size(self) -> int:
        world = self.trainer.world_size
        if self.actor.strategy == "megatron":
            return self.actor.megatron.data_parallel_size(world)
        return world

    @property
    def val_freq(self) -> int:
        """Validate every this many steps (0: only at the end)."""
        freq = self.rollout.test_freq if self.rollout.test_freq is not None else self.trainer.test_freq
        return max(freq, 0)

    @property
    def run_dir(self) -> str:
        return self.trainer.default_local_dir

    def total_training_steps(self, num_train_prompts: int) -> int:
        """The run's trainer steps: ``trainer.total_training_steps``, else the first budget to end of
        ``rollout.total_rollout_steps`` (prompts) and the epochs over ``num_train_prompts`` prompts."""
        if self.trainer.total_training_steps is not None:
            return self.trainer.total_training_steps
        per_step = self.prompts_per_step
        epochs = self.rollout.total_epochs or self.trainer.total_epochs
        steps = max(1, epochs * num_train_prompts // per_step)
        if self.rollout.total_rollout_steps is not None:
            steps = min(steps, max(1, self.rollout.total_rollout_steps // per_step))
        return steps

    @property
    def recompute_old_log_prob(self) -> bool:
        """Whether the trainer recomputes the old log-probs before the update (the release's proximal
        pass); otherwise the old log-probs are the rollout's (bypass uses none)."""
        at = self.async_training
        return at.compute_prox_log_prob and not at.skip_recompute_old_log_prob

    def policy_loss_spec(self) -> PolicyLossSpec:
        """The actor's loss from veRL's and the release's keys (docs/losses.md, "How a loss mode is selected")."""
        actor, at = self.actor, self.async_training
        correction = self.algorithm.rollout_correction.spec_fields()
        if at.skip_recompute_old_log_prob:
            mode = "bypass"
        elif actor.policy_loss.loss_mode == "gspo":
            mode = "gspo"
        elif self.recompute_old_log_prob and self.algorithm.rollout_correction.rollout_is:
            mode = "decoupled_ppo"
        else:
            mode = "ppo_clip"
        if not at.skip_recompute_old_log_prob and not self.recompute_old_log_prob:
            # Old log-probs = the rollout's: the correction ratio pi_old / mu is exactly 1, as in the release.
            correction.update(tis_level="none", rejection_level="none")
        return PolicyLossSpec(mode=mode, clip_ratio_low=actor.clip_low, clip_ratio_high=actor.clip_high,
                              clip_ratio_c=actor.clip_ratio_c, **correction)

    @property
    def needs_reference_policy(self) -> bool:
        """Whether the actor ranks hold the frozen reference policy (a KL term is on)."""
        return self.actor.use_kl_loss or self.algorithm.use_kl_in_reward

    def policy_update_config(self) -> PolicyUpdateConfig:
        """What every actor rank runs ``update_policy`` with (batch sizes in trajectories)."""
        actor, rollout, ref = self.actor, self.rollout_engine, self.actor_rollout_ref.ref
        spec = self.policy_loss_spec()
        ref_micro = None
        if self.needs_reference_policy:
            ref_micro = ref.log_prob_micro_batch_size_per_gpu or actor.ppo_micro_batch_size_per_gpu
        ref_offload = ref.megatron.param_offload if actor.strategy == "megatron" else ref.fsdp_config.param_offload
        return PolicyUpdateConfig(
            strategy=actor.strategy,
            ppo_mini_batch_size=actor.ppo_mini_batch_size * rollout.n,
            ppo_micro_batch_size_per_gpu=actor.ppo_micro_batch_size_per_gpu,
            log_prob_micro_batch_size_per_gpu=(rollout.log_prob_micro_batch_size_per_gpu
                                               or actor.ppo_micro_batch_size_per_gpu),
            ppo_epochs=actor.ppo_epochs, shuffle=actor.shuffle, loss_agg_mode=actor.loss_agg_mode,
            grad_clip=actor.optim.clip_grad, entropy_coeff=actor.entropy_coeff,
            use_kl_loss=actor.use_kl_loss, kl_loss_coef=actor.kl_loss_coef, kl_loss_type=actor.kl_loss_type,
            ref_log_prob_micro_batch_size_per_gpu=ref_micro, ref_param_offload=ref_offload,
            recompute_old_log_prob=self.recompute_old_log_prob,
            grad_norm_method="per_traj" if actor.update_policy_per_traj else "batched",
            policy_loss=spec, optim=actor.optim, ess_scaling=actor.ess_scaling,
            grad_baselining=actor.grad_baselining, megatron=actor.megatron,
        )

    # -------------------------------------------------------------- checks
    def validate(self) -> TrainerConfig:
        """Cross-field rules (types and ranges were checked when the config was built)."""
        self.data.validate("data")
        arr = "actor_rollout_ref"
        self.actor.validate(f"{arr}.actor")
        self._derive_rollout_lengths()
        self.rollout_engine.validate(f"{arr}.rollout")
        self.algorithm.rollout_correction.validate("algorithm.rollout_correction")
        self.trainer.validate("trainer")
        self.async_training.validate("async_training")
        self._check_missing_features()
        if self.trainer.val_only and not self.data.val_files:
            raise ConfigError("trainer.val_only", True, "needs held-out prompts: set data.val_files")
        self._check_batches()
        self._check_loss()
        return self

    def _derive_rollout_lengths(self) -> None:
        rollout, data = self.rollout_engine, self.data
        for key, derived, source in (("prompt_length", data.max_prompt_length, "data.max_prompt_length"),
                                     ("response_length", data.max_response_length, "data.max_response_length")):
            value = getattr(rollout, key)
            if value is not None and value != derived:
                raise ConfigError(f"actor_rollout_ref.rollout.{key}", value,
                                  f"is derived from {source}={derived}; set {source} instead")
            setattr(rollout, key, derived)

    def _check_missing_features(self) -> None:
        if self.actor_rollout_ref.hybrid_engine:
            raise ConfigError("actor_rollout_ref.hybrid_engine", True,
                              "must be false: this trainer runs rollout and training as separate workers "
                              "(fully async), never colocated")
        if self.algorithm.use_kl_in_reward and self.algorithm.kl_penalty == "full":
            raise ConfigError("algorithm.kl_penalty", "full",
                              "needs the full vocabulary distributions, which this build does not keep; use one of "
                              "kl/k1, abs, mse/k2, low_var_kl/k3 (optionally with '+')")
        if self.needs_reference_policy and self.actor_rollout_ref.ref.log_prob_use_dynamic_bsz:
            raise ConfigError("actor_rollout_ref.ref.log_prob_use_dynamic_bsz", True,
                              "dynamic batch sizes are not available in this build; set it to false and size "
                              "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu")
        custom = self.custom_reward_function
        if custom.path is not None:
            from verl.utils.reward_score.custom import CustomRewardFunction

            CustomRewardFunction(custom.path, custom.name, custom.reward_kwargs)  # raises naming the file and name
        elif custom.reward_kwargs:
            raise ConfigError("custom_reward_function.reward_kwargs", custom.reward_kwargs,
                              "are passed to a custom reward function only; set custom_reward_function.path too")
        if self.reward_model.enable:
            raise ConfigError("reward_model.enable", True,
                              "model-based rewards are not available in this build; rewards are rule-based")
        replicas = self.rollout.nnodes * self.rollout.n_gpus_per_node
        tp = self.rollout_engine.tensor_model_parallel_size
        if replicas % tp:
            raise ConfigError("rollout.n_gpus_per_node", self.rollout.n_gpus_per_node,
                              f"rollout.nnodes * rollout.n_gpus_per_node = {replicas} must be divisible by "
                              f"actor_rollout_ref.rollout.tensor_model_parallel_size={tp}")

    def _check_batches(self) -> None:
        actor, rollout, at = self.actor, self.rollout_engine, self.async_training
        arr = "actor_rollout_ref"
        if self.algorithm.adv_estimator in ("grpo", "rloo", "drgrpo") and rollout.n < 2:
            raise ConfigError(f"{arr}.rollout.n", rollout.n,
                              f"must be >= 2 with algorithm.adv_estimator={self.algorithm.adv_estimator} "
                              "(group baselines need 2+ samples)")
        if self.data.train_batch_size and at.require_batches != 1:
            raise ConfigError("async_training.require_batches", at.require_batches,
                              "counts mini-batches per step only with data.train_batch_size=0 (the release's async "
                              f"mode); with data.train_batch_size={self.data.train_batch_size} set it to 1")
        mini = actor.ppo_mini_batch_size
        if self.prompts_per_step % mini:
            raise ConfigError("data.train_batch_size", self.data.train_batch_size,
                              f"must be a multiple of {arr}.actor.ppo_mini_batch_size={mini} (prompts per optimizer "
                              "step)")
        world = self.trainer.world_size
        if actor.strategy == "megatron":
            self.actor.megatron.validate(f"{arr}.actor.megatron", world_size=world)
        dp = self.data_parallel_size
        dp_what = (f"the data-parallel size (trainer.nnodes * trainer.n_gpus_per_node / tp*pp*cp = {world} / "
                   f"{actor.megatron.model_parallel_size})" if actor.strategy == "megatron"
                   else "trainer.nnodes * trainer.n_gpus_per_node")
        if mini * rollout.n % dp:
            raise ConfigError(f"{arr}.actor.ppo_mini_batch_size", mini,
                              f"times {arr}.rollout.n={rollout.n} must be divisible by {dp_what}={dp}")
        needed_queue = (at.k + 1) * self.prompts_per_step
        if at.queue_max_groups and at.queue_max_groups < needed_queue:
            raise ConfigError("async_training.queue_max_groups", at.queue_max_groups,
                              f"must be 0 (auto) or >= (k + 1) * prompts per step = {needed_queue}, the most groups "
                              "admission control lets finish ahead of the trainer")

    def _check_loss(self) -> None:
        actor, at = self.actor, self.async_training
        if at.skip_recompute_old_log_prob and actor.policy_loss.loss_mode != "vanilla":
            raise ConfigError("actor_rollout_ref.actor.policy_loss.loss_mode", actor.policy_loss.loss_mode,
                              "must be 'vanilla' with async_training.skip_recompute_old_log_prob=true (bypass has "
                              "no ratio to shape)")
        self.policy_update_config().check_grad_baselining("actor_rollout_ref.actor.grad_baselining.enable")

    # -------------------------------------------------------------- start-up notes
    def startup_notes(self) -> list[str]:
        """One line per key that is set but has no effect on this build or backend."""
        notes: list[str] = []
        rollout, default_rollout = self.rollout_engine, RolloutConfig()
        if rollout.name == "torch":
            for key in ("gpu_memory_utilization", "enable_chunked_prefill", "max_num_batched_tokens",
                        "enforce_eager", "enable_prefix_caching", "tensor_model_parallel_size"):
                if getattr(rollout, key) != getattr(default_rollout, key):
                    notes.append(f"actor_rollout_ref.rollout.{key}={getattr(rollout, key)!r} is a vLLM knob: no "
                                 "effect with rollout.name=torch")
        elif self.trainer.device == "cpu" and rollout.gpu_memory_utilization != default_rollout.gpu_memory_utilization:
            notes.append("actor_rollout_ref.rollout.gpu_memory_utilization: no effect on CPU (vLLM's CPU KV cache is "
                         "actor_rollout_ref.rollout.engine_kwargs.vllm.kv_cache_space_gib)")
        if self.model.use_remove_padding or self.actor.megatron.use_remove_padding:
            notes.append("use_remove_padding=true: this build computes on padded batches (same numbers, more memory)")
        if self.data.return_raw_chat:
            notes.append("data.return_raw_chat=true: no effect (prompts are tokenized once by the dataset)")
        if self.data.gen_batch_size != 1:
            notes.append(f"data.gen_batch_size={self.data.gen_batch_size}: no effect (the rollouter admits one prompt "
                         "group at a time under the lag bound)")
        if self.data.filter_overlong_prompts_workers != 1:
            notes.append("data.filter_overlong_prompts_workers: no effect (prompts are filtered in-process)")
        if rollout.mode == "sync":
            notes.append("actor_rollout_ref.rollout.mode=sync: no effect (the rollouter drives its engine asynchronously)")
        rc, at = self.algorithm.rollout_correction, self.async_training
        if not at.skip_recompute_old_log_prob and not at.compute_prox_log_prob and (
                rc.rollout_is or rc.rollout_rs in ("token", "sequence", "geometric")):
            notes.append("algorithm.rollout_correction.rollout_is/rollout_rs: the old log-probs are the rollout's "
                         "(async_training.compute_prox_log_prob=false), so the correction ratio is 1 and has no "
                         "effect; set compute_prox_log_prob=true to recompute them")
        if self.critic != CriticConfig():
            notes.append(f"critic.*: unused (algorithm.adv_estimator={self.algorithm.adv_estimator} needs no critic)")
        if not self.needs_reference_policy and self.actor_rollout_ref.ref != RefConfig():
            notes.append("actor_rollout_ref.ref.*: unused (no KL term, so no reference policy)")
        if self.needs_reference_policy:
            ref = self.actor_rollout_ref.ref
            default_ref = RefConfig()
            if (dataclasses.replace(ref.megatron, param_offload=False) != default_ref.megatron
                    or ref.fsdp_config.model_dtype != default_ref.fsdp_config.model_dtype):
                notes.append("actor_rollout_ref.ref.megatron / ref.fsdp_config.model_dtype: the reference policy "
                             "shares the actor's layout and dtype; of these only param_offload is read")
            if self.trainer.device == "cpu" and (ref.megatron.param_offload or ref.fsdp_config.param_offload):
                notes.append("actor_rollout_ref.ref.*.param_offload: no effect on CPU (the weights are in CPU memory)")
        if not self.actor.use_kl_loss and self.actor.kl_loss_coef != ActorConfig().kl_loss_coef:
            notes.append("actor_rollout_ref.actor.kl_loss_coef: unused (use_kl_loss=false)")
        if not self.algorithm.use_kl_in_reward and self.algorithm.kl_ctrl != AlgorithmConfig().kl_ctrl:
            notes.append("algorithm.kl_ctrl.*: unused (use_kl_in_reward=false)")
        return notes


# ------------------------------------------------------------------------------- loading

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"
RECIPE_CONFIG_DIR = REPO_ROOT / "recipe" / "fully_async_policy" / "config"
CONFIG_GROUPS = ("task", "method")
SCHEMA_NODE = "trainer_schema"


def register_configs() -> None:
    """Make the schema's defaults the base node every primary config composes onto."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NODE, node=defaults_of(TrainerConfig))


def normalize_overrides(overrides: list[str]) -> list[str]:
    """Check every override's key against the schema (``UnknownKeyError`` with suggestions) and make
    ``+key=value`` set a key the schema already defines (Hydra's ``+`` refuses existing keys, but
    the release's scripts spell some of ours that way)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = schema_keys(TrainerConfig)
    parsed = OverridesParser.create().parse_overrides(overrides)
    out = []
    for text, override in zip(overrides, parsed):
        key = override.key_or_group
        if key.startswith("hydra.") or key in CONFIG_GROUPS or override.is_delete():
            out.append(text)
            continue
        if not is_known_key(key, keys):
            raise UnknownKeyError.for_key(key, keys)
        if not override.is_force_add() and (override.is_add() or key not in keys):
            # ``+k`` on a key the schema defines, or a new sub-key of a mapping (runtime_env.*).
            text = "++" + text.lstrip("+")
        out.append(text)
    return out


def load_config(overrides: list[str] | tuple[str, ...] = (), config_name: str = "ppo_trainer",
                config_dir: str | os.PathLike | None = None) -> TrainerConfig:
    """Compose ``config_name`` (from ``configs/`` or the recipe's config dir) with ``overrides`` and
    return the validated ``TrainerConfig``. Raises ``ConfigError`` naming the key."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_configs()
    overrides = normalize_overrides(list(overrides))
    primary = Path(config_dir) if config_dir is not None else _config_dir_of(config_name)
    search = [f"hydra.searchpath=[file://{CONFIG_DIR}]"] if primary.resolve() != CONFIG_DIR.resolve() else []
    with initialize_config_dir(config_dir=str(primary.resolve()), version_base=None):
        cfg = compose(config_name=config_name, overrides=search + overrides)
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("hydra", None)
    return build_config(TrainerConfig, data).validate()


def _config_dir_of(config_name: str) -> Path:
    for directory in (CONFIG_DIR, RECIPE_CONFIG_DIR):
        if (directory / f"{config_name.removesuffix('.yaml')}.yaml").exists():
            return directory
    raise ConfigError("--config-name", config_name,
                      f"no such config in {CONFIG_DIR} or {RECIPE_CONFIG_DIR}")


def parse_cli(argv: list[str], default_config: str = "ppo_trainer") -> tuple[str, list[str]]:
    """(config name, overrides) from a Hydra-style command line: ``--config-name=X`` / ``-cn X``."""
    name, overrides, args = default_config, [], list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("--config-name="):
            name = arg.split("=", 1)[1]
        elif arg in ("--config-name", "-cn"):
            if not args:
                raise ConfigError("--config-name", None, "needs a config name")
            name = args.pop(0)
        elif arg.startswith("-"):
            raise ConfigError(arg, arg, "unknown option: this entry point takes --config-name and Hydra overrides")
        else:
            overrides.append(arg)
    return name.removesuffix(".yaml"), overrides


def to_yaml(config: TrainerConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(config)))


