import torch

from tests.megatron_launch import run_ranks
from verl.utils.megatron.logprobs import vocab_parallel_entropy, vocab_parallel_log_probs
from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

torch.set_num_threads(1)


def _problem(offset: float = 0.0):
    """Full logits [2, 5, 12] (one row shifted by ``offset`` to test stability), labels, and loss coefficients."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 12, generator=gen) * 3
    logits[1, 2] += offset
    labels = torch.randint(0, 12, (2, 5), generator=gen)
    return logits, labels, torch.randn(2, 5, generator=gen), torch.randn(2, 5, generator=gen)


def _reference():
    """Single-process float64 autograd through log_softmax: values and d(loss)/d(logits)."""
    logits, labels, c_logp, c_ent = _problem(offset=1e4)
    c_logp, c_ent = c_logp.double(), c_ent.double()
    z = logits.double().requires_grad_(True)
    log_p = torch.log_softmax(z, dim=-1)
    logp = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    ((c_logp * logp).sum() + (c_ent * entropy).sum()).backward()
    return logp.detach(), entropy.detach(), z.grad


def _tp_rank(rank: int, world_size: int) -> dict:
    group = torch.distributed.new_group(list(range(world_size)))
    logits, labels, c_logp, c_ent = _problem(offset=1e4)
    local = logits.chunk(world_size, dim=-1)[rank].clone().requires_grad_(True)
    logp = vocab_parallel_log_probs(local, labels, group)
    entropy = vocab_parallel_entropy(local, group)
    ((c_logp * logp).sum() + (c_ent * entropy).sum()).backward()
    return {"logp": logp.detach(), "entropy": entropy.detach(), "grad": local.grad, "dtype": logp.dtype}


def test_vocab_parallel_log_probs_and_entropy_match_single_process_values_and_gradients():
    ref_logp, ref_entropy, ref_grad = _reference()
    results = run_ranks(_tp_rank, 2, timeout_s=120)
    for rank, res in enumerate(results):
        assert res["dtype"] == torch.float32
        assert (res["logp"].double() - ref_logp).abs().max().item() <= 1e-5
        assert (res["entropy"].double() - ref_entropy).abs().max().item() <= 1e-5
        assert (res["grad"].double() - ref_grad.chunk(2, dim=-1)[rank]).abs().max().item() <= 1e-6


def test_without_a_group_they_equal_the_torch_actor_functions():
    logits, labels, _, _ = _problem()
    # Both are fp32 with different summation orders; logits here reach |z| ~ 10.
    assert (vocab_parallel_log_probs(logits, labels, None) - logprobs_from_logits(logits, labels)).abs().max() <= 1e-5
    assert (vocab_parallel_entropy(logits, None) - entropy_from_logits(logits)).abs().max() <= 1e-5
