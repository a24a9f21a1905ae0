import itertools

import torch
from transformers import Qwen2ForCausalLM

from tests.megatron_launch import run_ranks
from verl.models import build_char_tokenizer, round_up_vocab_size, tiny_qwen2_config

torch.set_num_threads(1)

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]  # (tp, pp) on 4 ranks; the rest is data parallelism


def tiny_hf_model(tie: bool, seed: int = 0) -> Qwen2ForCausalLM:
    """A tiny Qwen2 with every parameter random (HF zero-inits biases and ones-inits norms)."""
    config = tiny_qwen2_config(round_up_vocab_size(len(build_char_tokenizer())), tie_word_embeddings=tie)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).float().eval()
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(torch.randn_like(param) * 0.1)
    return model


def _round_trips(rank: int, world_size: int) -> dict:
    from verl.models.mcore.model import build_gpt_model, model_forward_logits
    from verl.models.mcore.weights import export_hf_weights, load_hf_weights
    from verl.utils.megatron.cpu_compat import enable_cpu_compat
    from verl.utils.megatron.parallel import MegatronParallelConfig, destroy_megatron, initialize_megatron

    out = {"compat": (enable_cpu_compat(), enable_cpu_compat(), torch.cuda.current_device(),
                      torch.empty(1, device="cuda").device.type)}
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    for (tp, pp), tie in itertools.product(LAYOUTS, (True, False)):
        hf = tiny_hf_model(tie)
        cfg = MegatronParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     sequence_parallel=tp > 1)
        groups = initialize_megatron(cfg, seed=0)
        model = build_gpt_model(hf.config, cfg, groups)
        load_hf_weights(model, hf.state_dict(), hf.config, groups)
        exported = export_hf_weights(model, hf.config, groups)
        result = {"exported": exported is not None}
        if exported is not None:
            reference = hf.state_dict()
            result["same_keys"] = list(exported) == list(reference)
            result["not_equal"] = [k for k in reference if not torch.equal(exported[k], reference[k])]
            result["all_fp32_cpu"] = all(v.dtype == torch.float32 and v.device.type == "cpu" for v in exported.values())
            reloaded = Qwen2ForCausalLM(hf.config)
            reloaded.load_state_dict(exported, strict=True)
        if pp == 1:
            with torch.no_grad():
                logits = model_forward_logits(model, ids, torch.arange(12).expand(2, 12))
                reference_logits = hf(ids).logits.chunk(tp, dim=-1)[groups.tp_rank]
            result["logits_diff"] = (logits - reference_logits).abs().max().item()
        if tie and pp > 1 and groups.is_last_stage:
            # The last stage's private copy of the tied embedding must hold this rank's vocab shard.
            expected = hf.model.embed_tokens.weight.chunk(tp, dim=0)[groups.tp_rank]
            result["tied_copy_equal"] = torch.equal(model.output_layer.weight, expected)
        out[(tp, pp, tie)] = result
        destroy_megatron()
    return out


def test_hf_megatron_hf_round_trip_is_exact_for_tp_and_pp_layouts():
    results = run_ranks(_round_trips, 4, timeout_s=240)
    # The CPU shim is on (idempotently) in every rank: CUDA allocations land on the CPU.
    assert all(r["compat"] == (True, True, torch.device("cpu"), "cpu") for r in results)
    for (tp, pp), tie in itertools.product(LAYOUTS, (True, False)):
        per_rank = [r[(tp, pp, tie)] for r in results]
        assert [r["exported"] for r in per_rank] == [True, False, False, False], (tp, pp, tie)
        root = per_rank[0]
        assert root["same_keys"] and root["all_fp32_cpu"], (tp, pp, tie)
        assert root["not_equal"] == [], (tp, pp, tie, root["not_equal"])
        if pp == 1:
            assert max(r["logits_diff"] for r in per_rank) <= 1e-5, (tp, pp, tie)
        if tie and pp > 1:
            assert all(r["tied_copy_equal"] for r in per_rank if "tied_copy_equal" in r)
            assert sum("tied_copy_equal" in r for r in per_rank) == 4 // pp  # ranks on the last stage
