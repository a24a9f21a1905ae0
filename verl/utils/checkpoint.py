"""The on-disk format of a training checkpoint, ``<run_dir>/checkpoints/global_step_N/``: shared by
its writers (trainer, actor workers) and its reader (``verl.model_merger``, the Hugging Face export).

A complete checkpoint holds:
- ``COMPLETE``: written by the trainer after every worker saved (a directory without it is partial);
- ``huggingface/``: the model's HF ``config.json``, ``generation_config.json`` (when the model has
  one) and tokenizer files, written by actor rank 0; with ``hf_model`` in
  ``actor.checkpoint.save_contents`` also the weights (a loadable HF model);
- torch actor: ``actor.pt`` (rank 0; HF-named ``model`` state dict, ``optimizer``, ``lr_scheduler``)
  and ``actor_rng_rank{r}.pt`` per rank;
- Megatron actor: ``megatron_actor_rank{r:05d}.pt`` per rank (this rank's ``model`` shard,
  ``optimizer``, ``lr_scheduler``, ``rng``, ``world_size`` and its ``layout`` record).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

COMPLETE_MARKER = "COMPLETE"
HF_SUBDIR = "huggingface"
TORCH_ACTOR_FILE = "actor.pt"
MEGATRON_RANK_FILE = re.compile(r"^megatron_actor_rank(\d{5})\.pt$")

CHECKPOINT_CONTENTS = ("model", "optimizer", "extra", "hf_model")
DEFAULT_CHECKPOINT_CONTENTS = ("model", "optimizer", "extra")


def megatron_rank_file(rank: int) -> str:
    return f"megatron_actor_rank{rank:05d}.pt"


def check_contents(key: str, contents: Iterable[str]) -> frozenset[str]:
    """``contents`` as a set, refusing names outside ``CHECKPOINT_CONTENTS`` (``key`` names the setting)."""
    chosen = frozenset(contents)
    unknown = sorted(chosen - set(CHECKPOINT_CONTENTS))
    if unknown:
        raise ValueError(f"{key}: unknown checkpoint contents {unknown}; valid: {list(CHECKPOINT_CONTENTS)}")
    return chosen


@dataclass(frozen=True)
class MegatronRankLayout:
    """Where one Megatron rank file sits in the parallel layout (Megatron order tp-cp-dp-pp). The
    merger reassembles TP shards and PP stages from it; ``virtual_pipeline_size`` is None because
    this build runs one model chunk per rank."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    cp_rank: int
    cp_size: int
    dp_rank: int
    dp_size: int
    virtual_pipeline_size: int | None = None

    @classmethod
    def of(cls, rank: int, world_size: int, groups: Any) -> MegatronRankLayout:
        """The layout of a live rank from its ``ParallelGroups``."""
        return cls(rank=rank, world_size=world_size, tp_rank=groups.tp_rank, tp_size=groups.tp_size,
                   pp_rank=groups.pp_rank, pp_size=groups.pp_size, cp_rank=groups.cp_rank, cp_size=groups.cp_size,
                   dp_rank=groups.dp_rank, dp_size=groups.dp_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> MegatronRankLayout:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})


def require_contents(file: Any, state: dict[str, Any], contents: Iterable[str],
                     keys_by_content: dict[str, tuple[str, ...]]) -> None:
    """Raise ``ValueError`` naming every content a resume asks for that ``state`` (loaded from ``file``) lacks."""
    chosen = set(contents)
    absent = [c for c in CHECKPOINT_CONTENTS if c in chosen and any(k not in state for k in keys_by_content.get(c, ()))]
    if absent:
        raise ValueError(f"checkpoint file {file} holds no {' and no '.join(map(repr, absent))} state: it was saved "
                         f"without them in actor_rollout_ref.actor.checkpoint.save_contents; leave them out of "
                         "actor_rollout_ref.actor.checkpoint.load_contents to resume from it")
