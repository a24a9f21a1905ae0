"""Command line of the HF export: ``python -m verl.model_merger merge --local_dir <ckpt> --target_dir <out>``.

Exit status 0 on success, 2 for a bad command line, 1 for a checkpoint that cannot be exported
(the message names the path and what is missing).
"""

from __future__ import annotations

import argparse
import sys

from verl.model_merger.checkpoint_files import BACKENDS, CheckpointError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m verl.model_merger",
                                     description="Export a training checkpoint as a Hugging Face model directory.")
    commands = parser.add_subparsers(dest="operation", required=True)
    merge = commands.add_parser("merge", help="merge a checkpoint's shards into safetensors + config + tokenizer")
    merge.add_argument("--local_dir", required=True,
                       help="checkpoint directory, <run_dir>/checkpoints/global_step_N")
    merge.add_argument("--target_dir", required=True, help="output directory (must not exist or be empty)")
    merge.add_argument("--backend", choices=BACKENDS, default=None,
                       help="checkpoint format: torch (alias fsdp: the torch actor's actor.pt) or megatron "
                            "(rank files); detected from the files when omitted")
    merge.add_argument("--hf_model_path", default=None,
                       help="model directory to take config and tokenizer from when the checkpoint has no "
                            "huggingface/ folder (checkpoints from before it was written)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty --target_dir")
    merge.add_argument("--max_shard_size_gb", type=float, default=5.0,
                       help="split the weights into safetensors files of at most this size (default 5)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from verl.model_merger.merge import merge_checkpoint

    def log(message: str) -> None:
        print(f"[model_merger] {message}", file=sys.stderr, flush=True)

    try:
        merge_checkpoint(args.local_dir, args.target_dir, backend=args.backend, hf_model_path=args.hf_model_path,
                         overwrite=args.overwrite, max_shard_bytes=int(args.max_shard_size_gb * 1024**3), log=log)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
