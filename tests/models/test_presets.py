"""Presets, model-directory building and loading: parameter counts, tying, exact save/load."""

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from transformers import Qwen2ForCausalLM

from verl.models import (
    build_char_tokenizer,
    build_tiny_model_dir,
    load_model_and_tokenizer,
    tiny_qwen2_config,
)
from verl.models.presets import round_up_vocab_size
from verl.utils.config import ConfigError

torch.set_num_threads(1)
VOCAB = 112  # 102 char-tokenizer ids rounded up to a multiple of 16


def _expected_params(vocab: int, layers: int, hidden: int, heads: int, kv_heads: int, inter: int, tied: bool) -> int:
    """Qwen2 by hand: q/k/v projections carry a bias, o does not; SwiGLU MLP; two RMSNorms per layer."""
    head_dim = hidden // heads
    attn = hidden * hidden + hidden + 2 * (hidden * kv_heads * head_dim + kv_heads * head_dim) + hidden * hidden
    mlp = 3 * hidden * inter
    per_layer = attn + mlp + 2 * hidden
    embeddings = vocab * hidden * (1 if tied else 2)
    return embeddings + layers * per_layer + hidden


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {tied: build_tiny_model_dir(root / f"tied{int(tied)}", seed=3, tie_word_embeddings=tied)
            for tied in (True, False)}


def test_round_up_vocab_size():
    assert [round_up_vocab_size(n) for n in (1, 16, 17, 102)] == [16, 16, 32, 112]
    assert round_up_vocab_size(102, 8) == 104


@pytest.mark.parametrize("preset,shape,low,high", [
    ("tiny", (4, 128, 4, 2, 384), 0.75e6, 0.85e6),
    ("small", (6, 512, 8, 4, 1536), 15e6, 25e6),
])
def test_preset_parameter_counts(preset, shape, low, high):
    config = tiny_qwen2_config(VOCAB, preset)
    assert config.hidden_size // config.num_attention_heads in (32, 64)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Qwen2ForCausalLM(config).parameters())
    assert n_params == _expected_params(VOCAB, *shape, tied=True)
    assert low <= n_params <= high


def test_tiny_preset_fields():
    config = tiny_qwen2_config(VOCAB)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.max_position_embeddings) == (4, 128, 4, 2, 384, 256)
    assert config.tie_word_embeddings is True
    assert config.rope_parameters["rope_theta"] == 10000.0


def test_overrides_apply():
    config = tiny_qwen2_config(VOCAB, num_hidden_layers=2, rope_theta=500.0, tie_word_embeddings=False, eos_token_id=1)
    assert config.num_hidden_layers == 2 and config.rope_parameters["rope_theta"] == 500.0
    assert config.tie_word_embeddings is False and config.eos_token_id == 1


def test_bad_preset_and_overrides_raise_config_error():
    with pytest.raises(ConfigError, match="'tiny', 'small'") as err:
        tiny_qwen2_config(VOCAB, "huge")
    assert err.value.key == "model.preset" and err.value.value == "huge"
    with pytest.raises(ConfigError) as err:
        tiny_qwen2_config(VOCAB, hidden_sizes=64)
    assert err.value.key == "model.hidden_sizes"
    with pytest.raises(ConfigError) as err:
        tiny_qwen2_config(VOCAB, num_key_value_heads=3)
    assert err.value.key == "model.presets.tiny.num_attention_heads"


def test_tied_build_saves_one_embedding_and_loads_tied(model_dirs):
    with safe_open(f"{model_dirs[True]}/model.safetensors", "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    with safe_open(f"{model_dirs[False]}/model.safetensors", "pt") as f:
        assert "lm_head.weight" in set(f.keys())
    tied, _ = load_model_and_tokenizer(model_dirs[True])
    untied, _ = load_model_and_tokenizer(model_dirs[False])
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == VOCAB * 128
    assert tied.dtype == torch.float32 and tied.config.vocab_size == VOCAB
    with open(f"{model_dirs[True]}/generation_config.json") as f:
        generation = json.load(f)
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (1, 0)


@pytest.mark.parametrize("tied", [True, False])
def test_save_then_load_gives_identical_logits(model_dirs, tied):
    tokenizer = build_char_tokenizer()
    config = tiny_qwen2_config(VOCAB, tie_word_embeddings=tied, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(3)  # the seed build_tiny_model_dir was given
    reference = Qwen2ForCausalLM(config).eval()
    loaded, loaded_tokenizer = load_model_and_tokenizer(model_dirs[tied])
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    input_ids = torch.randint(0, len(tokenizer), (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, reference(input_ids).logits, rtol=0, atol=0)


def test_seed_determines_weights_and_leaves_global_rng(tmp_path):
    state = torch.random.get_rng_state()
    a = load_model_and_tokenizer(build_tiny_model_dir(tmp_path / "a", seed=7))[0].state_dict()
    b = load_model_and_tokenizer(build_tiny_model_dir(tmp_path / "b", seed=7))[0].state_dict()
    c = load_model_and_tokenizer(build_tiny_model_dir(tmp_path / "c", seed=8))[0].state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_loader_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model_and_tokenizer(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*config.json"):
        load_model_and_tokenizer(tmp_path / "empty")
    with pytest.raises(ConfigError) as err:
        load_model_and_tokenizer(tmp_path / "empty", dtype="fp8")
    assert err.value.key == "model.dtype"


def test_loader_pads_with_eos_when_pad_is_missing(model_dirs, tmp_path):
    model, tokenizer = load_model_and_tokenizer(model_dirs[True])
    tokenizer.pad_token = None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model_bf16, reloaded = load_model_and_tokenizer(tmp_path, dtype="bfloat16")
    assert any("no pad token" in str(w.message) for w in caught)
    assert reloaded.pad_token == "<|end|>" and reloaded.pad_token_id == 1
    assert model_bf16.dtype == torch.bfloat16
