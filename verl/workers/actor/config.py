"""Typed config of the actor (the trainer -> actor step): optimizer, policy loss, batching.

Plain types only (lists, not tuples) so Hydra structured configs accept every field; each
section's ``validate(prefix)`` fails with the full key before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from verl.trainer.ppo.core_algos import LOSS_AGG_MODES, POLICY_LOSS_MODES, REJECTION_LEVELS, TIS_LEVELS
from verl.utils.config import ConfigError, check_choice, check_positive, check_range
from verl.utils.megatron.parallel import MegatronParallelConfig
from verl.workers.utils.vcpo import ESSScalingConfig, GradBaseliningConfig

LR_SCHEDULERS = ("constant", "cosine", "linear")
ACTOR_STRATEGIES = ("torch", "megatron")


@dataclass
class OptimConfig:
    """AdamW with a warmup + constant/linear/cosine schedule over ``total_training_steps``."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    # Linear/cosine decay ends at lr * min_lr_ratio.
    min_lr_ratio: float = 0.0
    # -1: the trainer fills in its number of steps.
    total_training_steps: int = -1

    def validate(self, prefix: str) -> None:
        check_positive(f"{prefix}.lr", self.lr, allow_zero=True)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{prefix}.betas", self.betas, "must be two numbers in [0, 1)")
        check_positive(f"{prefix}.weight_decay", self.weight_decay, allow_zero=True)
        check_positive(f"{prefix}.eps", self.eps)
        check_choice(f"{prefix}.lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        check_positive(f"{prefix}.lr_warmup_steps", self.lr_warmup_steps, allow_zero=True)
        check_range(f"{prefix}.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if self.total_training_steps != -1 and self.total_training_steps <= 0:
            raise ConfigError(
                f"{prefix}.total_training_steps",
                self.total_training_steps,
                "must be -1 (set by the trainer) or > 0",
            )


@dataclass
class PolicyLossConfig:
    """``ppo_clip``: clipped ratio against old log-probs; ``bypass``: ratio = 1 with grad log pi,
    no clipping (the VCPO recipes); ``decoupled_ppo``: clip against the recomputed proximal policy,
    behaviour IS weight pi_prox / mu; ``gspo``: clipped length-normalised sequence ratio. TIS
    multiplies the loss by min(w, tis_cap), detached; rejection and M2PO mask tokens out of the
    loss. Formulas: ``core_algos.compute_policy_loss`` and docs/losses.md."""

    mode: str = "ppo_clip"
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    # Dual-clip bound for negative advantages (> 1); null turns dual clipping off.
    clip_ratio_c: float | None = 3.0
    tis_level: str = "none"
    tis_cap: float = 8.0
    # Masked IS: drop tokens/sequences whose IS ratio (token, sequence, or per-token geometric
    # mean) leaves [rejection_low, rejection_high].
    rejection_level: str = "none"
    rejection_low: float = 0.5
    rejection_high: float = 2.0
    # M2PO: mask the largest (log pi - log mu)^2 until their mean over the global mini-batch
    # is <= m2po_threshold.
    m2po: bool = False
    m2po_threshold: float = 0.04

    def validate(self, prefix: str) -> None:
        check_choice(f"{prefix}.mode", self.mode, POLICY_LOSS_MODES)
        check_range(f"{prefix}.clip_ratio_low", self.clip_ratio_low, 0.0, 1.0)
        check_positive(f"{prefix}.clip_ratio_high", self.clip_ratio_high, allow_zero=True)
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1.0:
            raise ConfigError(
                f"{prefix}.clip_ratio_c", self.clip_ratio_c, "must be > 1 or null (no dual clip)"
            )
        check_choice(f"{prefix}.tis_level", self.tis_level, TIS_LEVELS)
        check_positive(f"{prefix}.tis_cap", self.tis_cap)
        check_choice(f"{prefix}.rejection_level", self.rejection_level, REJECTION_LEVELS)
        # The bounds must bracket 1 so on-policy data (ratio 1) is never rejected.
        check_range(f"{prefix}.rejection_low", self.rejection_low, 0.0, 1.0)
        if not self.rejection_high >= 1.0:
            raise ConfigError(f"{prefix}.rejection_high", self.rejection_high, "must be >= 1")
        check_positive(f"{prefix}.m2po_threshold", self.m2po_threshold)


@dataclass
class ActorConfig:
    """Batching and loss of ``update_policy``.

    ``ppo_mini_batch_size`` counts trajectories over all data-parallel ranks (one optimizer step
    each); ``ppo_micro_batch_size_per_gpu`` trajectories per forward/backward on one rank.
    """

    strategy: str = "torch"
    ppo_mini_batch_size: int = 64
    ppo_micro_batch_size_per_gpu: int = 8
    ppo_epochs: int = 1
    # Permute trajectories before each epoch's mini-batch split (seeded from torch.initial_seed()).
    shuffle: bool = False
    loss_agg_mode: str = "seq-mean-token-mean"
    grad_clip: float = 1.0
    entropy_coeff: float = 0.0
    # True: the trainer recomputes old log-probs with the current weights before the update
    # (ppo_clip anchors on them); False: ppo_clip anchors on the rollout log-probs.
    recompute_old_log_prob: bool = False
    policy_loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # VCPO (SPEC.md): (i) ESS-scaled lr per optimizer step, (ii) the off-policy optimal baseline.
    ess_scaling: ESSScalingConfig = field(default_factory=ESSScalingConfig)
    grad_baselining: GradBaseliningConfig = field(default_factory=GradBaseliningConfig)
    # strategy=megatron only: DP x TP x SP x CP x PP layout (world size and model checked by the worker).
    megatron: MegatronParallelConfig = field(default_factory=MegatronParallelConfig)

    def validate(self, prefix: str) -> None:
        check_choice(f"{prefix}.strategy", self.strategy, ACTOR_STRATEGIES)
        check_positive(f"{prefix}.ppo_mini_batch_size", self.ppo_mini_batch_size)
        check_positive(f"{prefix}.ppo_micro_batch_size_per_gpu", self.ppo_micro_batch_size_per_gpu)
        check_positive(f"{prefix}.ppo_epochs", self.ppo_epochs)
        check_choice(f"{prefix}.loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        check_positive(f"{prefix}.grad_clip", self.grad_clip)
        check_positive(f"{prefix}.entropy_coeff", self.entropy_coeff, allow_zero=True)
        self.policy_loss.validate(f"{prefix}.policy_loss")
        if self.policy_loss.mode == "decoupled_ppo" and not self.recompute_old_log_prob:
            raise ConfigError(f"{prefix}.policy_loss.mode", "decoupled_ppo",
                              f"needs {prefix}.recompute_old_log_prob=true (the proximal policy is the old "
                              "log-probs recomputed with the current weights)")
        self.optim.validate(f"{prefix}.optim")
        self.ess_scaling.validate(f"{prefix}.ess_scaling")
        self.grad_baselining.validate(f"{prefix}.grad_baselining")
        if self.strategy == "megatron":
            self.megatron.validate(f"{prefix}.megatron")
        if self.grad_baselining.enable:
            self._validate_grad_baselining(prefix)

    def _validate_grad_baselining(self, prefix: str) -> None:
        """OPOB replaces each trajectory's advantage by its coefficient c_i in the VCPO loss
        l_i = -(w~_i / L_i) sum_t c_i log pi(y_t): that is only the trained gradient when the loss is
        that one, linear in the advantage, with nothing added. Rejection and M2PO masks would drop
        tokens from the loss but not from the per-trajectory score s_i whose norm weights the
        baseline (its gradient-norm pass sums log pi over every response token), so they are refused."""
        key = f"{prefix}.grad_baselining.enable"
        needs = {
            f"{prefix}.policy_loss.mode": (self.policy_loss.mode, "bypass"),
            f"{prefix}.policy_loss.tis_level": (self.policy_loss.tis_level, "sequence"),
            f"{prefix}.loss_agg_mode": (self.loss_agg_mode, "seq-mean-token-mean"),
            f"{prefix}.entropy_coeff": (self.entropy_coeff, 0.0),
            f"{prefix}.policy_loss.rejection_level": (self.policy_loss.rejection_level, "none"),
            f"{prefix}.policy_loss.m2po": (self.policy_loss.m2po, False),
        }
        for other, (value, required) in needs.items():
            if value != required:
                raise ConfigError(key, True, f"needs {other}={required!r} (got {value!r}): OPOB assumes the "
                                  "bypass-mode loss with sequence TIS, linear in the advantage, no token masks")
