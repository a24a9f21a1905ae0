"""The Megatron merger on synthetic rank files (no Megatron, one process, fast): any TP x PP x CP x DP
layout reassembles exactly the HF weights the shards were cut from, and different layouts of the
same weights export byte-identical safetensors. The real 4-rank checkpoints: test_merge_megatron.py."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.model_merger.export_helpers import write_synthetic_megatron_checkpoint
from verl.model_merger import merge_checkpoint

torch.set_num_threads(1)
LAYOUTS = [(1, 1, 1, 1), (2, 1, 1, 1), (1, 2, 1, 1), (2, 2, 1, 1), (2, 2, 2, 2), (1, 4, 1, 2)]  # (tp, pp, cp, dp)


@pytest.mark.parametrize("tie", [True, False])
def test_every_layout_exports_the_source_weights_byte_identically(tmp_path, random_model_dirs, tie):
    source = AutoModelForCausalLM.from_pretrained(random_model_dirs[tie], dtype=torch.float32).state_dict()
    exported_bytes = set()
    for tp, pp, cp, dp in LAYOUTS:
        name = f"tp{tp}_pp{pp}_cp{cp}_dp{dp}"
        checkpoint = write_synthetic_megatron_checkpoint(tmp_path / name, random_model_dirs[tie], tp, pp, cp, dp)
        target = merge_checkpoint(checkpoint, tmp_path / "hf" / name, backend="megatron")
        exported_bytes.add((target / "model.safetensors").read_bytes())
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
        assert list(model.state_dict()) == list(source), name
        for key, value in source.items():
            assert torch.equal(model.state_dict()[key], value), (name, key)
    assert len(exported_bytes) == 1
