"""HF export of a torch-actor checkpoint: the exported model computes the actor's logits (fp32, 1e-5)
and holds its exact weights, loads in transformers, the torch engine and vLLM and generates HF's
greedy tokens; ``save_contents`` with ``hf_model`` writes the same bytes as the offline merge; the
command line works as ``python -m verl.model_merger``; ``save_contents``/``load_contents`` choose
what a checkpoint holds and what a resume restores."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tests.model_merger.export_helpers import PROMPTS, encode_prompts, engine_greedy, hf_greedy
from verl.model_merger import merge_checkpoint
from verl.model_merger.__main__ import main
from verl.utils.checkpoint import COMPLETE_MARKER, DEFAULT_CHECKPOINT_CONTENTS, HF_SUBDIR
from verl.workers.actor.config import PolicyUpdateConfig

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")


def new_worker(model_dir: str):
    from verl.workers.actor_worker import ActorWorker

    return ActorWorker(model_dir, PolicyUpdateConfig(), total_training_steps=1, seed=0)


def train_like(module: torch.nn.Module, seed: int = 7) -> None:
    """Move every parameter as training would (seeded), so the export cannot pass by equalling the start."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=g))


def save_complete(worker, directory: Path, contents=DEFAULT_CHECKPOINT_CONTENTS) -> Path:
    worker.save_checkpoint(str(directory), list(contents))
    (directory / COMPLETE_MARKER).write_text("")  # what the trainer writes once every rank saved
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory, random_model_dirs):
    root = tmp_path_factory.mktemp("torch_export")
    worker = new_worker(random_model_dirs[True])
    train_like(worker.module)
    checkpoint = save_complete(worker, root / "global_step_3", [*DEFAULT_CHECKPOINT_CONTENTS, "hf_model"])
    # veRL's spelling of the data-parallel backend is accepted as the torch actor's format.
    assert main(["merge", "--backend", "fsdp", "--local_dir", str(checkpoint), "--target_dir", str(root / "hf")]) == 0
    return {"worker": worker, "checkpoint": checkpoint, "target": root / "hf", "source": random_model_dirs[True]}


def test_export_has_the_actors_logits_and_weights(exported):
    worker, target = exported["worker"], exported["target"]
    assert {p.name for p in target.iterdir()} >= {"config.json", "generation_config.json", "model.safetensors",
                                                  "tokenizer.json", "tokenizer_config.json"}
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    ids = torch.randint(2, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected = model(ids).logits, worker.module.eval()(ids).logits
    assert (got - expected).abs().max().item() <= 1e-5
    actor_state = worker.module.state_dict()
    assert list(model.state_dict()) == list(actor_state)
    for name, value in model.state_dict().items():
        assert torch.equal(value, actor_state[name]), name
    # The export is not the starting model: training (here simulated) moved every tensor.
    start = load_file(Path(exported["source"]) / "model.safetensors")
    assert not torch.equal(start["model.embed_tokens.weight"], actor_state["model.embed_tokens.weight"])


def test_export_keeps_tokenizer_and_generation_config(exported):
    source, target = exported["source"], exported["target"]
    for text in PROMPTS:
        assert AutoTokenizer.from_pretrained(target).encode(text) == AutoTokenizer.from_pretrained(source).encode(text)
    got, expected = GenerationConfig.from_pretrained(target), GenerationConfig.from_pretrained(source)
    assert (got.eos_token_id, got.pad_token_id) == (expected.eos_token_id, expected.pad_token_id) == (1, 0)


def test_hf_model_in_save_contents_writes_the_same_bytes_as_the_offline_merge(exported):
    folder, target = exported["checkpoint"] / HF_SUBDIR, exported["target"]
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (folder / name).read_bytes() == (target / name).read_bytes(), name


def test_module_command_line_detects_the_backend(exported, tmp_path):
    target = tmp_path / "cli_hf"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "verl.model_merger", "merge", "--local_dir",
                           str(exported["checkpoint"]), "--target_dir", str(target)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "reading torch actor checkpoint" in proc.stderr and str(target) in proc.stderr
    assert (target / "model.safetensors").read_bytes() == (exported["target"] / "model.safetensors").read_bytes()


def test_sharded_export_loads_with_the_same_weights(exported, tmp_path):
    target = merge_checkpoint(exported["checkpoint"], tmp_path / "sharded", max_shard_bytes=200_000)
    shards = sorted(p.name for p in target.glob("model-*.safetensors"))
    assert len(shards) > 2 and (target / "model.safetensors.index.json").is_file()
    assert not (target / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    for name, value in exported["worker"].module.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_save_contents_choose_what_is_saved_and_load_contents_what_is_restored(random_model_dirs, tmp_path):
    worker = new_worker(random_model_dirs[False])
    train_like(worker.module)
    checkpoint = save_complete(worker, tmp_path / "global_step_1", ["model"])
    assert sorted(torch.load(checkpoint / "actor.pt", weights_only=False)) == ["model"]
    assert not list(checkpoint.glob("actor_rng_rank*.pt"))
    assert not list((checkpoint / HF_SUBDIR).glob("*.safetensors"))  # metadata only without hf_model
    assert (checkpoint / HF_SUBDIR / "config.json").is_file()

    fresh = new_worker(random_model_dirs[False])
    with pytest.raises(ValueError, match="holds no 'optimizer' and no 'extra' state"):
        fresh.load_checkpoint(str(checkpoint))  # the default load_contents asks for the optimizer too
    fresh.load_checkpoint(str(checkpoint), ["model"])
    for name, value in worker.module.state_dict().items():
        assert torch.equal(fresh.module.state_dict()[name], value), name
    with pytest.raises(ValueError, match="unknown checkpoint contents"):
        worker.save_checkpoint(str(tmp_path / "bad"), ["model", "weights"])


def test_export_generates_hf_greedy_tokens_in_the_torch_engine(exported):
    from verl.workers.rollout.torch_engine import TorchRolloutEngine

    target = str(exported["target"])
    prompts = encode_prompts(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    engine = TorchRolloutEngine(model, AutoTokenizer.from_pretrained(target), max_batch_size=4, max_seq_len=64,
                                default_stop_token_ids=())
    assert engine_greedy(engine, prompts, 24) == hf_greedy(target, prompts, 24)


@pytest.mark.slow
@needs_vllm
def test_export_generates_hf_greedy_tokens_in_the_vllm_engine(exported):
    from verl.workers.rollout.config import EngineKwargs, RolloutConfig, VLLMEngineKwargs
    from verl.workers.rollout.vllm_rollout import VLLMRolloutEngine

    target = str(exported["target"])
    prompts = encode_prompts(target)
    config = RolloutConfig(name="vllm", prompt_length=32, response_length=24, max_model_len=64, max_num_seqs=4,
                           engine_kwargs=EngineKwargs(VLLMEngineKwargs(kv_cache_space_gib=1)))
    engine = VLLMRolloutEngine(target, AutoTokenizer.from_pretrained(target), config, seed=0,
                               default_stop_token_ids=())
    try:
        assert engine_greedy(engine, prompts, 24) == hf_greedy(target, prompts, 24)
    finally:
        engine.shutdown()
