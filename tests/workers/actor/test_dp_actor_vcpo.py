"""VCPO inside DataParallelPPOActor.update_policy: with SGD the parameter update equals
-lr * scale * clip(g) where ESS, OPOB and g are computed independently from brute-force
per-trajectory gradients (unpadded, one trajectory at a time); batched == per_traj; the
non-finite rule; 2 gloo ranks equal one process; split groups are refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import Qwen2Config, Qwen2ForCausalLM

from verl.protocol import DataProto
from verl.utils import distributed as vd
from verl.utils.config import ConfigError
from verl.workers.actor.config import PolicyLossSpec, PolicyUpdateConfig
from verl.workers.actor.dp_actor import DataParallelPPOActor
from verl.workers.utils.vcpo import ESSScalingConfig, GradBaseliningConfig

torch.set_num_threads(1)

VOCAB, P, R, N, TEMPERATURE, LR, CAP = 64, 5, 6, 8, 0.9, 0.1, 1.2
UIDS = np.array(["a"] * 4 + ["b"] * 4, dtype=object)  # two GRPO groups of 4
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]


def make_model(seed: int = 0) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=True, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).float()


def make_batch(seed: int = 3) -> DataProto:
    """Left-padded prompts, right-padded responses of uneven length, perturbed rollout log-probs."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.zeros(N, P, dtype=torch.long)
    responses = torch.zeros(N, R, dtype=torch.long)
    response_mask = torch.zeros(N, R)
    for i in range(N):
        p_len, r_len = 1 + (i * 2) % P, 1 + (i * 5) % R
        prompts[i, P - p_len:] = torch.randint(1, VOCAB, (p_len,), generator=g)
        responses[i, :r_len] = torch.randint(1, VOCAB, (r_len,), generator=g)
        response_mask[i, :r_len] = 1.0
    attention_mask = torch.cat([(prompts != 0).long(), response_mask.long()], dim=1)
    true_logp = torch.stack([brute_force(make_model(), prompts, responses, response_mask, i)[0] for i in range(N)])
    rollout = (true_logp.float() + 0.25 * torch.randn(N, R, generator=g)) * response_mask
    rewards = torch.zeros(N, R)
    lengths = response_mask.sum(-1).long()
    rewards[torch.arange(N), lengths - 1] = torch.tensor(REWARDS)
    tensors = {
        "prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": attention_mask, "position_ids": torch.clamp(attention_mask.cumsum(-1) - 1, min=0),
        "response_mask": response_mask, "rollout_log_probs": rollout, "token_level_rewards": rewards,
        "advantages": torch.randn(N, 1, generator=g) * response_mask,
    }
    return DataProto.from_dict(tensors=tensors, non_tensors={"uid": UIDS.copy()},
                               meta_info={"temperature": TEMPERATURE})


def brute_force(model, prompts, responses, response_mask, i) -> tuple[torch.Tensor, torch.Tensor]:
    """Trajectory i alone, unpadded: (m_t log pi(y_t) [R] float64, zero-padded; grad of sum_t m_t log pi,
    flat). Tokens up to the last kept one are in the context; masked ones among them are not scored."""
    prompt = prompts[i][prompts[i] != 0]
    r_len = int(torch.nonzero(response_mask[i]).max()) + 1
    keep = response_mask[i, :r_len].double()
    ids = torch.cat([prompt, responses[i, :r_len]])[None]
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double() / TEMPERATURE
    logp = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None]).squeeze(-1) * keep
    grads = torch.autograd.grad(logp.sum(), list(model.parameters()))
    padded = torch.zeros(R, dtype=torch.float64)
    padded[:r_len] = logp.detach()
    return padded, torch.cat([gr.reshape(-1) for gr in grads]).double()


def independent_update(data: DataProto, ess_on: bool, scope: str | None, grad_clip: float | None = None,
                       model_seed: int = 0) -> dict[str, object]:
    """-lr * scale * clip(g) from the formulas of docs/vcpo.md, on brute-force per-trajectory gradients."""
    b = data.batch
    model = make_model(model_seed)
    per_traj = [brute_force(model, b["prompts"], b["responses"], b["response_mask"], i) for i in range(len(data))]
    logp = torch.stack([lp for lp, _ in per_traj])
    grads = torch.stack([gr for _, gr in per_traj])  # [N, params]
    mask = b["response_mask"].double()
    log_w = ((logp - b["rollout_log_probs"].double()) * mask).sum(-1)
    w = log_w.exp()
    w_trunc = w.clamp(max=CAP)
    lengths = mask.sum(-1)
    ess_ratio = float(w.sum() ** 2 / (w ** 2).sum()) / len(data)
    scale = math.sqrt(min(1.0, ess_ratio)) if ess_on else 1.0
    sq = grads.pow(2).sum(-1)
    # Each trajectory's outcome advantage: the mean over its kept tokens (it is constant on them).
    advantages = (b["advantages"].double() * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    baselines = torch.zeros(len(data), dtype=torch.float64)
    if scope is None:
        c = advantages
    else:
        weights = w ** 2 * sq  # the paper's W_i
        c = torch.empty(len(data), dtype=torch.float64)
        if scope == "group":
            rewards = torch.tensor(REWARDS, dtype=torch.float64)
            for uid in np.unique(UIDS):
                members = torch.from_numpy(UIDS == uid)
                base = (weights[members] * rewards[members]).sum() / weights[members].sum()
                std = rewards[members].std(unbiased=False)
                c[members] = (rewards[members] - base) / (std if std > 1e-8 else 1.0)
                baselines[members] = base
        else:
            base = (weights * advantages).sum() / weights.sum()
            c, baselines[:] = advantages - base, base
    g = (c[:, None] * (w_trunc / lengths)[:, None] * grads).sum(0) / len(data)
    norm = float(g.norm())
    clip = grad_clip if grad_clip is not None else 0.5 * norm  # clipping active by default
    delta = LR * scale * min(1.0, clip / (norm + 1e-6)) * g  # descent on the loss, whose gradient is -g
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    return {"params": before + delta, "delta": delta, "clip": clip, "ess_ratio": ess_ratio, "scale": scale,
            "traj_grad_norm_mean": float(sq.sqrt().mean()), "baseline_mean": float(baselines.mean())}


def vcpo_actor(model, ess_on: bool, scope: str | None, method: str = "batched", grad_clip: float = 1.0,
               mini: int = N, micro: int = 3, **ess_kwargs) -> DataParallelPPOActor:
    config = PolicyUpdateConfig(
        ppo_mini_batch_size=mini, ppo_micro_batch_size_per_gpu=micro, log_prob_micro_batch_size_per_gpu=micro,
        grad_clip=grad_clip, grad_norm_method=method,
        policy_loss=PolicyLossSpec(mode="bypass", tis_level="sequence", tis_cap=CAP),
        ess_scaling=ESSScalingConfig(enable=ess_on, **ess_kwargs),
        grad_baselining=GradBaseliningConfig(enable=scope is not None, scope=scope or "group"),
    )
    config.check_grad_baselining("actor_rollout_ref.actor.grad_baselining.enable")
    return DataParallelPPOActor(config, model, torch.optim.SGD(model.parameters(), lr=LR))


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()


def assert_update(model, expected) -> None:
    before = expected["params"] - expected["delta"]
    error = (flat(model) - before - expected["delta"]).norm() / expected["delta"].norm()
    assert error.item() < 1e-5


@pytest.mark.parametrize("ess_on,scope", [(True, None), (False, "group"), (False, "minibatch"),
                                          (True, "group"), (True, "minibatch")])
def test_update_equals_independent_vcpo_step_and_methods_agree(ess_on, scope):
    data = make_batch()
    expected = independent_update(data, ess_on, scope)
    methods = ("batched", "per_traj") if scope else ("batched",)
    params = {}
    for method in methods:
        model = make_model()
        metrics = vcpo_actor(model, ess_on, scope, method, grad_clip=expected["clip"]).update_policy(data)
        assert_update(model, expected)
        params[method] = flat(model)
        assert metrics["actor/ess_ratio"] == pytest.approx(expected["ess_ratio"], rel=1e-5)
        assert metrics["actor/lr_scale"] == pytest.approx(expected["scale"], rel=1e-5)
        assert metrics["actor/lr"] == pytest.approx(LR * expected["scale"], rel=1e-5)
        assert metrics["actor/skipped_steps"] == 0.0 and metrics["actor/nonfinite_count"] == 0.0
        if scope:
            assert metrics["actor/traj_grad_norm_mean"] == pytest.approx(expected["traj_grad_norm_mean"], rel=1e-4)
            assert metrics["actor/opob_baseline_mean"] == pytest.approx(expected["baseline_mean"], rel=1e-4, abs=1e-6)
            assert sum(v for k, v in metrics.items() if k.startswith("actor/traj_grad_norm_hist/")) == N
    if scope:
        assert ((params["batched"] - params["per_traj"]).norm() / expected["delta"].norm()).item() < 1e-5
    assert 0.0 < expected["ess_ratio"] < 0.95  # the scaling did something


def test_minibatch_scope_reads_the_advantage_of_a_trajectory_whose_first_token_is_masked():
    # A masked gap at the start of a response: the trajectory's advantage lives on its kept tokens
    # only, and the minibatch baseline must still use it (reading position 0 would give 0).
    data = make_batch()
    b = data.batch
    i = int(torch.nonzero(b["response_mask"].sum(-1) >= 2)[0])
    b["response_mask"][i, 0] = 0.0
    b["advantages"][i, 0] = 0.0
    b["rollout_log_probs"][i, 0] = 0.0
    assert b["advantages"][i, 1] != 0.0
    expected = independent_update(data, False, "minibatch")
    for method in ("batched", "per_traj"):
        model = make_model()
        metrics = vcpo_actor(model, False, "minibatch", method, grad_clip=expected["clip"]).update_policy(data)
        assert_update(model, expected)
        assert metrics["actor/opob_baseline_mean"] == pytest.approx(expected["baseline_mean"], rel=1e-4, abs=1e-6)


def test_lr_scale_applies_to_one_step_and_scheduler_lr_is_restored():
    data = make_batch()
    model = make_model()
    actor = vcpo_actor(model, True, None, grad_clip=1e9, mini=4, micro=4)
    metrics = actor.update_policy(data)  # two mini-batches, two scaled steps
    assert actor.optimizer.param_groups[0]["lr"] == LR
    assert 0 < metrics["actor/lr"] < LR and metrics["actor/lr"] == pytest.approx(LR * metrics["actor/lr_scale"])


def test_ess_counts_only_trajectories_with_response_tokens():
    """Issue 15, edge case 6: a row without response tokens (log w = 0 by the empty sum) is not a
    trajectory the loss trains on, so it must not enter the ESS as w = 1."""
    data = make_batch()
    data.batch["response_mask"][5] = 0.0
    data.batch["advantages"][5] = 0.0
    model = make_model()
    metrics = vcpo_actor(model, True, None, grad_clip=1e9).update_policy(data)
    b = data.batch
    logp = torch.stack([brute_force(make_model(), b["prompts"], b["responses"], b["response_mask"], i)[0]
                        if i != 5 else torch.zeros(R, dtype=torch.float64) for i in range(N)])
    mask = b["response_mask"].double()
    w = ((logp - b["rollout_log_probs"].double()) * mask).sum(-1).exp()[mask.sum(-1) > 0]
    expected = float(w.sum() ** 2 / (w ** 2).sum()) / (N - 1)
    assert metrics["actor/ess_ratio"] == pytest.approx(expected, rel=1e-5)
    with_empty_row = float((torch.cat([w, w.new_ones(1)]).sum() ** 2 / (torch.cat([w, w.new_ones(1)]) ** 2).sum()) / N)
    assert abs(with_empty_row - expected) > 1e-3  # what counting it as w = 1 gave


def test_nan_behaviour_log_prob_skips_the_step_and_is_counted():
    data = make_batch()
    data.batch["rollout_log_probs"][2, 0] = float("nan")
    model = make_model()
    before = flat(model)
    metrics = vcpo_actor(model, True, "group").update_policy(data)
    assert torch.equal(flat(model), before)
    assert metrics["actor/skipped_steps"] == 1.0 and metrics["actor/lr"] == 0.0
    assert metrics["actor/lr_scale"] == 0.0 and metrics["actor/nonfinite_count"] == 1.0


def test_nonfinite_ess_with_min_lr_rule_trains_at_the_minimum_lr_never_full():
    """ESS only, no TIS in the loss (so the gradient stays finite): NaN ESS -> rho = 1/B."""
    data = make_batch()
    data.batch["rollout_log_probs"][5, 0] = float("nan")
    model = make_model()
    config = PolicyUpdateConfig(ppo_mini_batch_size=N, ppo_micro_batch_size_per_gpu=N, grad_clip=1e9,
                                policy_loss=PolicyLossSpec(mode="bypass", tis_level="none"),
                                ess_scaling=ESSScalingConfig(enable=True, nonfinite_rule="min_lr"))
    actor = DataParallelPPOActor(config, model, torch.optim.SGD(model.parameters(), lr=LR))
    metrics = actor.update_policy(data)
    assert metrics["actor/lr"] == pytest.approx(LR * math.sqrt(1 / N))
    assert metrics["actor/skipped_steps"] == 0.0 and metrics["actor/nonfinite_count"] == 1.0


def test_infinite_log_weight_gives_the_one_dominating_trajectory_limit():
    """mu(y) = 0 on a sampled token: log w = +inf, ESS := 1 (rho = 1/B), w~ = C still trains."""
    data = make_batch()
    data.batch["rollout_log_probs"][4, 0] = -float("inf")
    metrics = vcpo_actor(make_model(), True, "group").update_policy(data)
    assert metrics["actor/ess_ratio"] == pytest.approx(1 / N)
    assert metrics["actor/lr"] == pytest.approx(LR * math.sqrt(1 / N))
    assert metrics["actor/nonfinite_count"] == 1.0 and metrics["actor/skipped_steps"] == 0.0


def test_group_split_across_mini_batches_is_refused():
    data = make_batch()
    data.non_tensor_batch["uid"] = np.array(["a", "b"] * 4, dtype=object)
    with pytest.raises(ConfigError, match="actor_rollout_ref.actor.grad_baselining.scope") as info:
        vcpo_actor(make_model(), False, "group", mini=4, micro=4).update_policy(data)
    assert "scope=minibatch" in str(info.value)
    # the same batch trains in minibatch scope
    vcpo_actor(make_model(), False, "minibatch", mini=4, micro=4).update_policy(data)


# ------------------------------------------------------------------ data parallel


def _rows(data: DataProto, index: slice) -> DataProto:
    return DataProto.from_dict(tensors={k: v[index] for k, v in data.batch.items()},
                               non_tensors={k: v[index] for k, v in data.non_tensor_batch.items()},
                               meta_info=dict(data.meta_info))


def _dp_worker(rank: int, world_size: int, port: int, clip: float, out_dir: str) -> None:
    torch.set_num_threads(1)
    vd.init_process_group("gloo", rank, world_size, master_port=port)
    try:
        data = make_batch()
        shard = _rows(data, slice(rank * 4, (rank + 1) * 4))  # group "a" on rank 0, "b" on rank 1
        out: dict[str, object] = {}
        for scope in ("group", "minibatch"):
            model = make_model()
            metrics = vcpo_actor(model, True, scope, grad_clip=clip).update_policy(shard)
            out[scope] = {"params": flat(model), "metrics": metrics}
        split = make_batch()
        split.non_tensor_batch["uid"] = np.array(["a", "b"] * 4, dtype=object)
        try:
            vcpo_actor(make_model(), True, "group").update_policy(_rows(split, slice(rank * 4, (rank + 1) * 4)))
            out["split_error"] = ""
        except ConfigError as err:
            out["split_error"] = str(err)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path):
    data = make_batch()
    clip = independent_update(data, True, "group")["clip"]
    mp.spawn(_dp_worker, args=(2, vd.find_free_port(), clip, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for scope in ("group", "minibatch"):
        model = make_model()
        single = vcpo_actor(model, True, scope, grad_clip=clip).update_policy(data)
        expected = independent_update(data, True, scope, grad_clip=clip)
        change = (flat(model) - flat(make_model())).norm()
        for out in ranks:
            got = out[scope]
            assert ((got["params"] - flat(model)).norm() / change).item() < 1e-6
            for key in ("actor/ess", "actor/ess_ratio", "actor/ess_ratio_clipped", "actor/lr",
                        "actor/traj_grad_norm_mean", "actor/opob_baseline_mean", "actor/opob_baseline_std",
                        "actor/rollout_kl_k3", "actor/is_weight_mean"):
                assert got["metrics"][key] == pytest.approx(single[key], rel=1e-5, abs=1e-7), key
        assert single["actor/ess_ratio"] == pytest.approx(expected["ess_ratio"], rel=1e-5)
        assert_update(model, expected)
    for out in ranks:
        assert "actor_rollout_ref.actor.grad_baselining.scope" in out["split_error"] and "split" in out["split_error"]
