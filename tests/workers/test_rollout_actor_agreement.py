"""The rollout engine and the actor agree: behaviour log-probs from the torch engine, padded into
the shared batch layout, equal the actor's recomputed log-probs for the same weights.

This is what makes on-policy (k = 0) importance weights equal 1; it exercises the engine, the
batch assembly (left-padded prompts, right-padded responses) and the actor's forward together.
"""

from __future__ import annotations

import pytest
import torch

from verl.models.loader import load_model_and_tokenizer
from verl.models.presets import build_tiny_model_dir
from verl.trainer.ppo.core_algos import sequence_log_is_weight
from verl.utils.dataset.rl_dataset import chat_prompt_ids
from verl.workers.actor.config import PolicyUpdateConfig
from verl.workers.actor.dp_actor import DataParallelPPOActor
from verl.workers.rollout.base import GenerationRequest, SamplingParams
from verl.workers.rollout.batch import trajectories_to_batch
from verl.workers.rollout.torch_engine import TorchRolloutEngine

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=5, tie_word_embeddings=False)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_log_probs_equal_actor_recompute(model_dir, temperature):
    engine_model, tokenizer = load_model_and_tokenizer(model_dir)
    actor_model, _ = load_model_and_tokenizer(model_dir)
    engine = TorchRolloutEngine(engine_model, tokenizer, max_batch_size=4, seed=11)
    prompts = ["3,7,12:43", "1,2,3:6", "20,19,18:1", "5,5:25", "12,1,4,9:100", "7:7"]
    prompt_ids = chat_prompt_ids(tokenizer, [[{"role": "user", "content": p}] for p in prompts])
    requests = [
        GenerationRequest(
            request_id=f"p{i}/{j}", prompt_ids=ids,
            # A random model rarely stops by itself: vary the budget to get ragged responses.
            sampling=SamplingParams(temperature=temperature, max_new_tokens=3 + (5 * i + j) % 10,
                                    stop_token_ids=(tokenizer.eos_token_id,)),
        )
        for i, ids in enumerate(prompt_ids) for j in range(2)
    ]
    trajectories = engine.generate(requests)
    lengths = {len(t.response_ids) for t in trajectories}
    assert len(lengths) > 1, "want varying response lengths to exercise padding"

    batch = trajectories_to_batch(
        trajectories, {"uid": [r.request_id.split("/")[0] for r in requests]}, tokenizer.pad_token_id,
        max_prompt_length=24, max_response_length=12, meta_info={"temperature": temperature},
    )
    config = PolicyUpdateConfig(ppo_mini_batch_size=12, ppo_micro_batch_size_per_gpu=5, log_prob_micro_batch_size_per_gpu=5)
    actor = DataParallelPPOActor(config, actor_model)
    log_probs, _ = actor.compute_log_prob(batch)
    mask = batch.batch["response_mask"]
    diff = ((log_probs - batch.batch["rollout_log_probs"]) * mask).abs().max().item()
    assert diff <= 1e-5
    log_w = sequence_log_is_weight(log_probs, batch.batch["rollout_log_probs"], mask)
    assert log_w.abs().max().item() < 1e-4  # on-policy IS weights are 1
