"""Supervised warm start: teaches the tiny model the answer format from solver solutions.

Runs before RL (model preset -> [SFT] -> RL actor/engines). The result is cached by a hash of
everything that determines it, so a second run with the same settings starts instantly.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch

from verl.models.loader import load_model_and_tokenizer
from verl.trainer.config import WarmStartConfig
from verl.utils.dataset.countdown import DATA_SOURCE, solve


def countdown_sft_examples(train_files: Sequence[str], limit: int | None = None) -> list[tuple[list[dict], str]]:
    """(chat messages, answer) pairs: each Countdown training prompt with one solver solution."""
    examples = []
    for f in train_files:
        df = pd.read_parquet(f, columns=["data_source", "prompt", "reward_model"])
        for source, prompt, rm in zip(df["data_source"], df["prompt"], df["reward_model"]):
            if source != DATA_SOURCE:
                continue
            gt = rm["ground_truth"]
            solutions = solve(list(gt["numbers"]), int(gt["target"]))
            if solutions:
                examples.append(([dict(m) for m in prompt], solutions[0]))
            if limit is not None and len(examples) >= limit:
                return examples
    return examples


def _encode(tokenizer, messages: list[dict], answer: str) -> tuple[list[int], int]:
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(prompt_ids, list):
        prompt_ids = list(prompt_ids["input_ids"])
    answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    return list(prompt_ids) + answer_ids, len(prompt_ids)


def sft_loss(model, batch: list[tuple[list[int], int]], pad_id: int) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens (prompt tokens are not trained)."""
    max_len = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), max_len), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), max_len), -100, dtype=torch.long)
    attention = torch.zeros((len(batch), max_len), dtype=torch.long)
    for i, (ids, prompt_len) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        labels[i, prompt_len: len(ids)] = torch.tensor(ids[prompt_len:])
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def train_sft(
    model_path: str,
    out_dir: str | Path,
    examples: list[tuple[list[dict], str]],
    config: WarmStartConfig,
    progress: Callable[[int, float], None] | None = None,
) -> Path:
    """Train ``config.steps`` AdamW steps on ``examples`` and save an HF checkpoint to ``out_dir``."""
    if not examples:
        raise ValueError("warm start has no examples: the training files contain no solvable countdown rows")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    model, tokenizer = load_model_and_tokenizer(model_path)
    model.train()
    encoded = [_encode(tokenizer, m, a) for m, a in examples]
    optim = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    order: list[int] = []
    for step in range(1, config.steps + 1):
        if len(order) < config.batch_size:
            fresh = list(range(len(encoded)))
            rng.shuffle(fresh)
            order.extend(fresh)
        idx, order = order[: config.batch_size], order[config.batch_size:]
        loss = sft_loss(model, [encoded[i] for i in idx], tokenizer.pad_token_id)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        if progress is not None:
            progress(step, loss.item())
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left over from an interrupted run
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # atomic: an interrupted warm start never leaves a half-written cache entry
    return out


def warm_start_cache_key(base_identity: str, train_files: Sequence[str], config: WarmStartConfig,
                         num_threads: int | None = None) -> str:
    """The cache entry of one warm start. The torch thread count is part of it: CPU kernels reduce in
    a thread-dependent order, so one thread (``make test``) and two (``make demo``) train different
    weights from the same settings, and a shared cache would make a run depend on who built it."""
    h = hashlib.sha256()
    h.update(base_identity.encode())
    for f in train_files:
        h.update(hashlib.sha256(Path(f).read_bytes()).digest())
    h.update(json.dumps(asdict(config), sort_keys=True).encode())
    h.update(f"threads={torch.get_num_threads() if num_threads is None else num_threads}".encode())
    return h.hexdigest()[:16]


def check_warm_start_data(train_files: Sequence[str]) -> None:
    """Refuse Countdown rows whose data source is the release's ``countdown``: its rule reads only
    ``<answer>``/``\\boxed{}`` answers and scores the bare expressions the warm start teaches 0. Files
    generated before the rules were split carry it (ours now write ``countdown_lenient``)."""
    for f in train_files:
        count = int((pd.read_parquet(f, columns=["data_source"])["data_source"] == "countdown").sum())
        if count:
            raise ValueError(
                f"{f}: {count} rows have data_source='countdown', whose rule (the release's) scores the bare "
                f"expressions the warm start teaches 0; the generator now writes data_source='{DATA_SOURCE}'. "
                "Delete the file to have it regenerated (or rerun scripts/data/prepare_countdown.py), or set "
                "actor_rollout_ref.model.warm_start.enable=false")


def cached_warm_start(
    model_path: str,
    base_identity: str,
    train_files: Sequence[str],
    config: WarmStartConfig,
    cache_dir: str | Path,
    log: Callable[[str], None] = print,
) -> Path:
    """Return the warm-started checkpoint for these settings, training it on first use."""
    check_warm_start_data(train_files)
    key = warm_start_cache_key(base_identity, train_files, config)
    out = Path(cache_dir) / f"warm_start-{key}"
    if (out / "config.json").exists():
        log(f"warm start: using cached {out}")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    examples = countdown_sft_examples(train_files)
    log(f"warm start: {config.steps} SFT steps on {len(examples)} solver solutions -> {out}")
    t0 = time.perf_counter()
    from tqdm import tqdm

    with tqdm(total=config.steps, desc="warm start (SFT)", unit="step", dynamic_ncols=True) as bar:
        def progress(step: int, loss: float) -> None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss:.3f}")

        train_sft(model_path, out, examples, config, progress)
    log(f"warm start: done in {time.perf_counter() - t0:.0f} s")
    return out
