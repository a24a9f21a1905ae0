"""Param sync in a real async run, through the collective weight channel and the object store: two
actor ranks and two torch-engine rollouters on Ray at k = 2 train for a few steps, and after the
last sync every engine holds exactly the actor's weights at the last version; a bad backend name
fails validation; every configurable backend has exactly one weight transport."""

from __future__ import annotations

import pytest
import ray
import torch

from tests.trainer.fully_async.conftest import small_config
from verl.models.loader import load_model_and_tokenizer
from verl.trainer.config import PARAM_SYNC_BACKENDS
from verl.trainer.fully_async.param_sync import WEIGHT_TRANSPORTS, ParamSync, WeightTransport
from verl.trainer.ppo.ray_trainer import RayPPOTrainer
from verl.utils.config import ConfigError

STEPS = 3


def _engine_state(rollouter) -> ray.ObjectRef:
    # Runs inside the Rollouter actor: its engine's live tensors and loaded version.
    return rollouter.__ray_call__.remote(
        lambda self: ({k: v.detach().clone() for k, v in self.engine.model.state_dict().items()},
                      self.engine.version))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["collective", "object_store"])
def test_sync_leaves_engines_equal_to_the_actor(pipeline_assets, ray_cluster, tmp_path, backend):
    config = small_config(
        pipeline_assets, tmp_path / "run", f"async_training.param_sync_backend={backend}",
        "async_training.staleness_threshold=2", "async_training.partial_rollout=true", "rollout.n_gpus_per_node=2",
        "trainer.n_gpus_per_node=2", f"trainer.total_training_steps={STEPS}", f"trainer.save_freq={STEPS}",
        # A random-init model scores 0 on every prompt (zero advantages): weight decay still moves it.
        "actor_rollout_ref.actor.optim.lr=1e-3", "actor_rollout_ref.actor.optim.weight_decay=0.1",
    )
    trainer = RayPPOTrainer(config, pipeline_assets["model"])
    trainer.run_dir.mkdir(parents=True)
    try:
        trainer.init_workers()
        trainer.pipeline.start(0, weight_sources=trainer.actors)
        metrics = [trainer.train_step(step) for step in range(1, STEPS + 1)]
        actor_weights = ray.get(trainer.actors[0].get_weights.remote())
        assert ray.get(trainer.actors[1].get_weights.remote()) is None
        engines = ray.get([_engine_state(r) for r in trainer.pipeline.rollouters])
    finally:
        trainer.shutdown()

    for m in metrics:
        assert m["timing/param_sync_s"] >= m["timing/param_sync_load_s"] > 0
        if backend == "collective":
            assert m["timing/param_sync_send_s"] > 0 and m["timing/param_sync_recv_s"] > 0
    initial, _ = load_model_and_tokenizer(pipeline_assets["model"])
    changed = [k for k, v in initial.state_dict().items() if not torch.equal(v, actor_weights[k])]
    assert changed, "training should have moved the weights"
    for state, version in engines:
        assert version == STEPS
        assert state.keys() == actor_weights.keys()
        for name, tensor in actor_weights.items():
            assert torch.equal(state[name], tensor), name


def test_collective_is_the_default_and_unknown_backends_are_config_errors(pipeline_assets, tmp_path):
    assert small_config(pipeline_assets, tmp_path).async_training.param_sync_backend == "collective"
    with pytest.raises(ConfigError, match="async_training.param_sync_backend"):
        small_config(pipeline_assets, tmp_path, "async_training.param_sync_backend=nccl")


def test_each_configurable_backend_has_one_transport_registered_under_its_name():
    assert set(WEIGHT_TRANSPORTS) == set(PARAM_SYNC_BACKENDS)
    for name, transport in WEIGHT_TRANSPORTS.items():
        assert issubclass(transport, WeightTransport) and transport.name == name
        assert isinstance(ParamSync(["actor"], ["rollouter"], backend=name).transport, transport)


def test_param_sync_rejects_unknown_backends_and_a_sync_before_open():
    with pytest.raises(ValueError, match="'nccl': expected one of"):
        ParamSync(["actor"], ["rollouter"], backend="nccl")
    with pytest.raises(RuntimeError, match=r"ParamSync.open\(\) first"):
        ParamSync(["actor"], ["rollouter"], backend="collective").sync(1)
