"""Write a Hugging Face model directory (actor checkpoint -> ``huggingface/`` folder, and
``verl.model_merger``'s export): config, generation config, tokenizer, and safetensors weights.

The counterpart of ``loader.load_model_and_tokenizer``: what these functions write, it and vLLM load.
Weights are written in the order given, one file (``model.safetensors``) or, past
``max_shard_bytes``, numbered shards with ``model.safetensors.index.json``, as ``save_pretrained``
does; the same tensors always give the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# Files in an HF directory that hold weights (ours or any save_pretrained's), not metadata.
_WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")


def is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_FILE_SUFFIXES)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_hf_metadata(directory: str | Path, hf_config: Any, tokenizer: Any, generation_config: Any = None) -> None:
    """``config.json``, ``generation_config.json`` (when given) and the tokenizer files into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(out)
    if generation_config is not None:
        generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _shards(names: list[str], sizes: list[int], max_shard_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    filled = 0
    for name, size in zip(names, sizes):
        if groups[-1] and filled + size > max_shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += size
    return groups


def save_safetensors_weights(directory: str | Path, state_dict: dict[str, torch.Tensor], tie_word_embeddings: bool,
                             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write ``state_dict`` as safetensors into ``directory`` (which must hold ``config.json``) and
    set the config's ``dtype`` to the weights' dtype. Returns the file names written.

    With tied embeddings ``lm_head.weight`` is left out (the HF model ties it to the input
    embedding on load). Raises ``ValueError`` when the tensors mix dtypes.
    """
    from safetensors.torch import save_file

    out = Path(directory)
    config_file = out / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing: write the HF config before the weights")
    tensors = {name: t for name, t in state_dict.items() if not (tie_word_embeddings and name == "lm_head.weight")}
    dtypes = sorted({dtype_name(t.dtype) for t in tensors.values()})
    if len(dtypes) != 1:
        raise ValueError(f"weights for {out} mix dtypes {dtypes}; export needs one")
    names = list(tensors)
    groups = _shards(names, [t.numel() * t.element_size() for t in tensors.values()], max_shard_bytes)
    files = ([SAFE_WEIGHTS_NAME] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    seen_storages: set[int] = set()
    for file, group in zip(files, groups):
        shard = {}
        for name in group:
            tensor = tensors[name].detach().cpu().contiguous()
            # safetensors refuses tensors that share memory (views of one buffer): own a copy of those.
            storage = tensor.untyped_storage().data_ptr()
            if storage in seen_storages or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
                tensor = tensor.clone()
            seen_storages.add(tensor.untyped_storage().data_ptr())
            shard[name] = tensor
        save_file(shard, str(out / file), metadata={"format": "pt"})
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {name: file for file, group in zip(files, groups) for name in group}}
        (out / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        files.append(SAFE_WEIGHTS_INDEX_NAME)
    config = json.loads(config_file.read_text())
    config["dtype"] = dtypes[0]
    if "torch_dtype" in config:  # configs written by transformers < 5
        config["torch_dtype"] = dtypes[0]
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return files


def save_hf_model(directory: str | Path, hf_config: Any, tokenizer: Any, generation_config: Any = None,
                  state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """A loadable HF model directory: the metadata, plus the weights when ``state_dict`` is given."""
    save_hf_metadata(directory, hf_config, tokenizer, generation_config)
    if state_dict is not None:
        save_safetensors_weights(directory, state_dict, bool(getattr(hf_config, "tie_word_embeddings", False)))
