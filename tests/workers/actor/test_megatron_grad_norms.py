"""Per-trajectory squared gradient norms of the Megatron actor under TP+SP, CP and PP, both methods,
against a single-process brute force on the HF model (autograd per trajectory, all parameters)."""

from __future__ import annotations

import pytest
import torch

from tests.megatron_launch import run_ranks
from verl.models.loader import load_model_and_tokenizer
from verl.models.presets import build_tiny_model_dir

torch.set_num_threads(1)
RTOL = 1e-5
PROMPT_LENS = (6, 3, 5, 1)
RESPONSE_LENS = (7, 9, 2, 5)
METHODS = ("batched", "per_traj")


def padded_batch(vocab_size: int, seed: int = 3) -> dict[str, torch.Tensor]:
    """The shared layout: left-padded prompts, right-padded responses, a tool-output hole in one mask."""
    gen = torch.Generator().manual_seed(seed)
    batch, p_max, r_max = len(PROMPT_LENS), max(PROMPT_LENS), max(RESPONSE_LENS)
    prompts = torch.zeros(batch, p_max, dtype=torch.long)
    responses = torch.zeros(batch, r_max, dtype=torch.long)
    response_mask = torch.zeros(batch, r_max)
    for i, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        prompts[i, p_max - p:] = torch.randint(1, vocab_size, (p,), generator=gen)
        # A few distinct ids, so one token id repeats within a trajectory (embedding rows sum).
        responses[i, :r] = torch.randint(1, 9, (r,), generator=gen)
        response_mask[i, :r] = 1.0
    response_mask[1, 2:4] = 0.0
    input_ids = torch.cat([prompts, responses], 1)
    attention_mask = (input_ids != 0).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                responses=responses, response_mask=response_mask)


def brute_force_sq_norms(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """‖∇θ Σ_t m_t log π(y_t)‖² per trajectory: one HF forward and autograd.grad per row, float64."""
    params = [p for p in model.parameters() if p.requires_grad]
    num_response = batch["responses"].shape[1]
    out = []
    for i in range(batch["input_ids"].shape[0]):
        row = slice(i, i + 1)
        logits = model(input_ids=batch["input_ids"][row], attention_mask=batch["attention_mask"][row],
                       position_ids=batch["position_ids"][row], use_cache=False).logits
        log_probs = torch.log_softmax(logits[:, -num_response - 1:-1].float(), -1)
        token_lp = log_probs.gather(-1, batch["responses"][row, :, None])[..., 0]
        grads = torch.autograd.grad((token_lp * batch["response_mask"][row]).sum(), params)
        out.append(sum(g.double().pow(2).sum() for g in grads))
    return torch.stack(out)


def megatron_micro_batch(batch: dict[str, torch.Tensor], tp: int, cp: int, cp_rank: int) -> dict[str, torch.Tensor]:
    """The actor's Megatron layout: rows left-aligned, the response mask moved to the positions
    that predict each response token, padded for SP × CP, then this CP rank's two chunks."""
    from verl.utils.megatron.batch import (
        context_parallel_multiple,
        left_align,
        next_token_labels,
        pad_sequence_for_parallel,
        responses_to_aligned,
        split_for_context_parallel,
    )

    ids, positions, _, response_index = left_align(batch["input_ids"], batch["attention_mask"],
                                                   batch["responses"].shape[1])
    layout = dict(input_ids=ids, position_ids=positions, labels=next_token_labels(ids),
                  objective_mask=responses_to_aligned(batch["response_mask"], response_index, ids.shape[1]))
    multiple = context_parallel_multiple(tp, tp > 1, cp)
    return {k: split_for_context_parallel(pad_sequence_for_parallel(v, multiple), cp, cp_rank).contiguous()
            for k, v in layout.items()}


def _rank_sq_norms(rank: int, world_size: int, layouts: dict[str, dict], model_dirs: dict[bool, str],
                   batch: dict[str, torch.Tensor]) -> dict[str, dict]:
    """For each parallel layout in turn (one spawn amortises the Megatron import): the norms of
    both methods for the tied and the untied model wrapped in Megatron DDP, whether the gradient
    buffers survived, and the batched method's error for a parameter it cannot account for."""
    return {name: _layout_sq_norms(parallel_kwargs, model_dirs, batch) for name, parallel_kwargs in layouts.items()}


def _layout_sq_norms(parallel_kwargs: dict, model_dirs: dict[bool, str], batch: dict[str, torch.Tensor]) -> dict:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from verl.models.mcore.model import build_gpt_model, model_forward_logits
    from verl.models.mcore.weights import load_hf_weights
    from verl.utils.megatron.logprobs import vocab_parallel_log_probs
    from verl.utils.megatron.parallel import MegatronParallelConfig, destroy_megatron, initialize_megatron
    from verl.workers.actor import traj_grad_norms
    from verl.workers.actor.megatron_grad_norms import UnsupportedLayerError, megatron_traj_sq_grad_norms

    # Unsharded fc1 weights (98k elements, CP and PP layouts) go in chunks of 2 trajectories, the
    # rest in one chunk: the batched method's per-sample chunking runs, CP sums per chunk included.
    traj_grad_norms._DIRECT_CHUNK_ELEMENTS = 200_000
    parallel = MegatronParallelConfig(**parallel_kwargs)
    groups = initialize_megatron(parallel, seed=0)
    micro_batch = megatron_micro_batch(batch, groups.tp_size, groups.cp_size, groups.cp_rank)

    def objective(model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model_forward_logits(model, mb["input_ids"], mb["position_ids"])
        if not groups.is_last_stage:
            return out
        return (vocab_parallel_log_probs(out.float(), mb["labels"], groups.tp) * mb["objective_mask"]).sum(-1)

    results: dict = {"grads_untouched": True}
    for tied, model_dir in model_dirs.items():
        hf_model, _ = load_model_and_tokenizer(model_dir)
        model = build_gpt_model(hf_model.config, parallel, groups)
        load_hf_weights(model, hf_model.state_dict(), hf_model.config, groups)
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        # Gradient buffers as a training step would have left them mid-accumulation.
        gen = torch.Generator().manual_seed(5)
        for p in model.parameters():
            p.main_grad.copy_(torch.randn(p.shape, generator=gen))
        saved = [p.main_grad.clone() for p in model.parameters()]
        for method in METHODS:
            results[(tied, method)] = megatron_traj_sq_grad_norms(ddp, objective, micro_batch, groups, method)
        results["grads_untouched"] &= all(p.grad is None and torch.equal(p.main_grad, before)
                                          for p, before in zip(model.parameters(), saved))
    model.register_parameter("stray_scale", torch.nn.Parameter(torch.ones(3)))
    try:
        megatron_traj_sq_grad_norms(model, objective, micro_batch, groups, "batched")
        results["unsupported_error"] = None
    except UnsupportedLayerError as err:
        results["unsupported_error"] = str(err)
    destroy_megatron()
    return results


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[bool, str], dict, dict[bool, torch.Tensor]]:
    root = tmp_path_factory.mktemp("models")
    model_dirs, expected = {}, {}
    for tied in (True, False):
        model_dirs[tied] = build_tiny_model_dir(root / f"tied_{tied}", seed=1, tie_word_embeddings=tied)
        model, _ = load_model_and_tokenizer(model_dirs[tied])
        with torch.no_grad():  # non-trivial norm weights and biases, so their gradients are exercised
            gen = torch.Generator().manual_seed(7)
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(model_dirs[tied])
        batch = padded_batch(model.config.vocab_size)
        expected[tied] = brute_force_sq_norms(model, batch)
    return model_dirs, batch, expected


TWO_RANK_LAYOUTS = {
    "tp2_sp": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "cp2": dict(context_parallel_size=2),
    "pp2": dict(pipeline_model_parallel_size=2),
}
FOUR_RANK_LAYOUTS = {
    "tp2_sp_cp2": dict(tensor_model_parallel_size=2, sequence_parallel=True, context_parallel_size=2),
    "tp2_sp_pp2": dict(tensor_model_parallel_size=2, sequence_parallel=True, pipeline_model_parallel_size=2),
}


@pytest.fixture(scope="module")
def two_rank_results(reference: tuple) -> list[dict[str, dict]]:
    model_dirs, batch, _ = reference
    return run_ranks(_rank_sq_norms, 2, TWO_RANK_LAYOUTS, model_dirs, batch, timeout_s=240)


def _check(ranks: list[dict[str, dict]], layout: str, expected: dict[bool, torch.Tensor]) -> None:
    for rank, by_layout in enumerate(ranks):
        results = by_layout[layout]
        assert results["grads_untouched"], f"{layout} rank {rank}: .grad set or .main_grad changed"
        assert "stray_scale" in (results["unsupported_error"] or ""), results["unsupported_error"]
        for tied in (True, False):
            for method in METHODS:
                got = results[(tied, method)].double()
                where = f"{layout} rank {rank} tied={tied} {method}"
                torch.testing.assert_close(got, expected[tied], rtol=RTOL, atol=0.0,
                                           msg=lambda m, where=where: f"{where}: {m}")


def test_tensor_parallel_with_sequence_parallel_matches_brute_force(two_rank_results: list, reference: tuple) -> None:
    _check(two_rank_results, "tp2_sp", reference[2])


def test_context_parallel_matches_brute_force(two_rank_results: list, reference: tuple) -> None:
    _check(two_rank_results, "cp2", reference[2])


def test_pipeline_parallel_matches_brute_force(two_rank_results: list, reference: tuple) -> None:
    _check(two_rank_results, "pp2", reference[2])


@pytest.mark.slow
def test_sequence_parallel_combined_with_context_or_pipeline_parallel_matches_brute_force(reference: tuple) -> None:
    """4 ranks: SP norm weights partial over TP and CP at once; tied embedding shards summed over PP."""
    model_dirs, batch, expected = reference
    ranks = run_ranks(_rank_sq_norms, 4, FOUR_RANK_LAYOUTS, model_dirs, batch, timeout_s=420)
    for layout in FOUR_RANK_LAYOUTS:
        _check(ranks, layout, expected)
