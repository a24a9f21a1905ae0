"""Find and check the files of one checkpoint before anything is merged (checkpoint dir -> merger).

Everything that can be missing or inconsistent is checked here, so a merge either has all it
needs or fails naming the path and what is wrong: the ``COMPLETE`` marker, the HF metadata
folder, the actor file(s), every Megatron rank of the recorded world size, one layout for all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from verl.utils.checkpoint import (
    COMPLETE_MARKER,
    HF_SUBDIR,
    MEGATRON_RANK_FILE,
    TORCH_ACTOR_FILE,
    MegatronRankLayout,
    megatron_rank_file,
)

BACKENDS = ("torch", "fsdp", "megatron")
# veRL users know the data-parallel format as ``fsdp``; ours is the torch actor's ``actor.pt``.
BACKEND_ALIASES = {"fsdp": "torch"}


class CheckpointError(ValueError):
    """A checkpoint directory the merger cannot export; the message names the path and what is missing."""


@dataclass
class CheckpointFiles:
    """A checked checkpoint: its backend (``torch`` or ``megatron``), the HF metadata folder, and the
    actor file (torch) or the rank files with their layouts (Megatron, indexed by global rank)."""

    directory: Path
    backend: str
    hf_dir: Path
    torch_file: Path | None = None
    rank_files: dict[int, Path] = field(default_factory=dict)
    layouts: dict[int, MegatronRankLayout] = field(default_factory=dict)


def load_rank_file(path: Path) -> dict[str, Any]:
    """A checkpoint file's top-level dict; tensors stay memory-mapped, so optimizer states the merge
    never touches are not read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        raise CheckpointError(f"{path}: cannot be read as a checkpoint file ({type(err).__name__}: {err})") from err


def detect_backend(directory: Path) -> str:
    """``torch`` if ``actor.pt`` is there, ``megatron`` if rank files are; neither or both raise."""
    has_torch = (directory / TORCH_ACTOR_FILE).is_file()
    has_megatron = any(MEGATRON_RANK_FILE.match(p.name) for p in directory.iterdir())
    if has_torch and has_megatron:
        raise CheckpointError(f"{directory} holds both {TORCH_ACTOR_FILE} and Megatron rank files; "
                              "pass --backend torch or --backend megatron")
    if not (has_torch or has_megatron):
        raise CheckpointError(f"{directory} holds neither {TORCH_ACTOR_FILE} (torch actor) nor "
                              f"{megatron_rank_file(0)}... (Megatron actor): is it a checkpoint directory "
                              "(<run_dir>/checkpoints/global_step_N)?")
    return "torch" if has_torch else "megatron"


def inspect_checkpoint(local_dir: str | Path, backend: str | None = None,
                       hf_model_path: str | Path | None = None) -> CheckpointFiles:
    """Check ``local_dir`` and return its files; ``backend`` None detects it, ``fsdp`` means ``torch``.

    The HF config and tokenizer come from the checkpoint's ``huggingface/`` folder, or from
    ``hf_model_path`` (a model directory with the same architecture) when it has none.
    """
    directory = Path(local_dir)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not (directory / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"{directory} has no {COMPLETE_MARKER} marker: the trainer writes it after every "
                              "rank saved, so this checkpoint is incomplete (interrupted save?)")
    if backend is not None and backend not in BACKENDS:
        raise CheckpointError(f"--backend {backend!r}: valid are {', '.join(BACKENDS)}")
    found = detect_backend(directory)
    wanted = BACKEND_ALIASES.get(backend, backend) if backend else found
    if wanted != found:
        raise CheckpointError(f"--backend {backend}: {directory} is a {found} checkpoint "
                              f"({TORCH_ACTOR_FILE if found == 'torch' else 'megatron_actor_rank*.pt'})")
    files = CheckpointFiles(directory=directory, backend=found, hf_dir=_hf_dir(directory, hf_model_path))
    if found == "torch":
        files.torch_file = directory / TORCH_ACTOR_FILE
    else:
        files.rank_files, files.layouts = _megatron_rank_files(directory)
    return files


def _hf_dir(directory: Path, hf_model_path: str | Path | None) -> Path:
    if hf_model_path is not None:
        source = Path(hf_model_path)
        if not (source / "config.json").is_file():
            raise CheckpointError(f"--hf_model_path {source} has no config.json")
        return source
    source = directory / HF_SUBDIR
    if not (source / "config.json").is_file():
        raise CheckpointError(f"{source}/config.json is missing: this checkpoint predates the HF metadata "
                              "folder; pass --hf_model_path <the model directory the run started from>")
    return source


def _megatron_rank_files(directory: Path) -> tuple[dict[int, Path], dict[int, MegatronRankLayout]]:
    files = {int(m.group(1)): p for p in directory.iterdir() if (m := MEGATRON_RANK_FILE.match(p.name))}
    layouts: dict[int, MegatronRankLayout] = {}
    for rank, path in sorted(files.items()):
        record = load_rank_file(path).get("layout")
        if record is None:
            raise CheckpointError(f"{path} records no parallel layout (written before layouts were recorded): "
                                  "resume it with the same actor.megatron layout and save again to export it")
        try:
            layouts[rank] = MegatronRankLayout.from_dict(record)
        except TypeError as err:
            raise CheckpointError(f"{path}: malformed layout record {record!r} ({err})") from err
        if layouts[rank].rank != rank:
            raise CheckpointError(f"{path} records rank {layouts[rank].rank}, its name says rank {rank}")
    world_sizes = {rank: layout.world_size for rank, layout in layouts.items()}
    if len(set(world_sizes.values())) != 1:
        raise CheckpointError(f"{directory}: rank files record mixed world sizes {world_sizes} "
                              "(files from different runs in one directory?)")
    world_size = next(iter(world_sizes.values()))
    missing = [megatron_rank_file(r) for r in range(world_size) if r not in files]
    extra = [files[r].name for r in files if r >= world_size]
    if missing or extra:
        raise CheckpointError(f"{directory}: world size {world_size} needs {megatron_rank_file(0)} .. "
                              f"{megatron_rank_file(world_size - 1)}; missing {missing}, unexpected {extra}")
    sizes = {(lo.tp_size, lo.pp_size, lo.cp_size, lo.dp_size, lo.virtual_pipeline_size) for lo in layouts.values()}
    if len(sizes) != 1:
        raise CheckpointError(f"{directory}: rank files record different layouts {sorted(sizes, key=str)}")
    tp, pp, cp, dp, vpp = next(iter(sizes))
    if tp * pp * cp * dp != world_size:
        raise CheckpointError(f"{directory}: layout tp*pp*cp*dp = {tp}*{pp}*{cp}*{dp} != world size {world_size}")
    if vpp not in (None, 1):
        raise CheckpointError(f"{directory}: virtual pipeline size {vpp} is not supported by this merger")
    coords = {(lo.tp_rank, lo.pp_rank, lo.cp_rank, lo.dp_rank) for lo in layouts.values()}
    if len(coords) != world_size:
        raise CheckpointError(f"{directory}: two rank files claim the same (tp, pp, cp, dp) coordinates")
    return files, layouts
