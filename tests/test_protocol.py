"""DataProto: every operation checked against an independent computation on a layout-shaped batch."""

import random

import numpy as np
import pytest
import torch

from verl.protocol import DataProto, to_object_array

P, R = 5, 7


def _make_batch(group_sizes: list[int], seed: int = 0, shuffle: bool = False) -> DataProto:
    """A batch in the shared layout; ``row_id`` records each row's original position."""
    gen = torch.Generator().manual_seed(seed)
    uids = [f"prompt-{g}" for g, size in enumerate(group_sizes) for _ in range(size)]
    b = len(uids)
    order = list(range(b))
    if shuffle:
        random.Random(seed).shuffle(order)
    uids = [uids[i] for i in order]
    prompts = torch.randint(1, 100, (b, P), generator=gen)
    responses = torch.randint(1, 100, (b, R), generator=gen)
    attention_mask = torch.ones(b, P + R, dtype=torch.long)
    return DataProto.from_dict(
        tensors={
            "row_id": torch.arange(b),
            "prompts": prompts,
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], dim=1),
            "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
            "response_mask": torch.ones(b, R),
            "rollout_log_probs": -torch.rand(b, R, generator=gen),
        },
        non_tensors={
            "uid": uids,
            "data_source": ["countdown"] * b,
            # Equal-length lists and dicts: the inputs numpy likes to turn into 2-D arrays.
            "ground_truth": [[i, i + 1] for i in range(b)],
            "extra_info": [{"index": i, "split": "train"} for i in range(b)],
            "param_version_start": [i % 3 for i in range(b)],
        },
        meta_info={"temperature": 1.0, "global_steps": 3},
    )


def _rows(data: DataProto) -> list[int]:
    return data.batch["row_id"].tolist()


def assert_same(a: DataProto, b: DataProto) -> None:
    assert set(a.batch) == set(b.batch) and set(a.non_tensor_batch) == set(b.non_tensor_batch)
    for key in a.batch:
        assert a.batch[key].dtype == b.batch[key].dtype and torch.equal(a.batch[key], b.batch[key]), key
    for key in a.non_tensor_batch:
        assert a.non_tensor_batch[key].dtype == b.non_tensor_batch[key].dtype, key
        assert a.non_tensor_batch[key].shape == b.non_tensor_batch[key].shape, key
        assert a.non_tensor_batch[key].tolist() == b.non_tensor_batch[key].tolist(), key
    assert a.meta_info == b.meta_info


def assert_rows_of(part: DataProto, full: DataProto, rows: list[int]) -> None:
    """``part`` holds exactly rows ``rows`` of ``full``, checked key by key with plain indexing."""
    assert len(part) == len(rows)
    for key, value in full.batch.items():
        expected = torch.stack([value[r] for r in rows]) if rows else value[:0]
        assert torch.equal(part.batch[key], expected), key
    for key, value in full.non_tensor_batch.items():
        assert part.non_tensor_batch[key].tolist() == [value[r] for r in rows], key


def test_from_dict_builds_one_dimensional_arrays():
    data = _make_batch([2, 2, 2])
    assert len(data) == 6
    nt = data.non_tensor_batch
    assert nt["uid"].dtype == object and nt["uid"].shape == (6,)
    assert nt["ground_truth"].dtype == object and nt["ground_truth"].shape == (6,) and nt["ground_truth"][1] == [1, 2]
    assert nt["extra_info"].dtype == object and nt["extra_info"][4] == {"index": 4, "split": "train"}
    assert np.issubdtype(nt["param_version_start"].dtype, np.integer)
    assert to_object_array([(1, 2), (3, 4)]).shape == (2,)


def test_construction_names_the_offending_key():
    with pytest.raises(ValueError, match=r"'responses'.*length 3.*'prompts'.*length 4"):
        DataProto({"prompts": torch.zeros(4, 2), "responses": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match=r"'uid'.*length 2.*'prompts'.*length 4"):
        DataProto({"prompts": torch.zeros(4, 2)}, {"uid": to_object_array(["a", "b"])})
    with pytest.raises(TypeError, match="'uid'"):
        DataProto({}, {"uid": ["a", "b"]})
    with pytest.raises(TypeError, match="'scalar'"):
        DataProto({"scalar": torch.tensor(1.0)})
    assert len(DataProto(meta_info={"a": 1})) == 0


def test_select_copies_chosen_keys():
    data = _make_batch([3, 3])
    picked = data.select(["responses", "row_id"], ["uid"], ["temperature"])
    assert set(picked.batch) == {"responses", "row_id"} and set(picked.non_tensor_batch) == {"uid"}
    assert picked.meta_info == {"temperature": 1.0}
    picked.batch["extra"] = torch.zeros(6)
    picked.meta_info["temperature"] = 0.5
    assert "extra" not in data.batch and data.meta_info["temperature"] == 1.0
    everything = data.select()
    assert_same(everything, data)
    with pytest.raises(KeyError, match="advantages"):
        data.select(["advantages"])


@pytest.mark.parametrize("index,rows", [
    ([4, 0, 0, 7], [4, 0, 0, 7]),
    (torch.tensor([9, 2]), [9, 2]),
    (np.array([-1, -10]), [9, 0]),
    (slice(2, 9, 3), [2, 5, 8]),
    (3, [3]),
    ([], []),
    (torch.arange(10) % 3 == 0, [0, 3, 6, 9]),
    (np.arange(10) > 7, [8, 9]),
    ([True] * 2 + [False] * 8, [0, 1]),
])
def test_index_matches_plain_indexing(index, rows):
    data = _make_batch([5, 5])
    part = data[index]
    assert_rows_of(part, data, rows)
    assert part.meta_info == data.meta_info and part.non_tensor_batch["extra_info"].dtype == object


def test_index_errors():
    data = _make_batch([2, 2])
    with pytest.raises(IndexError, match="length 4"):
        data[[0, 4]]
    with pytest.raises(IndexError, match="mask has length 3"):
        data[np.array([True, False, True])]
    with pytest.raises(IndexError, match="integers"):
        data[np.array([0.0, 1.0])]


def test_chunk_then_concat_is_identity():
    data = _make_batch([4, 4, 4])
    chunks = data.chunk(3)
    assert [_rows(c) for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert_same(DataProto.concat(chunks), data)
    with pytest.raises(ValueError, match="length 12.*5 equal chunks"):
        data.chunk(5)


def test_split_keeps_remainder():
    data = _make_batch([5, 5])
    parts = data.split(4)
    assert [len(p) for p in parts] == [4, 4, 2]
    assert_rows_of(parts[2], data, [8, 9])
    assert_same(DataProto.concat(parts), data)


def test_concat_keeps_object_dtype_and_merges_meta():
    a, b = _make_batch([2], seed=1), _make_batch([3], seed=2)
    b.meta_info["param_version"] = 7
    merged = DataProto.concat([a, b])
    assert len(merged) == 5
    for key in ("uid", "ground_truth", "extra_info"):
        assert merged.non_tensor_batch[key].dtype == object and merged.non_tensor_batch[key].shape == (5,)
    assert merged.non_tensor_batch["ground_truth"].tolist() == [[0, 1], [1, 2], [0, 1], [1, 2], [2, 3]]
    assert torch.equal(merged.batch["responses"], torch.cat([a.batch["responses"], b.batch["responses"]]))
    assert merged.meta_info == {"temperature": 1.0, "global_steps": 3, "param_version": 7}
    b.meta_info["temperature"] = 0.7
    with pytest.raises(ValueError, match="temperature"):
        DataProto.concat([a, b])
    with pytest.raises(ValueError, match="advantages"):
        DataProto.concat([a, a.union(DataProto({"advantages": torch.zeros(2, R)}))])


def test_union_adds_keys_and_rejects_conflicts():
    data = _make_batch([3])
    advantages = DataProto({"advantages": torch.randn(3, R)}, meta_info={"adv_estimator": "grpo"})
    merged = data.union(advantages)
    assert torch.equal(merged.batch["advantages"], advantages.batch["advantages"])
    assert merged.meta_info["adv_estimator"] == "grpo" and "advantages" not in data.batch
    assert_same(merged.union(data), merged)  # identical shared keys are no conflict
    with pytest.raises(ValueError, match="'responses'"):
        data.union(DataProto({"responses": torch.zeros(3, R, dtype=torch.long)}))
    with pytest.raises(ValueError, match="'uid'"):
        data.union(DataProto({}, {"uid": to_object_array(["x", "y", "z"])}))
    with pytest.raises(ValueError, match="lengths differ"):
        data.union(DataProto({"advantages": torch.zeros(2, R)}))


def test_reorder_then_inverse_is_identity():
    data = _make_batch([3, 3, 3, 3], seed=4)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    shuffled = data.reorder(perm)
    assert_rows_of(shuffled, data, perm.tolist())
    assert_same(shuffled.reorder(torch.argsort(perm)), data)
    with pytest.raises(ValueError, match="permutation"):
        data.reorder([0] * len(data))


def test_group_indices_first_appearance_order():
    data = DataProto({}, {"uid": to_object_array(["b", "a", "b", "c", "a", "b"])})
    assert data.group_indices() == [[0, 2, 5], [1, 4], [3]]
    with pytest.raises(KeyError, match="group_id"):
        data.group_indices("group_id")


def _check_groups_whole(chunks: list[DataProto], data: DataProto, n: int) -> None:
    assert len(chunks) == n and all(len(c) == len(data) // n for c in chunks)
    all_rows = sorted(r for c in chunks for r in _rows(c))
    assert all_rows == list(range(len(data)))  # every row exactly once
    owner = {}
    for chunk_id, chunk in enumerate(chunks):
        rows = _rows(chunk)
        assert rows == sorted(rows)
        assert_rows_of(chunk, data, rows)
        for uid in chunk.non_tensor_batch["uid"].tolist():
            assert owner.setdefault(uid, chunk_id) == chunk_id, uid


def test_chunk_by_group_equal_groups_is_chunk():
    data = _make_batch([4] * 6)
    by_group, plain = data.chunk_by_group(3), data.chunk(3)
    for a, b in zip(by_group, plain):
        assert_same(a, b)


@pytest.mark.parametrize("seed", range(5))
def test_chunk_by_group_keeps_unequal_groups_whole(seed):
    rng = random.Random(seed)
    n, capacity = 4, 12
    sizes = []
    for _ in range(n):  # each chunk's capacity cut into random group sizes: a partition exists
        left = capacity
        while left:
            size = rng.randint(1, min(left, 6))
            sizes.append(size)
            left -= size
    rng.shuffle(sizes)
    data = _make_batch(sizes, seed=seed, shuffle=True)
    _check_groups_whole(data.chunk_by_group(n), data, n)


def test_chunk_by_group_many_singletons():
    data = _make_batch([1] * 2048)
    _check_groups_whole(data.chunk_by_group(4), data, 4)


@pytest.mark.parametrize("sizes,n", [([3, 3, 2], 2), ([2] * 6, 4), ([5, 1, 1, 1], 2)])
def test_chunk_by_group_impossible_names_sizes(sizes, n):
    data = _make_batch(sizes)
    with pytest.raises(ValueError, match=r"group sizes \[" + ", ".join(map(str, sizes)) + r"\]"):
        data.chunk_by_group(n)


@pytest.mark.parametrize("length,divisor,rows", [(10, 4, [0, 1]), (3, 8, [0, 1, 2, 0, 1]), (6, 3, [])])
def test_pad_to_divisor_and_unpad(length, divisor, rows):
    data = _make_batch([length])
    padded, pad_size = data.pad_to_divisor(divisor)
    assert pad_size == len(rows) and len(padded) % divisor == 0 and len(padded) == length + pad_size
    assert_rows_of(padded, data, list(range(length)) + rows)
    assert_same(padded.unpad(pad_size), data)


def test_to_and_save_load_round_trip(tmp_path):
    data = _make_batch([3, 2])
    moved = data.to("cpu")
    assert_same(moved, data)
    data.save(tmp_path / "batch.pt")
    loaded = DataProto.load(tmp_path / "batch.pt")
    assert_same(loaded, data)
    assert loaded.non_tensor_batch["extra_info"][3] == {"index": 3, "split": "train"}


def test_chunk_by_group_backtracks_when_first_fit_fails():
    # First-fit largest-first puts 4+4 together and strands a 3; only {4,3,3} x 2 works.
    data = _make_batch([4, 4, 3, 3, 3, 3], shuffle=True, seed=1)
    chunks = data.chunk_by_group(2)
    _check_groups_whole(chunks, data, 2)
    assert sorted(sorted(np.unique(c.non_tensor_batch["uid"], return_counts=True)[1].tolist()) for c in chunks) == \
        [[3, 3, 4], [3, 3, 4]]
