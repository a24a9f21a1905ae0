"""MegatronPPOActor equals the torch actor: under TP=2 x SP x DP=2, CP=2 x DP=2 and PP=2 x DP=2
(gloo, 4 ranks) its log-probs, entropies, one VCPO update (bypass + sequence TIS + ESS-scaled lr +
group-scope OPOB with batched or per-trajectory gradient norms, SGD, stale behaviour log-probs;
under TP=2 also with the KL-to-reference loss added)
and the step's metrics match DataParallelPPOActor run in one process on the whole batch; a NaN
behaviour log-prob skips the step on every rank; the MegatronActorWorker's checkpoint round trip
(distributed Adam) reproduces the next update exactly.

One spawn of 4 ranks runs every layout in turn (Megatron is re-initialised between them): the
import of megatron.core + transformers per rank costs more than all the computations together."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.megatron_launch import run_ranks
from verl.models.presets import build_tiny_model_dir
from verl.protocol import DataProto
from verl.trainer.config import load_config
from verl.utils.config import ConfigError
from verl.workers.actor.config import OptimConfig, PolicyLossSpec, PolicyUpdateConfig
from verl.workers.utils.vcpo import ESSScalingConfig, GradBaseliningConfig

torch.set_num_threads(1)

P, R, N, TEMPERATURE, LR, CAP, CLIP = 6, 7, 8, 0.9, 0.5, 1.5, 5.0
UIDS = np.array(["a"] * 4 + ["b"] * 4, dtype=object)  # one GRPO group per data-parallel rank
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def vcpo_config(**overrides) -> PolicyUpdateConfig:
    config = PolicyUpdateConfig(
        strategy="megatron", ppo_mini_batch_size=N, ppo_micro_batch_size_per_gpu=2,
        log_prob_micro_batch_size_per_gpu=2, grad_clip=CLIP,
        policy_loss=PolicyLossSpec(mode="bypass", tis_level="sequence", tis_cap=CAP),
        optim=OptimConfig(lr=LR, weight_decay=0.0),  # the torch reference runs plain SGD
        ess_scaling=ESSScalingConfig(enable=True),
        grad_baselining=GradBaseliningConfig(enable=True, scope="group", norm_by_std=True),
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def make_batch(model_dir: str, seed: int = 3) -> DataProto:
    """Left-padded prompts, right-padded responses of uneven length, behaviour log-probs = the
    model's own + noise (stale, so ESS < 1), rewards on the last response token."""
    from verl.models.loader import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(model_dir)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompts = torch.zeros(N, P, dtype=torch.long)
    responses = torch.zeros(N, R, dtype=torch.long)
    response_mask = torch.zeros(N, R)
    for i in range(N):
        p_len, r_len = 1 + (i * 2) % P, 1 + (i * 5) % R
        prompts[i, P - p_len:] = torch.randint(1, vocab, (p_len,), generator=g)
        responses[i, :r_len] = torch.randint(1, vocab, (r_len,), generator=g)
        response_mask[i, :r_len] = 1.0
    attention_mask = torch.cat([(prompts != 0).long(), response_mask.long()], dim=1)
    input_ids = torch.cat([prompts, responses], 1)
    position_ids = torch.clamp(attention_mask.cumsum(-1) - 1, min=0)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    true_logp = torch.log_softmax(logits[:, P - 1:-1].float() / TEMPERATURE, -1).gather(-1, responses[..., None])[..., 0]
    rollout = (true_logp + 0.5 * torch.randn(N, R, generator=g)) * response_mask
    ref = (true_logp + 0.3 * torch.randn(N, R, generator=g)) * response_mask
    rewards = torch.zeros(N, R)
    rewards[torch.arange(N), response_mask.sum(-1).long() - 1] = torch.tensor(REWARDS)
    tensors = {
        "prompts": prompts, "responses": responses, "input_ids": input_ids, "attention_mask": attention_mask,
        "position_ids": position_ids, "response_mask": response_mask, "rollout_log_probs": rollout,
        "token_level_rewards": rewards, "advantages": torch.randn(N, 1, generator=g) * response_mask,
        "ref_log_prob": ref,
    }
    return DataProto.from_dict(tensors=tensors, non_tensors={"uid": UIDS.copy()},
                               meta_info={"temperature": TEMPERATURE})


def shard(data: DataProto, rank: int, size: int) -> DataProto:
    """What the controller sends data-parallel replica ``rank``: its contiguous slice of whole groups."""
    return data.chunk(size)[rank]


def _megatron_rank(rank: int, world_size: int, model_dir: str, data: DataProto, config: PolicyUpdateConfig) -> dict:
    from verl.models.loader import load_model_and_tokenizer
    from verl.utils.megatron.parallel import destroy_megatron, initialize_megatron
    from verl.workers.actor.megatron_actor import (
        MegatronPPOActor,
        build_megatron_model,
        build_megatron_optimizer_and_scheduler,
    )

    hf, _ = load_model_and_tokenizer(model_dir)
    groups = initialize_megatron(config.megatron, seed=0)
    model = build_megatron_model(hf.config, config.megatron, groups, hf.state_dict())
    optimizer, scheduler = build_megatron_optimizer_and_scheduler(model, config.optim, 1, optimizer="sgd")
    actor = MegatronPPOActor(config, model, optimizer, scheduler, groups, hf.config)
    local = shard(data, groups.dp_rank, groups.dp_size)
    log_prob, entropy = actor.compute_log_prob(local, calculate_entropy=True)
    metrics = actor.update_policy(local)
    weights = actor.get_weights()
    # A NaN behaviour log-prob on one trajectory: the ESS is undefined, every rank must skip the step.
    poisoned = shard(data, groups.dp_rank, groups.dp_size)
    poisoned.batch["rollout_log_probs"] = poisoned.batch["rollout_log_probs"].clone()
    if groups.dp_rank == 0:
        poisoned.batch["rollout_log_probs"][0, 0] = float("nan")
    skipped = actor.update_policy(poisoned)
    weights_after_skip = actor.get_weights()
    destroy_megatron()
    return {"dp_rank": groups.dp_rank, "log_prob": log_prob, "entropy": entropy, "metrics": metrics,
            "weights": weights, "skipped": skipped, "weights_after_skip": weights_after_skip}


def _torch_reference(model_dir: str, data: DataProto, config: PolicyUpdateConfig) -> dict:
    from verl.models.loader import load_model_and_tokenizer
    from verl.workers.actor.dp_actor import DataParallelPPOActor

    model, _ = load_model_and_tokenizer(model_dir)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    actor = DataParallelPPOActor(config, model, torch.optim.SGD(model.parameters(), lr=LR))
    log_prob, entropy = actor.compute_log_prob(data, calculate_entropy=True)
    metrics = actor.update_policy(data)
    return {"log_prob": log_prob, "entropy": entropy, "metrics": metrics, "weights": dict(model.state_dict()),
            "before": before}


# name -> (megatron layout, OPOB gradient-norm method, batch seed)
LAYOUTS = {
    "tp2_sp_dp2": ({"tensor_model_parallel_size": 2, "sequence_parallel": True}, "batched", 3),
    "cp2_dp2": ({"context_parallel_size": 2}, "batched", 4),
    "pp2_dp2": ({"pipeline_model_parallel_size": 2}, "per_traj", 4),
    "tp2_kl_dp2": ({"tensor_model_parallel_size": 2}, "batched", 5),  # OPOB + the KL-to-reference loss
}
KL = {"use_kl_loss": True, "kl_loss_coef": 0.5, "kl_loss_type": "low_var_kl+"}


def layout_config(name: str) -> PolicyUpdateConfig:
    parallel, method, _ = LAYOUTS[name]
    config = vcpo_config(grad_norm_method=method, **(KL if "kl" in name else {}))
    for key, value in parallel.items():
        setattr(config.megatron, key, value)
    return config


def worker_config() -> PolicyUpdateConfig:
    """TP=2 x DP=2 with the distributed optimizer (sharded Adam state), AdamW + weight decay, warmup + cosine lr."""
    config = PolicyUpdateConfig(
        strategy="megatron", ppo_mini_batch_size=N, ppo_micro_batch_size_per_gpu=2,
        log_prob_micro_batch_size_per_gpu=2,
        policy_loss=PolicyLossSpec(mode="bypass", tis_level="sequence", tis_cap=CAP),
        optim=OptimConfig(lr=1e-3, weight_decay=0.1, lr_decay_style="cosine", lr_warmup_steps=1, min_lr_ratio=0.1),
        ess_scaling=ESSScalingConfig(enable=True),
        use_kl_loss=True, kl_loss_coef=0.1, ref_log_prob_micro_batch_size_per_gpu=3,
    )
    config.megatron.tensor_model_parallel_size = 2
    config.megatron.use_distributed_optimizer = True
    return config


def _every_layout(rank: int, world_size: int, model_dir: str, batches: dict[str, DataProto],
                  checkpoint_dir: str, export_dir: str, worker_batches: list[DataProto]) -> dict:
    out = {name: _megatron_rank(rank, world_size, model_dir, batches[name], layout_config(name)) for name in LAYOUTS}
    out["worker"] = _worker_round_trip(rank, world_size, model_dir, checkpoint_dir, export_dir, worker_batches,
                                       worker_config())
    return out


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """Every rank's results per layout, the torch references, and the batches."""
    batches = {name: make_batch(model_dir, seed) for name, (_, _, seed) in LAYOUTS.items()}
    worker_batches = [make_batch(model_dir, seed) for seed in (5, 6)]
    tmp = tmp_path_factory.mktemp("megatron")
    export_dir = str(tmp / "hf")
    ranks = run_ranks(_every_layout, 4, model_dir, batches, str(tmp / "ckpt"), export_dir, worker_batches,
                      timeout_s=420)
    references = {name: _torch_reference(model_dir, batches[name], layout_config(name)) for name in LAYOUTS}
    return ranks, references, batches, export_dir


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_log_probs_and_entropy_equal_torch_actor(runs, layout):
    ranks, refs, batches, _ = runs
    ref, mask = refs[layout], batches[layout].batch["response_mask"] > 0
    for out in (r[layout] for r in ranks):
        rows = slice(out["dp_rank"] * N // 2, (out["dp_rank"] + 1) * N // 2)
        assert (out["log_prob"] - ref["log_prob"][rows]).abs()[mask[rows]].max() <= 1e-5
        assert (out["entropy"] - ref["entropy"][rows]).abs()[mask[rows]].max() <= 1e-5


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_vcpo_update_equals_torch_actor(runs, layout):
    ranks, refs, _, _ = runs
    ref = refs[layout]
    megatron_weights = ranks[0][layout]["weights"]
    assert all(r[layout]["weights"] is None for r in ranks[1:])
    assert megatron_weights.keys() == ref["weights"].keys()
    scale = max(float(w.abs().max()) for w in ref["weights"].values())
    for name, expected in ref["weights"].items():
        got = megatron_weights[name]
        update = expected - ref["before"][name]
        # Equal to 1e-6 of the weights; the update itself to 1e-3 of its size, tensor by tensor
        # (float32 rounding of w + update bounds how well a small update can be compared).
        assert (got - expected).abs().max() <= 1e-6 * scale, name
        assert (got - expected).norm() <= 1e-3 * update.norm(), name
    assert ref["metrics"]["actor/skipped_steps"] == 0.0
    assert ref["metrics"]["actor/ess_ratio"] < 0.9  # the behaviour policy is stale: the lr is scaled
    assert ref["metrics"]["actor/grad_norm"] > CLIP  # clipping is active


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_vcpo_metrics_equal_torch_actor(runs, layout):
    ranks, refs, _, _ = runs
    expected = refs[layout]["metrics"]
    for got in (r[layout]["metrics"] for r in ranks):
        assert got.keys() == expected.keys()
        for key in ("actor/ess_ratio", "actor/ess", "actor/lr_scale", "actor/is_weight_mean", "actor/is_weight_max",
                    "actor/grad_norm", "actor/traj_grad_norm_mean", "actor/opob_baseline_mean", "actor/pg_loss",
                    "actor/loss", "actor/rollout_kl_k3", "actor/lr", "actor/kl_loss"):
            if key == "actor/kl_loss" and "kl" not in layout:
                assert key not in got
                continue
            assert math.isclose(got[key], expected[key], rel_tol=1e-5, abs_tol=1e-7), (key, got[key], expected[key])


def test_nonfinite_ess_skips_the_step_on_every_rank(runs):
    ranks, _, _, _ = runs
    for out in (r["tp2_sp_dp2"] for r in ranks):
        assert out["skipped"]["actor/skipped_steps"] == 1.0
        assert out["skipped"]["actor/lr_scale"] == 0.0
    first = ranks[0]["tp2_sp_dp2"]
    for name, value in first["weights"].items():
        assert torch.equal(first["weights_after_skip"][name], value), name


def _worker_round_trip(rank: int, world_size: int, model_dir: str, checkpoint_dir: str, export_dir: str,
                       batches: list[DataProto], config: PolicyUpdateConfig) -> dict:
    from verl.utils.megatron.parallel import destroy_megatron
    from verl.workers.megatron_actor_worker import MegatronActorWorker

    def new_worker() -> MegatronActorWorker:
        return MegatronActorWorker(model_dir, config, total_training_steps=4, rank=rank, world_size=world_size)

    worker = new_worker()
    local = [shard(b, worker.data_parallel_rank(), worker.data_parallel_size()) for b in batches]
    start_log_prob = worker.compute_log_prob(local[0]).batch["old_log_probs"]
    ref_before = worker.compute_ref_log_prob(local[0]).batch["ref_log_prob"]
    worker.update_policy(local[0])
    worker.save_checkpoint(checkpoint_dir)
    continued = worker.update_policy(local[1])
    continued_weights = worker.get_weights()
    ref_after = worker.compute_ref_log_prob(local[0]).batch["ref_log_prob"]
    destroy_megatron()
    restored = new_worker()
    restored.load_checkpoint(checkpoint_dir)
    resumed = restored.update_policy(local[1])
    resumed_weights = restored.get_weights()
    restored.export_hf(export_dir)
    destroy_megatron()
    return {"start_log_prob": start_log_prob, "ref_before": ref_before, "ref_after": ref_after,
            "dp": (worker.data_parallel_rank(), worker.data_parallel_size()), "continued": continued,
            "resumed": resumed, "continued_weights": continued_weights, "resumed_weights": resumed_weights}


def test_worker_checkpoint_round_trip_gives_the_same_next_update(runs):
    """The update after load_checkpoint equals the update of the run that never stopped (weights,
    Adam moments, lr schedule position), export_hf writes exactly the actor's weights, and the
    worker's reference policy gives the starting weights' log-probs before and after training."""
    ranks, _, _, export_dir = runs
    assert [r["worker"]["dp"] for r in ranks] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    first = ranks[0]["worker"]
    assert first["resumed"]["actor/lr"] == first["continued"]["actor/lr"] < 1e-3  # the schedule resumed mid-way
    for key in ("actor/loss", "actor/grad_norm", "actor/ess_ratio", "actor/kl_loss"):
        assert first["resumed"][key] == first["continued"][key], key
    # The reference policy: the starting weights in the actor's layout (micro-batches of 3, not 2),
    # untouched by the updates.
    for r in ranks:
        worker = r["worker"]
        torch.testing.assert_close(worker["ref_before"], worker["start_log_prob"], rtol=0, atol=1e-6)
        assert torch.equal(worker["ref_after"], worker["ref_before"])
    for name, value in first["continued_weights"].items():
        assert torch.equal(first["resumed_weights"][name], value), name
    assert all(r["worker"]["resumed_weights"] is None for r in ranks[1:])

    from verl.models.loader import load_model_and_tokenizer

    exported, _ = load_model_and_tokenizer(export_dir)
    for name, value in exported.state_dict().items():
        assert torch.equal(value, first["resumed_weights"][name]), name


def test_megatron_section_is_validated_only_for_the_megatron_strategy():
    sequence_parallel = "actor_rollout_ref.actor.megatron.sequence_parallel=true"  # needs TP > 1
    load_config(["actor_rollout_ref.actor.strategy=torch", sequence_parallel])  # the torch actor ignores it
    with pytest.raises(ConfigError) as err:
        load_config(["actor_rollout_ref.actor.strategy=megatron", sequence_parallel])
    assert err.value.key == "actor_rollout_ref.actor.megatron.sequence_parallel"


def test_scheduled_lr_follows_the_torch_actors_schedule():
    """ScheduledLR (for Megatron optimizers) gives the lr of dp_actor's LambdaLR at every trainer step."""
    from verl.workers.actor.dp_actor import build_optimizer_and_scheduler
    from verl.workers.actor.megatron_actor import ScheduledLR

    optim = OptimConfig(lr=2e-3, lr_decay_style="cosine", lr_warmup_steps=2, min_lr_ratio=0.1)
    torch_optimizer, torch_schedule = build_optimizer_and_scheduler(torch.nn.Linear(2, 2), optim, total_steps=7)
    other = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    schedule = ScheduledLR(other, optim, total_steps=7)
    for _ in range(9):
        assert math.isclose(other.param_groups[0]["lr"], torch_optimizer.param_groups[0]["lr"], rel_tol=1e-12)
        torch_optimizer.step()  # no gradients: a no-op that keeps LambdaLR from warning
        torch_schedule.step()
        schedule.step()
    restored = ScheduledLR(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0), optim, total_steps=7)
    restored.load_state_dict(schedule.state_dict())
    assert restored.get_last_lr() == schedule.get_last_lr()
