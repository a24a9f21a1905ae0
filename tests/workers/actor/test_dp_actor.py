"""DataParallelPPOActor on a tiny Qwen2: log-probs vs an independent HF forward, gradients vs an
independent loss, micro-batching and 2-rank gloo data parallelism vs one process, skip rule."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import Qwen2Config, Qwen2ForCausalLM

from verl.protocol import DataProto
from verl.trainer.ppo.core_algos import LOSS_AGG_MODES
from verl.utils import distributed as vd
from verl.utils.config import ConfigError
from verl.workers.actor.config import OptimConfig, PolicyLossSpec, PolicyUpdateConfig
from verl.workers.actor.dp_actor import (
    DataParallelPPOActor,
    _reduce_history,
    build_optimizer_and_scheduler,
    lr_schedule_factor,
)

torch.set_num_threads(1)

VOCAB, P, R, TEMPERATURE = 64, 6, 5, 0.7


def make_model(seed: int = 0) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=True, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).float()


def reference_log_probs(model, batch: dict, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Full-sequence HF forward, float64 log_softmax, response tokens read at positions P-1+t."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    logp = torch.log_softmax(logits[:, P - 1 : P + R - 1].double() / temperature, dim=-1)
    return logp.gather(-1, batch["responses"][..., None]).squeeze(-1)


def rows(data: DataProto, index) -> DataProto:
    return DataProto.from_dict(tensors={k: v[index] for k, v in data.batch.items()}, meta_info=data.meta_info)


def make_batch(n: int = 7, seed: int = 1) -> DataProto:
    """Left-padded prompts, right-padded responses (uneven lengths), perturbed rollout log-probs."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.zeros(n, P, dtype=torch.long)
    responses = torch.zeros(n, R, dtype=torch.long)
    response_mask = torch.zeros(n, R)
    for i in range(n):
        p_len = 1 + (i * 2) % P
        r_len = 1 + (i * 3) % R
        prompts[i, P - p_len :] = torch.randint(1, VOCAB, (p_len,), generator=g)
        responses[i, :r_len] = torch.randint(1, VOCAB, (r_len,), generator=g)
        response_mask[i, :r_len] = 1.0
    attention_mask = torch.cat([(prompts != 0).long(), response_mask.long()], dim=1)
    tensors = {
        "prompts": prompts,
        "responses": responses,
        "input_ids": torch.cat([prompts, responses], dim=1),
        "attention_mask": attention_mask,
        "position_ids": torch.clamp(attention_mask.cumsum(-1) - 1, min=0),
        "response_mask": response_mask,
    }
    with torch.no_grad():
        true_logp = reference_log_probs(make_model(0), tensors).float()
    noise = 0.3 * torch.randn(n, R, generator=g)
    tensors["rollout_log_probs"] = (true_logp + noise) * response_mask
    tensors["advantages"] = torch.randn(n, 1, generator=g) * response_mask
    return DataProto.from_dict(tensors=tensors, meta_info={"temperature": TEMPERATURE})


class RecordingSGD(torch.optim.SGD):
    """Plain SGD that also keeps a copy of the gradients it was asked to apply."""

    def step(self, closure=None):
        self.recorded = [p.grad.detach().clone() for group in self.param_groups for p in group["params"]]
        return super().step(closure)


def make_actor(model, mini=7, micro=7, lr=0.1, grad_clip=1e9, **overrides) -> DataParallelPPOActor:
    """SGD actor; bypass loss with sequence TIS (cap 1.2, so some weights are truncated) by default."""
    default_loss = PolicyLossSpec(mode="bypass", tis_level="sequence", tis_cap=1.2)
    config = PolicyUpdateConfig(
        ppo_mini_batch_size=mini,
        ppo_micro_batch_size_per_gpu=micro,
        log_prob_micro_batch_size_per_gpu=micro,
        grad_clip=grad_clip,
        policy_loss=overrides.pop("policy_loss", default_loss),
        **overrides,
    )
    return DataParallelPPOActor(config, model, RecordingSGD(model.parameters(), lr=lr))


# ------------------------------------------------------------------ log-probs


def test_compute_log_prob_matches_independent_hf_forward():
    data = make_batch()
    model = make_model()
    actor = make_actor(model, micro=3)  # 3 + 3 + 1 rows
    log_probs, entropy = actor.compute_log_prob(data, calculate_entropy=True)
    with torch.no_grad():
        expected = reference_log_probs(model, data.batch)
        b = data.batch
        logits = model(b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]).logits
        logits = logits[:, P - 1 : P + R - 1].double() / TEMPERATURE
    mask = data.batch["response_mask"] > 0
    assert log_probs.dtype == torch.float32 and log_probs.shape == (7, R)
    torch.testing.assert_close(log_probs.double()[mask], expected[mask], rtol=0, atol=1e-6)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy.double()[mask], -(p * p.log()).sum(-1)[mask], rtol=0, atol=1e-5)
    assert actor.compute_log_prob(data)[1] is None


def test_compute_log_prob_is_independent_of_padding():
    """Each trajectory scored alone, unpadded, gives the same log-probs as the padded batch."""
    data = make_batch()
    model = make_model()
    log_probs, _ = make_actor(model).compute_log_prob(data)
    for i in range(len(data)):
        prompt = data.batch["prompts"][i][data.batch["prompts"][i] != 0]
        r_len = int(data.batch["response_mask"][i].sum())
        ids = torch.cat([prompt, data.batch["responses"][i, :r_len]])[None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double() / TEMPERATURE
        alone = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None]).squeeze(-1)
        torch.testing.assert_close(log_probs[i, :r_len].double(), alone, rtol=0, atol=1e-5)


def test_missing_temperature_is_an_error():
    data = make_batch()
    data.meta_info.clear()
    with pytest.raises(KeyError, match="temperature"):
        make_actor(make_model()).compute_log_prob(data)


# ------------------------------------------------------------------ gradients


def test_bypass_update_gradient_equals_independent_vcpo_loss():
    """grad of (1/B) sum_i -(w~_i / L_i) sum_t A_i log pi(y_t), w~ = min(exp(sum_t log pi - log mu), 1.2)."""
    data = make_batch()
    model = make_model()
    reference = copy.deepcopy(model)
    actor = make_actor(model, micro=2)
    metrics = actor.update_policy(data)

    b = data.batch
    logp = reference_log_probs(reference, b).float()
    mask = b["response_mask"]
    log_w = ((logp.detach() - b["rollout_log_probs"]) * mask).sum(-1)
    w = torch.clamp(torch.exp(log_w), max=1.2)
    loss = (-(w[:, None] * b["advantages"] * logp * mask).sum(-1) / mask.sum(-1)).mean()
    loss.backward()
    for recorded, p in zip(actor.optimizer.recorded, reference.parameters()):
        torch.testing.assert_close(recorded, p.grad, rtol=1e-5, atol=1e-7)
    # the reported loss is the value of the (ratio = 1) surrogate: -(1/B) sum_i w~_i A_i
    expected_value = (-(w[:, None] * b["advantages"] * mask).sum(-1) / mask.sum(-1)).mean()
    assert metrics["actor/pg_loss"] == pytest.approx(expected_value.item(), abs=1e-6)
    truncated = (log_w > torch.log(torch.tensor(1.2))).float().mean().item()
    assert 0 < truncated < 1 and metrics["actor/is_weight_truncated_frac"] == pytest.approx(truncated)
    assert metrics["actor/skipped_steps"] == 0.0 and metrics["actor/lr"] == 0.1


@pytest.mark.parametrize("agg_mode", LOSS_AGG_MODES)
def test_micro_batch_accumulation_equals_one_big_batch(agg_mode):
    data = make_batch()
    grads = {}
    for micro in (7, 2):
        actor = make_actor(make_model(), micro=micro, loss_agg_mode=agg_mode, entropy_coeff=0.01,
                           policy_loss=PolicyLossSpec(mode="ppo_clip", tis_level="token", tis_cap=1.2))
        metrics = actor.update_policy(data)
        grads[micro] = actor.optimizer.recorded
    for big, small in zip(grads[7], grads[2]):
        torch.testing.assert_close(small, big, rtol=1e-5, atol=1e-7)
    assert metrics["actor/entropy"] > 0


def test_step_optimizer_scales_lr_for_one_step_and_clips():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    actor = DataParallelPPOActor(PolicyUpdateConfig(grad_clip=1.0), model, optimizer)
    model.weight.grad = torch.tensor([[6.0, 8.0]])  # norm 10 -> clipped to norm 1
    grad_norm, lr = actor.step_optimizer(lr_scale=0.25)
    assert grad_norm == pytest.approx(10.0) and lr == pytest.approx(0.025)
    scale = 1.0 / (10.0 + 1e-6)
    expected = torch.tensor([[1.0 - 0.025 * 6 * scale, 2.0 - 0.025 * 8 * scale]])
    torch.testing.assert_close(model.weight.detach(), expected, rtol=0, atol=1e-7)
    assert actor.optimizer.param_groups[0]["lr"] == 0.1 and model.weight.grad is None


def test_nan_loss_skips_the_step_and_is_counted():
    """Mini-batch 1 carries a NaN advantage: its step is skipped; mini-batch 2 still applies, so
    the result equals training on mini-batch 2 alone."""
    data = make_batch(n=8)
    data.batch["advantages"][1, 0] = float("nan")
    model = make_model()
    actor = make_actor(model, mini=4, micro=4)
    before = [p.detach().clone() for p in model.parameters()]
    actor.update_policy(rows(data, slice(0, 4)))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())

    both = make_model()
    metrics = make_actor(both, mini=4, micro=4).update_policy(data)
    assert metrics["actor/skipped_steps"] == 1.0 and "actor/grad_norm" in metrics
    alone = make_model()
    make_actor(alone, mini=4, micro=4).update_policy(rows(data, slice(4, 8)))
    for a, b in zip(both.parameters(), alone.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_shuffle_equals_training_on_the_permuted_batch():
    data = make_batch(n=8)
    torch.manual_seed(5)
    shuffled = make_model()  # make_model reseeds; the actor's shuffle seed comes from the last manual_seed
    torch.manual_seed(5)
    make_actor(shuffled, mini=4, micro=4, shuffle=True).update_policy(data)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(5))
    plain = make_model()
    make_actor(plain, mini=4, micro=4).update_policy(rows(data, perm))
    for a, b in zip(shuffled.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mini_batch_must_divide_the_batch():
    with pytest.raises(ConfigError, match="ppo_mini_batch_size"):
        make_actor(make_model(), mini=3).update_policy(make_batch(n=7))


def test_get_weights_are_hf_named_state():
    model = make_model()
    weights = make_actor(model).get_weights()
    assert set(weights) == set(model.state_dict()) and "lm_head.weight" in weights
    assert torch.equal(weights["model.embed_tokens.weight"], model.model.embed_tokens.weight.detach())


# ------------------------------------------------------------------ optimizer / schedule


def test_lr_schedule_factor_matches_formulas():
    assert [lr_schedule_factor(s, "constant", 4, 10, 0.0) for s in (0, 3, 4, 9)] == [0.25, 1.0, 1.0, 1.0]
    # linear after 2 warmup steps over 10: p = (s - 2) / 8
    assert lr_schedule_factor(6, "linear", 2, 10, 0.2) == pytest.approx(1 - 0.8 * 0.5)
    assert lr_schedule_factor(6, "cosine", 2, 10, 0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    assert lr_schedule_factor(50, "cosine", 2, 10, 0.2) == pytest.approx(0.2)


def test_build_optimizer_and_scheduler_steps_the_schedule():
    model = torch.nn.Linear(2, 2)
    optim_config = OptimConfig(lr=1e-2, lr_decay_style="cosine", lr_warmup_steps=1, weight_decay=0.1)
    optimizer, scheduler = build_optimizer_and_scheduler(model, optim_config, total_steps=5)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 0.1
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1e-2 * lr_schedule_factor(s, "cosine", 1, 5, 0.0) for s in range(6)]
    assert lrs == pytest.approx(expected) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    # lr_decay_steps, when set, is the decay length whatever the run's steps.
    fixed = OptimConfig(lr=1e-2, lr_decay_style="cosine", lr_warmup_steps=1, lr_decay_steps=3)
    optimizer, scheduler = build_optimizer_and_scheduler(model, fixed, total_steps=100)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1e-2 * lr_schedule_factor(s, "cosine", 1, 3, 0.0) for s in range(4)])
    # A decaying schedule with no length from either source is a config error.
    with pytest.raises(ConfigError, match="lr_decay_steps"):
        build_optimizer_and_scheduler(model, optim_config)


# ------------------------------------------------------------------ data parallel


def _dp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    vd.init_process_group("gloo", rank, world_size, master_port=port)
    try:
        data = make_batch(n=8)
        shard = rows(data, slice(rank * 4, (rank + 1) * 4))
        results = {}
        for agg_mode in ("token-mean", "seq-mean-token-mean"):
            model = make_model()
            actor = make_actor(model, mini=8, micro=3, loss_agg_mode=agg_mode)
            metrics = actor.update_policy(shard)
            results[agg_mode] = {"grads": actor.optimizer.recorded,
                                 "params": [p.detach().clone() for p in model.parameters()],
                                 "loss": metrics["actor/loss"]}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path):
    mp.spawn(_dp_worker, args=(2, vd.find_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    data = make_batch(n=8)
    for agg_mode in ("token-mean", "seq-mean-token-mean"):
        model = make_model()
        actor = make_actor(model, mini=8, micro=8, loss_agg_mode=agg_mode)
        metrics = actor.update_policy(data)
        for out in ranks:
            for dp_grad, grad in zip(out[agg_mode]["grads"], actor.optimizer.recorded):
                torch.testing.assert_close(dp_grad, grad, rtol=1e-5, atol=1e-7)
            for dp_param, param in zip(out[agg_mode]["params"], model.parameters()):
                torch.testing.assert_close(dp_param, param.detach(), rtol=0, atol=1e-6)
            assert out[agg_mode]["loss"] == pytest.approx(metrics["actor/loss"], abs=1e-6)


def test_metrics_of_several_optimizer_steps_keep_minima_maxima_and_counts():
    # Two mini-batches: a minimum is the smaller of the two (not their mean, which read 0.52 where
    # the true minimum was 0.365), a maximum the larger, counts add up, the rest is averaged.
    out = _reduce_history({"opob_baseline_min": [0.682, 0.365], "opob_baseline_max": [1.0, 2.5],
                           "skipped_steps": [0.0, 1.0], "nonfinite_count": [2.0, 3.0],
                           "traj_grad_norm_hist/1e0": [4.0, 5.0], "pg_loss": [1.0, 3.0]})
    assert out == {"opob_baseline_min": 0.365, "opob_baseline_max": 2.5, "skipped_steps": 1.0,
                   "nonfinite_count": 5.0, "traj_grad_norm_hist/1e0": 9.0, "pg_loss": 2.0}
