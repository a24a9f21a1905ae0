"""Partial rollouts in the real rollouter: a weight update mid-generation aborts in-flight
requests and resumes them under the new weights, and each token's behaviour log-prob equals
the log-prob recomputed by an HF forward under the weights of the version that sampled it."""

from __future__ import annotations

import time

import numpy as np
import ray
import torch

from verl.models.loader import load_model_and_tokenizer
from verl.trainer.fully_async.reorder_buffer import ReorderBuffer
from verl.trainer.fully_async.rollouter import Rollouter
from verl.utils.dataset.rl_dataset import RLDataset, collate_prompts
from verl.workers.rollout.config import RolloutConfig

NUM_GROUPS, N, MAX_NEW = 8, 4, 48


def _response_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    return logp.gather(1, torch.tensor(response).unsqueeze(1)).squeeze(1)


def test_partial_rollout_logprobs_match_the_version_that_sampled_each_token(pipeline_assets, ray_cluster):
    torch.manual_seed(0)
    rollout = RolloutConfig(n=N, prompt_length=32, response_length=MAX_NEW, max_model_len=96, max_num_seqs=64)
    worker_kwargs = dict(model_path=pipeline_assets["model"], rollout_config=rollout, max_prompt_length=32,
                         reward_timeout_s=5.0, num_threads=1)
    queue = ray.remote(num_cpus=0, max_concurrency=4)(ReorderBuffer).remote(NUM_GROUPS)
    rollouter = Rollouter(worker_kwargs, queue, k=10, groups_per_step=NUM_GROUPS, partial_rollout=True, seed=3)

    model_v0, tokenizer = load_model_and_tokenizer(pipeline_assets["model"])
    model_v1, _ = load_model_and_tokenizer(pipeline_assets["model"])
    with torch.no_grad():
        for p in model_v1.parameters():
            p.add_(0.05 * torch.randn_like(p))
    weights_v1 = {k: v.clone() for k, v in model_v1.state_dict().items()}

    dataset = RLDataset(pipeline_assets["train"], tokenizer, 32)
    prompts = collate_prompts([dataset[i] for i in range(NUM_GROUPS)], tokenizer.pad_token_id)
    prompts.non_tensor_batch["uid"] = np.array([f"g{j}" for j in range(NUM_GROUPS)], dtype=object)
    rollouter.start()
    rollouter.submit([(j, prompts[j:j + 1]) for j in range(NUM_GROUPS)])
    deadline = time.monotonic() + 30
    while rollouter.engine.generated_tokens < NUM_GROUPS * N * 4 and time.monotonic() < deadline:
        time.sleep(0.001)
    timing = rollouter.update_weights(weights_v1, version=1)
    got = ray.get(queue.get_groups.remote(0, NUM_GROUPS, 60.0))
    rollouter.stop()
    assert got is not None and timing["load_s"] >= 0
    batch = got[0]
    b, nt = batch.batch, batch.non_tensor_batch
    spanning = np.flatnonzero((nt["param_version_start"] == 0) & (nt["param_version_end"] == 1))
    assert len(spanning) >= 4, "the update should have caught several requests mid-generation"
    assert rollouter.stats()["resumed_requests"] >= len(spanning)

    max_err, max_gap = 0.0, 0.0
    for i in spanning:
        length = int(b["response_mask"][i].sum())
        response = b["responses"][i, :length].tolist()
        prompt = [t for t, m in zip(b["prompts"][i].tolist(), b["attention_mask"][i, :32].tolist()) if m]
        versions = b["rollout_param_versions"][i, :length]
        behaviour = b["rollout_log_probs"][i, :length]
        assert versions[0] == 0 and versions[-1] == 1 and bool((versions.diff() >= 0).all())
        lp0, lp1 = _response_logprobs(model_v0, prompt, response), _response_logprobs(model_v1, prompt, response)
        expected = torch.where(versions == 0, lp0, lp1)
        max_err = max(max_err, float((behaviour - expected).abs().max()))
        # The two versions really disagree on these tokens, so the match is not vacuous.
        max_gap = max(max_gap, float((lp0 - lp1).abs().max()))
    assert max_err < 1e-4, max_err
    assert max_gap > 1e-2, max_gap
