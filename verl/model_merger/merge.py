"""Turn one checkpoint into a Hugging Face model directory (checkpoint dir -> merger -> HF dir that
``transformers`` and the vLLM engine load): check the files, rebuild the HF weights, check them
against the HF config, write them next to the target and move them into place in one rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import torch

from verl.model_merger.checkpoint_files import CheckpointError, inspect_checkpoint
from verl.models.hf_export import DEFAULT_MAX_SHARD_BYTES, is_weight_file, save_safetensors_weights


@contextlib.contextmanager
def staged_directory(target: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh temporary directory beside ``target`` that becomes ``target`` when the block succeeds;
    on any error it is removed, so a failed merge leaves no half-written ``target``.

    An existing non-empty ``target`` is refused unless ``overwrite`` (then it is replaced only after
    the new one is complete).
    """
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"--target_dir {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise CheckpointError(f"--target_dir {target} exists and is not empty; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            retired = target.parent / f".{target.name}.old-{os.getpid()}"
            os.rename(target, retired)
            os.rename(staging, target)
            shutil.rmtree(retired)
        else:
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_weights_match_config(weights: dict[str, torch.Tensor], hf_config: Any, source: Path) -> None:
    """Every tensor of ``AutoModelForCausalLM.from_config(hf_config)`` present with its shape, nothing else."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(hf_config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    wrong = {k: (got[k], expected[k]) for k in expected.keys() & got.keys() if got[k] != expected[k]}
    if missing or unexpected or wrong:
        raise CheckpointError(f"{source}: weights do not fit the HF config: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}, shape (got, config) {dict(list(wrong.items())[:5])}")


def merge_checkpoint(local_dir: str | Path, target_dir: str | Path, backend: str | None = None,
                     hf_model_path: str | Path | None = None, overwrite: bool = False,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     log: Callable[[str], None] = lambda _: None) -> Path:
    """Export checkpoint ``local_dir`` as an HF model directory ``target_dir``; returns its path.

    ``backend``: ``torch`` (alias ``fsdp``) or ``megatron``; None detects it from the files. The
    metadata files (config, generation config, tokenizer, chat template) are copied from the
    checkpoint's ``huggingface/`` folder (or ``hf_model_path``) as they are, except that
    ``config.json``'s ``dtype`` is set to the weights' dtype. Raises ``CheckpointError`` naming
    the path and the problem.
    """
    from transformers import AutoConfig

    files = inspect_checkpoint(local_dir, backend, hf_model_path)
    hf_config = AutoConfig.from_pretrained(files.hf_dir, local_files_only=True)
    if files.backend == "torch":
        from verl.model_merger.torch_merger import torch_hf_weights

        log(f"reading torch actor checkpoint {files.torch_file}")
        weights = torch_hf_weights(files)
    else:
        from verl.model_merger.megatron_merger import megatron_hf_weights

        lo = next(iter(files.layouts.values()))
        log(f"reading {len(files.rank_files)} Megatron rank files from {files.directory} "
            f"(tp={lo.tp_size}, pp={lo.pp_size}, cp={lo.cp_size}, dp={lo.dp_size})")
        weights = megatron_hf_weights(files, hf_config, log)
    check_weights_match_config(weights, hf_config, files.directory)
    target = Path(target_dir)
    with staged_directory(target, overwrite) as staging:
        for source in sorted(files.hf_dir.iterdir()):
            if source.is_file() and not is_weight_file(source.name):
                shutil.copy2(source, staging / source.name)
        written = save_safetensors_weights(staging, weights, bool(getattr(hf_config, "tie_word_embeddings", False)),
                                           max_shard_bytes)
        log(f"wrote {len(weights)} tensors ({sum(t.numel() for t in weights.values()):,} parameters) "
            f"in {', '.join(written)} and the metadata of {files.hf_dir}")
    log(f"exported {files.directory} -> {target}")
    return target
