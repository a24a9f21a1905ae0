import pytest
import torch

from tests.megatron_launch import run_ranks
from tests.models.mcore.test_weights import tiny_hf_model
from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

torch.set_num_threads(1)

TEMPERATURE = 0.7
# (tp, sequence_parallel, cp, pp) on 4 ranks; data parallelism takes the rest.
LAYOUTS = [(2, True, 1, 1), (1, False, 2, 1), (1, False, 1, 2), (2, True, 2, 1), (2, True, 1, 2)]


def rollout_batch() -> dict:
    """Four trajectories in the shared layout: prompts left-padded to P=6, responses right-padded to R=5."""
    prompts = torch.tensor([[0, 0, 0, 40, 41, 42], [50, 51, 52, 53, 54, 55], [0, 0, 0, 0, 0, 60], [0, 70, 71, 72, 73, 74]])
    responses = torch.tensor([[43, 44, 45, 1, 0], [56, 1, 0, 0, 0], [61, 62, 63, 64, 65], [75, 76, 0, 0, 0]])
    input_ids = torch.cat([prompts, responses], dim=1)
    attention_mask = (input_ids != 0).long()
    return {"prompts": prompts, "responses": responses, "input_ids": input_ids, "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
            "response_mask": (responses != 0).float()}


def hf_reference(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Response log-probs and entropies the way the torch actor computes them (padded layout, mask, positions)."""
    prompt_len = batch["prompts"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits[:, prompt_len - 1 : -1] / TEMPERATURE
    return logprobs_from_logits(logits, batch["responses"]), entropy_from_logits(logits)


def _last_stage_outputs(logits, labels, groups):
    from verl.utils.megatron.logprobs import vocab_parallel_entropy, vocab_parallel_log_probs

    logits = logits / TEMPERATURE
    return vocab_parallel_log_probs(logits, labels, groups.tp), vocab_parallel_entropy(logits, groups.tp)


def megatron_response_log_probs(model, groups, cfg, rows: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Left-align, pad, split for CP, forward (through Megatron's pipeline schedule when pp > 1), gather back."""
    from verl.models.mcore.model import model_forward_logits
    from verl.utils.megatron.batch import (
        aligned_to_responses,
        context_parallel_multiple,
        gather_from_context_parallel,
        left_align,
        next_token_labels,
        pad_sequence_for_parallel,
        split_for_context_parallel,
    )

    response_len = rows["responses"].shape[1]
    ids, positions, _, index = left_align(rows["input_ids"], rows["attention_mask"], response_len)
    seq_len = ids.shape[1]
    multiple = context_parallel_multiple(groups.tp_size, cfg.sequence_parallel, groups.cp_size)
    ids, positions = (pad_sequence_for_parallel(t, multiple) for t in (ids, positions))
    labels = next_token_labels(ids)
    ids, positions, labels = (split_for_context_parallel(t, groups.cp_size, groups.cp_rank) for t in (ids, positions, labels))
    with torch.no_grad():
        if groups.pp_size == 1:
            log_probs, entropy = _last_stage_outputs(model_forward_logits(model, ids, positions), labels, groups)
        else:
            from megatron.core.pipeline_parallel import get_forward_backward_func

            def loss_func(logits):
                log_probs, entropy = _last_stage_outputs(logits, labels, groups)
                return torch.zeros(()), {"log_probs": log_probs, "entropy": entropy}

            def forward_step(data_iterator, stage_model):
                step_ids, step_positions = next(data_iterator)
                return model_forward_logits(stage_model, step_ids, step_positions), loss_func

            stored = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([(ids, positions)]), model=[model],
                num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=True)
            if not groups.is_last_stage:
                return None
            log_probs, entropy = stored[0]["log_probs"], stored[0]["entropy"]
    full = [gather_from_context_parallel(t, groups.cp)[:, :seq_len] for t in (log_probs, entropy)]
    return tuple(aligned_to_responses(t, index) for t in full)


def _gradients_match_hf(hf, batch: dict) -> float:
    """TP=2 x SP x CP=2: d(sum c*logp + sum c'*H)/d(params) after the partial-gradient sums equals HF's.

    Under SP the norm weights see a slice of the sequence (all-reduce over TP, the params marked
    ``sequence_parallel``); under CP every parameter sees half the tokens (all-reduce over CP).
    Returns the largest absolute difference to HF's gradient shard over all parameters.
    """
    import torch.distributed as dist

    from verl.models.mcore.model import build_gpt_model, model_forward_logits
    from verl.models.mcore.weights import load_hf_weights, megatron_shard_from_hf
    from verl.utils.megatron.batch import (
        context_parallel_multiple,
        left_align,
        next_token_labels,
        pad_sequence_for_parallel,
        responses_to_aligned,
        split_for_context_parallel,
    )
    from verl.utils.megatron.parallel import MegatronParallelConfig, destroy_megatron, initialize_megatron

    gen = torch.Generator().manual_seed(3)
    c_logp, c_ent = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    mask = batch["response_mask"]
    hf.zero_grad()
    prompt_len = batch["prompts"].shape[1]
    logits = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"]).logits[:, prompt_len - 1 : -1] / TEMPERATURE
    hf_loss = (logprobs_from_logits(logits, batch["responses"]) * c_logp * mask).sum() \
        + (entropy_from_logits(logits) * c_ent * mask).sum()
    hf_loss.backward()
    hf_grads = {name: p.grad for name, p in hf.named_parameters()}
    hf_grads.setdefault("lm_head.weight", hf_grads["model.embed_tokens.weight"])

    cfg = MegatronParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True, context_parallel_size=2)
    groups = initialize_megatron(cfg, seed=0)
    model = build_gpt_model(hf.config, cfg, groups)
    load_hf_weights(model, hf.state_dict(), hf.config, groups)
    ids, positions, _, index = left_align(batch["input_ids"], batch["attention_mask"], 5)
    seq_len = ids.shape[1]
    multiple = context_parallel_multiple(2, True, 2)
    per_position = [ids, positions, next_token_labels(ids), responses_to_aligned(c_logp * mask, index, seq_len),
                    responses_to_aligned(c_ent * mask, index, seq_len)]
    ids, positions, labels, a_logp, a_ent = (
        split_for_context_parallel(pad_sequence_for_parallel(t, multiple), 2, groups.cp_rank) for t in per_position)
    log_probs, entropy = _last_stage_outputs(model_forward_logits(model, ids, positions), labels, groups)
    ((log_probs * a_logp).sum() + (entropy * a_ent).sum()).backward()
    worst = 0.0
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        if getattr(param, "sequence_parallel", False):
            dist.all_reduce(grad, group=groups.tp)
        dist.all_reduce(grad, group=groups.cp)
        expected = megatron_shard_from_hf(name, hf_grads, hf.config, groups)
        worst = max(worst, (grad - expected).abs().max().item())
    destroy_megatron()
    return worst


def _compare_layouts(rank: int, world_size: int) -> dict:
    from verl.models.mcore.model import build_gpt_model
    from verl.models.mcore.weights import load_hf_weights
    from verl.utils.megatron.parallel import MegatronParallelConfig, destroy_megatron, initialize_megatron

    hf = tiny_hf_model(tie=True)
    batch = rollout_batch()
    ref_log_probs, ref_entropy = hf_reference(hf, batch)
    out = {}
    for tp, sp, cp, pp in LAYOUTS:
        cfg = MegatronParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp, context_parallel_size=cp,
                                     pipeline_model_parallel_size=pp)
        groups = initialize_megatron(cfg, seed=0)
        model = build_gpt_model(hf.config, cfg, groups)
        model.eval()
        load_hf_weights(model, hf.state_dict(), hf.config, groups)
        # Each data-parallel rank takes its own contiguous slice of the trajectories.
        rows = slice(groups.dp_rank * 4 // groups.dp_size, (groups.dp_rank + 1) * 4 // groups.dp_size)
        result = megatron_response_log_probs(model, groups, cfg, {k: v[rows] for k, v in batch.items()})
        if result is not None:
            mask = batch["response_mask"][rows]
            out[(tp, sp, cp, pp)] = {
                "rows": (rows.start, rows.stop),
                "log_prob_diff": ((result[0] - ref_log_probs[rows]) * mask).abs().max().item(),
                "entropy_diff": ((result[1] - ref_entropy[rows]) * mask).abs().max().item(),
            }
        destroy_megatron()
    out["grad_diff"] = _gradients_match_hf(hf, batch)
    return out


@pytest.fixture(scope="module")
def results():
    """One 4-rank run for every check here (importing megatron costs seconds per rank)."""
    return run_ranks(_compare_layouts, 4, timeout_s=300)


def test_response_log_probs_and_entropies_equal_hf_under_tp_sp_dp_cp_pp(results):
    for layout in LAYOUTS:
        tp, _, cp, pp = layout
        per_rank = [r[layout] for r in results if layout in r]
        # Every rank of the last pipeline stage reports; together the DP ranks cover all four rows.
        assert len(per_rank) == 4 // pp, layout
        covered = sorted({row for r in per_rank for row in range(*r["rows"])})
        assert covered == [0, 1, 2, 3], layout
        assert max(r["log_prob_diff"] for r in per_rank) <= 1e-5, (layout, per_rank)
        assert max(r["entropy_diff"] for r in per_rank) <= 1e-5, (layout, per_rank)


def test_gradients_equal_hf_under_tp_sp_cp_after_summing_partial_gradients(results):
    assert max(r["grad_diff"] for r in results) <= 1e-5, [r["grad_diff"] for r in results]
