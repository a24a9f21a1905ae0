"""The warm start's cache key: one entry per distinct training run, and nothing shared that differs;
and the warm start refuses Countdown rows whose rule would score what it teaches 0."""

from __future__ import annotations

import pandas as pd
import pytest

from verl.trainer.config import WarmStartConfig
from verl.trainer.sft_trainer import cached_warm_start, countdown_sft_examples, warm_start_cache_key
from verl.utils.dataset.countdown import write_countdown_parquet


def test_cache_key_separates_what_changes_the_trained_weights(tmp_path):
    files = write_countdown_parquet(tmp_path, train_size=40, test_size=8, seed=1)
    train = [str(files["train"])]
    config = WarmStartConfig(enable=True)
    key = warm_start_cache_key("preset:tiny@seed0", train, config, num_threads=2)
    assert key == warm_start_cache_key("preset:tiny@seed0", train, WarmStartConfig(enable=True), num_threads=2)
    # CPU kernels reduce in a thread-dependent order: one and two threads train different weights.
    assert key != warm_start_cache_key("preset:tiny@seed0", train, config, num_threads=1)
    assert key != warm_start_cache_key("preset:tiny@seed1", train, config, num_threads=2)
    assert key != warm_start_cache_key("preset:tiny@seed0", train, WarmStartConfig(enable=True, steps=10), num_threads=2)
    other = write_countdown_parquet(tmp_path / "other", train_size=40, test_size=8, seed=2)
    assert key != warm_start_cache_key("preset:tiny@seed0", [str(other["train"])], config, num_threads=2)


def test_release_countdown_rows_are_refused_before_the_cache_is_consulted(tmp_path):
    files = write_countdown_parquet(tmp_path, train_size=40, test_size=8, seed=1)
    assert len(countdown_sft_examples([str(files["train"])])) == 40  # countdown_lenient rows: all used
    # A file written before the rules were split: same rows, data source "countdown".
    stale = tmp_path / "stale.parquet"
    pd.read_parquet(files["train"]).assign(data_source="countdown").to_parquet(stale)
    with pytest.raises(ValueError) as info:
        cached_warm_start("unused", "preset:tiny@seed0", [str(stale)], WarmStartConfig(enable=True), tmp_path / "cache")
    assert str(stale) in str(info.value) and "40 rows" in str(info.value) and "countdown_lenient" in str(info.value)
    assert not (tmp_path / "cache").exists()
