"""RolloutConfig validation, its derived lengths and SamplingParams, and the engine factory."""

from __future__ import annotations

import pytest
import torch
import transformers

from verl.trainer.config import load_config
from verl.utils.config import ConfigError, build_config
from verl.workers.rollout import RolloutConfig, TorchRolloutEngine, ValKwargs, build_rollout_engine

torch.set_num_threads(1)

PREFIX = "actor_rollout_ref.rollout"


def test_defaults_validate_and_validation_is_greedy():
    config = RolloutConfig()
    config.validate(PREFIX)
    val = config.val_kwargs
    assert (val.do_sample, val.temperature, val.top_p, val.top_k, val.n, val.report_greedy) == (
        False, 0.0, 1.0, -1, 1, False)
    greedy = RolloutConfig(prompt_length=8, response_length=4).val_sampling_params()
    assert (greedy.temperature, greedy.top_p, greedy.top_k) == (0.0, 1.0, -1)


def test_lengths_are_derived_from_prompt_and_response_length():
    config = RolloutConfig(prompt_length=32, response_length=16)
    assert (config.max_new_tokens, config.max_seq_len) == (16, 48)
    # max_model_len raises what the engine holds; the response budget stays the same.
    longer = RolloutConfig(prompt_length=32, response_length=16, max_model_len=100)
    assert (longer.max_new_tokens, longer.max_seq_len) == (16, 100)
    # Not derived yet (built outside TrainerConfig): the error says where the value comes from.
    with pytest.raises(ValueError, match="data.max_response_length"):
        _ = RolloutConfig().max_new_tokens
    with pytest.raises(ValueError, match="data.max_prompt_length"):
        _ = RolloutConfig(response_length=16).max_seq_len


@pytest.mark.parametrize("overrides,key", [
    ([f"{PREFIX}.name=sglang"], f"{PREFIX}.name"),
    ([f"{PREFIX}.temperature=-0.1"], f"{PREFIX}.temperature"),
    ([f"{PREFIX}.top_p=0.0"], f"{PREFIX}.top_p"),
    ([f"{PREFIX}.top_p=1.5"], f"{PREFIX}.top_p"),
    ([f"{PREFIX}.top_k=0"], f"{PREFIX}.top_k"),
    ([f"{PREFIX}.n=0"], f"{PREFIX}.n"),
    # The response budget is data.max_response_length (rollout.response_length is derived from it).
    (["data.max_response_length=0"], "data.max_response_length"),
    ([f"{PREFIX}.max_num_seqs=0"], f"{PREFIX}.max_num_seqs"),
    ([f"{PREFIX}.max_model_len=32"], f"{PREFIX}.max_model_len"),
    ([f"{PREFIX}.response_length=17"], f"{PREFIX}.response_length"),
    ([f"{PREFIX}.stop_strings=['']"], f"{PREFIX}.stop_strings"),
    ([f"{PREFIX}.val_kwargs.n=0"], f"{PREFIX}.val_kwargs.n"),
    ([f"{PREFIX}.val_kwargs.top_k=0"], f"{PREFIX}.val_kwargs.top_k"),
    ([f"{PREFIX}.val_kwargs.temperature=-1.0"], f"{PREFIX}.val_kwargs.temperature"),
    ([f"{PREFIX}.calculate_log_probs=false"], f"{PREFIX}.calculate_log_probs"),
    ([f"{PREFIX}.multi_turn.enable=true"], f"{PREFIX}.multi_turn.enable"),
    ([f"{PREFIX}.tensor_model_parallel_size=2", f"{PREFIX}.engine_kwargs.vllm.in_process=true"],
     f"{PREFIX}.engine_kwargs.vllm.in_process"),
])
def test_invalid_values_name_their_key(overrides, key):
    with pytest.raises(ConfigError) as error:
        load_config(overrides)
    assert error.value.key == key


def test_types_are_checked_when_the_section_is_built():
    with pytest.raises(ConfigError) as error:
        build_config(RolloutConfig, {"top_p": 2.0})
    assert error.value.key == "top_p" and "less than or equal to 1" in str(error.value)
    with pytest.raises(ConfigError) as error:
        build_config(RolloutConfig, {"val_kwargs": {"mean_at_n_samples": 4}})
    assert error.value.key == "val_kwargs.mean_at_n_samples"


def test_sampling_params_follow_the_config():
    config = RolloutConfig(temperature=0.9, top_p=0.7, top_k=20, prompt_length=16, response_length=33,
                           stop_strings=["</answer>"],
                           val_kwargs=ValKwargs(do_sample=True, temperature=0.8, top_p=0.7, top_k=5, n=4))
    train = config.sampling_params(stop_token_ids=(1,))
    assert (train.temperature, train.top_p, train.top_k, train.max_new_tokens) == (0.9, 0.7, 20, 33)
    assert train.stop_token_ids == (1,) and train.stop_strings == ("</answer>",)
    sampled = config.val_sampling_params(sampled=True)
    assert (sampled.temperature, sampled.top_p, sampled.top_k, sampled.max_new_tokens) == (0.8, 0.7, 5, 33)
    greedy = config.val_sampling_params(sampled=False, stop_token_ids=(1,))
    assert (greedy.temperature, greedy.top_p, greedy.top_k) == (0.0, 1.0, -1)
    assert greedy.stop_token_ids == (1,) and greedy.stop_strings == ("</answer>",)


def test_factory_builds_torch_engine_and_validates_first():
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64)).eval()
    engine = build_rollout_engine(RolloutConfig(max_num_seqs=3, prompt_length=32, response_length=8, seed=5),
                                  model, None)
    assert isinstance(engine, TorchRolloutEngine)
    assert (engine.max_batch_size, engine.max_seq_len, engine.version) == (3, 40, 0)
    with pytest.raises(ConfigError) as error:
        build_rollout_engine(RolloutConfig(top_k=0, prompt_length=32, response_length=8), model, None)
    assert error.value.key == f"{PREFIX}.top_k"


def test_command_line_overrides_reach_the_dataclass():
    config = load_config([f"{PREFIX}.name=torch", f"{PREFIX}.n=8", f"{PREFIX}.stop_strings=['</answer>']",
                          f"{PREFIX}.val_kwargs.do_sample=true", f"{PREFIX}.val_kwargs.n=4",
                          f"{PREFIX}.val_kwargs.top_p=0.7", f"{PREFIX}.max_num_seqs=12",
                          "data.max_prompt_length=40", "data.max_response_length=20"])
    rollout = config.rollout_engine
    assert (rollout.n, rollout.stop_strings, rollout.max_num_seqs) == (8, ["</answer>"], 12)
    assert (rollout.val_kwargs.do_sample, rollout.val_kwargs.n, rollout.val_kwargs.top_p) == (True, 4, 0.7)
    assert (rollout.prompt_length, rollout.max_new_tokens, rollout.max_seq_len) == (40, 20, 60)
