"""DataProto: the one batch container passed between every component of the pipeline.

Data flow: dataset -> rollouter -> queue -> trainer/actor -> param sync -> engines; whatever
crosses an arrow is a DataProto (or a list of them). This docstring is the reference for the
shared batch layout. B trajectories, P = max prompt length, R = max response length:

batch (torch tensors, leading dim B)
    prompts            [B, P]   long, LEFT-padded with pad_token_id
    responses          [B, R]   long, RIGHT-padded with pad_token_id
    input_ids          [B, P+R] long, cat(prompts, responses)
    attention_mask     [B, P+R] long, 1 on real tokens
    position_ids       [B, P+R] long, clamp(cumsum(attention_mask, -1) - 1, min=0)
    response_mask      [B, R]   float32, 1 on tokens the policy generated (0 on padding and on
                                tool outputs)
    rollout_log_probs  [B, R]   float32 behaviour log-probs (0 where response_mask is 0)
    token_level_scores / token_level_rewards
                       [B, R]   float32, the scalar reward on the last response token
    advantages         [B, R]   float32
    old_log_probs      [B, R]   float32, when recomputed

non_tensor_batch (numpy arrays of length B; dtype=object, or numeric)
    uid                 str, prompt-group id: the n responses to one prompt share it
    data_source         str, selects the reward function
    ground_truth        the reference answer
    extra_info          dict
    param_version_start int, weight version that sampled the first response token
    param_version_end   int, weight version that sampled the last response token

meta_info: a plain dict for the whole batch, e.g. {"temperature": 1.0, "global_steps": 3}.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import numpy as np
import torch

Index = Union[int, slice, Sequence[int], Sequence[bool], np.ndarray, torch.Tensor]

# A group partition search that needs more steps than this is pathological (thousands of
# unequal groups); fail loudly instead of hanging the trainer.
_MAX_PARTITION_STEPS = 200_000


def to_object_array(values: Iterable[Any]) -> np.ndarray:
    """A 1-D dtype=object array holding ``values`` as given.

    Filled element by element because ``np.array`` turns a list of equal-length lists into a
    2-D array and may split dicts or tuples, which would break the leading-dim contract.
    """
    items = list(values)
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out


def _as_non_tensor(key: str, value: Any) -> np.ndarray:
    """Arrays pass through; a list of plain numbers becomes a numeric array, anything else an
    object array (so str uids never become fixed-width '<U' arrays)."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, torch.Tensor):
        raise TypeError(f"DataProto: non-tensor key {key!r} got a torch.Tensor; put it in tensors")
    items = list(value)
    if items and all(isinstance(v, numbers.Number) and not isinstance(v, complex) for v in items):
        return np.asarray(items)
    return to_object_array(items)


def _values_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape \
            and bool(np.all(a == b))
    return bool(a == b)


def _merge_meta(metas: Sequence[dict], what: str) -> dict:
    """Union of the meta dicts; a key present in several must hold equal values everywhere."""
    merged: dict = {}
    for meta in metas:
        for key, value in meta.items():
            if key in merged and not _values_equal(merged[key], value):
                raise ValueError(f"DataProto.{what}: meta_info[{key!r}] differs ({merged[key]!r} vs {value!r})")
            merged.setdefault(key, value)
    return merged


@dataclass(eq=False)
class DataProto:
    """Named tensors, per-sample numpy arrays and batch-wide meta info sharing one leading dim."""

    batch: dict[str, torch.Tensor] = field(default_factory=dict)
    non_tensor_batch: dict[str, np.ndarray] = field(default_factory=dict)
    meta_info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.meta_info, dict):
            raise TypeError(f"DataProto: meta_info must be a dict, got {type(self.meta_info).__name__}")
        reference: tuple[str, int] | None = None
        for kind, store, cls in (("batch", self.batch, torch.Tensor), ("non_tensor_batch", self.non_tensor_batch,
                                                                        np.ndarray)):
            for key, value in store.items():
                if not isinstance(value, cls) or value.ndim == 0:
                    raise TypeError(f"DataProto: {kind}[{key!r}] must be a {cls.__name__} with a leading batch "
                                    f"dim, got {type(value).__name__} with shape {getattr(value, 'shape', None)}")
                if reference is None:
                    reference = (key, len(value))
                elif len(value) != reference[1]:
                    raise ValueError(f"DataProto: {kind}[{key!r}] has length {len(value)} but "
                                     f"{reference[0]!r} has length {reference[1]}")

    def __len__(self) -> int:
        for store in (self.batch, self.non_tensor_batch):
            for value in store.values():
                return len(value)
        return 0

    def __repr__(self) -> str:
        tensors = {k: f"{tuple(v.shape)} {v.dtype}" for k, v in self.batch.items()}
        arrays = {k: f"{v.shape} {v.dtype}" for k, v in self.non_tensor_batch.items()}
        return f"DataProto(len={len(self)}, batch={tensors}, non_tensor_batch={arrays}, " \
               f"meta_info_keys={list(self.meta_info)})"

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor] | None = None,
                  non_tensors: dict[str, Any] | None = None, meta_info: dict | None = None) -> "DataProto":
        """Build from plain dicts. A non-tensor list of plain numbers becomes a numeric array,
        any other list a 1-D object array; numpy arrays are kept as they are."""
        return cls(batch=dict(tensors or {}),
                   non_tensor_batch={k: _as_non_tensor(k, v) for k, v in (non_tensors or {}).items()},
                   meta_info=dict(meta_info or {}))

    def select(self, batch_keys: Iterable[str] | None = None, non_tensor_keys: Iterable[str] | None = None,
               meta_keys: Iterable[str] | None = None) -> "DataProto":
        """The chosen keys (``None`` = all of that kind) in new dicts; tensor storage is shared."""
        def pick(store: dict, keys: Iterable[str] | None, kind: str) -> dict:
            if keys is None:
                return dict(store)
            missing = [k for k in keys if k not in store]
            if missing:
                raise KeyError(f"DataProto.select: {kind} has no {missing}; available: {sorted(store)}")
            return {k: store[k] for k in keys}
        return DataProto(pick(self.batch, batch_keys, "batch"),
                         pick(self.non_tensor_batch, non_tensor_keys, "non_tensor_batch"),
                         pick(self.meta_info, meta_keys, "meta_info"))

    def _row_index(self, idx: Index) -> slice | np.ndarray:
        """Normalise any supported index to a slice (kept as a view) or an int64 row array."""
        n = len(self)
        if isinstance(idx, slice):
            return idx
        if isinstance(idx, numbers.Integral) and not isinstance(idx, bool):
            idx = [int(idx)]
        if isinstance(idx, torch.Tensor):
            idx = idx.detach().cpu().numpy()
        rows = np.asarray(idx)
        if rows.ndim != 1:
            raise IndexError(f"DataProto: index must be 1-D, got shape {rows.shape}")
        if rows.dtype == bool:
            if len(rows) != n:
                raise IndexError(f"DataProto: boolean mask has length {len(rows)}, batch has {n}")
            return np.flatnonzero(rows)
        if rows.size == 0:
            return rows.astype(np.int64)
        if not np.issubdtype(rows.dtype, np.integer):
            raise IndexError(f"DataProto: index must be integers, a boolean mask or a slice, got {rows.dtype}")
        if rows.min() < -n or rows.max() >= n:
            raise IndexError(f"DataProto: index out of range for length {n} (min {rows.min()}, max {rows.max()})")
        return rows.astype(np.int64) % max(n, 1)

    def index(self, idx: Index) -> "DataProto":
        """Rows ``idx``: an int (kept as a length-1 batch), a slice, int indices or a boolean mask.
        A slice returns views of the tensors and arrays (no copy); other indices copy."""
        rows = self._row_index(idx)
        if isinstance(rows, slice):
            batch = {k: v[rows] for k, v in self.batch.items()}
            non_tensor = {k: v[rows] for k, v in self.non_tensor_batch.items()}
        else:
            batch = {k: v[torch.from_numpy(rows).to(v.device)] for k, v in self.batch.items()}
            non_tensor = {k: v[rows] for k, v in self.non_tensor_batch.items()}
        return DataProto(batch, non_tensor, dict(self.meta_info))

    __getitem__ = index

    def chunk(self, n: int) -> list["DataProto"]:
        """``n`` consecutive chunks of equal length."""
        if n <= 0 or len(self) % n != 0:
            raise ValueError(f"DataProto.chunk: length {len(self)} is not divisible into {n} equal chunks")
        size = len(self) // n
        return [self[i * size:(i + 1) * size] for i in range(n)]

    def split(self, size: int) -> list["DataProto"]:
        """Consecutive chunks of ``size`` rows; the last one holds the remainder."""
        if size <= 0:
            raise ValueError(f"DataProto.split: size must be > 0, got {size}")
        return [self[start:start + size] for start in range(0, len(self), size)]

    @classmethod
    def concat(cls, parts: Sequence["DataProto"]) -> "DataProto":
        """Rows of ``parts`` in order. Every part must have the same keys; meta_info is the union
        of the parts' meta dicts and a key present in several must be equal in all of them."""
        if not parts:
            raise ValueError("DataProto.concat: nothing to concatenate")
        first = parts[0]
        for i, part in enumerate(parts[1:], start=1):
            for kind, a, b in (("batch", first.batch, part.batch),
                               ("non_tensor_batch", first.non_tensor_batch, part.non_tensor_batch)):
                if set(a) != set(b):
                    raise ValueError(f"DataProto.concat: part {i} {kind} keys {sorted(b)} differ from part 0 "
                                     f"keys {sorted(a)} (symmetric difference {sorted(set(a) ^ set(b))})")
        batch = {}
        for key in first.batch:
            try:
                batch[key] = torch.cat([p.batch[key] for p in parts])
            except RuntimeError as err:
                shapes = [tuple(p.batch[key].shape) for p in parts]
                raise ValueError(f"DataProto.concat: batch[{key!r}] shapes {shapes} do not concatenate") from err
        non_tensor = {}
        for key in first.non_tensor_batch:
            try:
                non_tensor[key] = np.concatenate([p.non_tensor_batch[key] for p in parts])
            except ValueError as err:
                shapes = [p.non_tensor_batch[key].shape for p in parts]
                raise ValueError(f"DataProto.concat: non_tensor_batch[{key!r}] shapes {shapes} do not "
                                 f"concatenate") from err
        return cls(batch, non_tensor, _merge_meta([p.meta_info for p in parts], "concat"))

    def union(self, other: "DataProto") -> "DataProto":
        """Columns of both; a key present in both must hold equal values (else ValueError)."""
        # A batch without columns (meta info only) has no length to disagree with.
        both_have_columns = bool(self.batch or self.non_tensor_batch) and bool(other.batch or other.non_tensor_batch)
        if both_have_columns and len(self) != len(other):
            raise ValueError(f"DataProto.union: lengths differ ({len(self)} vs {len(other)})")
        batch, non_tensor = dict(self.batch), dict(self.non_tensor_batch)
        for kind, mine, theirs in (("batch", batch, other.batch), ("non_tensor_batch", non_tensor,
                                                                    other.non_tensor_batch)):
            for key, value in theirs.items():
                if key in mine and not _values_equal(mine[key], value):
                    raise ValueError(f"DataProto.union: {kind}[{key!r}] differs between the two batches")
                mine[key] = value
        return DataProto(batch, non_tensor, _merge_meta([self.meta_info, other.meta_info], "union"))

    def reorder(self, indices: Index) -> "DataProto":
        """Rows permuted: row i of the result is row ``indices[i]``; ``indices`` must be a permutation."""
        rows = self._row_index(indices)
        if isinstance(rows, slice) or len(rows) != len(self) or len(np.unique(rows)) != len(self):
            raise ValueError(f"DataProto.reorder: indices must be a permutation of range({len(self)})")
        return self.index(rows)

    def group_indices(self, key: str = "uid") -> list[list[int]]:
        """Row indices of each group of equal ``non_tensor_batch[key]``, groups in first-appearance order."""
        if key not in self.non_tensor_batch:
            raise KeyError(f"DataProto.group_indices: no non_tensor_batch[{key!r}]; "
                           f"available: {sorted(self.non_tensor_batch)}")
        groups: dict[Any, list[int]] = {}
        for row, value in enumerate(self.non_tensor_batch[key].tolist()):
            groups.setdefault(value, []).append(row)
        return list(groups.values())

    def chunk_by_group(self, n: int, key: str = "uid") -> list["DataProto"]:
        """``n`` chunks of equal length such that every group lies whole in one chunk.

        Groups are placed largest first into the first chunk with room (ties in first-appearance
        order), backtracking when stuck, so equal-size contiguous groups give exactly
        ``chunk(n)``. Within a chunk rows keep their original order.
        """
        groups = self.group_indices(key)
        sizes = [len(g) for g in groups]
        if n <= 0 or len(self) % n != 0:
            raise ValueError(f"DataProto.chunk_by_group: length {len(self)} is not divisible into {n} chunks "
                             f"(group sizes {sizes})")
        capacity = len(self) // n
        impossible = f"DataProto.chunk_by_group: group sizes {sizes} cannot be split into {n} chunks of " \
                     f"{capacity} rows with every group whole"
        # Every chunk's length is a sum of group sizes, hence a multiple of their gcd; this settles
        # the common equal-size case (groups not divisible by n) without searching.
        if sizes and capacity % math.gcd(*sizes) != 0:
            raise ValueError(impossible)
        order = sorted(range(len(groups)), key=lambda g: -sizes[g])
        free = [capacity] * n
        assignment = [-1] * len(groups)
        # Depth-first search without recursion (one level per group, and there may be thousands):
        # candidates[p] holds the chunks still to try for the group at position p.
        candidates: list[list[int]] = []
        position, steps = 0, 0
        while 0 <= position < len(order):
            group = order[position]
            if len(candidates) == position:
                options, seen_free = [], set()
                for chunk_id in range(n):
                    # Chunks with equal free space are interchangeable for the rest of the search.
                    if free[chunk_id] >= sizes[group] and free[chunk_id] not in seen_free:
                        seen_free.add(free[chunk_id])
                        options.append(chunk_id)
                candidates.append(options[::-1])
            else:
                free[assignment[group]] += sizes[group]
            if candidates[position]:
                chunk_id = candidates[position].pop()
                free[chunk_id] -= sizes[group]
                assignment[group] = chunk_id
                position += 1
                steps += 1
                if steps > _MAX_PARTITION_STEPS:
                    raise ValueError(f"DataProto.chunk_by_group: gave up partitioning group sizes {sizes} "
                                     f"into {n} chunks of {capacity} rows")
            else:
                candidates.pop()
                position -= 1
        if position < 0:
            raise ValueError(impossible)
        rows_of_chunk: list[list[int]] = [[] for _ in range(n)]
        for group, members in enumerate(groups):
            rows_of_chunk[assignment[group]].extend(members)
        return [self.index(np.asarray(sorted(rows), dtype=np.int64)) for rows in rows_of_chunk]

    def pad_to_divisor(self, divisor: int) -> tuple["DataProto", int]:
        """Append copies of the leading rows (cyclically) until the length divides by ``divisor``;
        returns the padded batch and ``pad_size`` for ``unpad``."""
        if divisor <= 0:
            raise ValueError(f"DataProto.pad_to_divisor: divisor must be > 0, got {divisor}")
        pad_size = -len(self) % divisor
        if pad_size == 0:
            return self, 0
        if len(self) == 0:
            raise ValueError("DataProto.pad_to_divisor: cannot pad an empty batch")
        padding = self.index(np.arange(pad_size) % len(self))
        return DataProto.concat([self, padding]), pad_size

    def unpad(self, pad_size: int) -> "DataProto":
        """Drop the last ``pad_size`` rows added by ``pad_to_divisor``."""
        if not 0 <= pad_size <= len(self):
            raise ValueError(f"DataProto.unpad: pad_size {pad_size} outside [0, {len(self)}]")
        return self[:len(self) - pad_size]

    def to(self, device: str | torch.device) -> "DataProto":
        """Tensors moved to ``device``; numpy arrays and meta info are shared."""
        return DataProto({k: v.to(device) for k, v in self.batch.items()}, dict(self.non_tensor_batch),
                         dict(self.meta_info))

    def save(self, path: str | Path) -> None:
        """Write with ``torch.save`` (tensors moved to CPU so the file loads anywhere)."""
        torch.save({"batch": {k: v.cpu() for k, v in self.batch.items()},
                    "non_tensor_batch": self.non_tensor_batch, "meta_info": self.meta_info}, path)

    @classmethod
    def load(cls, path: str | Path) -> "DataProto":
        """Read a file written by ``save``. Object arrays need full unpickling, so only load
        files this pipeline wrote (queue checkpoints, debug dumps)."""
        state = torch.load(path, map_location="cpu", weights_only=False)
        return cls(state["batch"], state["non_tensor_batch"], state["meta_info"])
