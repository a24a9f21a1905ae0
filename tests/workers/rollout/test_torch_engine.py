"""TorchRolloutEngine against independent HF computations: log-probs, greedy decoding, refill,
stops, pad masking, truncation, weight updates, abort/resume and determinism."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
import transformers

from verl.models.char_tokenizer import build_char_tokenizer
from verl.models.presets import round_up_vocab_size
from verl.workers.rollout.base import GenerationRequest, SamplingParams, Trajectory
from verl.workers.rollout.torch_engine import TorchRolloutEngine, sample_next_tokens

torch.set_num_threads(1)
VOCAB = 64


def tiny_model(arch: str = "qwen2", tied: bool = True, seed: int = 0, vocab: int = VOCAB,
               **config_overrides) -> transformers.PreTrainedModel:
    """A 2-layer GQA decoder with non-trivial biases and norm weights (HF init leaves them 0 / 1)."""
    shape = dict(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 tie_word_embeddings=tied, initializer_range=0.1, **config_overrides)
    if arch == "qwen2":
        config, cls = transformers.Qwen2Config(**shape), transformers.Qwen2ForCausalLM
    else:
        config, cls = transformers.LlamaConfig(attention_bias=True, **shape), transformers.LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).float().eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0.0, 0.3)
                elif "norm" in name:
                    param.copy_(1.0 + 0.2 * torch.randn_like(param))
    return model


def hf_logprobs(model, trajectory: Trajectory, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of each response token from one unpadded HF forward."""
    ids = torch.tensor([trajectory.prompt_ids + trajectory.response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    start = len(trajectory.prompt_ids) - 1
    scaled = logits[start:start + len(trajectory.response_ids)] / (temperature if temperature > 0 else 1.0)
    return torch.log_softmax(scaled, -1).gather(1, torch.tensor(trajectory.response_ids)[:, None]).squeeze(1)


def prompts(lengths: list[int], seed: int = 1, low: int = 2) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, VOCAB, (n,), generator=g).tolist() for n in lengths]


def requests(prompt_list, **sampling) -> list[GenerationRequest]:
    return [GenerationRequest(f"r{i}", p, SamplingParams(**sampling)) for i, p in enumerate(prompt_list)]


def max_logprob_error(model, trajectories, temperature) -> float:
    return max((hf_logprobs(model, t, temperature) - torch.tensor(t.response_logprobs)).abs().max().item()
               for t in trajectories)


@pytest.mark.parametrize("arch,tied", [("qwen2", True), ("qwen2", False), ("llama", False)])
def test_behaviour_logprobs_equal_hf_forward_with_early_stops(arch, tied):
    model = tiny_model(arch, tied)
    engine = TorchRolloutEngine(model, max_batch_size=8, max_seq_len=64, seed=3)
    stops = (5, 6, 7, 8)
    # Even requests may stop early on any of ``stops``; odd ones run to their length limit.
    batch = [GenerationRequest(f"r{i}", p, SamplingParams(temperature=0.8, max_new_tokens=24 - i,
                                                          stop_token_ids=stops if i % 2 == 0 else ()))
             for i, p in enumerate(prompts([3, 9, 1, 14, 6, 11]))]
    out = engine.generate(batch)
    assert [t.request_id for t in out] == [r.request_id for r in batch]
    assert any(t.finish_reason == "stop" for t in out[::2])
    for i, t in enumerate(out):
        assert len(t.response_ids) == len(t.response_logprobs) == len(t.response_versions) <= 24 - i
        if i % 2:
            assert t.finish_reason == "length" and len(t.response_ids) == 24 - i
        else:
            assert (t.finish_reason == "stop") == (t.response_ids[-1] in stops)
            assert not set(t.response_ids[:-1]) & set(stops)
    assert max_logprob_error(model, out, 0.8) < 1e-5


def test_greedy_equals_hf_generate_left_padded():
    model = tiny_model("qwen2", tied=True)
    prompt_list = prompts([2, 5, 9, 13])
    engine = TorchRolloutEngine(model, max_batch_size=4, max_seq_len=64)
    out = engine.generate(requests(prompt_list, temperature=0.0, max_new_tokens=12))
    span = max(map(len, prompt_list))
    ids = torch.zeros(len(prompt_list), span, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompt_list):
        ids[i, span - len(p):], mask[i, span - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                            pad_token_id=0, eos_token_id=None)[:, span:]
    assert [t.response_ids for t in out] == hf.tolist()
    assert max_logprob_error(model, out, 0.0) < 1e-5


def test_continuous_refill_small_batch_matches_wide_batch_and_hf():
    model = tiny_model("qwen2", tied=False)
    lengths = [3, 17, 5, 11, 8]
    prompt_list = prompts([4, 2, 10, 7, 3])
    batch = [GenerationRequest(f"r{i}", p, SamplingParams(temperature=1.0, max_new_tokens=n, seed=100 + i))
             for i, (p, n) in enumerate(zip(prompt_list, lengths))]
    narrow = TorchRolloutEngine(model, max_batch_size=2, max_seq_len=64).generate(batch)
    wide = TorchRolloutEngine(model, max_batch_size=8, max_seq_len=64).generate(batch)
    assert [t.request_id for t in narrow] == [f"r{i}" for i in range(5)]
    assert [len(t.response_ids) for t in narrow] == lengths
    assert all(t.finish_reason == "length" for t in narrow)
    # Per-request seeds make each sample independent of which slot / batch it ran in.
    assert [t.response_ids for t in narrow] == [t.response_ids for t in wide]
    assert max_logprob_error(model, narrow, 1.0) < 1e-5


def test_stop_token_and_stop_string_end_response_inclusively():
    tokenizer = build_char_tokenizer()
    model = tiny_model("qwen2", vocab=round_up_vocab_size(len(tokenizer)), seed=4)
    engine = TorchRolloutEngine(model, tokenizer, max_batch_size=4, max_seq_len=64, default_stop_token_ids=())
    prompt = tokenizer.encode("12,7,3:81=")
    free = engine.generate(requests([prompt], temperature=0.0, max_new_tokens=30))[0].response_ids
    assert len(free) == 30

    stop_token = free[6]
    cut = free.index(stop_token) + 1
    by_token = engine.generate(requests([prompt], temperature=0.0, max_new_tokens=30,
                                        stop_token_ids=(stop_token,)))[0]
    assert by_token.response_ids == free[:cut] and by_token.finish_reason == "stop"

    def text_of(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    stop_string = text_of(free)[12:14]
    expected = next(t for t in range(1, 31) if stop_string in text_of(free[:t]))
    by_string = engine.generate(requests([prompt], temperature=0.0, max_new_tokens=30,
                                         stop_strings=(stop_string,)))[0]
    assert by_string.response_ids == free[:expected] and by_string.finish_reason == "stop"

    # The tokenizer's eos is a default stop token.
    eos_engine = TorchRolloutEngine(model, tokenizer, max_batch_size=4, max_seq_len=64)
    assert eos_engine.default_stop_token_ids == {tokenizer.eos_token_id}


def test_pad_token_is_never_sampled_even_when_dominant():
    model = tiny_model("qwen2", tied=False, pad_token_id=0, eos_token_id=1)
    head = torch.nn.Linear(128, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[0] = 50.0  # pad would win every argmax and every sample
    model.lm_head = head
    engine = TorchRolloutEngine(model, max_batch_size=8, max_seq_len=64, default_stop_token_ids=())
    assert engine.banned_token_id == 0
    for temperature in (0.0, 1.0):
        out = engine.generate(requests(prompts([3, 6, 9, 4] * 2), temperature=temperature, max_new_tokens=20))
        assert all(0 not in t.response_ids and len(t.response_ids) == 20 for t in out)
        # Reported log-probs stay the full-vocabulary ones (pad masking is a truncation).
        assert max_logprob_error(model, out, temperature) < 1e-5

    # pad == eos: pad is a legitimate stop token, so it is sampled and ends the response.
    model.config.eos_token_id = model.generation_config.eos_token_id = 0
    same = TorchRolloutEngine(model, max_batch_size=8, max_seq_len=64)
    assert same.banned_token_id is None
    out = same.generate(requests(prompts([3, 6]), temperature=0.0, max_new_tokens=20))
    assert all(t.response_ids == [0] and t.finish_reason == "stop" for t in out)


def test_top_k_one_and_tiny_top_p_equal_greedy():
    model = tiny_model("qwen2", tied=True, seed=2)
    engine = TorchRolloutEngine(model, max_batch_size=8, max_seq_len=64)
    prompt_list = prompts([3, 8, 5, 12], seed=5)
    greedy = [t.response_ids for t in engine.generate(requests(prompt_list, temperature=0.0, max_new_tokens=16))]
    top_k = engine.generate(requests(prompt_list, temperature=1.0, top_k=1, max_new_tokens=16))
    top_p = engine.generate(requests(prompt_list, temperature=1.0, top_p=1e-6, max_new_tokens=16))
    assert [t.response_ids for t in top_k] == greedy
    assert [t.response_ids for t in top_p] == greedy
    # The log-probs are those of the untruncated T=1 distribution.
    assert max_logprob_error(model, top_k, 1.0) < 1e-5


def test_sampling_frequencies_follow_truncated_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    rows = 40_000
    logits = probs.log().expand(rows, 4).contiguous()
    g = torch.Generator().manual_seed(0)

    def frequencies(top_k: int, top_p: float, temperature: float = 1.0) -> torch.Tensor:
        noise = torch.rand(rows, 4, generator=g)
        tokens, logprobs = sample_next_tokens(logits, torch.full((rows,), temperature), torch.full((rows,), top_k),
                                              torch.full((rows,), top_p), noise, banned_token_id=None)
        expected_lp = torch.log_softmax(logits[0] / temperature, -1)[tokens]
        assert torch.allclose(logprobs, expected_lp)
        return torch.bincount(tokens, minlength=4).float() / rows

    def close(observed, expected):
        tolerance = 5 * (expected * (1 - expected) / rows).sqrt() + 1e-9
        assert ((observed - expected).abs() <= tolerance).all(), (observed, expected)

    close(frequencies(-1, 1.0), probs)
    close(frequencies(2, 1.0), torch.tensor([2 / 3, 1 / 3, 0, 0]))
    close(frequencies(-1, 0.8), torch.tensor([0.5, 0.25, 0.15, 0]) / 0.9)  # 0.5+0.25 < 0.8 needs the third
    tempered = torch.softmax(probs.log() / 0.5, -1)
    close(frequencies(-1, 1.0, temperature=0.5), tempered)


def test_update_weights_switches_to_new_model_and_version():
    old, new = tiny_model("qwen2", tied=True, seed=0), tiny_model("qwen2", tied=True, seed=7)
    engine = TorchRolloutEngine(copy.deepcopy(old), max_batch_size=4, max_seq_len=64)
    batch = requests(prompts([4, 9, 6]), temperature=1.0, max_new_tokens=10)
    before = engine.generate(batch)
    assert all(t.response_versions == [0] * 10 for t in before)
    engine.update_weights(new.state_dict().items(), version=3)
    assert engine.version == 3
    after = engine.generate(batch)
    assert all(t.response_versions == [3] * 10 for t in after)
    assert max_logprob_error(new, after, 1.0) < 1e-5
    assert max_logprob_error(old, after, 1.0) > 1e-2
    # The untied lm_head and qkv biases travel too.
    untied_new = tiny_model("qwen2", tied=False, seed=8)
    untied = TorchRolloutEngine(tiny_model("qwen2", tied=False, seed=1), max_batch_size=4, max_seq_len=64)
    untied.update_weights(untied_new.named_parameters(), version=1)
    assert max_logprob_error(untied_new, untied.generate(batch), 1.0) < 1e-5
    with pytest.raises(KeyError, match="not_a_weight"):
        engine.update_weights([("not_a_weight", torch.zeros(1))], version=4)
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights([("model.norm.weight", torch.zeros(3))], version=4)


def test_abort_returns_partials_and_resume_under_new_weights_keeps_both_behaviours():
    old, new = tiny_model("qwen2", tied=True, seed=0), tiny_model("qwen2", tied=True, seed=9)
    engine = TorchRolloutEngine(copy.deepcopy(old), max_batch_size=2, max_seq_len=256, default_stop_token_ids=())
    assert engine.abort_all() == []
    batch = requests(prompts([5, 3, 8, 6]), temperature=1.0, max_new_tokens=240)
    box: dict[str, list[Trajectory]] = {}
    worker = threading.Thread(target=lambda: box.setdefault("out", engine.generate(batch)))
    worker.start()
    deadline = time.monotonic() + 20
    while engine.generated_tokens < 20 and time.monotonic() < deadline:
        time.sleep(0.001)
    aborted = engine.abort_all()
    worker.join(timeout=20)
    out = box["out"]
    assert [t.request_id for t in out] == ["r0", "r1", "r2", "r3"]
    assert {t.request_id for t in aborted} == {t.request_id for t in out if t.finish_reason == "abort"}
    assert all(t.finish_reason == "abort" for t in out[2:]) and all(t.response_ids == [] for t in out[2:])
    partial = [t for t in out if t.finish_reason == "abort" and t.response_ids]
    assert partial and all(0 < len(t.response_ids) < 240 for t in partial)
    assert max_logprob_error(old, partial, 1.0) < 1e-5

    engine.update_weights(new.state_dict().items(), version=1)
    resumed = engine.generate([GenerationRequest(t.request_id, t.prompt_ids, batch[0].sampling, t.response_ids,
                                                 t.response_logprobs, t.response_versions) for t in out])
    for before, after in zip(out, resumed):
        k = len(before.response_ids)
        assert after.finish_reason == "length" and len(after.response_ids) == 240
        assert after.response_ids[:k] == before.response_ids
        assert after.response_versions == [0] * k + [1] * (240 - k)
        lp = torch.tensor(after.response_logprobs)
        if k:
            assert (hf_logprobs(old, after, 1.0)[:k] - lp[:k]).abs().max() < 1e-5
        assert (hf_logprobs(new, after, 1.0)[k:] - lp[k:]).abs().max() < 1e-5


def test_pause_blocks_decoding_until_resume():
    engine = TorchRolloutEngine(tiny_model(), max_batch_size=2, max_seq_len=64)
    engine.pause()
    box: dict[str, list[Trajectory]] = {}
    worker = threading.Thread(target=lambda: box.setdefault("out", engine.generate(
        requests(prompts([3, 4]), max_new_tokens=8))))
    worker.start()
    time.sleep(0.1)
    assert worker.is_alive() and engine.generated_tokens == 0
    engine.resume()
    worker.join(timeout=20)
    assert [len(t.response_ids) for t in box["out"]] == [8, 8]


def test_seeded_sampling_is_deterministic():
    model = tiny_model()
    batch = requests(prompts([3, 7, 5]), temperature=1.0, max_new_tokens=12)
    engine = TorchRolloutEngine(model, max_batch_size=4, max_seq_len=64, seed=11)
    first = [t.response_ids for t in engine.generate(batch)]
    engine.set_seed(11)
    assert [t.response_ids for t in engine.generate(batch)] == first
    fresh = TorchRolloutEngine(model, max_batch_size=4, max_seq_len=64, seed=11)
    assert [t.response_ids for t in fresh.generate(batch)] == first
    engine.set_seed(12)
    assert [t.response_ids for t in engine.generate(batch)] != first


def test_unsupported_architecture_and_bad_requests_are_rejected():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*Qwen2ForCausalLM"):
        TorchRolloutEngine(gpt2)
    engine = TorchRolloutEngine(tiny_model(), max_batch_size=2, max_seq_len=32)
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.generate(requests(prompts([10]), max_new_tokens=30))
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate(requests(prompts([3]), stop_strings=("ab",)))
