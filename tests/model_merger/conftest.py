"""Fixtures of the HF-export tests (helpers: ``export_helpers``)."""

from __future__ import annotations

import pytest

from tests.model_merger.export_helpers import build_random_model_dir


@pytest.fixture(scope="session")
def random_model_dirs(tmp_path_factory) -> dict[bool, str]:
    """Tied and untied embeddings: {tie_word_embeddings: model dir}."""
    root = tmp_path_factory.mktemp("random_models")
    return {tie: build_random_model_dir(root / f"tie_{tie}", tie) for tie in (True, False)}
