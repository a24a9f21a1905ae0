"""Fixtures shared across test directories: the assets of a short pipeline run (tiny model, Countdown files)."""

from __future__ import annotations

import pytest
import torch

from verl.models.presets import build_tiny_model_dir
from verl.utils.dataset.countdown import write_countdown_parquet


@pytest.fixture(scope="session")
def pipeline_assets(tmp_path_factory):
    """A random-init tiny model and small Countdown train/test files, built once per session."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("async_assets")
    files = write_countdown_parquet(root / "data", train_size=400, test_size=8, seed=5)
    model = build_tiny_model_dir(str(root / "model"), preset="tiny", seed=0)
    return {"root": root, "train": str(files["train"]), "test": str(files["test"]), "model": model}
