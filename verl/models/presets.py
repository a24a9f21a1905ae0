"""Tiny Qwen2-architecture model presets, random-initialised from a config (no downloads).

Data flow: ``build_tiny_model_dir`` writes the HF model directory that the actor, the rollout
engines (torch, vLLM) and param sync all load, so every backend sees the same architecture.
Head dims are 32 / 64 because vLLM's CPU build rejects smaller ones.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from verl.models.char_tokenizer import build_char_tokenizer
from verl.utils.config import ConfigError, check_choice, check_divisible, check_positive


@dataclass(frozen=True)
class Qwen2Preset:
    """The shape of one preset; everything not listed keeps Qwen2's defaults."""

    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int
    rope_theta: float = 10000.0

    def validate(self, prefix: str) -> None:
        for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "max_position_embeddings", "rope_theta"):
            check_positive(f"{prefix}.{name}", getattr(self, name))
        check_divisible(f"{prefix}.hidden_size", self.hidden_size, self.num_attention_heads,
                        f"{prefix}.num_attention_heads")
        # Grouped-query attention shares each KV head among an integer number of query heads.
        check_divisible(f"{prefix}.num_attention_heads", self.num_attention_heads, self.num_key_value_heads,
                        f"{prefix}.num_key_value_heads")


PRESETS: dict[str, Qwen2Preset] = {
    # ~0.80M parameters with the char vocabulary: 3 SFT steps/s on one CPU thread.
    "tiny": Qwen2Preset(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=384, max_position_embeddings=256),
    # ~19M parameters: the largest that still trains at a usable pace on a laptop CPU.
    "small": Qwen2Preset(num_hidden_layers=6, hidden_size=512, num_attention_heads=8, num_key_value_heads=4,
                         intermediate_size=1536, max_position_embeddings=1024),
}

_QWEN2_CONFIG_KEYS = frozenset(inspect.signature(Qwen2Config.__init__).parameters) - {"self", "kwargs"}


def round_up_vocab_size(num_tokens: int, multiple: int = 16) -> int:
    """Embedding rows = num_tokens rounded up to a multiple (aligned matmuls, TP-divisible vocab)."""
    check_positive("vocab_multiple", multiple)
    return -(-num_tokens // multiple) * multiple


def tiny_qwen2_config(vocab_size: int, preset: str = "tiny", **overrides) -> Qwen2Config:
    """A ``Qwen2Config`` for ``preset`` ("tiny" or "small"), tied embeddings by default.

    ``overrides`` may be any preset field or ``Qwen2Config`` argument (e.g. ``num_hidden_layers=2``,
    ``tie_word_embeddings=False``, ``eos_token_id=1``); unknown names raise ``ConfigError``.
    """
    check_choice("model.preset", preset, PRESETS)
    check_positive("model.vocab_size", vocab_size)
    shape = {name: getattr(PRESETS[preset], name) for name in Qwen2Preset.__dataclass_fields__}
    config_kwargs: dict = {"tie_word_embeddings": True}
    for key, value in overrides.items():
        if key in shape:
            shape[key] = value
        elif key in _QWEN2_CONFIG_KEYS:
            config_kwargs[key] = value
        else:
            raise ConfigError(f"model.{key}", value,
                              f"must be a preset field ({', '.join(shape)}) or a Qwen2Config argument")
    Qwen2Preset(**shape).validate(f"model.presets.{preset}")
    rope_theta = shape.pop("rope_theta")
    config_kwargs.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": float(rope_theta)})
    return Qwen2Config(vocab_size=vocab_size, **shape, **config_kwargs)


def build_tiny_model_dir(path: str | Path, preset: str = "tiny", seed: int = 0,
                         tie_word_embeddings: bool = True) -> str:
    """Random-init a fp32 Qwen2ForCausalLM (seeded) and the char tokenizer; save both to ``path``.

    The global torch RNG is left untouched: initialisation runs in a forked RNG seeded with
    ``seed``, so the same seed gives bit-identical weights whatever ran before.
    """
    tokenizer = build_char_tokenizer()
    config = tiny_qwen2_config(
        round_up_vocab_size(len(tokenizer)), preset,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    # generate() reads stop/pad ids from the generation config, not from the model config.
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)
