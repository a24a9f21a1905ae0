"""The Megatron-Core actor (trainer -> actor -> param sync): log-probs and VCPO policy updates of a
GPTModel under data, tensor, sequence, context and pipeline parallelism.

Numerically it is the torch actor: ``MegatronPPOActor`` subclasses ``DataParallelPPOActor`` and keeps
its batching, policy loss (``policy_loss.actor_policy_loss``), global token/sequence normalisers,
ESS-scaled lr and OPOB coefficients, all over the DATA-parallel group (the TP/CP/PP ranks of one
data-parallel replica hold the same trajectories, so each trajectory counts once). Only three
things differ:

- the forward: rows are left-aligned (Megatron's attention is causal with no padding mask), padded
  for SP/CP, split over CP, run through Megatron's forward/backward schedule (1F1B under PP), and
  the vocab-parallel log-probs are gathered over CP back into the [b, R] response layout. Every CP
  and TP rank then evaluates the same loss on the same full log-probs; the CP gather's backward
  keeps only this rank's slice, so the gradients of the CP ranks add up to the full gradient;
- gradients live in Megatron DDP's buffers and are summed (not averaged: the losses already divide
  by global counts) over DP x CP by ``finalize_model_grads``, which also all-reduces the SP norm
  weights over TP and the tied embedding over the first/last stage;
- the step: a Megatron optimizer, whose grad norm counts TP-replicated and shared parameters once.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.distributed as dist

from verl.trainer.ppo.core_algos import agg_loss
from verl.utils.config import ConfigError
from verl.utils.megatron.batch import (
    context_parallel_multiple,
    gather_from_context_parallel,
    left_align,
    next_token_labels,
    pad_sequence_for_parallel,
    responses_to_aligned,
    split_for_context_parallel,
)
from verl.utils.megatron.logprobs import vocab_parallel_entropy, vocab_parallel_log_probs
from verl.utils.megatron.parallel import MegatronParallelConfig, ParallelGroups
from verl.workers.actor.config import OptimConfig, PolicyUpdateConfig
from verl.workers.actor.dp_actor import (
    LOSS_TOTALS,
    DataParallelPPOActor,
    OPOBPass,
    lr_schedule_factor,
    sampling_temperature,
)
from verl.workers.actor.policy_loss import FORWARD_KEYS, actor_kl_loss, actor_policy_loss
from verl.workers.actor.traj_grad_norms import trajectory_objective
from verl.workers.utils import vcpo

if TYPE_CHECKING:
    from verl.protocol import DataProto

__all__ = ["MegatronPPOActor", "ScheduledLR", "build_megatron_model", "build_megatron_optimizer_and_scheduler"]


class _GatherFromContextParallel(torch.autograd.Function):
    """All-gather of the CP ranks' sequence chunks whose backward keeps this rank's chunk of the
    incoming gradient: every CP rank evaluates the same loss on the gathered tensor, so the
    gradient of its own positions is exactly its share (no reduction over CP)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
        ctx.groups = groups
        return gather_from_context_parallel(tensor, groups.cp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return split_for_context_parallel(grad, ctx.groups.cp_size, ctx.groups.cp_rank).contiguous(), None


def build_megatron_model(hf_config: Any, parallel: MegatronParallelConfig, groups: ParallelGroups,
                         hf_state_dict: dict[str, torch.Tensor], params_dtype: torch.dtype = torch.float32,
                         use_distributed_optimizer: bool | None = None) -> torch.nn.Module:
    """This rank's pipeline stage of the GPTModel with the HF weights, wrapped in Megatron DDP.

    ``calculate_per_token_loss`` is switched on: the actor's losses already divide by GLOBAL
    token/sequence counts, so DDP must SUM gradients over DP x CP (not average) and the schedules
    must not divide the loss by the number of micro-batches.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from verl.models.mcore.model import build_gpt_model
    from verl.models.mcore.weights import load_hf_weights

    model = build_gpt_model(hf_config, parallel, groups, params_dtype)
    load_hf_weights(model, hf_state_dict, hf_config, groups)
    model.config.calculate_per_token_loss = True
    distributed = parallel.use_distributed_optimizer if use_distributed_optimizer is None else use_distributed_optimizer
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=distributed,
    )
    return DistributedDataParallel(model.config, ddp_config, model)


class ScheduledLR:
    """Sets every param group's lr to lr * ``lr_schedule_factor(step)`` (the torch actor's schedule);
    steps once per trainer step. Works on Megatron's (chained, distributed) optimizers, which torch's
    LR schedulers do not accept."""

    def __init__(self, optimizer: Any, optim_config: OptimConfig, total_steps: int):
        self.optimizer, self.optim_config, self.total_steps = optimizer, optim_config, total_steps
        self.step_count = 0
        self._apply()

    def _apply(self) -> None:
        c = self.optim_config
        factor = lr_schedule_factor(self.step_count, c.lr_decay_style, c.lr_warmup_steps, self.total_steps, c.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = c.lr * factor

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, int]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step_count = int(state["step_count"])
        self._apply()


def build_megatron_optimizer_and_scheduler(
    model: torch.nn.Module, optim_config: OptimConfig, total_steps: int | None = None,
    use_distributed_optimizer: bool = False, params_dtype: torch.dtype = torch.float32, optimizer: str = "adam",
) -> tuple[Any, ScheduledLR]:
    """A Megatron optimizer over the DDP-wrapped ``model`` with the torch actor's semantics, and its schedule.

    ``adam``: AdamW (decoupled weight decay on EVERY parameter, as ``torch.optim.AdamW`` in the torch
    actor; Megatron's default would skip biases and norms); ``sgd``: plain SGD without momentum (for
    exactness tests). Clipping and the ESS lr scale are applied by the actor, not here.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    total = optim_config.decay_steps(total_steps)
    config = OptimizerConfig(
        optimizer=optimizer, lr=optim_config.lr, min_lr=optim_config.lr * optim_config.min_lr_ratio,
        weight_decay=optim_config.weight_decay, adam_beta1=optim_config.betas[0], adam_beta2=optim_config.betas[1],
        adam_eps=optim_config.eps, sgd_momentum=0.0, decoupled_weight_decay=True,
        bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16, params_dtype=params_dtype,
        use_distributed_optimizer=use_distributed_optimizer, clip_grad=0.0,
    )
    megatron_optimizer = get_megatron_optimizer(config, [model], config_overrides={})
    return megatron_optimizer, ScheduledLR(megatron_optimizer, optim_config, total)


class MegatronPPOActor(DataParallelPPOActor):
    """``compute_log_prob`` / ``update_policy`` of one Megatron rank, equal to the torch actor on the
    same trajectories (see the module docstring).

    ``model``: this rank's pipeline stage wrapped in Megatron DDP (``build_megatron_model``), or a
    one-element list of it (virtual pipeline stages are not supported). ``optimizer``: a Megatron
    optimizer (``build_megatron_optimizer_and_scheduler``); ``lr_scheduler``: anything with
    ``step()``. Every rank of the world calls every method together.
    """

    def __init__(self, config: PolicyUpdateConfig, model: torch.nn.Module | list[torch.nn.Module], optimizer: Any,
                 lr_scheduler: Any, groups: ParallelGroups, hf_config: Any):
        chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        if len(chunks) != 1:
            raise ValueError(f"MegatronPPOActor takes one model chunk per rank (no virtual pipeline), got {len(chunks)}")
        if not getattr(chunks[0].config, "calculate_per_token_loss", False):
            raise ValueError("the model's TransformerConfig needs calculate_per_token_loss=True (see build_megatron_model)")
        super().__init__(config, torch.nn.ModuleList(chunks), optimizer, lr_scheduler, process_group=groups.dp)
        self.chunks = chunks
        self.groups = groups
        self.hf_config = hf_config
        self._sequence_parallel = bool(chunks[0].config.sequence_parallel)

    @property
    def device(self) -> torch.device:
        return next(self.chunks[0].parameters()).device

    # ------------------------------------------------------------------ layout
    def _megatron_layout(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The Megatron inputs of ``batch``'s rows, one length for all rows (micro-batches then share
        a shape, as pipeline stages need), as [b, s_local] tensors for this CP rank:

        ``mc_input_ids``/``mc_position_ids``: left-aligned tokens padded to a multiple of tp (SP) and
        2 cp, this rank's CP chunks; ``mc_labels``: the next token at each position (pad at the end);
        ``mc_objective_mask``: response_mask moved to the position that predicts each response token
        (what ``megatron_traj_sq_grad_norms``' objective sums); ``mc_response_index`` [b, R]: that
        position in the full (gathered) sequence.
        """
        response_length = batch["responses"].shape[1]
        ids, position_ids, _, response_index = left_align(batch["input_ids"], batch["attention_mask"], response_length)
        multiple = context_parallel_multiple(self.groups.tp_size, self._sequence_parallel, self.groups.cp_size)
        labels = next_token_labels(ids)
        padded = [pad_sequence_for_parallel(t, multiple) for t in (ids, position_ids, labels)]
        layout = {"mc_response_index": response_index}
        if "response_mask" in batch:
            mask = responses_to_aligned(batch["response_mask"].float(), response_index, ids.shape[1])
            padded.append(pad_sequence_for_parallel(mask, multiple))
        names = ("mc_input_ids", "mc_position_ids", "mc_labels", "mc_objective_mask")
        for name, tensor in zip(names, padded):
            layout[name] = split_for_context_parallel(tensor, self.groups.cp_size, self.groups.cp_rank).contiguous()
        return layout

    def _response_log_probs(self, output: torch.Tensor, micro: dict[str, torch.Tensor], temperature: float,
                            calculate_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Last stage: vocab-parallel logits [b, s_local, V/tp] -> (log-probs [b, R], entropy [b, R] | None)."""
        logits = output.float() / temperature
        per_position = vocab_parallel_log_probs(logits, micro["mc_labels"], self.groups.tp)
        log_prob = self._to_response_layout(per_position, micro)
        entropy = None
        if calculate_entropy:
            entropy = self._to_response_layout(vocab_parallel_entropy(logits, self.groups.tp), micro)
        return log_prob, entropy

    def _to_response_layout(self, per_position: torch.Tensor, micro: dict[str, torch.Tensor]) -> torch.Tensor:
        """[b, s_local] of this CP rank -> [b, R] at the positions predicting the response tokens;
        0 on response padding."""
        full = _GatherFromContextParallel.apply(per_position, self.groups) if self.groups.cp_size > 1 else per_position
        picked = torch.gather(full, 1, micro["mc_response_index"])
        is_response = micro["attention_mask"][:, -picked.shape[1]:] > 0
        return torch.where(is_response, picked, torch.zeros_like(picked))

    # ------------------------------------------------------------------ schedule
    def _run_schedule(self, micros: list[dict[str, torch.Tensor]], temperature: float, calculate_entropy: bool,
                      loss_fn: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]] | None) -> list[dict]:
        """Megatron's forward/backward schedule over ``micros`` (no pipelining, or 1F1B under PP).

        ``loss_fn(micro, log_prob, entropy) -> (loss, extras)`` on the last stage; its loss is
        backpropagated as is (``calculate_per_token_loss``: no division by the micro-batch count).
        ``None``: forward only, no grad. Returns, on the last stage, one dict per micro-batch with
        ``log_prob``, ``entropy`` and the extras; elsewhere an empty list.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module):
            micro = next(data_iterator)
            output = model(input_ids=micro["mc_input_ids"], position_ids=micro["mc_position_ids"], attention_mask=None)
            if not self.groups.is_last_stage:
                return output, None
            log_prob, entropy = self._response_log_probs(output, micro, temperature, calculate_entropy)
            return log_prob, partial(_stage_loss, loss_fn, micro, entropy)

        seq_local = micros[0]["mc_input_ids"].shape[1]
        if self.groups.pp_size > 1 and len({len(m["mc_input_ids"]) for m in micros}) > 1:
            raise ConfigError("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", self.config.ppo_micro_batch_size_per_gpu,
                              "must divide each rank's mini-batch (and batch) under pipeline parallelism: "
                              "stages exchange tensors of one micro-batch shape")
        forward_backward = get_forward_backward_func()
        with torch.no_grad() if loss_fn is None else torch.enable_grad():
            return forward_backward(
                forward_step_func=forward_step, data_iterator=iter(micros), model=self.chunks,
                num_microbatches=len(micros), seq_length=seq_local * self.groups.cp_size,
                micro_batch_size=micros[0]["mc_input_ids"].shape[0], forward_only=loss_fn is None,
            )

    def _from_last_stage(self, tensor: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
        """The last pipeline stage's float32 ``tensor`` on every stage of this pipeline (broadcast over PP)."""
        if self.groups.pp_size == 1:
            return tensor
        if tensor is None:
            tensor = torch.empty(shape, dtype=torch.float32, device=self.device)
        tensor = tensor.detach().float().contiguous()
        dist.broadcast(tensor, src=dist.get_global_rank(self.groups.pp, self.groups.pp_size - 1), group=self.groups.pp)
        return tensor

    def _collect(self, outputs: list[dict], key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """``key`` of every micro-batch's output, concatenated on the last stage and broadcast over PP."""
        local = torch.cat([out[key] for out in outputs]) if self.groups.is_last_stage else None
        return self._from_last_stage(local, shape)

    # ------------------------------------------------------------------ forward
    def _no_grad_log_prob(self, mini: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
        """Log-probs [b, R] of a mini-batch under the current weights (forward-only schedule), on every stage."""
        mini = mini if "mc_input_ids" in mini else {**mini, **self._megatron_layout(mini)}
        outputs = self._run_schedule(self._micro_batches(mini), temperature, False, None)
        return self._collect(outputs, "log_prob", tuple(mini["responses"].shape))

    def compute_log_prob(self, data: "DataProto",
                         calculate_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs [B, R] (and entropies) of this data-parallel rank's responses, no grad; the same
        on every TP/CP/PP rank of the replica. Temperature from ``data.meta_info["temperature"]``."""
        temperature = sampling_temperature(data)
        tensors = self._to_device(data, FORWARD_KEYS)
        tensors.update(self._megatron_layout(tensors))
        size = self.config.ppo_micro_batch_size_per_gpu
        micros = [{k: v[start:start + size] for k, v in tensors.items()} for start in range(0, len(data), size)]
        outputs = self._run_schedule(micros, temperature, calculate_entropy, None)
        shape = tuple(tensors["responses"].shape)
        log_prob = self._collect(outputs, "log_prob", shape)
        entropy = self._collect(outputs, "entropy", shape) if calculate_entropy else None
        return log_prob, entropy

    # ------------------------------------------------------------------ update
    def _update_mini_batch(self, mini: dict[str, torch.Tensor], temperature: float) -> dict[str, float]:
        """The torch actor's mini-batch step (same losses, VCPO statistics, skip rules and metric
        names) on the mini-batch plus its Megatron layout, computed once for all its passes."""
        self._zero_grads()
        mini.update(self._megatron_layout(mini))
        return super()._update_mini_batch(mini, temperature)

    def _loss_backward(self, mini: dict[str, torch.Tensor], temperature: float, num_tokens: torch.Tensor,
                       num_seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward of the configured loss per micro-batch; (log-probs [b, R], ``LOSS_TOTALS``)."""
        cfg = self.config
        calculate_entropy = cfg.entropy_coeff != 0.0

        def loss_fn(micro: dict[str, torch.Tensor], log_prob: torch.Tensor,
                    entropy: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            pg_loss, _ = actor_policy_loss(cfg, micro, log_prob, num_tokens, num_seqs, self.process_group)
            loss, entropy_term, kl_term = pg_loss, torch.zeros_like(pg_loss), torch.zeros_like(pg_loss)
            if entropy is not None:
                entropy_term = agg_loss(entropy, micro["response_mask"], cfg.loss_agg_mode, num_tokens, num_seqs)
                loss = loss - cfg.entropy_coeff * entropy_term
            if cfg.use_kl_loss:
                kl_term = actor_kl_loss(cfg, micro, log_prob, num_tokens, num_seqs)
                loss = loss + cfg.kl_loss_coef * kl_term
            return loss, {"totals": torch.stack([loss, pg_loss, entropy_term, kl_term]).detach()[None]}

        micros = self._micro_batches(mini)
        outputs = self._run_schedule(micros, temperature, calculate_entropy, loss_fn)
        log_prob = self._collect(outputs, "log_prob", tuple(mini["responses"].shape))
        totals = self._collect(outputs, "totals", (len(micros), len(LOSS_TOTALS)))
        return log_prob, totals.sum(0)

    def _opob_backward(self, mini: dict[str, torch.Tensor], temperature: float, num_tokens: torch.Tensor,
                       num_seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, OPOBPass]:
        """Leave this rank's share of g = (1/B) sum_i c_i s_i in the DDP gradient buffers.

        Per micro-batch, ‖∇θ log π(τ_i)‖² from ``megatron_traj_sq_grad_norms`` (``grad_norm_method``:
        batched ghost norms or per-trajectory backward passes; it touches no gradient buffer), then
        the log-probs, the OPOB coefficients k_i of the mini-batch, and one backward of the weighted
        objective sum_i k_i f_i (plus kl_loss_coef * kl_loss when the KL term is on) through the
        schedule. Returns (log-probs, ``LOSS_TOTALS``, the OPOB pass), as the torch actor.
        """
        from verl.workers.actor.megatron_grad_norms import megatron_traj_sq_grad_norms

        method = self.config.grad_norm_method
        objective = partial(_local_objective, self.groups, temperature)
        micros = self._micro_batches(mini)
        sq_norms = torch.cat([megatron_traj_sq_grad_norms(self.chunks[0], objective, _objective_inputs(micro),
                                                          self.groups, method) for micro in micros])
        log_prob = self._no_grad_log_prob(mini, temperature)
        opob = self._opob_coefficients(mini, log_prob, sq_norms, num_seqs)
        size = self.config.ppo_micro_batch_size_per_gpu
        for i, micro in enumerate(micros):
            micro["opob_k"] = opob.loss_coefficients[i * size:(i + 1) * size]

        cfg = self.config

        def loss_fn(micro: dict[str, torch.Tensor], log_prob: torch.Tensor,
                    entropy: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            loss = (micro["opob_k"] * trajectory_objective(log_prob, micro["response_mask"])).sum()
            if not cfg.use_kl_loss:
                return loss, {}
            kl_term = actor_kl_loss(cfg, micro, log_prob, num_tokens, num_seqs)
            return loss + cfg.kl_loss_coef * kl_term, {"kl": kl_term.detach()[None]}

        outputs = self._run_schedule(micros, temperature, False, loss_fn)
        kl_term = self._collect(outputs, "kl", (len(micros),)).sum() if cfg.use_kl_loss else torch.zeros(())
        return log_prob, self._opob_totals(mini, log_prob, opob, kl_term.to(self.device), num_tokens, num_seqs), opob

    # ------------------------------------------------------------------ gradients and step
    def _zero_grads(self) -> None:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def _reduce_gradients(self) -> None:
        """Nothing here: Megatron DDP keeps the gradients in its own buffers and ``step_optimizer``
        reduces them over every parallel dimension at once (``_finalize_grads``)."""

    def _finalize_grads(self) -> None:
        """Sum the DDP buffers over DP x CP, all-reduce SP norm grads over TP and tied embeddings over PP."""
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads(self.chunks)

    def step_optimizer(self, lr_scale: float = 1.0) -> tuple[float, float]:
        """Reduce the gradients (``_finalize_grads``), clip them to ``grad_clip`` and step at
        lr * lr_scale (the scheduler's lr is restored after); returns (grad norm before clipping,
        lr used, 0.0 without a step).

        The norm is Megatron's: the float32 2-norm over the full model, TP-replicated and shared
        parameters counted once. Skip rules as the torch actor: no step when the norm is inf/nan or
        ``lr_scale`` is 0; every rank sees the same norm and scale, so all skip together.
        """
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        self._finalize_grads()
        self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        lr_used = 0.0
        if math.isfinite(grad_norm) and lr_scale > 0.0:
            for optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
                params = optimizer.get_parameters()
                if params:
                    clip_grad_by_total_norm_fp32(params, self.config.grad_clip, grad_norm)
            with vcpo.scaled_lr_step(self.optimizer, lr_scale):
                lr_used = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step_with_ready_grads()
        self._zero_grads()
        return grad_norm, lr_used

    def get_weights(self) -> dict[str, torch.Tensor] | None:
        """Full HF-named fp32 CPU weights on global rank 0, None elsewhere; a collective over ALL ranks."""
        from verl.models.mcore.weights import export_hf_weights

        return export_hf_weights(self.chunks[0].module, self.hf_config, self.groups)


def _stage_loss(loss_fn: Callable | None, micro: dict[str, torch.Tensor], entropy: torch.Tensor | None,
                log_prob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The last stage's loss function for Megatron's schedule: (loss, token count, collected outputs)."""
    collected = {"log_prob": log_prob.detach()}
    if entropy is not None:
        collected["entropy"] = entropy.detach()
    if loss_fn is None:
        loss = log_prob.new_zeros(())
    else:
        loss, extras = loss_fn(micro, log_prob, entropy)
        collected.update(extras)
    return loss, torch.ones((), dtype=torch.int, device=log_prob.device), collected


def _objective_inputs(micro: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ``_local_objective`` reads, in the Megatron layout (``input_ids`` [b, s_local] as
    ``megatron_traj_sq_grad_norms`` expects)."""
    return {"input_ids": micro["mc_input_ids"], "position_ids": micro["mc_position_ids"],
            "labels": micro["mc_labels"], "objective_mask": micro["mc_objective_mask"]}


def _local_objective(groups: ParallelGroups, temperature: float, model: torch.nn.Module,
                     inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """f_i = sum_t m_it log π(y_it) over the response tokens this CP rank holds (the contract of
    ``megatron_traj_sq_grad_norms``); other stages return their output for the next stage."""
    output = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], attention_mask=None)
    if not groups.is_last_stage:
        return output
    per_position = vocab_parallel_log_probs(output.float() / temperature, inputs["labels"], groups.tp)
    return (per_position * inputs["objective_mask"]).sum(-1)
