"""The merger refuses what it cannot export, naming the path and what is missing or wrong, and a failed
merge leaves nothing at (or beside) the target directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.model_merger.export_helpers import write_synthetic_megatron_checkpoint
from verl.model_merger import CheckpointError, merge_checkpoint
from verl.model_merger.__main__ import main
from verl.utils.checkpoint import COMPLETE_MARKER, HF_SUBDIR

torch.set_num_threads(1)


def write_torch_checkpoint(directory: Path, model_dir: str, with_hf_folder: bool = True) -> Path:
    """What the torch actor's rank 0 writes, without building an actor."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    directory.mkdir(parents=True)
    torch.save({"model": model.state_dict()}, directory / "actor.pt")
    if with_hf_folder:
        model.config.save_pretrained(directory / HF_SUBDIR)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(directory / HF_SUBDIR)
    (directory / COMPLETE_MARKER).write_text("")
    return directory


def drop_from_rank_file(path: Path, key: str) -> None:
    state = torch.load(path, weights_only=False)
    del state[key]
    torch.save(state, path)


def merge_error(local_dir: Path, target: Path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as err:
        merge_checkpoint(local_dir, target, **kwargs)
    assert not target.exists()
    return str(err.value)


def test_missing_or_incomplete_directory_is_named(tmp_path, random_model_dirs):
    assert "does not exist" in merge_error(tmp_path / "nowhere", tmp_path / "out")
    checkpoint = write_torch_checkpoint(tmp_path / "global_step_2", random_model_dirs[True])
    (checkpoint / COMPLETE_MARKER).unlink()
    message = merge_error(checkpoint, tmp_path / "out")
    assert str(checkpoint) in message and "COMPLETE" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / COMPLETE_MARKER).write_text("")
    assert "neither actor.pt" in merge_error(empty, tmp_path / "out")


def test_missing_rank_file_is_named(tmp_path, random_model_dirs):
    checkpoint = write_synthetic_megatron_checkpoint(tmp_path / "ckpt", random_model_dirs[True], tp=2, pp=2)
    (checkpoint / "megatron_actor_rank00002.pt").unlink()
    message = merge_error(checkpoint, tmp_path / "out")
    assert "world size 4" in message and "missing ['megatron_actor_rank00002.pt']" in message


def test_mixed_world_sizes_are_refused(tmp_path, random_model_dirs):
    checkpoint = write_synthetic_megatron_checkpoint(tmp_path / "ckpt", random_model_dirs[True], tp=2, pp=1)
    other = write_synthetic_megatron_checkpoint(tmp_path / "other", random_model_dirs[True], tp=2, pp=2)
    shutil.copy(other / "megatron_actor_rank00002.pt", checkpoint)
    message = merge_error(checkpoint, tmp_path / "out")
    assert "mixed world sizes" in message and str(checkpoint) in message


def test_rank_files_without_layout_or_model_are_refused(tmp_path, random_model_dirs):
    checkpoint = write_synthetic_megatron_checkpoint(tmp_path / "ckpt", random_model_dirs[True], tp=2, pp=1)
    drop_from_rank_file(checkpoint / "megatron_actor_rank00001.pt", "model")
    message = merge_error(checkpoint, tmp_path / "out")
    assert "megatron_actor_rank00001.pt holds no model weights" in message
    drop_from_rank_file(checkpoint / "megatron_actor_rank00001.pt", "layout")
    assert "records no parallel layout" in merge_error(checkpoint, tmp_path / "out")


def test_backend_must_match_the_files(tmp_path, random_model_dirs):
    checkpoint = write_torch_checkpoint(tmp_path / "ckpt", random_model_dirs[True])
    assert "is a torch checkpoint" in merge_error(checkpoint, tmp_path / "out", backend="megatron")
    assert "valid are torch, fsdp, megatron" in merge_error(checkpoint, tmp_path / "out", backend="deepspeed")


def test_checkpoint_without_hf_folder_needs_hf_model_path(tmp_path, random_model_dirs):
    checkpoint = write_torch_checkpoint(tmp_path / "ckpt", random_model_dirs[True], with_hf_folder=False)
    assert "--hf_model_path" in merge_error(checkpoint, tmp_path / "out")
    target = merge_checkpoint(checkpoint, tmp_path / "out", hf_model_path=random_model_dirs[True])
    assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, random_model_dirs):
    checkpoint = write_torch_checkpoint(tmp_path / "ckpt", random_model_dirs[True])
    state = torch.load(checkpoint / "actor.pt", weights_only=False)
    state["model"]["model.norm.weight"] = torch.ones(7)
    del state["model"]["model.layers.0.mlp.up_proj.weight"]
    torch.save(state, checkpoint / "actor.pt")
    message = merge_error(checkpoint, tmp_path / "out")
    assert "model.layers.0.mlp.up_proj.weight" in message and "model.norm.weight" in message


def test_existing_target_is_kept_unless_overwrite(tmp_path, random_model_dirs):
    checkpoint = write_torch_checkpoint(tmp_path / "ckpt", random_model_dirs[True])
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty; pass --overwrite"):
        merge_checkpoint(checkpoint, target)
    assert (target / "keep.txt").read_text() == "mine"
    merge_checkpoint(checkpoint, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


def test_a_failed_write_leaves_nothing_behind(tmp_path, random_model_dirs, monkeypatch):
    checkpoint = write_torch_checkpoint(tmp_path / "ckpt", random_model_dirs[True])

    def fail_midway(directory, *args, **kwargs):
        (Path(directory) / "model-00001-of-00002.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("verl.model_merger.merge.save_safetensors_weights", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        merge_checkpoint(checkpoint, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_command_line_reports_the_error_and_exits_1(tmp_path, capsys):
    assert main(["merge", "--local_dir", str(tmp_path / "nowhere"), "--target_dir", str(tmp_path / "out")]) == 1
    assert f"error: checkpoint directory {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--local_dir", str(tmp_path)])  # --target_dir is required
    assert exit_info.value.code == 2
