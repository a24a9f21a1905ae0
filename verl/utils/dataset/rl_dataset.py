"""Prompt dataset, sampler and collation: parquet rows -> prompt token ids -> prompt batches for the rollouter.

Rows follow veRL's RL schema: ``data_source`` (str), ``prompt`` (chat messages
``[{"role", "content"}, ...]``), ``reward_model`` (``{"style", "ground_truth"}``) and optional
``ability`` and ``extra_info``. Every row is checked and tokenized when the dataset loads, so a
bad file fails at start-up with its path, row and column rather than mid-training.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from verl.protocol import DataProto, to_object_array
from verl.utils.config import check_choice, check_positive

TRUNCATION_MODES = ("error", "left", "right")
_TOKENIZE_CHUNK = 1024


def chat_prompt_ids(tokenizer: Any, conversations: Sequence[list[dict]]) -> list[list[int]]:
    """Token ids of each conversation rendered with the generation prompt.

    ``apply_chat_template(tokenize=True)`` returns a list of ids in transformers 4 and a
    ``BatchEncoding`` in transformers 5; both are reduced to plain lists of ints.
    """
    encoded = tokenizer.apply_chat_template(list(conversations), add_generation_prompt=True, tokenize=True)
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    return [[int(t) for t in ids] for ids in encoded]


def _row_error(path: str, row: int, column: str, problem: str) -> ValueError:
    return ValueError(f"{path}: row {row}, column {column!r}: {problem}")


def _checked_messages(path: str, row: int, column: str, value: Any) -> list[dict[str, str]]:
    if not isinstance(value, (list, tuple, np.ndarray)) or len(value) == 0:
        raise _row_error(path, row, column, f"must be a non-empty list of chat messages, got {type(value).__name__}")
    messages = []
    for turn, message in enumerate(value):
        if (not isinstance(message, Mapping) or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)):
            raise _row_error(path, row, column,
                             f"message {turn} must be {{'role': str, 'content': str}}, got {message!r}")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


class RLDataset:
    """All rows of one or more parquet files, validated and tokenized at load.

    ``truncation`` decides what happens to a prompt longer than ``max_prompt_length`` tokens:
    ``error`` (raise, naming file, row and lengths), ``left`` (keep the last tokens, which hold
    the generation prompt) or ``right`` (keep the first tokens). Items are dicts with
    ``raw_prompt_ids``, ``raw_prompt`` (the messages), ``data_source``, ``ground_truth``,
    ``extra_info``, ``ability`` and ``index`` (position in the concatenated files).
    """

    def __init__(self, files: str | os.PathLike | Sequence[str | os.PathLike], tokenizer: Any,
                 max_prompt_length: int, prompt_key: str = "prompt", truncation: str = "error",
                 filter_overlong_prompts: bool = False):
        check_positive("data.max_prompt_length", max_prompt_length)
        check_choice("data.truncation", truncation, TRUNCATION_MODES)
        self.files = [os.fspath(files)] if isinstance(files, (str, os.PathLike)) else [os.fspath(f) for f in files]
        if not self.files:
            raise ValueError("RLDataset: no parquet files given")
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.prompt_key = prompt_key
        self.truncation = truncation
        # veRL's data.filter_overlong_prompts: drop such prompts (counted) instead of truncating.
        self.filter_overlong_prompts = filter_overlong_prompts
        self.num_filtered = 0
        self._items: list[dict[str, Any]] = []
        for path in self.files:
            self._load(path)

    def _load(self, path: str) -> None:
        table = pq.read_table(path)
        for column in ("data_source", self.prompt_key, "reward_model"):
            if column not in table.column_names:
                raise ValueError(f"{path}: missing column {column!r} (columns present: {table.column_names})")
        columns = {name: table.column(name).to_pylist()
                   for name in ("data_source", self.prompt_key, "reward_model", "extra_info", "ability")
                   if name in table.column_names}
        rows = []
        for row in range(table.num_rows):
            data_source = columns["data_source"][row]
            if not isinstance(data_source, str) or not data_source:
                raise _row_error(path, row, "data_source", f"must be a non-empty string, got {data_source!r}")
            messages = _checked_messages(path, row, self.prompt_key, columns[self.prompt_key][row])
            reward_model = columns["reward_model"][row]
            if not isinstance(reward_model, Mapping) or reward_model.get("ground_truth") is None:
                raise _row_error(path, row, "reward_model.ground_truth", f"is missing in {reward_model!r}")
            extra_info = columns.get("extra_info", [None] * table.num_rows)[row]
            if extra_info is not None and not isinstance(extra_info, Mapping):
                raise _row_error(path, row, "extra_info", f"must be a dict, got {type(extra_info).__name__}")
            rows.append({
                "raw_prompt": messages,
                "data_source": data_source,
                "ground_truth": reward_model["ground_truth"],
                "extra_info": dict(extra_info or {}),
                "ability": columns.get("ability", [None] * table.num_rows)[row],
            })
        for start in range(0, len(rows), _TOKENIZE_CHUNK):
            chunk = rows[start:start + _TOKENIZE_CHUNK]
            for offset, (item, ids) in enumerate(zip(chunk, chat_prompt_ids(self.tokenizer,
                                                                             [r["raw_prompt"] for r in chunk]))):
                if self.filter_overlong_prompts and len(ids) > self.max_prompt_length:
                    self.num_filtered += 1
                    continue
                item["raw_prompt_ids"] = self._fit(path, start + offset, ids)
                item["index"] = len(self._items)
                self._items.append(item)

    def _fit(self, path: str, row: int, ids: list[int]) -> list[int]:
        if len(ids) <= self.max_prompt_length:
            return ids
        if self.truncation == "left":
            return ids[-self.max_prompt_length:]
        if self.truncation == "right":
            return ids[:self.max_prompt_length]
        raise _row_error(path, row, self.prompt_key,
                         f"prompt is {len(ids)} tokens, longer than max_prompt_length={self.max_prompt_length} "
                         "(raise data.max_prompt_length or set data.truncation to 'left' or 'right')")

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(self._items[index])

    def data_sources(self) -> list[str]:
        """The distinct data sources, sorted (for the trainer's start-up reward check)."""
        return sorted({item["data_source"] for item in self._items})


class PromptSampler:
    """Batches of dataset indices, epoch after epoch, reproducible and resumable.

    Epoch e visits a permutation drawn from ``numpy.random.default_rng([seed, e])`` (the identity
    when ``shuffle`` is off) in consecutive batches; the last ``num_items % batch_size`` indices
    of each epoch are dropped. ``state_dict`` holds (epoch, position), so a sampler restored
    from it continues with exactly the batches the original would have produced.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, shuffle: bool = True):
        check_positive("data.train_batch_size", batch_size)
        if num_items < batch_size:
            raise ValueError(f"PromptSampler: {num_items} items cannot fill one batch of {batch_size}")
        self.num_items, self.batch_size, self.seed, self.shuffle = num_items, batch_size, seed, shuffle
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order = np.arange(num_items)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // self.batch_size

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
                           if self.shuffle else np.arange(self.num_items))
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> list[int]:
        if self.position + self.batch_size > self.num_items:
            self.epoch += 1
            self.position = 0
        batch = self._epoch_order()[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return [int(i) for i in batch]

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "num_items": self.num_items,
                "batch_size": self.batch_size, "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore (epoch, position); the data size, batch size, seed and shuffle must match,
        since with any of them changed the resumed sequence would silently differ."""
        for key in ("num_items", "batch_size", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"PromptSampler.load_state_dict: checkpoint has {key}={state[key]!r}, "
                                 f"this sampler {key}={getattr(self, key)!r}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def collate_prompts(items: Sequence[Mapping[str, Any]], pad_token_id: int, pad_to: int | None = None) -> DataProto:
    """A prompt batch: ``prompts`` [B, P] LEFT-padded with ``pad_token_id`` (P = the longest prompt,
    or ``pad_to``), and per-sample ``raw_prompt_ids``, ``raw_prompt``, ``data_source``,
    ``ground_truth``, ``extra_info`` (object arrays) and ``index`` (int64). The rollouter adds ``uid``."""
    if not items:
        raise ValueError("collate_prompts: empty batch")
    longest = max(len(item["raw_prompt_ids"]) for item in items)
    width = longest if pad_to is None else pad_to
    if width < longest:
        raise ValueError(f"collate_prompts: pad_to={pad_to} is shorter than the longest prompt ({longest} tokens)")
    prompts = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    for row, item in enumerate(items):
        ids = item["raw_prompt_ids"]
        if ids:
            prompts[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
    non_tensors = {key: to_object_array(item[key] for item in items)
                   for key in ("raw_prompt_ids", "raw_prompt", "data_source", "ground_truth", "extra_info")}
    non_tensors["index"] = np.array([item["index"] for item in items], dtype=np.int64)
    return DataProto.from_dict({"prompts": prompts}, non_tensors)
