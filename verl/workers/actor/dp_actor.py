"""The plain-torch data-parallel actor (trainer -> actor -> param sync): log-probs and policy updates.

Wraps a Hugging Face causal LM. Each data-parallel rank receives its own shard of the batch;
losses are normalised by GLOBAL token/sequence counts and gradients are summed with one
all-reduce per optimizer step, so DP = N computes the single-process gradient. VCPO
(``actor.ess_scaling``, ``actor.grad_baselining``) is orchestrated here per mini-batch; its
math lives in ``verl.workers.utils.vcpo`` and ``verl.workers.actor.traj_grad_norms``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.distributed as dist

from verl.trainer.ppo.core_algos import (
    agg_loss,
    group_ids_from_uids,
    loss_normalizer_counts,
    sequence_log_is_weight,
    truncated_is_weight,
    truncated_log_is_weight,
)
from verl.utils.config import ConfigError
from verl.utils.distributed import all_reduce_gradients_, all_reduce_sum_, get_rank, get_world_size
from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits
from verl.workers.actor.config import OptimConfig, PolicyUpdateConfig
from verl.workers.actor.policy_loss import (
    FORWARD_KEYS,
    actor_kl_loss,
    actor_policy_loss,
    prepare_minibatch,
    required_batch_keys,
)
from verl.workers.actor.traj_grad_norms import (
    PerTrajectoryGradNorms,
    per_trajectory_sq_grad_norms,
    trajectory_objective,
)
from verl.workers.utils import vcpo

if TYPE_CHECKING:
    from verl.protocol import DataProto

__all__ = ["DataParallelPPOActor", "build_optimizer_and_scheduler", "lr_schedule_factor"]


def lr_schedule_factor(
    step: int, scheduler: str, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> float:
    """Multiplier of the base lr before optimizer step ``step`` (0-based).

    Warmup (step < W): (step + 1) / W. After it, with progress p = clip((step - W) / (T - W), 0, 1)
    and m = min_lr_ratio: constant 1; linear 1 - (1 - m) p; cosine m + (1 - m)(1 + cos(pi p)) / 2.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if scheduler == "constant":
        return 1.0
    progress = min(max((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
    if scheduler == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    if scheduler == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr scheduler {scheduler!r}")


def build_optimizer_and_scheduler(
    module: torch.nn.Module, optim_config: OptimConfig, total_steps: int | None = None
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters and a LambdaLR following ``lr_schedule_factor``.

    ``total_steps`` (trainer steps; the scheduler steps once per ``update_policy``) is the decay
    length unless ``optim_config.lr_decay_steps`` sets one (``OptimConfig.decay_steps``).
    """
    total = optim_config.decay_steps(total_steps)
    optimizer = torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad],
        lr=optim_config.lr,
        betas=(optim_config.betas[0], optim_config.betas[1]),
        eps=optim_config.eps,
        weight_decay=optim_config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_schedule_factor(
            step, optim_config.lr_decay_style, optim_config.lr_warmup_steps, total, optim_config.min_lr_ratio
        ),
    )
    return optimizer, scheduler


class DataParallelPPOActor:
    """``compute_log_prob`` and ``update_policy`` for one data-parallel rank.

    ``process_group``: the data-parallel group (None: the default group if one is initialised,
    otherwise a single process). The lr scheduler, if any, steps once per ``update_policy``
    (one trainer step), also when an optimizer step was skipped.
    """

    def __init__(
        self,
        config: PolicyUpdateConfig,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        process_group: dist.ProcessGroup | None = None,
    ):
        self.config = config
        self.module = module
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.process_group = process_group
        # Derived from the run's one seed, separate from the sampling stream.
        self._shuffle_generator = torch.Generator().manual_seed(torch.initial_seed() % (2**63))
        self._ghost_norms: PerTrajectoryGradNorms | None = None

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    # ------------------------------------------------------------------ forward
    def _forward_micro_batch(
        self, micro: dict[str, torch.Tensor], temperature: float, calculate_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs [b, R] (and entropies) of ``responses`` under logits / temperature, float32.

        The logit at position t predicts token t + 1, so the response tokens (the last R of
        input_ids) are scored by the logits at positions P - 1 .. P + R - 2.
        """
        response_length = micro["responses"].shape[1]
        output = self.module(
            input_ids=micro["input_ids"],
            attention_mask=micro["attention_mask"],
            position_ids=micro["position_ids"],
            use_cache=False,
            logits_to_keep=response_length + 1,
        )
        logits = output.logits[:, :-1].float() / temperature
        log_probs = logprobs_from_logits(logits, micro["responses"])
        entropy = entropy_from_logits(logits) if calculate_entropy else None
        return log_probs, entropy

    def _no_grad_log_prob(self, mini: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
        """Log-probs [b, R] of a mini-batch under the current weights, micro-batch by micro-batch, no grad."""
        with torch.no_grad():
            return torch.cat([self._forward_micro_batch(m, temperature, False)[0] for m in self._micro_batches(mini)])

    def compute_log_prob(
        self, data: "DataProto", calculate_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs [B, R] (and entropies [B, R] if asked) of the responses, no grad.

        Uses ``data.meta_info["temperature"]``, which must be the rollout's sampling temperature
        for the result to be comparable with the behaviour log-probs.
        """
        temperature = sampling_temperature(data)
        tensors = self._to_device(data, FORWARD_KEYS)
        size = self.config.log_prob_micro_batch_size_per_gpu
        log_probs, entropies = [], []
        with torch.no_grad():
            for start in range(0, len(data), size):
                micro = {k: v[start : start + size] for k, v in tensors.items()}
                lp, ent = self._forward_micro_batch(micro, temperature, calculate_entropy)
                log_probs.append(lp)
                entropies.append(ent)
        return torch.cat(log_probs), torch.cat(entropies) if calculate_entropy else None

    # ------------------------------------------------------------------ update
    def update_policy(self, data: "DataProto") -> dict[str, float]:
        """One trainer step on this rank's shard: ``ppo_epochs`` passes, one optimizer step per
        mini-batch. Returns metrics (see ``_reduce_history`` for how steps combine).

        Needs the ``policy_loss.required_batch_keys`` of the config (``rollout_log_probs`` is also
        used for the ESS/KL/IS metrics when present) and, for group-scope OPOB,
        ``non_tensor_batch["uid"]``.
        """
        if self.optimizer is None:
            raise RuntimeError("update_policy needs an optimizer; this actor was built for log-probs only")
        temperature = sampling_temperature(data)
        tensors = self._to_device(data, self._update_keys(data))
        tensors.update(self._opob_tensors(data))
        local_mini = self._local_mini_batch_size(len(data))
        history: dict[str, list[float]] = defaultdict(list)
        self.module.zero_grad(set_to_none=True)
        for _ in range(self.config.ppo_epochs):
            order = self._epoch_order(len(data))
            if "group_ids" in tensors:
                self._check_whole_groups(tensors["group_ids"][order], local_mini)
            for start in range(0, len(data), local_mini):
                rows = order[start : start + local_mini]
                mini = {k: v[rows] for k, v in tensors.items()}
                for key, value in self._update_mini_batch(mini, temperature).items():
                    history[key].append(value)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return _reduce_history(history)

    def _update_mini_batch(self, mini: dict[str, torch.Tensor], temperature: float) -> dict[str, float]:
        """One optimizer step on one mini-batch: backward passes, all-reduce, VCPO lr scale, clip, step."""
        cfg = self.config
        num_tokens, num_seqs = self._global_counts(mini["response_mask"])
        masks, mask_metrics = prepare_minibatch(cfg, mini, lambda: self._no_grad_log_prob(mini, temperature),
                                                self.process_group)
        mini.update(masks)
        opob = None
        if cfg.grad_baselining.enable:
            log_prob, totals, opob = self._opob_backward(mini, temperature, num_tokens, num_seqs)
        else:
            log_prob, totals = self._loss_backward(mini, temperature, num_tokens, num_seqs)
        self._reduce_gradients()
        all_reduce_sum_(totals, self.process_group)
        lr_scale, vcpo_metrics = self._vcpo_statistics(mini, log_prob, opob)
        grad_norm, lr = self.step_optimizer(lr_scale)
        # Diagnostics over this rank's whole mini-batch (a mean of micro-batch means would weight
        # a short last micro-batch like a full one): one elementwise pass, no forward.
        with torch.no_grad():
            _, metrics = actor_policy_loss(cfg, mini, log_prob, num_tokens, num_seqs, self.process_group)
        metrics.update(mask_metrics)
        out = {f"actor/{k}": v.item() for k, v in metrics.items() if k != "pg_loss"}
        out.update({"actor/loss": totals[0].item(), "actor/pg_loss": totals[1].item(), "actor/lr": lr})
        if cfg.entropy_coeff != 0.0:
            out["actor/entropy"] = totals[2].item()
        if cfg.use_kl_loss:
            out.update({"actor/kl_loss": totals[3].item(), "actor/kl_coef": cfg.kl_loss_coef})
        out["actor/skipped_steps"] = float(not math.isfinite(grad_norm) or lr_scale <= 0.0)
        if math.isfinite(grad_norm):
            out["actor/grad_norm"] = grad_norm
        out.update(vcpo_metrics)  # global over the data-parallel group: replaces the per-rank IS stats
        return out

    def _loss_backward(
        self, mini: dict[str, torch.Tensor], temperature: float, num_tokens: torch.Tensor, num_seqs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward of the configured loss per micro-batch; (log-probs [b, R], ``LOSS_TOTALS``).

        loss = pg_loss - entropy_coeff * entropy + kl_loss_coef * kl_loss (``actor_kl_loss``)."""
        cfg = self.config
        calculate_entropy = cfg.entropy_coeff != 0.0
        totals = torch.zeros(len(LOSS_TOTALS), dtype=torch.float32, device=self.device)
        log_probs = []
        for micro in self._micro_batches(mini):
            log_prob, entropy = self._forward_micro_batch(micro, temperature, calculate_entropy)
            pg_loss, _ = actor_policy_loss(cfg, micro, log_prob, num_tokens, num_seqs, self.process_group)
            loss = pg_loss
            if entropy is not None:
                mask = micro["response_mask"]
                entropy_term = agg_loss(entropy, mask, cfg.loss_agg_mode, num_tokens, num_seqs)
                loss = loss - cfg.entropy_coeff * entropy_term
                totals[2] += entropy_term.detach()
            if cfg.use_kl_loss:
                kl_term = actor_kl_loss(cfg, micro, log_prob, num_tokens, num_seqs)
                loss = loss + cfg.kl_loss_coef * kl_term
                totals[3] += kl_term.detach()
            loss.backward()
            totals[0] += loss.detach()
            totals[1] += pg_loss.detach()
            log_probs.append(log_prob.detach())
        return torch.cat(log_probs), totals

    def _kl_backward(self, mini: dict[str, torch.Tensor], temperature: float, num_tokens: torch.Tensor,
                     num_seqs: torch.Tensor) -> torch.Tensor:
        """Add the gradient of kl_loss_coef * kl_loss to ``.grad`` (one forward/backward per
        micro-batch; used after OPOB, whose pass forms only the policy-gradient part); the KL term."""
        cfg = self.config
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for micro in self._micro_batches(mini):
            log_prob, _ = self._forward_micro_batch(micro, temperature, False)
            kl_term = actor_kl_loss(cfg, micro, log_prob, num_tokens, num_seqs)
            (cfg.kl_loss_coef * kl_term).backward()
            total += kl_term.detach()
        return total

    # ------------------------------------------------------------------ VCPO
    def _vcpo_statistics(
        self, mini: dict[str, torch.Tensor], log_prob: torch.Tensor, opob: "OPOBPass | None"
    ) -> tuple[float, dict[str, float]]:
        """(lr scale of this step, ``actor/``-prefixed VCPO metrics) from the global ESS.

        The ESS and diagnostics are logged whenever behaviour log-probs are present, also with
        ``ess_scaling.enable=false`` (the scale is then 1). Non-finite ESS: see ``vcpo.ess_lr_scale``
        (``skip`` gives scale 0, and ``step_optimizer`` takes no step).
        """
        if "rollout_log_probs" not in mini:
            return 1.0, {}
        cfg = self.config
        rollout, mask, cap = mini["rollout_log_probs"], mini["response_mask"], cfg.policy_loss.tis_cap
        # Rows without response tokens (w = 1 by the empty sum) are not trajectories the loss trains on.
        log_w = sequence_log_is_weight(log_prob, rollout, mask)[mask.sum(-1) > 0]
        ess = vcpo.global_ess(log_w, self.process_group)
        ess_clipped = vcpo.global_ess(truncated_log_is_weight(log_w, cap), self.process_group)
        lr_scale, _ = vcpo.lr_scale_from_ess(ess_clipped if cfg.ess_scaling.use_clipped else ess, cfg.ess_scaling)
        metrics = vcpo.vcpo_metrics(
            log_prob, rollout, mask, cap, ess, ess_clipped, lr_scale,
            sq_grad_norms=None if opob is None else opob.sq_grad_norms,
            baselines=None if opob is None else opob.baselines,
            log_weights=None if opob is None else opob.log_weights,
            group=self.process_group,
        )
        return lr_scale, {f"actor/{k}": v for k, v in metrics.items()}

    def _opob_backward(
        self, mini: dict[str, torch.Tensor], temperature: float, num_tokens: torch.Tensor, num_seqs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, "OPOBPass"]:
        """Leave this rank's share of g = (1/B) sum_i c_i s_i in ``.grad`` (the negative gradient of
        ``vcpo.opob_surrogate_loss``), B the global number of trajectories with response tokens.

        ``batched``: per micro-batch one forward and a backward to the embedding outputs that yields
        the per-trajectory squared norms and keeps each layer's inputs and output gradients; once
        every coefficient of the scope is known, the weighted weight gradients are formed from those
        factors (no second backward). ``per_traj``: one forward/backward per trajectory for the
        norms, then a log-prob pass and a backward of the weighted objective per micro-batch.
        The KL term, if on, is added by ``_kl_backward`` (OPOB baselines the policy gradient only).
        Returns (log-probs, ``LOSS_TOTALS`` with loss = surrogate (+ KL) and pg_loss = the VCPO loss
        with the advantages, the OPOB pass).
        """
        method = self.config.grad_norm_method
        if method == "batched":
            if self._ghost_norms is None:
                self._ghost_norms = PerTrajectoryGradNorms(self.module)
            with self._ghost_norms as ghost:
                log_probs, sq_norms = [], []
                for micro in self._micro_batches(mini):
                    with ghost.capture(micro["attention_mask"]):
                        log_prob, _ = self._forward_micro_batch(micro, temperature, False)
                    objective = trajectory_objective(log_prob, micro["response_mask"])
                    sq_norms.append(ghost.backward(objective, keep_factors=True))
                    log_probs.append(log_prob.detach())
                log_prob = torch.cat(log_probs)
                opob = self._opob_coefficients(mini, log_prob, torch.cat(sq_norms), num_seqs)
                ghost.accumulate_weighted_grads(opob.loss_coefficients)
        else:
            sq_norm = per_trajectory_sq_grad_norms(
                self.module, *(mini[k] for k in FORWARD_KEYS), mini["response_mask"],
                temperature=temperature, method="per_traj",
            )
            log_prob = self._no_grad_log_prob(mini, temperature)
            opob = self._opob_coefficients(mini, log_prob, sq_norm, num_seqs)
            size = self.config.ppo_micro_batch_size_per_gpu
            for start, micro in zip(range(0, len(log_prob), size), self._micro_batches(mini)):
                micro_log_prob, _ = self._forward_micro_batch(micro, temperature, False)
                k = opob.loss_coefficients[start : start + size]
                (k * trajectory_objective(micro_log_prob, micro["response_mask"])).sum().backward()
        kl_term = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.config.use_kl_loss:
            kl_term = self._kl_backward(mini, temperature, num_tokens, num_seqs)
        return log_prob, self._opob_totals(mini, log_prob, opob, kl_term, num_tokens, num_seqs), opob

    def _opob_totals(self, mini: dict[str, torch.Tensor], log_prob: torch.Tensor, opob: "OPOBPass",
                     kl_term: torch.Tensor, num_tokens: torch.Tensor, num_seqs: torch.Tensor) -> torch.Tensor:
        """``LOSS_TOTALS`` of an OPOB step: the surrogate loss sum_i k_i f_i (+ kl_loss_coef * KL) and the
        VCPO loss with the advantages as pg_loss (for comparison with runs without OPOB)."""
        with torch.no_grad():
            surrogate = (opob.loss_coefficients * trajectory_objective(log_prob, mini["response_mask"])).sum()
            pg_loss, _ = actor_policy_loss(self.config, mini, log_prob, num_tokens, num_seqs, self.process_group)
        loss = surrogate + self.config.kl_loss_coef * kl_term if self.config.use_kl_loss else surrogate
        return torch.stack([loss, pg_loss, torch.zeros_like(pg_loss), kl_term.float()])

    def _opob_coefficients(
        self, mini: dict[str, torch.Tensor], log_prob: torch.Tensor, sq_grad_norms: torch.Tensor, num_seqs: torch.Tensor
    ) -> "OPOBPass":
        """Baselines and loss coefficients k_i = -c_i w~_i / (L_i B) of one mini-batch (``vcpo.compute_opob``).

        Group scope: values R_i (``scores``), one baseline per uid group on this rank. Minibatch
        scope: values A_i, the estimator's advantage on the first response token (outcome
        estimators broadcast one scalar per trajectory), one baseline over every rank.
        """
        cfg = self.config
        mask = mini["response_mask"]
        log_w = sequence_log_is_weight(log_prob, mini["rollout_log_probs"], mask)
        w_trunc = truncated_is_weight(log_w, cfg.policy_loss.tis_cap)
        lengths = mask.float().sum(-1)
        if cfg.grad_baselining.scope == "group":
            values, group_ids = mini["scores"], mini["group_ids"]
        else:
            values, group_ids = vcpo.trajectory_advantages(mini["advantages"], mask), None
        result = vcpo.compute_opob(cfg.grad_baselining, values, sq_grad_norms, log_w, w_trunc, lengths,
                                   group_ids, self.process_group)
        k = vcpo.opob_loss_coefficients(result.coefficients, w_trunc, lengths, max(float(num_seqs), 1.0))
        return OPOBPass(sq_grad_norms, result.baselines, result.log_weights, k)

    def _opob_tensors(self, data: "DataProto") -> dict[str, torch.Tensor]:
        """Group-scope OPOB inputs: R_i = sum_t token_level_rewards and int64 uid-group ids."""
        gb = self.config.grad_baselining
        if not (gb.enable and gb.scope == "group"):
            return {}
        if "uid" not in data.non_tensor_batch:
            raise KeyError("actor: grad_baselining.scope='group' needs non_tensor_batch['uid'] (the prompt groups)")
        return {
            "scores": data.batch["token_level_rewards"].float().sum(-1).to(self.device),
            "group_ids": group_ids_from_uids(data.non_tensor_batch["uid"]).to(self.device),
        }

    def _check_whole_groups(self, group_ids: torch.Tensor, local_mini: int) -> None:
        """Group scope: every uid group must sit whole in one mini-batch of one data-parallel rank.

        One all-gather of (group id, place) with place = rank * minis + mini-batch index, so every
        rank reaches the same verdict and raises together.
        """
        minis = -(-len(group_ids) // local_mini)
        place = get_rank(self.process_group) * minis + torch.arange(len(group_ids), device=group_ids.device) // local_mini
        every = vcpo.all_gather_rows(torch.stack([group_ids, place], 1), self.process_group)
        places = [every[every[:, 1] == p, 0] for p in range(int(every[:, 1].max()) + 1)]
        try:
            vcpo.check_whole_groups(places)
        except ValueError as err:
            raise ConfigError(
                "actor_rollout_ref.actor.grad_baselining.scope", "group",
                f"needs each uid group whole in one mini-batch on one data-parallel rank, but {err} "
                f"(place = rank * {minis} + mini-batch index): split the batch by uid across ranks "
                "(DataProto.chunk_by_group), keep actor_rollout_ref.actor.ppo_mini_batch_size a multiple of actor_rollout_ref.rollout.n with "
                "actor_rollout_ref.actor.shuffle=false, or use actor_rollout_ref.actor.grad_baselining.scope=minibatch",
            ) from err

    def _reduce_gradients(self) -> None:
        """Sum this mini-batch's gradients over the data-parallel group (one all-reduce)."""
        all_reduce_gradients_(self.module.parameters(), self.process_group)

    def step_optimizer(self, lr_scale: float = 1.0) -> tuple[float, float]:
        """Clip the (already all-reduced) gradients and take one optimizer step at lr * lr_scale
        (``vcpo.scaled_lr_step``: the scheduler's lr is restored afterwards); returns (grad norm
        before clipping, lr used, 0.0 when no step was taken).

        The grad norm is the float32 2-norm over all parameters. No step is taken (gradients are
        zeroed, optimizer state untouched) when the norm is inf/nan, or when ``lr_scale`` is 0 (the
        VCPO non-finite-ESS ``skip`` rule); the caller counts both as ``actor/skipped_steps``. Every
        rank sees the same summed gradients and ESS, so all skip together.
        """
        params = [p for p in self.module.parameters() if p.grad is not None]
        if not params:
            return 0.0, 0.0
        norms = torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params])
        grad_norm = torch.linalg.vector_norm(norms)
        lr_used = 0.0
        if torch.isfinite(grad_norm) and lr_scale > 0.0:
            clip_coef = torch.clamp(self.config.grad_clip / (grad_norm + 1e-6), max=1.0)
            for p in params:
                p.grad.mul_(clip_coef.to(p.grad.dtype))
            with vcpo.scaled_lr_step(self.optimizer, lr_scale):
                lr_used = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.item(), lr_used

    # ------------------------------------------------------------------ helpers
    def _update_keys(self, data: "DataProto") -> tuple[str, ...]:
        """``required_batch_keys`` plus the behaviour log-probs when present (for the ESS/KL/IS metrics)."""
        keys = required_batch_keys(self.config)
        return keys + ("rollout_log_probs",) if "rollout_log_probs" in data.batch else keys

    def _micro_batches(self, mini: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        size = self.config.ppo_micro_batch_size_per_gpu
        return [{k: v[start : start + size] for k, v in mini.items()}
                for start in range(0, len(mini["response_mask"]), size)]

    def _to_device(self, data: "DataProto", keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        missing = [k for k in keys if k not in data.batch]
        if missing:
            raise KeyError(f"actor: batch lacks {missing} (has {sorted(data.batch)})")
        return {k: data.batch[k].to(self.device) for k in keys}

    def _local_mini_batch_size(self, local_batch_size: int) -> int:
        world = get_world_size(self.process_group)
        mini = self.config.ppo_mini_batch_size
        if mini % world:
            raise ConfigError(
                "actor_rollout_ref.actor.ppo_mini_batch_size", mini, f"must be divisible by the data-parallel size {world}"
            )
        local_mini = mini // world
        if local_batch_size % local_mini:
            raise ConfigError(
                "actor_rollout_ref.actor.ppo_mini_batch_size",
                mini,
                f"this rank's batch of {local_batch_size} must split into whole mini-batches of "
                f"{local_mini} (= ppo_mini_batch_size / {world} ranks)",
            )
        return local_mini

    def _epoch_order(self, n: int) -> torch.Tensor:
        if self.config.shuffle:
            return torch.randperm(n, generator=self._shuffle_generator).to(self.device)
        return torch.arange(n, device=self.device)

    def _global_counts(self, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N_tok, N_seq) of the mini-batch over all data-parallel ranks (see ``agg_loss``)."""
        counts = torch.stack(loss_normalizer_counts(response_mask))
        all_reduce_sum_(counts, self.process_group)
        return counts[0], counts[1]

    def get_weights(self) -> dict[str, torch.Tensor]:
        """HF-named weights (``module.state_dict()``, tied weights under both names) for param
        sync. Views of the live parameters: copy them if they must outlive the next update."""
        return dict(self.module.state_dict())


# What ``_loss_backward``/``_opob_backward`` return besides the log-probs, summed over micro-batches.
LOSS_TOTALS = ("loss", "pg_loss", "entropy", "kl_loss")


class OPOBPass(NamedTuple):
    """One mini-batch's OPOB quantities on this rank ([b] each): ‖∇log π(τ_i)‖², scope baselines,
    log W_i, and the loss coefficients k_i whose weighted objective sum_i k_i f_i has gradient -g."""

    sq_grad_norms: torch.Tensor
    baselines: torch.Tensor
    log_weights: torch.Tensor
    loss_coefficients: torch.Tensor


def sampling_temperature(data: "DataProto") -> float:
    if "temperature" not in data.meta_info:
        raise KeyError(
            "actor: data.meta_info['temperature'] is required (the rollout's sampling temperature)"
        )
    return float(data.meta_info["temperature"])


def _reduce_history(history: dict[str, list[float]]) -> dict[str, float]:
    """Mean of each metric over optimizer steps, except ``*_max`` (max), ``*_min`` (min) and counts
    (sum): ``skipped_steps``, ``*_count`` and histogram bins (``*_hist/*``)."""
    out = {}
    for key, values in history.items():
        if key.endswith("_max"):
            out[key] = max(values)
        elif key.endswith("_min"):
            out[key] = min(values)
        elif key.endswith(("skipped_steps", "_count")) or "_hist/" in key:
            out[key] = float(sum(values))
        else:
            out[key] = sum(values) / len(values)
    return out
