"""The warm start's cache key: one entry per distinct training run, and nothing shared that differs."""

from __future__ import annotations

from verl.trainer.config import WarmStartConfig
from verl.trainer.sft_trainer import warm_start_cache_key
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
