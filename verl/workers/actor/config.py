"""Config of the actor (trainer -> actor step): ``actor_rollout_ref.actor`` and ``.ref`` in veRL's
spelling, and the resolved ``PolicyUpdateConfig`` the actor backends run on.

The user-facing sections (``ActorConfig``, ``RefConfig``, ``OptimConfig``) carry veRL's and the
VCPO release's key names; ``TrainerConfig.policy_update_config`` turns them, together with
``algorithm.rollout_correction`` and ``async_training``, into one ``PolicyUpdateConfig``: what the
torch and Megatron actors read (batch sizes in trajectories, the loss mode, the IS correction).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from verl.trainer.ppo.core_algos import KLEstimator, LossAggMode
from verl.utils.config import ConfigError, config_section
from verl.utils.megatron.parallel import MegatronParallelConfig
from verl.workers.utils.vcpo import ESSScalingConfig, GradBaseliningConfig

Dtype = Literal["float32", "bfloat16", "float16"]
UnitFloat = Annotated[float, Field(ge=0.0, le=1.0)]


@config_section
class OptimConfig:
    """``actor_rollout_ref.actor.optim``: AdamW with warmup, then a constant/linear/cosine schedule."""

    lr: NonNegativeFloat = 1e-6
    """Peak learning rate (VCPO's ESS rule scales it per step)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    weight_decay: NonNegativeFloat = 0.01
    """Decoupled weight decay."""
    eps: PositiveFloat = 1e-8
    """AdamW epsilon."""
    clip_grad: PositiveFloat = 1.0
    """Clip the global gradient norm to this value."""
    lr_warmup_steps: NonNegativeInt = 0
    """Linear warmup steps from 0 to ``lr``."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Schedule after warmup."""
    lr_decay_steps: PositiveInt | None = None
    """Steps over which linear/cosine decay to ``lr * min_lr_ratio``; null: the run's training steps."""
    min_lr_ratio: UnitFloat = 0.0
    """Where linear/cosine decay ends, as a fraction of ``lr``."""

    def decay_steps(self, total_training_steps: int | None) -> int:
        """Steps of the decay schedule: ``lr_decay_steps``, else the run's training steps."""
        steps = self.lr_decay_steps if self.lr_decay_steps is not None else (total_training_steps or 0)
        if self.lr_decay_style != "constant" and steps <= 0:
            raise ConfigError("actor_rollout_ref.actor.optim.lr_decay_steps", steps,
                              f"must be > 0 for lr_decay_style={self.lr_decay_style!r}")
        return steps

    def validate(self, prefix: str) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{prefix}.betas", self.betas, "must be two numbers in [0, 1)")


@config_section
class PolicyLossConfig:
    """``actor_rollout_ref.actor.policy_loss``: which surrogate the actor optimises."""

    loss_mode: Literal["vanilla", "gspo"] = "vanilla"
    """``vanilla``: PPO's clipped ratio; ``gspo``: the clipped length-normalised sequence ratio.
    With ``async_training.skip_recompute_old_log_prob`` the ratio is 1 (bypass) and only vanilla applies."""


@config_section
class FsdpConfig:
    """``actor_rollout_ref.actor.fsdp_config``: the non-Megatron actor's precision (``strategy=torch``)."""

    model_dtype: Dtype = "float32"
    """Parameter dtype of the torch actor."""
    param_offload: bool = False
    """Keep the parameters in CPU memory between uses (GPU only): the reference policy honours it;
    for the actor it is refused (FSDP offload is not in this build)."""


CheckpointContent = Literal["model", "optimizer", "extra", "hf_model"]


@config_section
class CheckpointConfig:
    """``actor_rollout_ref.actor.checkpoint``: what each checkpoint (``trainer.save_freq``) holds and
    what a resume restores; export any checkpoint with ``python -m verl.model_merger`` (docs/export.md)."""

    save_contents: list[CheckpointContent] = field(default_factory=lambda: ["model", "optimizer", "extra"])
    """States to save: model, optimizer, extra (lr schedule, RNG), hf_model (also a loadable HF model in <checkpoint>/huggingface/)."""
    load_contents: list[CheckpointContent] = field(default_factory=lambda: ["model", "optimizer", "extra"])
    """States a resume restores (each must be in the checkpoint's save_contents; hf_model is never loaded)."""


@config_section
class ActorConfig:
    """``actor_rollout_ref.actor``: batching, loss and optimizer of ``update_policy``."""

    strategy: Literal["torch", "megatron", "fsdp", "fsdp2"] = "torch"
    """``torch`` (plain data parallel over gloo/NCCL) or ``megatron`` (DP x TP x SP x CP x PP); FSDP is not in this build."""
    ppo_mini_batch_size: PositiveInt = 16
    """Prompts per optimizer step, as in veRL (x ``actor_rollout_ref.rollout.n`` trajectories), over all data-parallel ranks."""
    ppo_micro_batch_size_per_gpu: PositiveInt = 8
    """Trajectories per forward/backward on one rank."""
    use_dynamic_bsz: bool = False
    """Micro-batches by token budget (not in this build)."""
    ppo_epochs: PositiveInt = 1
    """Passes over each trainer step's batch."""
    shuffle: bool = False
    """Permute trajectories before each epoch's mini-batch split (seeded)."""
    loss_agg_mode: LossAggMode = "seq-mean-token-mean"
    """How token losses are averaged (docs/losses.md)."""
    clip_ratio: NonNegativeFloat = 0.2
    """PPO clip range; ``clip_ratio_low``/``_high`` override each side."""
    clip_ratio_low: UnitFloat | None = None
    """Lower clip: ratio >= 1 - clip_ratio_low (null: ``clip_ratio``)."""
    clip_ratio_high: NonNegativeFloat | None = None
    """Upper clip: ratio <= 1 + clip_ratio_high (null: ``clip_ratio``)."""
    clip_ratio_c: float | None = 3.0
    """Dual-clip bound for negative advantages (> 1); null turns dual clipping off."""
    entropy_coeff: NonNegativeFloat = 0.0
    """Entropy bonus coefficient (must be 0 with OPOB)."""
    use_kl_loss: bool = False
    """Add kl_loss_coef * KL(pi || pi_ref) to the loss (starts the frozen reference policy ``actor_rollout_ref.ref``)."""
    kl_loss_coef: NonNegativeFloat = 0.001
    """Coefficient of the KL loss term (used only with ``use_kl_loss``)."""
    kl_loss_type: KLEstimator = "low_var_kl"
    """KL estimator of the loss term: kl/k1, abs, mse/k2, low_var_kl/k3; a ``+`` suffix takes k2's gradient (docs/losses.md)."""
    use_rollout_log_probs: bool = True
    """The release's switch: the behaviour log-probs come from the rollout engine (required here)."""
    update_policy_per_traj: bool = False
    """The release's per-trajectory update: per-trajectory gradient norms by one forward/backward per
    trajectory (exact for any layer) instead of the batched ghost norms."""
    policy_loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ess_scaling: ESSScalingConfig = field(default_factory=ESSScalingConfig)
    grad_baselining: GradBaseliningConfig = field(default_factory=GradBaseliningConfig)
    megatron: MegatronParallelConfig = field(default_factory=MegatronParallelConfig)
    fsdp_config: FsdpConfig = field(default_factory=FsdpConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def clip_low(self) -> float:
        return self.clip_ratio if self.clip_ratio_low is None else self.clip_ratio_low

    @property
    def clip_high(self) -> float:
        return self.clip_ratio if self.clip_ratio_high is None else self.clip_ratio_high

    @property
    def dtype(self) -> str:
        """The parameter dtype of the configured strategy."""
        return self.megatron.dtype if self.strategy == "megatron" else self.fsdp_config.model_dtype

    def validate(self, prefix: str) -> None:
        if self.strategy in ("fsdp", "fsdp2"):
            raise ConfigError(f"{prefix}.strategy", self.strategy,
                              "FSDP is not in this build; use 'torch' (data parallel) or 'megatron'")
        if self.clip_ratio > 1.0 and self.clip_ratio_low is None:
            raise ConfigError(f"{prefix}.clip_ratio", self.clip_ratio, "must be <= 1 unless clip_ratio_low is set")
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1.0:
            raise ConfigError(f"{prefix}.clip_ratio_c", self.clip_ratio_c, "must be > 1 or null (no dual clip)")
        if not self.use_rollout_log_probs:
            raise ConfigError(f"{prefix}.use_rollout_log_probs", False,
                              "must be true: the behaviour log-probs always come from the rollout engine here")
        self.optim.validate(f"{prefix}.optim")
        self.grad_baselining.validate(f"{prefix}.grad_baselining")
        for key, on, feature in ((f"{prefix}.use_dynamic_bsz", self.use_dynamic_bsz, "dynamic batch sizes"),
                                 (f"{prefix}.fsdp_config.param_offload", self.fsdp_config.param_offload,
                                  "actor parameter offload"),
                                 (f"{prefix}.megatron.param_offload", self.megatron.param_offload, "parameter offload"),
                                 (f"{prefix}.megatron.optimizer_offload", self.megatron.optimizer_offload,
                                  "optimizer offload"),
                                 (f"{prefix}.megatron.grad_offload", self.megatron.grad_offload, "gradient offload")):
            if on:
                raise ConfigError(key, True, f"{feature} is not available in this build; set it to false")


@config_section
class RefConfig:
    """``actor_rollout_ref.ref``: the frozen reference policy pi_ref of the KL terms, loaded from the
    actor's starting weights and held by every actor rank in the actor's layout. It exists only with
    ``actor.use_kl_loss`` or ``algorithm.use_kl_in_reward``; otherwise these keys are unused."""

    log_prob_micro_batch_size_per_gpu: PositiveInt | None = None
    """Trajectories per reference forward on one rank (null: the actor's ``ppo_micro_batch_size_per_gpu``)."""
    log_prob_use_dynamic_bsz: bool = False
    """Reference micro-batches by token budget (not in this build)."""
    megatron: MegatronParallelConfig = field(default_factory=MegatronParallelConfig)
    fsdp_config: FsdpConfig = field(default_factory=FsdpConfig)


# ------------------------------------------------------------------------------- resolved


POLICY_LOSS_MODES = ("ppo_clip", "bypass", "decoupled_ppo", "gspo")


@dataclass
class PolicyLossSpec:
    """The loss the actor computes, resolved from ``actor.policy_loss``, ``actor.clip_ratio*``,
    ``algorithm.rollout_correction`` and ``async_training.skip_recompute_old_log_prob``.

    ``ppo_clip``: clipped ratio against the old log-probs; ``bypass``: ratio = 1 with grad log pi,
    no clipping (the VCPO recipes); ``decoupled_ppo``: clip against the recomputed proximal policy,
    behaviour IS weight pi_prox / mu; ``gspo``: clipped length-normalised sequence ratio. TIS
    multiplies the loss by min(w, tis_cap), detached; rejection and M2PO mask tokens out of the
    loss. Formulas: ``core_algos.compute_policy_loss`` and docs/losses.md."""

    mode: str = "bypass"
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: float | None = 3.0
    tis_level: str = "none"
    tis_cap: float = 8.0
    rejection_level: str = "none"
    rejection_low: float = 0.5
    rejection_high: float = 2.0
    m2po: bool = False
    m2po_threshold: float = 0.04


@dataclass
class PolicyUpdateConfig:
    """What one actor rank runs ``update_policy`` with (built by ``TrainerConfig.policy_update_config``).

    ``ppo_mini_batch_size`` counts trajectories over all data-parallel ranks (one optimizer step
    each); ``ppo_micro_batch_size_per_gpu`` trajectories per forward/backward on one rank;
    ``log_prob_micro_batch_size_per_gpu`` per no-grad forward. The defaults serve tests and
    library use; a run always builds this from its config tree.
    """

    strategy: str = "torch"
    ppo_mini_batch_size: int = 64
    ppo_micro_batch_size_per_gpu: int = 8
    log_prob_micro_batch_size_per_gpu: int = 8
    ppo_epochs: int = 1
    shuffle: bool = False
    loss_agg_mode: str = "seq-mean-token-mean"
    grad_clip: float = 1.0
    entropy_coeff: float = 0.0
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.001
    kl_loss_type: str = "low_var_kl"
    # The frozen reference policy (None: the actor holds none): its micro-batch and CPU offload.
    ref_log_prob_micro_batch_size_per_gpu: int | None = None
    ref_param_offload: bool = False
    # True: the trainer recomputes old log-probs with the current weights before the update.
    recompute_old_log_prob: bool = False
    grad_norm_method: Literal["batched", "per_traj"] = "batched"
    policy_loss: PolicyLossSpec = field(default_factory=PolicyLossSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ess_scaling: ESSScalingConfig = field(default_factory=ESSScalingConfig)
    grad_baselining: GradBaseliningConfig = field(default_factory=GradBaseliningConfig)
    megatron: MegatronParallelConfig = field(default_factory=MegatronParallelConfig)

    def check_grad_baselining(self, key: str) -> None:
        """OPOB replaces each trajectory's advantage by its coefficient c_i in the VCPO loss
        l_i = -(w~_i / L_i) sum_t c_i log pi(y_t): that is only the trained gradient when the loss is
        that one, linear in the advantage, with nothing added. Rejection and M2PO masks would drop
        tokens from the loss but not from the per-trajectory score s_i whose norm weights the
        baseline (its gradient-norm pass sums log pi over every response token), so they are refused.
        ``key`` names the user's switch in the error."""
        if not self.grad_baselining.enable:
            return
        pl = self.policy_loss
        needs = {
            "the bypass loss (async_training.skip_recompute_old_log_prob=true)": (pl.mode, "bypass"),
            "algorithm.rollout_correction.rollout_is": (pl.tis_level, "sequence"),
            "actor_rollout_ref.actor.loss_agg_mode": (self.loss_agg_mode, "seq-mean-token-mean"),
            "actor_rollout_ref.actor.entropy_coeff": (self.entropy_coeff, 0.0),
            "algorithm.rollout_correction.rollout_rs": (pl.rejection_level if not pl.m2po else "m2po", "none"),
        }
        for other, (value, required) in needs.items():
            if value != required:
                raise ConfigError(key, True, f"needs {other}={required!r} (got {value!r}): OPOB assumes the "
                                  "bypass-mode loss with sequence TIS, linear in the advantage, no token masks")
