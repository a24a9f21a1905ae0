"""Hugging Face export of training checkpoints (checkpoint dir -> HF model directory), in veRL's shape:
``python -m verl.model_merger merge --backend {torch,fsdp,megatron} --local_dir <ckpt> --target_dir <out>``.

Modules: ``checkpoint_files`` (find and check a checkpoint's files), ``torch_merger`` /
``megatron_merger`` (rebuild HF-named weights), ``merge`` (check, write, rename into place),
``__main__`` (the command line). Format of a checkpoint: ``verl.utils.checkpoint``.
"""

from verl.model_merger.checkpoint_files import CheckpointError
from verl.model_merger.merge import merge_checkpoint

__all__ = ["CheckpointError", "merge_checkpoint"]
