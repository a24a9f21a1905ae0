"""HF export of Megatron checkpoints (4 gloo ranks): a TP2 x PP2 checkpoint and a TP1 (x DP4) one of
the same weights export byte-identical safetensors, equal to the HF weights they were loaded from;
after an update, the export equals the live actor's gathered weights and gives the actor's
log-probs (fp32, 1e-5); ``hf_model`` in ``save_contents`` writes the offline merge's bytes; the
export generates HF's greedy tokens in the torch and vLLM engines.

One spawn of 4 ranks saves every checkpoint (Megatron is re-initialised between layouts): importing
megatron.core per rank costs more than the rest."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.megatron_launch import run_ranks
from tests.model_merger.export_helpers import encode_prompts, engine_greedy, hf_greedy
from verl.model_merger import merge_checkpoint
from verl.protocol import DataProto
from verl.utils.checkpoint import COMPLETE_MARKER, DEFAULT_CHECKPOINT_CONTENTS, HF_SUBDIR
from verl.utils.megatron.parallel import MegatronParallelConfig
from verl.workers.actor.config import OptimConfig, PolicyUpdateConfig

torch.set_num_threads(1)
# The 4-rank spawn (megatron.core imported per rank, three layouts, one update) takes 17 s on a quiet
# 2-core machine, up to 90 s on a loaded one, like tests/models/mcore/test_weights.py.
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")
N, P, R = 4, 5, 6
# (name, tp, pp, tied embeddings, train one step)
LAYOUTS = [("tp2_pp2", 2, 2, True, True), ("tp1", 1, 1, True, False), ("tp2_pp2_untied", 2, 2, False, False)]


def make_batch(vocab: int) -> DataProto:
    """Left-padded prompts, right-padded responses of uneven length, random advantages (one update's input)."""
    g = torch.Generator().manual_seed(3)
    prompts = torch.zeros(N, P, dtype=torch.long)
    responses = torch.zeros(N, R, dtype=torch.long)
    response_mask = torch.zeros(N, R)
    for i in range(N):
        p_len, r_len = 2 + i % (P - 1), 1 + (3 * i) % R
        prompts[i, P - p_len:] = torch.randint(2, vocab, (p_len,), generator=g)
        responses[i, :r_len] = torch.randint(2, vocab, (r_len,), generator=g)
        response_mask[i, :r_len] = 1.0
    attention_mask = torch.cat([(prompts != 0).long(), response_mask.long()], dim=1)
    tensors = {"prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
               "attention_mask": attention_mask, "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
               "response_mask": response_mask, "rollout_log_probs": -2.0 * response_mask,
               "advantages": torch.randn(N, 1, generator=g) * response_mask}
    return DataProto.from_dict(tensors=tensors, non_tensors={"uid": np.array(["a", "a", "b", "b"], dtype=object)},
                               meta_info={"temperature": 1.0})


def update_config(tp: int, pp: int) -> PolicyUpdateConfig:
    return PolicyUpdateConfig(strategy="megatron", ppo_mini_batch_size=N, ppo_micro_batch_size_per_gpu=2,
                              log_prob_micro_batch_size_per_gpu=2, optim=OptimConfig(lr=1e-2, weight_decay=0.0),
                              megatron=MegatronParallelConfig(tensor_model_parallel_size=tp,
                                                              pipeline_model_parallel_size=pp,
                                                              sequence_parallel=tp > 1))


def _save_checkpoints(rank: int, world_size: int, model_dirs: dict[bool, str], root: Path) -> dict:
    from verl.utils.megatron.parallel import destroy_megatron
    from verl.workers.megatron_actor_worker import MegatronActorWorker

    out = {}
    for name, tp, pp, tie, train in LAYOUTS:
        worker = MegatronActorWorker(model_dirs[tie], update_config(tp, pp), total_training_steps=2, rank=rank,
                                     world_size=world_size)
        worker.save_checkpoint(str(root / name / "global_step_0"), [*DEFAULT_CHECKPOINT_CONTENTS, "hf_model"])
        if train:
            batch = make_batch(worker.hf_config.vocab_size)
            local = batch.chunk(worker.data_parallel_size())[worker.data_parallel_rank()]
            worker.update_policy(local)
            worker.save_checkpoint(str(root / name / "global_step_1"))
            out["live_weights"] = worker.get_weights()
            out["log_probs"] = worker.compute_log_prob(local).batch["old_log_probs"]
        destroy_megatron()
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory, random_model_dirs):
    root = tmp_path_factory.mktemp("megatron_ckpt")
    ranks = run_ranks(_save_checkpoints, 4, random_model_dirs, root, timeout_s=400)
    targets = {}
    for checkpoint in sorted(root.glob("*/global_step_*")):
        (checkpoint / COMPLETE_MARKER).write_text("")
        key = f"{checkpoint.parent.name}/{checkpoint.name}"
        targets[key] = merge_checkpoint(checkpoint, root / "hf" / key)
    return {"root": root, "targets": targets, "ranks": ranks, "sources": random_model_dirs}


def test_tp2_pp2_and_tp1_exports_are_byte_identical_and_equal_the_source_weights(exports):
    tp2_pp2, tp1 = exports["targets"]["tp2_pp2/global_step_0"], exports["targets"]["tp1/global_step_0"]
    assert (tp2_pp2 / "model.safetensors").read_bytes() == (tp1 / "model.safetensors").read_bytes()
    for tie in (True, False):
        target = exports["targets"]["tp2_pp2/global_step_0" if tie else "tp2_pp2_untied/global_step_0"]
        source = AutoModelForCausalLM.from_pretrained(exports["sources"][tie], dtype=torch.float32).state_dict()
        exported = load_file(target / "model.safetensors")
        assert ("lm_head.weight" in exported) == (not tie)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
        assert list(model.state_dict()) == list(source)
        for name, value in source.items():
            assert torch.equal(model.state_dict()[name], value), (tie, name)


def test_rank_files_record_their_layout(exports):
    records = [torch.load(exports["root"] / "tp2_pp2" / "global_step_0" / f"megatron_actor_rank{r:05d}.pt",
                          weights_only=False, mmap=True)["layout"] for r in range(4)]
    # Megatron's order tp-cp-dp-pp: TP is the fastest-varying coordinate.
    assert [(lo["tp_rank"], lo["pp_rank"]) for lo in records] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert all((lo["tp_size"], lo["pp_size"], lo["cp_size"], lo["dp_size"], lo["world_size"]) == (2, 2, 1, 1, 4)
               for lo in records)
    tp1 = torch.load(exports["root"] / "tp1" / "global_step_0" / "megatron_actor_rank00003.pt",
                     weights_only=False, mmap=True)["layout"]
    assert (tp1["dp_rank"], tp1["dp_size"], tp1["tp_size"]) == (3, 4, 1)


def test_trained_export_equals_live_weights_and_gives_the_actors_log_probs(exports):
    from verl.workers.actor.dp_actor import DataParallelPPOActor

    rank0 = exports["ranks"][0]
    target = exports["targets"]["tp2_pp2/global_step_1"]
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    start = exports["targets"]["tp2_pp2/global_step_0"]
    assert (target / "model.safetensors").read_bytes() != (start / "model.safetensors").read_bytes()
    for name, value in rank0["live_weights"].items():
        assert torch.equal(model.state_dict()[name], value), name
    batch = make_batch(model.config.vocab_size)
    log_probs, _ = DataParallelPPOActor(update_config(1, 1), model).compute_log_prob(batch)
    mask = batch.batch["response_mask"].bool()  # the Megatron actor leaves padding positions at 0
    assert (log_probs[mask] - rank0["log_probs"][mask]).abs().max().item() <= 1e-5


def test_hf_model_in_save_contents_writes_the_same_bytes_as_the_offline_merge(exports):
    for name in ("tp2_pp2", "tp1", "tp2_pp2_untied"):
        folder = exports["root"] / name / "global_step_0" / HF_SUBDIR
        target = exports["targets"][f"{name}/global_step_0"]
        for file in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
            assert (folder / file).read_bytes() == (target / file).read_bytes(), (name, file)


def test_megatron_export_generates_hf_greedy_tokens_in_the_torch_engine(exports):
    from verl.workers.rollout.torch_engine import TorchRolloutEngine

    target = str(exports["targets"]["tp2_pp2/global_step_1"])
    prompts = encode_prompts(target)
    engine = TorchRolloutEngine(AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32),
                                AutoTokenizer.from_pretrained(target), max_batch_size=4, max_seq_len=64,
                                default_stop_token_ids=())
    assert engine_greedy(engine, prompts, 24) == hf_greedy(target, prompts, 24)


@pytest.mark.slow
@needs_vllm
def test_megatron_export_generates_hf_greedy_tokens_in_the_vllm_engine(exports):
    from verl.workers.rollout.config import EngineKwargs, RolloutConfig, VLLMEngineKwargs
    from verl.workers.rollout.vllm_rollout import VLLMRolloutEngine

    target = str(exports["targets"]["tp2_pp2/global_step_1"])
    prompts = encode_prompts(target)
    config = RolloutConfig(name="vllm", prompt_length=32, response_length=24, max_model_len=64, max_num_seqs=4,
                           engine_kwargs=EngineKwargs(VLLMEngineKwargs(kv_cache_space_gib=1)))
    engine = VLLMRolloutEngine(target, AutoTokenizer.from_pretrained(target), config, seed=0,
                               default_stop_token_ids=())
    try:
        assert engine_greedy(engine, prompts, 24) == hf_greedy(target, prompts, 24)
    finally:
        engine.shutdown()
