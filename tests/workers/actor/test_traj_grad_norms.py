"""Per-trajectory gradient norms (batched hooks, per-trajectory loop) and the OPOB-weighted gradient
against brute-force per-sample gradients of a tiny Qwen2, tied and untied, on padded batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from torch import nn

from verl.trainer.ppo.core_algos import sequence_log_is_weight
from verl.workers.actor.traj_grad_norms import (
    PerTrajectoryGradNorms,
    UnsupportedLayerError,
    per_trajectory_sq_grad_norms,
    response_log_probs,
    trajectory_objective,
)
from verl.workers.utils.vcpo import (
    GradBaseliningConfig,
    compute_opob,
    opob_loss_coefficients,
    opob_surrogate_loss,
)

torch.set_num_threads(1)
RTOL = 1e-5
TIS_CLIP = 1.5
PROMPT_LENS = (6, 4, 3, 5, 6, 2)
RESPONSE_LENS = (8, 5, 2, 7, 1, 8)
GROUP_IDS = torch.tensor([0, 0, 0, 1, 1, 1])


def build_model(tied: bool, attn: str = "eager") -> transformers.Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=tied, pad_token_id=0)
    model = transformers.Qwen2ForCausalLM._from_config(config, attn_implementation=attn, torch_dtype=torch.float32)
    with torch.no_grad():  # random, non-trivial norm weights so their gradients are exercised too
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


def padded_batch(seed: int = 1) -> tuple[torch.Tensor, ...]:
    """Left-padded prompts, right-padded responses of varying lengths, as in the shared batch layout."""
    gen = torch.Generator().manual_seed(seed)
    batch, p_max, r_max = len(PROMPT_LENS), max(PROMPT_LENS), max(RESPONSE_LENS)
    prompts = torch.zeros(batch, p_max, dtype=torch.long)
    responses = torch.zeros(batch, r_max, dtype=torch.long)
    response_mask = torch.zeros(batch, r_max)
    for i, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        prompts[i, p_max - p:] = torch.randint(1, 64, (p,), generator=gen)
        # Few distinct ids so one token id repeats within a trajectory (embedding rows sum).
        responses[i, :r] = torch.randint(1, 8, (r,), generator=gen)
        response_mask[i, :r] = 1.0
    input_ids = torch.cat([prompts, responses], 1)
    attention_mask = (input_ids != 0).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids, responses, response_mask


def per_sample_grads(model: nn.Module, batch: tuple[torch.Tensor, ...], token_weights=None,
                     temperature: float = 1.0) -> torch.Tensor:
    """Brute force: ∇θ f_i of every trajectory from one batched forward, flattened, float64 [B, D]."""
    input_ids, attention_mask, position_ids, responses, response_mask = batch
    params = [p for p in model.parameters() if p.requires_grad]
    log_probs = response_log_probs(model, input_ids, attention_mask, position_ids, responses, temperature)
    f = trajectory_objective(log_probs, response_mask, token_weights)
    rows = []
    for i in range(f.shape[0]):
        grads = torch.autograd.grad(f[i], params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    return torch.stack(rows)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tied_model(request):
    model = build_model(request.param)
    batch = padded_batch()
    return model, batch, per_sample_grads(model, batch)


def assert_rel_close(got: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    rel = ((got.double() - expected.double()).abs() / expected.double().abs().clamp(min=1e-30)).max().item()
    assert rel < rtol, f"max relative error {rel:.2e} >= {rtol:.0e}: {got.tolist()} vs {expected.tolist()}"


def test_batched_and_per_traj_norms_equal_brute_force(tied_model):
    model, batch, grads = tied_model
    expected = grads.pow(2).sum(-1)
    for strategy in ("auto", "gram", "direct"):
        assert_rel_close(per_trajectory_sq_grad_norms(model, *batch, linear_strategy=strategy), expected)
    assert_rel_close(per_trajectory_sq_grad_norms(model, *batch, method="per_traj"), expected)


def test_token_weights_and_temperature_give_the_weighted_objective_norms(tied_model):
    model, batch, _ = tied_model
    token_weights = torch.rand(batch[4].shape, generator=torch.Generator().manual_seed(3)) + 0.5
    expected = per_sample_grads(model, batch, token_weights, temperature=0.7).pow(2).sum(-1)
    for method in ("batched", "per_traj"):
        got = per_trajectory_sq_grad_norms(model, *batch, token_weights=token_weights, temperature=0.7, method=method)
        assert_rel_close(got, expected)


def test_sdpa_attention_gives_the_same_norms():
    model = build_model(tied=True, attn="sdpa")
    batch = padded_batch(seed=5)
    expected = per_sample_grads(model, batch).pow(2).sum(-1)
    assert_rel_close(per_trajectory_sq_grad_norms(model, *batch), expected)


def test_padding_contributes_nothing():
    model = build_model(tied=True)
    batch = padded_batch()
    padded = per_trajectory_sq_grad_norms(model, *batch)
    p_max = max(PROMPT_LENS)
    for i, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        ids = batch[0][i:i + 1, p_max - p:p_max + r]
        mask = torch.ones_like(ids)
        alone = per_trajectory_sq_grad_norms(model, ids, mask, (mask.cumsum(-1) - 1), batch[3][i:i + 1, :r],
                                             batch[4][i:i + 1, :r])
        assert_rel_close(padded[i:i + 1], alone, rtol=1e-4)


def test_every_trainable_parameter_is_covered(tied_model):
    model, _, _ = tied_model
    covered = PerTrajectoryGradNorms(model).covered_parameters
    names = {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    assert {part for entry in covered for part in entry.split(" = ")} == names
    tied = model.config.tie_word_embeddings
    assert ("model.embed_tokens.weight = lm_head.weight" in covered) == tied


def test_gradients_are_left_untouched_and_hooks_removed():
    model = build_model(tied=False)
    batch = padded_batch()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in model.parameters()]
    for method in ("batched", "per_traj"):
        per_trajectory_sq_grad_norms(model, *batch, method=method)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))
    assert all(not m._forward_hooks for m in model.modules())


class ScaledNorm(nn.Module):
    """A layer the batched method does not know: a norm followed by a learned scalar gain."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.gain = nn.Parameter(torch.tensor(1.3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.gain


def test_unknown_layer_is_named_and_per_traj_still_works():
    model = build_model(tied=False)
    model.model.norm = ScaledNorm(model.model.norm)
    with pytest.raises(UnsupportedLayerError, match=r"model\.norm\.gain.*per_traj"):
        PerTrajectoryGradNorms(model)
    batch = padded_batch()
    expected = per_sample_grads(model, batch).pow(2).sum(-1)
    assert_rel_close(per_trajectory_sq_grad_norms(model, *batch, method="per_traj"), expected)


class OffsetRMSNorm(nn.Module):
    """A (1 + weight)-scaled RMSNorm (Gemma style): affine in its weight but not homogeneous."""

    def __init__(self, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1.0 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class ToyLM(nn.Module):
    """Embedding -> LayerNorm (weight and bias) -> Linear residual -> (1 + w) norm -> untied head."""

    def __init__(self, vocab: int = 16, hidden: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden, padding_idx=0)
        self.layer_norm = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.final_norm = OffsetRMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + torch.tanh(self.proj(self.layer_norm(h)))
        return self.head(self.final_norm(h))


def test_layernorm_offset_norm_and_biases_are_exact_on_a_toy_lm():
    torch.manual_seed(2)
    model = ToyLM()
    with torch.no_grad():
        model.layer_norm.weight.add_(0.2 * torch.randn(8))
        model.layer_norm.bias.add_(0.2 * torch.randn(8))
    ids = torch.randint(1, 16, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    ids = ids * mask

    def objective() -> torch.Tensor:
        log_probs = torch.log_softmax(model(ids)[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (log_probs * mask[:, 1:]).sum(-1)

    params = list(model.parameters())
    f = objective()
    expected = torch.stack([sum(g.double().pow(2).sum() for g in torch.autograd.grad(f[i], params, retain_graph=True))
                            for i in range(4)])
    with PerTrajectoryGradNorms(model) as ghost:
        with ghost.capture(mask):
            f = objective()
        assert_rel_close(ghost.backward(f), expected)


def _np_weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values, kind="stable")
    running = 0.0
    for k in order:
        running += weights[k]
        if running >= q * weights.sum() * (1 - 1e-9):
            return float(values[k])
    return float(values[order[-1]])


def _np_baseline(values: np.ndarray, weights: np.ndarray, mode: str) -> float:
    if mode == "mean":
        return float((weights * values).sum() / weights.sum())
    if mode == "median":
        return _np_weighted_quantile(values, weights, 0.5)
    low, high = (_np_weighted_quantile(values, weights, q) for q in (0.05, 0.95))
    clipped = np.clip(values, low, high)
    return float((weights * clipped).sum() / weights.sum())


@pytest.mark.parametrize("assembly", ["second_backward", "deferred"])
@pytest.mark.parametrize("scope", ["group", "minibatch"])
@pytest.mark.parametrize("agg_mode", ["mean", "median", "winsorized_mean"])
def test_one_forward_gives_norms_and_the_opob_weighted_gradient(tied_model, scope, agg_mode, assembly):
    model, batch, grads = tied_model
    input_ids, attention_mask, position_ids, responses, response_mask = batch
    exact = agg_mode == "mean" and scope == "group"  # also exercise the exact-estimator weighting
    config = GradBaseliningConfig(scope=scope, agg_mode=agg_mode, use_clipped_is_ratios=exact,
                                  normalize_by_length=exact)
    gen = torch.Generator().manual_seed(11)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    values = rewards if scope == "group" else torch.randn(6, generator=gen)
    model.zero_grad(set_to_none=True)
    with PerTrajectoryGradNorms(model) as ghost:
        with ghost.capture(attention_mask):
            log_probs = response_log_probs(model, input_ids, attention_mask, position_ids, responses)
        deferred = assembly == "deferred"
        sq_norms = ghost.backward(trajectory_objective(log_probs, response_mask), retain_graph=not deferred,
                                  keep_factors=deferred)
        rollout = (log_probs.detach() + 0.3 * torch.randn(log_probs.shape, generator=gen)) * response_mask
        log_w = sequence_log_is_weight(log_probs.detach(), rollout, response_mask)
        w_trunc = log_w.exp().clamp(max=TIS_CLIP)
        lengths = response_mask.sum(-1)
        opob = compute_opob(config, values, sq_norms, log_w, w_trunc, lengths,
                            GROUP_IDS if scope == "group" else None)
        if deferred:
            ghost.accumulate_weighted_grads(opob_loss_coefficients(opob.coefficients, w_trunc, lengths, 6))
        else:
            opob_surrogate_loss(log_probs, response_mask, opob.coefficients, w_trunc, global_batch_size=6).backward()
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()

    # Independent computation from the brute-force per-sample gradients.
    sq = grads.pow(2).sum(-1).numpy()
    w, wt, length = log_w.double().exp().numpy(), w_trunc.double().numpy(), lengths.double().numpy()
    weights = (wt / length) ** 2 * sq if exact else w ** 2 * sq
    v = values.double().numpy()
    c = np.empty(6)
    scopes = [np.arange(0, 3), np.arange(3, 6)] if scope == "group" else [np.arange(6)]
    for members in scopes:
        b = _np_baseline(v[members], weights[members], agg_mode)
        std = v[members].std() if scope == "group" else 1.0
        c[members] = (v[members] - b) / (std if std > 1e-8 else 1.0)
    torch.testing.assert_close(opob.coefficients.double(), torch.from_numpy(c), rtol=1e-5, atol=1e-6)
    scores = grads * torch.from_numpy(wt / length)[:, None]  # s_i
    g = (torch.from_numpy(c)[:, None] * scores).sum(0) / 6
    assert ((got + g).norm() / g.norm()).item() < RTOL  # the loss gradient is -g


def test_deferred_factors_add_up_across_micro_batches(tied_model):
    """Two captured micro-batches, one accumulate_weighted_grads with k for all rows == Σ_i k_i ∇f_i."""
    model, batch, grads = tied_model
    k = torch.tensor([0.5, -1.0, 2.0, 0.25, -0.75, 1.5])
    model.zero_grad(set_to_none=True)
    with PerTrajectoryGradNorms(model) as ghost:
        for rows in (slice(0, 4), slice(4, 6)):
            part = [t[rows] for t in batch]
            with ghost.capture(part[1]):
                log_probs = response_log_probs(model, *part[:4])
            ghost.backward(trajectory_objective(log_probs, part[4]), keep_factors=True)
        with pytest.raises(ValueError, match="6 kept trajectories"):
            ghost.accumulate_weighted_grads(k[:4])
        ghost.accumulate_weighted_grads(k)
        with pytest.raises(RuntimeError, match="no stored factors"):
            ghost.accumulate_weighted_grads(k)
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
    expected = (k.double()[:, None] * grads).sum(0)
    assert ((got - expected).norm() / expected.norm()).item() < RTOL


def test_trajectory_objective_keeps_negative_token_weights():
    # f_i = sum_t w_it m_it log pi_it: a negative weight scales its token, it does not drop it.
    log_probs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    weights = torch.tensor([[2.0, -1.0, 5.0], [-3.0, 4.0, 1.0]])
    got = trajectory_objective(log_probs, mask, weights)
    torch.testing.assert_close(got, torch.tensor([2.0 * -1.0 + -1.0 * -2.0, -3.0 * -0.5 + 4.0 * -0.25]))
    torch.testing.assert_close(trajectory_objective(log_probs, mask), torch.tensor([-3.0, -0.75]))
