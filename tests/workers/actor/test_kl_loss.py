"""The KL-to-reference loss term in the torch actor: its gradient against a brute-force autograd
computation (one unpadded trajectory at a time), with and without OPOB; the reference policy of
ActorWorker (frozen, equal to the starting weights); a large kl_loss_coef keeps the policy closer
to the reference than no KL term."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from verl.models.presets import build_tiny_model_dir
from verl.protocol import DataProto
from verl.workers.actor.config import OptimConfig, PolicyLossSpec, PolicyUpdateConfig
from verl.workers.actor.dp_actor import DataParallelPPOActor
from verl.workers.utils.vcpo import GradBaseliningConfig

torch.set_num_threads(1)

VOCAB, P, R, N, TEMPERATURE, LR, COEF = 64, 5, 6, 6, 0.9, 0.1, 0.7


def make_model(seed: int = 0) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=True, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).float()


def trajectory_log_probs(model, batch: dict, i: int) -> torch.Tensor:
    """log pi of trajectory i's response tokens from an unpadded forward of it alone, float64, with grad."""
    prompt = batch["prompts"][i][batch["prompts"][i] != 0]
    length = int(batch["response_mask"][i].sum())
    ids = torch.cat([prompt, batch["responses"][i, :length]])[None]
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double() / TEMPERATURE
    return torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None]).squeeze(-1)


def make_batch(seed: int = 2) -> DataProto:
    g = torch.Generator().manual_seed(seed)
    prompts = torch.zeros(N, P, dtype=torch.long)
    responses = torch.zeros(N, R, dtype=torch.long)
    mask = torch.zeros(N, R)
    for i in range(N):
        p_len, r_len = 1 + (i * 2) % P, 1 + (i * 5) % R
        prompts[i, P - p_len:] = torch.randint(1, VOCAB, (p_len,), generator=g)
        responses[i, :r_len] = torch.randint(1, VOCAB, (r_len,), generator=g)
        mask[i, :r_len] = 1.0
    attention_mask = torch.cat([(prompts != 0).long(), mask.long()], dim=1)
    tensors = {"prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
               "attention_mask": attention_mask, "position_ids": torch.clamp(attention_mask.cumsum(-1) - 1, min=0),
               "response_mask": mask}
    with torch.no_grad():
        true_logp = torch.zeros(N, R)
        for i in range(N):
            true_logp[i, :int(mask[i].sum())] = trajectory_log_probs(make_model(), tensors, i).float()
    # A reference and a behaviour policy that differ from the current weights token by token.
    tensors["ref_log_prob"] = (true_logp + 0.4 * torch.randn(N, R, generator=g)) * mask
    tensors["rollout_log_probs"] = (true_logp + 0.2 * torch.randn(N, R, generator=g)) * mask
    tensors["advantages"] = torch.randn(N, 1, generator=g) * mask
    return DataProto.from_dict(tensors=tensors, meta_info={"temperature": TEMPERATURE})


def kl_by_hand(log_prob: torch.Tensor, ref: torch.Tensor, estimator: str) -> torch.Tensor:
    """The per-token estimator written out (the '+' variants: value of X, gradient of d^2 / 2)."""
    d = log_prob - ref
    values = {"k1": d, "abs": d.abs(), "k2": 0.5 * d * d,
              "k3": torch.clamp(torch.exp(-d.clamp(-20, 20)) + d.clamp(-20, 20) - 1, -10, 10)}
    if estimator.endswith("+"):
        k2 = 0.5 * d * d
        return k2 - k2.detach() + values[estimator[:-1]].detach()
    return values[estimator]


NAMES = {"low_var_kl": "k3", "kl": "k1", "abs": "abs", "mse": "k2", "low_var_kl+": "k3+", "k1+": "k1+"}


class RecordingSGD(torch.optim.SGD):
    def step(self, closure=None):
        self.recorded = [p.grad.detach().clone() for group in self.param_groups for p in group["params"]]
        return super().step(closure)


def make_actor(model, **overrides) -> DataParallelPPOActor:
    config = PolicyUpdateConfig(ppo_mini_batch_size=N, ppo_micro_batch_size_per_gpu=4,
                                log_prob_micro_batch_size_per_gpu=4, grad_clip=1e9, **overrides)
    return DataParallelPPOActor(config, model, RecordingSGD(model.parameters(), lr=LR))


def brute_force_kl_term(model, b: dict, estimator: str) -> torch.Tensor:
    """(1/B) sum_i (1/L_i) sum_t kl(log pi_it, log ref_it): seq-mean-token-mean, trajectory by trajectory."""
    terms = []
    for i in range(N):
        length = int(b["response_mask"][i].sum())
        logp = trajectory_log_probs(model, b, i)
        terms.append(kl_by_hand(logp, b["ref_log_prob"][i, :length].double(), estimator).mean())
    return torch.stack(terms).mean()


@pytest.mark.parametrize("estimator", list(NAMES))
def test_kl_loss_gradient_equals_brute_force(estimator):
    """Bypass loss + KL: grad of (1/B) sum_i (1/L_i) sum_t [-A_i log pi_it + coef * kl_it]."""
    data = make_batch()
    model, reference = make_model(), make_model()
    actor = make_actor(model, use_kl_loss=True, kl_loss_coef=COEF, kl_loss_type=estimator)
    metrics = actor.update_policy(data)

    b = data.batch
    pg_terms = []
    for i in range(N):
        logp = trajectory_log_probs(reference, b, i)
        pg_terms.append((-b["advantages"][i, 0].double() * logp).mean())
    kl_term = brute_force_kl_term(reference, b, NAMES[estimator])
    (torch.stack(pg_terms).mean() + COEF * kl_term).backward()
    for recorded, p in zip(actor.optimizer.recorded, reference.parameters()):
        torch.testing.assert_close(recorded.double(), p.grad.double(), rtol=1e-5, atol=1e-7)
    assert metrics["actor/kl_loss"] == pytest.approx(kl_term.item(), rel=1e-5, abs=1e-7)
    assert metrics["actor/kl_coef"] == COEF
    assert metrics["actor/loss"] == pytest.approx(metrics["actor/pg_loss"] + COEF * metrics["actor/kl_loss"], abs=1e-6)


@pytest.mark.parametrize("method", ["batched", "per_traj"])
def test_opob_with_kl_adds_exactly_the_kl_gradient(method):
    """OPOB baselines the policy gradient only: its update with the KL term minus its update
    without it equals coef * the brute-force gradient of the KL term."""
    data = make_batch()
    loss = PolicyLossSpec(mode="bypass", tis_level="sequence", tis_cap=1.2)
    opob = GradBaseliningConfig(enable=True, scope="minibatch")
    grads = {}
    for use_kl in (False, True):
        actor = make_actor(make_model(), policy_loss=loss, grad_baselining=opob, grad_norm_method=method,
                           use_kl_loss=use_kl, kl_loss_coef=COEF, kl_loss_type="low_var_kl")
        metrics = actor.update_policy(data)
        grads[use_kl] = actor.optimizer.recorded
    reference = make_model()
    (COEF * brute_force_kl_term(reference, data.batch, "k3")).backward()
    for with_kl, without, p in zip(grads[True], grads[False], reference.parameters()):
        torch.testing.assert_close((with_kl - without).double(), p.grad.double(), rtol=1e-4, atol=1e-7)
    assert metrics["actor/kl_loss"] > 0.0


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    return build_tiny_model_dir(str(tmp_path_factory.mktemp("kl") / "model"), preset="tiny", seed=0)


def worker_batch(vocab: int, seed: int = 4, n: int = 8) -> DataProto:
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, vocab, (n, P), generator=g)
    responses = torch.randint(1, vocab, (n, R), generator=g)
    mask = torch.ones(n, R)
    mask[::3, R - 2:] = 0.0
    attention_mask = torch.cat([torch.ones(n, P, dtype=torch.long), mask.long()], dim=1)
    tensors = {"prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
               "attention_mask": attention_mask, "position_ids": torch.clamp(attention_mask.cumsum(-1) - 1, min=0),
               "response_mask": mask, "advantages": torch.randn(n, 1, generator=g) * mask}
    return DataProto.from_dict(tensors=tensors, meta_info={"temperature": 1.0})


def exact_kl_to_reference(worker, data: DataProto) -> float:
    """Mean over response positions of KL(pi || pi_ref) over the whole vocabulary."""
    b = data.batch
    with torch.no_grad():
        logits = [m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]).logits
                  for m in (worker.module, worker.ref_actor.module)]
    log_p, log_ref = (torch.log_softmax(x[:, P - 1:-1].double(), -1) for x in logits)
    per_position = (log_p.exp() * (log_p - log_ref)).sum(-1)
    return float((per_position * b["response_mask"]).sum() / b["response_mask"].sum())


def test_worker_reference_is_frozen_and_a_large_kl_coef_stays_closer(tiny_model_dir):
    from verl.workers.actor_worker import ActorWorker

    data = worker_batch(vocab=64)
    kl_after = {}
    for coef in (0.0, 2.0):
        config = PolicyUpdateConfig(ppo_mini_batch_size=8, ppo_micro_batch_size_per_gpu=4,
                                    log_prob_micro_batch_size_per_gpu=4, optim=OptimConfig(lr=3e-3, weight_decay=0.0),
                                    use_kl_loss=True, kl_loss_coef=coef, kl_loss_type="low_var_kl",
                                    ref_log_prob_micro_batch_size_per_gpu=3)
        worker = ActorWorker(tiny_model_dir, config, total_training_steps=10, seed=0)
        ref_before = worker.compute_ref_log_prob(data).batch["ref_log_prob"]
        start = worker.compute_log_prob(data).batch["old_log_probs"]
        torch.testing.assert_close(ref_before, start, rtol=0, atol=1e-6)  # pi_ref = the starting weights
        for _ in range(8):
            batch = data.union(worker.compute_ref_log_prob(data))
            metrics = worker.update_policy(batch)
        assert torch.equal(worker.compute_ref_log_prob(data).batch["ref_log_prob"], ref_before)  # frozen
        assert not torch.equal(worker.compute_log_prob(data).batch["old_log_probs"], start)  # the actor moved
        assert all(not p.requires_grad for p in worker.ref_actor.module.parameters())
        assert math.isfinite(metrics["actor/kl_loss"])
        kl_after[coef] = exact_kl_to_reference(worker, data)
    assert kl_after[0.0] > 0.01
    assert kl_after[2.0] < 0.5 * kl_after[0.0], kl_after
