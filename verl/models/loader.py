"""Load any local HF causal LM and its tokenizer: the one entry point for actor, engines and eval.

Data flow: a model directory (``build_tiny_model_dir`` or a downloaded checkpoint) ->
``load_model_and_tokenizer`` -> actor / rollout engine / param sync.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from verl.utils.config import check_choice

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS: tuple[str, ...] = ("sdpa", "eager", "flash_attention_2")


def load_model_and_tokenizer(path: str | Path, dtype: str = "float32", attn_implementation: str = "sdpa"
                             ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``path`` with ``AutoModelForCausalLM`` / ``AutoTokenizer`` from local files only.

    The tokenizer always has a pad token: a checkpoint without one pads with its eos token
    (a warning says so), because every batch in the pipeline is padded.
    """
    check_choice("model.dtype", dtype, DTYPES)
    check_choice("model.attn_implementation", attn_implementation, ATTN_IMPLEMENTATIONS)
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model path {str(model_dir)!r} does not exist or is not a directory")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model path {str(model_dir)!r} has no config.json; is it a HF model directory?")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer at {str(model_dir)!r} has neither a pad nor an eos token")
        warnings.warn(f"tokenizer at {str(model_dir)!r} has no pad token; padding with eos {tokenizer.eos_token!r}",
                      stacklevel=2)
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=DTYPES[dtype], attn_implementation=attn_implementation, local_files_only=True)
    return model, tokenizer
