"""RLDataset, PromptSampler, collate_prompts: errors name file/row/column; sampling replays on resume."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from verl.models.char_tokenizer import build_char_tokenizer
from verl.protocol import DataProto
from verl.utils.config import ConfigError
from verl.utils.dataset.countdown import write_countdown_parquet
from verl.utils.dataset.rl_dataset import PromptSampler, RLDataset, chat_prompt_ids, collate_prompts


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def row(content: str = "3,7,12:43", truth=None, **overrides) -> dict:
    base = {"data_source": "countdown", "prompt": [{"role": "user", "content": content}], "ability": "arithmetic",
            "reward_model": {"style": "rule", "ground_truth": truth if truth is not None else "43"},
            "extra_info": {"split": "train", "index": 0}}
    base.update(overrides)
    return base


def write(path, rows, schema=None) -> str:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


def test_items_hold_chat_template_ids_and_row_fields(tmp_path, tokenizer):
    paths = write_countdown_parquet(tmp_path / "cd", train_size=30, test_size=10, seed=0)
    dataset = RLDataset([paths["train"], paths["test"]], tokenizer, max_prompt_length=32)
    assert len(dataset) == 40
    raw = pq.read_table(paths["test"]).to_pylist()
    item = dataset[30]
    content = raw[0]["prompt"][0]["content"]
    # The char tokenizer's template: <|user|> content <|end|> <|assistant|>, one id per character.
    assert item["raw_prompt_ids"] == ([tokenizer.convert_tokens_to_ids("<|user|>")]
                                      + tokenizer.encode(content, add_special_tokens=False)
                                      + [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|assistant|>")])
    assert item["raw_prompt"] == raw[0]["prompt"]
    assert item["ground_truth"] == raw[0]["reward_model"]["ground_truth"]
    assert item["extra_info"] == {"split": "test", "index": 0}
    assert item["data_source"] == "countdown_lenient" and item["index"] == 30 and item["ability"] == "arithmetic"
    assert dataset.data_sources() == ["countdown_lenient"]


def test_chat_prompt_ids_matches_single_calls(tokenizer):
    conversations = [[{"role": "user", "content": c}] for c in ("1,2:3", "10,20,30:600", "x")]
    singles = []
    for conversation in conversations:
        encoded = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        singles.append(list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded))
    assert chat_prompt_ids(tokenizer, conversations) == singles


def test_missing_column_names_file_and_column(tmp_path, tokenizer):
    rows = [row()]
    for column in ("data_source", "prompt", "reward_model"):
        path = write(tmp_path / f"no_{column}.parquet", [{k: v for k, v in r.items() if k != column} for r in rows])
        with pytest.raises(ValueError) as info:
            RLDataset(path, tokenizer, 32)
        assert path in str(info.value) and repr(column) in str(info.value)
    # extra_info and ability are optional.
    path = write(tmp_path / "minimal.parquet", [{k: v for k, v in row().items() if k in
                                                 ("data_source", "prompt", "reward_model")}])
    assert RLDataset(path, tokenizer, 32)[0]["extra_info"] == {}


@pytest.mark.parametrize("bad_row, column", [
    (row(prompt=[]), "prompt"),
    (row(prompt=[{"role": "user", "content": None}]), "prompt"),
    (row(prompt=[{"role": None, "content": "3,7:10"}]), "prompt"),
    (row(reward_model={"style": "rule", "ground_truth": None}), "reward_model.ground_truth"),
    (row(data_source=""), "data_source"),
])
def test_malformed_row_names_file_row_and_column(tmp_path, tokenizer, bad_row, column):
    path = write(tmp_path / "bad.parquet", [row(), row(), bad_row, row()])
    with pytest.raises(ValueError) as info:
        RLDataset(path, tokenizer, 32)
    message = str(info.value)
    assert path in message and "row 2" in message and repr(column) in message


def test_prompt_that_is_not_a_list_is_rejected(tmp_path, tokenizer):
    path = write(tmp_path / "string_prompt.parquet", [row(prompt="3,7:10"), row(prompt="1,2:3")])
    with pytest.raises(ValueError, match="row 0, column 'prompt'"):
        RLDataset(path, tokenizer, 32)


def test_overlong_prompt_error_and_truncation(tmp_path, tokenizer):
    path = write(tmp_path / "long.parquet", [row("1,2:3"), row("1" * 40)])
    with pytest.raises(ValueError) as info:
        RLDataset(path, tokenizer, max_prompt_length=20)
    message = str(info.value)
    assert path in message and "row 1" in message and "43 tokens" in message and "max_prompt_length=20" in message
    full = chat_prompt_ids(tokenizer, [[{"role": "user", "content": "1" * 40}]])[0]
    left = RLDataset(path, tokenizer, max_prompt_length=20, truncation="left")
    right = RLDataset(path, tokenizer, max_prompt_length=20, truncation="right")
    assert left[1]["raw_prompt_ids"] == full[-20:] and right[1]["raw_prompt_ids"] == full[:20]
    assert left[0]["raw_prompt_ids"] == right[0]["raw_prompt_ids"]  # short prompts are untouched
    with pytest.raises(ConfigError) as config_info:
        RLDataset(path, tokenizer, 20, truncation="middle")
    assert config_info.value.key == "data.truncation"


def test_sampler_is_deterministic_reshuffles_and_drops_last():
    sampler = PromptSampler(10, 3, seed=4)
    batches = list(itertools.islice(sampler, 9))
    assert batches == list(itertools.islice(PromptSampler(10, 3, seed=4), 9))
    assert batches != list(itertools.islice(PromptSampler(10, 3, seed=5), 9))
    for epoch in range(3):
        seen = [i for b in batches[3 * epoch:3 * epoch + 3] for i in b]
        assert len(seen) == len(set(seen)) == 9 and set(seen) <= set(range(10))
        assert seen == np.random.default_rng([4, epoch]).permutation(10)[:9].tolist()
    assert batches[0:3] != batches[3:6]
    assert list(itertools.islice(PromptSampler(7, 2, seed=0, shuffle=False), 4)) == [[0, 1], [2, 3], [4, 5], [0, 1]]
    assert sampler.batches_per_epoch == 3


def test_sampler_resume_sees_the_same_sequence():
    original = PromptSampler(50, 8, seed=11)
    for _ in range(9):  # into the second epoch (6 batches per epoch)
        original.next_batch()
    state = original.state_dict()
    expected = [original.next_batch() for _ in range(20)]
    resumed = PromptSampler(50, 8, seed=11)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(20)] == expected
    with pytest.raises(ValueError, match="batch_size"):
        PromptSampler(50, 4, seed=11).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot fill"):
        PromptSampler(3, 4, seed=0)


def test_collate_left_pads_and_keeps_per_sample_fields(tmp_path, tokenizer):
    path = write(tmp_path / "mixed.parquet", [row("1,2:3", truth="3"), row("10,20,30:600", truth="600")])
    dataset = RLDataset(path, tokenizer, 32)
    items = [dataset[1], dataset[0]]
    batch = collate_prompts(items, tokenizer.pad_token_id)
    assert isinstance(batch, DataProto) and len(batch) == 2
    prompts = batch.batch["prompts"]
    long_ids, short_ids = items[0]["raw_prompt_ids"], items[1]["raw_prompt_ids"]
    assert prompts.shape == (2, len(long_ids)) and prompts.dtype == torch.long
    assert prompts[0].tolist() == long_ids
    pad = len(long_ids) - len(short_ids)
    assert prompts[1].tolist() == [tokenizer.pad_token_id] * pad + short_ids
    nt = batch.non_tensor_batch
    assert nt["index"].tolist() == [1, 0] and nt["ground_truth"].tolist() == ["600", "3"]
    assert nt["raw_prompt_ids"][1] == short_ids and nt["data_source"].dtype == object
    assert collate_prompts(items, 0, pad_to=20).batch["prompts"].shape == (2, 20)
    with pytest.raises(ValueError, match="pad_to"):
        collate_prompts(items, 0, pad_to=5)
