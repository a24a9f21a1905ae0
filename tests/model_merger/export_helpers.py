"""Helpers of the HF-export tests: tiny Qwen2 model directories whose every parameter is random
(HF's own init leaves biases at 0 and norms at 1, which would hide a mis-mapped bias or norm),
Megatron checkpoints written without Megatron, and greedy generation from HF ``generate`` and
from our engines."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from verl.models.presets import build_tiny_model_dir

PROMPTS = ["3,5,8:40=", "11,12:1=", "6:6=", "20,4,2:10="]


def build_random_model_dir(path: Path, tie: bool, seed: int = 0) -> str:
    """``build_tiny_model_dir`` with every parameter redrawn: weights ~ 0.05 N(0, 1), norms 1 + 0.1 N(0, 1)."""
    build_tiny_model_dir(path, preset="tiny", seed=seed, tie_word_embeddings=tie)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed + 1)
        for name, param in model.named_parameters():
            noise = torch.randn_like(param)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.05 * noise)
    model.save_pretrained(path)
    return str(path)


def hf_greedy(model_dir: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations from HF ``generate``, one prompt at a time (no padding), never stopping
    early and never picking the pad token (as the engines: the pad is banned, eos is turned off)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = model.generation_config.pad_token_id
    out = []
    for ids in prompts:
        generated = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens,
                                   min_new_tokens=max_new_tokens, suppress_tokens=[pad], pad_token_id=pad)
        out.append(generated[0, len(ids):].tolist())
    return out


def engine_greedy(engine, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from verl.workers.rollout.base import GenerationRequest, SamplingParams

    requests = [GenerationRequest(f"g{i}", ids, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
                for i, ids in enumerate(prompts)]
    return [t.response_ids for t in engine.generate(requests)]


def encode_prompts(model_dir: str) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer.encode(p) for p in PROMPTS]


MEGATRON_LAYER_PARAMS = ("input_layernorm.weight", "self_attention.linear_qkv.weight",
                         "self_attention.linear_qkv.bias", "self_attention.linear_proj.weight",
                         "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")


def megatron_stage_names(num_layers: int, pp_rank: int, pp_size: int, tie: bool) -> list[str]:
    """The parameter names of one GPTModel pipeline stage (local layer indices, as Megatron keeps them)."""
    names = ["embedding.word_embeddings.weight"] if pp_rank == 0 else []
    names += [f"decoder.layers.{i}.{p}" for i in range(num_layers // pp_size) for p in MEGATRON_LAYER_PARAMS]
    if pp_rank == pp_size - 1:
        names.append("decoder.final_layernorm.weight")
        if not tie or pp_size > 1:  # a tied single stage reuses the embedding; a tied last stage keeps a copy
            names.append("output_layer.weight")
    return names


def write_synthetic_megatron_checkpoint(directory: Path, model_dir: str, tp: int, pp: int, cp: int = 1,
                                        dp: int = 1) -> Path:
    """A complete Megatron checkpoint of ``model_dir``'s weights without running Megatron: each rank's
    file holds the shards ``load_hf_weights`` would give it (Megatron's rank order tp-cp-dp-pp), its
    layout record and ``_extra_state`` entries, plus ``huggingface/`` and ``COMPLETE``."""
    from verl.models.mcore.weights import megatron_shard_from_hf
    from verl.utils.checkpoint import COMPLETE_MARKER, HF_SUBDIR, MegatronRankLayout, megatron_rank_file

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf, config = model.state_dict(), model.config
    directory.mkdir(parents=True)
    world = tp * pp * cp * dp
    for rank in range(world):
        layout = MegatronRankLayout(rank=rank, world_size=world, tp_rank=rank % tp, tp_size=tp,
                                    cp_rank=rank // tp % cp, cp_size=cp, dp_rank=rank // (tp * cp) % dp, dp_size=dp,
                                    pp_rank=rank // (tp * cp * dp), pp_size=pp)
        state = {}
        for name in megatron_stage_names(config.num_hidden_layers, layout.pp_rank, pp, config.tie_word_embeddings):
            state[name] = megatron_shard_from_hf(name, hf, config, layout).clone()
            if name.endswith(".weight") and "layernorm" not in name and "embedding" not in name:
                state[name.rsplit(".", 1)[0] + "._extra_state"] = None
        torch.save({"world_size": world, "layout": layout.to_dict(), "model": state, "optimizer": []},
                   directory / megatron_rank_file(rank))
    model.config.save_pretrained(directory / HF_SUBDIR)
    model.generation_config.save_pretrained(directory / HF_SUBDIR)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(directory / HF_SUBDIR)
    (directory / COMPLETE_MARKER).write_text("")
    return directory
