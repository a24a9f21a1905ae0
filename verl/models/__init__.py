"""Models and tokenizers: tiny Qwen2 presets, the char tokenizer and a loader for any local HF causal LM."""

from transformers.utils import logging as _hf_logging

from verl.models.char_tokenizer import build_char_tokenizer
from verl.models.loader import load_model_and_tokenizer
from verl.models.presets import PRESETS, build_tiny_model_dir, round_up_vocab_size, tiny_qwen2_config

__all__ = [
    "PRESETS",
    "build_char_tokenizer",
    "build_tiny_model_dir",
    "load_model_and_tokenizer",
    "round_up_vocab_size",
    "tiny_qwen2_config",
]

# Per-file "Loading weights" / "Writing model shards" bars drown the trainer's own progress.
_hf_logging.disable_progress_bar()
