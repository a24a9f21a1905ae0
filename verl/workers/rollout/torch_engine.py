"""Torch rollout engine: batched KV-cache sampling with continuous refill for Qwen2/Llama decoders.

Data flow: rollouter -> [TorchRolloutEngine.generate] -> trajectories (tokens, behaviour
log-probs, weight versions) -> queue -> trainer; param sync -> ``update_weights``.

The engine runs its own compact forward pass over the HF module's parameters (no copies, so
``update_weights`` only has to copy into them) with a preallocated per-slot KV cache. Up to
``max_batch_size`` slots decode together; a finished slot is refilled from the waiting
requests at once, so short requests never wait for long ones.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from verl.workers.rollout.base import GenerationRequest, RolloutEngine, Trajectory, check_request
from verl.workers.rollout.run_control import RunControl

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("qwen2", "llama")


def sample_next_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor, uniform_noise: torch.Tensor,
                       banned_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row and return ``(tokens, behaviour_logprobs)``.

    With logits z, temperature T (per row; T = 0 means greedy) and scaled logits s = z / T
    (s = z when T = 0), the behaviour log-prob reported for the chosen token y is

        log mu(y) = log_softmax(s)[y]                      (full vocabulary)

    and the token is drawn from the truncated distribution q(y) = mu(y) 1[y in S] / mu(S),
    where S keeps the top-k tokens, then the smallest prefix of them (by probability,
    renormalised after top-k) whose mass reaches top_p, and never the banned (pad) token.
    Sampling is Gumbel-max: y = argmax_{i in S} (s_i - log(-log U_i)) with U_i ~ Uniform[0, 1)
    given in ``uniform_noise`` (one per row and token); greedy rows take y = argmax_{i in S} s_i.

    Truncation and the IS ratio: the reported log mu(y) omits the renormalisation, so the
    true sampling log-prob is log q(y) = log mu(y) - log mu(S). An actor comparing its
    full-vocabulary log_softmax with the reported value gets ratio 1 on-policy (it matches
    the trainer's own computation), while the ratio against the true sampler would be
    pi/q = (pi/mu) * mu(S): each truncated token inflates the IS weight by 1/mu(S) >= 1.
    Without top-k/top-p, and once the pad token has negligible probability, mu(S) = 1.
    """
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(-1)
    logprobs_all = torch.log_softmax(scaled, dim=-1)
    allowed = scaled
    if banned_token_id is not None:
        allowed = scaled.clone()
        allowed[:, banned_token_id] = float("-inf")
    vocab = allowed.shape[-1]
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        sorted_vals, sorted_idx = allowed.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=allowed.device).unsqueeze(0)
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(-1)
        drop = ranks >= k
        probs = torch.softmax(sorted_vals.masked_fill(drop, float("-inf")), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before >= top_p.unsqueeze(-1)
        drop[:, 0] = False  # the most likely allowed token always survives
        allowed = allowed.masked_fill(torch.zeros_like(drop).scatter(1, sorted_idx, drop), float("-inf"))
    # Clamping keeps every Gumbel draw finite, so an allowed token always beats the -inf ones.
    tiny = torch.finfo(uniform_noise.dtype).tiny
    gumbel = -(-uniform_noise.clamp_min(tiny).log()).clamp_min(tiny).log()
    sampled = (allowed + gumbel).argmax(dim=-1)
    tokens = torch.where(greedy, allowed.argmax(dim=-1), sampled)
    return tokens, logprobs_all.gather(1, tokens.unsqueeze(-1)).squeeze(-1)


def rope_tables(head_dim: int, rope_theta: float, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_positions, head_dim] for rotary embeddings in the half-split layout:

    inv_freq_j = rope_theta^(-2j / head_dim), angle(p, j) = p * inv_freq_j, and each table is
    [cos|sin(angle) , cos|sin(angle)] so that rope(x) = x * cos + rotate_half(x) * sin.
    """
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.arange(max_positions, dtype=torch.float32).unsqueeze(-1) * inv_freq.unsqueeze(0)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rope(x) = x * cos + rotate_half(x) * sin, rotate_half([a, b]) = [-b, a] on the last dim."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) = weight * x / sqrt(mean(x^2) + eps), computed in fp32."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@dataclass
class _Linear:
    weight: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def of(cls, module: torch.nn.Module) -> _Linear:
        return cls(module.weight, getattr(module, "bias", None))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass
class _Layer:
    input_norm: torch.Tensor
    q: _Linear
    k: _Linear
    v: _Linear
    o: _Linear
    post_norm: torch.Tensor
    gate: _Linear
    up: _Linear
    down: _Linear


@dataclass
class _Slot:
    """One in-flight request: its position in the ``generate`` call and the response so far."""

    index: int
    request: GenerationRequest
    response_ids: list[int]
    response_logprobs: list[float]
    response_versions: list[int]
    stop_token_ids: frozenset[int]
    stop_window_tokens: int  # tail length decoded to look for stop strings; 0 = none
    generator: torch.Generator | None  # per-request stream when SamplingParams.seed is set

    def trajectory(self, finish_reason: str) -> Trajectory:
        return Trajectory(self.request.request_id, list(self.request.prompt_ids), self.response_ids,
                          self.response_logprobs, self.response_versions, finish_reason)


def _config_token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _check_supported(model: PreTrainedModel) -> None:
    config = model.config
    model_type = getattr(config, "model_type", None)
    rope = getattr(config, "rope_parameters", None) or {"rope_type": "default"}
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    problems = []
    if model_type not in SUPPORTED_MODEL_TYPES:
        problems.append(f"model_type={model_type!r}")
    else:
        if getattr(config, "hidden_act", "silu") != "silu":
            problems.append(f"hidden_act={config.hidden_act!r}")
        if rope.get("rope_type", "default") != "default":
            problems.append(f"rope_type={rope.get('rope_type')!r}")
        if any(t != "full_attention" for t in layer_types):
            problems.append("sliding-window attention layers")
    if problems:
        raise ValueError(
            f"TorchRolloutEngine does not support {type(model).__name__} ({type(config).__name__}: "
            f"{', '.join(problems)}); supported: Qwen2ForCausalLM / LlamaForCausalLM "
            f"(model_type in {SUPPORTED_MODEL_TYPES}) with SiLU MLP, full attention and default RoPE")


class TorchRolloutEngine(RolloutEngine):
    """Continuous-batching sampler over a Qwen2/Llama HF model (CPU or GPU).

    Thread model: ``generate`` runs in one thread at a time (a second call waits for the
    first). ``pause``, ``resume``, ``abort_all`` and ``update_weights`` may be called from any
    other thread; they take effect between decode steps. ``update_weights`` without a pause
    is atomic per step, but requests already in flight keep the KV cache of the old weights.

    ``default_stop_token_ids`` (None: the eos ids of the tokenizer / generation config /
    model config) end every request in addition to each request's own ``stop_token_ids``;
    pass ``()`` to generate to the length limit. ``max_new_tokens`` bounds the whole response,
    including a partial response carried by the request; ``len(prompt) + max_new_tokens``
    must fit in ``max_seq_len``.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: Any = None, max_batch_size: int = 64,
                 max_seq_len: int = 512, seed: int = 0, device: str | torch.device = "cpu",
                 default_stop_token_ids: Iterable[int] | None = None):
        _check_supported(model)
        if max_batch_size < 1 or max_seq_len < 2:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1 and max_seq_len={max_seq_len} >= 2")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        config = model.config
        self._num_heads = config.num_attention_heads
        self._num_kv_heads = getattr(config, "num_key_value_heads", None) or self._num_heads
        self._head_dim = getattr(config, "head_dim", None) or config.hidden_size // self._num_heads
        self._eps = config.rms_norm_eps

        decoder = model.model
        self._embed = decoder.embed_tokens.weight
        self._final_norm = decoder.norm.weight
        self._lm_head = _Linear.of(model.lm_head)
        self._layers = [
            _Layer(layer.input_layernorm.weight, _Linear.of(layer.self_attn.q_proj),
                   _Linear.of(layer.self_attn.k_proj), _Linear.of(layer.self_attn.v_proj),
                   _Linear.of(layer.self_attn.o_proj),
                   layer.post_attention_layernorm.weight, _Linear.of(layer.mlp.gate_proj),
                   _Linear.of(layer.mlp.up_proj), _Linear.of(layer.mlp.down_proj))
            for layer in decoder.layers]
        # state_dict(keep_vars=True) holds the live parameters, including the tied lm_head alias.
        self._named_tensors: dict[str, torch.Tensor] = dict(model.state_dict(keep_vars=True))

        rope = getattr(config, "rope_parameters", None) or {}
        rope_theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        dtype = self._embed.dtype
        cos, sin = rope_tables(self._head_dim, rope_theta, max_seq_len)
        self._cos, self._sin = cos.to(self.device, dtype), sin.to(self.device, dtype)
        cache_shape = (max_batch_size, self._num_kv_heads, max_seq_len, self._head_dim)
        self._k_cache = [torch.zeros(cache_shape, dtype=dtype, device=self.device) for _ in self._layers]
        self._v_cache = [torch.zeros(cache_shape, dtype=dtype, device=self.device) for _ in self._layers]
        self._positions = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
        self._pending = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
        self._temperature = torch.zeros(max_batch_size, device=self.device)
        self._top_k = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
        self._top_p = torch.ones(max_batch_size, device=self.device)

        generation_config = getattr(model, "generation_config", None)
        eos_ids = _config_token_ids(getattr(tokenizer, "eos_token_id", None)) \
            or _config_token_ids(getattr(generation_config, "eos_token_id", None)) \
            or _config_token_ids(getattr(config, "eos_token_id", None))
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(config, "pad_token_id", None)
        self.default_stop_token_ids = frozenset(eos_ids if default_stop_token_ids is None
                                                else default_stop_token_ids)
        # A pad that is also eos is a legitimate stop token; any other pad must never be sampled.
        self.banned_token_id: int | None = None if pad_id is None or pad_id in eos_ids else int(pad_id)

        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(seed)
        self._version = 0
        self._generated_tokens = 0
        self._control = RunControl()
        self._weights_lock = threading.Lock()

    # ------------------------------------------------------------------ contract
    @property
    def version(self) -> int:
        return self._version

    @property
    def generated_tokens(self) -> int:
        """Tokens sampled since construction (all requests, all calls)."""
        return self._generated_tokens

    def set_seed(self, seed: int) -> None:
        """Reseed the engine's sampling stream; the same calls then give the same outputs."""
        self._generator.manual_seed(seed)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copy HF-named tensors (``state_dict`` names; ``lm_head.weight`` of a tied model lands
        in the shared embedding) into the live parameters, then set ``version``. The tensors may
        stream from an iterator; an unknown name or a wrong shape raises and leaves the version
        unchanged, with the tensors before it already copied."""
        with self._weights_lock, torch.no_grad():
            for name, tensor in named_tensors:
                target = self._named_tensors.get(name)
                if target is None:
                    raise KeyError(f"update_weights: {name!r} is not a tensor of {type(self.model).__name__} "
                                   f"(expected state_dict names such as {next(iter(self._named_tensors))!r})")
                if target.shape != tensor.shape:
                    raise ValueError(f"update_weights: {name!r} has shape {tuple(tensor.shape)}, "
                                     f"the model expects {tuple(target.shape)}")
                target.copy_(tensor)
            self._version = int(version)

    def pause(self) -> None:
        self._control.pause()

    def resume(self) -> None:
        self._control.resume()

    def abort_all(self) -> list[Trajectory]:
        """Stop the running ``generate`` at its next decode step and return the requests it left
        unfinished (``finish_reason == "abort"``, tokens and log-probs so far; requests not yet
        started come back with an empty response). The running ``generate`` returns the same
        objects in their places among its finished results. Returns ``[]`` when nothing runs.
        A paused engine stays paused."""
        return self._control.abort_all()

    def generate(self, requests: list[GenerationRequest]) -> list[Trajectory]:
        """Sample every request to a stop token, stop string or ``max_new_tokens`` (or until
        ``abort_all``); results in request order. A request with a partial response is
        continued: its old tokens, log-probs and versions are kept and new ones appended."""
        for request in requests:
            check_request(request, self.max_seq_len, self.tokenizer is not None)
        return self._control.run(lambda run_id, aborted: self._run(requests, aborted))

    # ------------------------------------------------------------------ scheduling

    def _new_slot(self, index: int, request: GenerationRequest) -> _Slot:
        params = request.sampling
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed)
        return _Slot(index, request, list(request.response_ids), list(request.response_logprobs),
                     list(request.response_versions),
                     self.default_stop_token_ids | frozenset(params.stop_token_ids),
                     max((len(s) for s in params.stop_strings), default=0), generator)

    def _run(self, requests: list[GenerationRequest], aborted: list[Trajectory]) -> list[Trajectory]:
        """The scheduler loop: admit waiting requests into free slots (prefill), then one decode
        step for every active slot; repeat until all are done or an abort arrives."""
        results: list[Trajectory | None] = [None] * len(requests)
        waiting = deque(enumerate(requests))
        active: list[_Slot | None] = []  # active[row] owns KV-cache row ``row``; None = free
        free_rows: list[int] = []
        while True:
            if self._control.wait_while_paused():
                leftovers = [slot for slot in active if slot is not None]
                leftovers += [self._new_slot(index, request) for index, request in waiting]
                for slot in leftovers:
                    results[slot.index] = slot.trajectory("abort")
                    aborted.append(results[slot.index])
                return results  # type: ignore[return-value]
            free_rows = self._admit(active, free_rows, waiting, results)
            self._compact(active, free_rows)
            free_rows = []
            if not active:
                if not waiting:
                    return results  # type: ignore[return-value]
                continue
            with self._weights_lock, torch.no_grad():
                version = self._version
                logits = self._decode_step(len(active))
            free_rows = self._sample_and_record(active, list(range(len(active))), logits, version, results)

    def _admit(self, active: list[_Slot | None], free_rows: list[int],
               waiting: deque[tuple[int, GenerationRequest]], results: list[Trajectory | None]) -> list[int]:
        """Prefill waiting requests into free rows (holes first, then new rows up to
        ``max_batch_size``) and sample their first token; returns the rows free afterwards."""
        free_rows = sorted(free_rows)
        while waiting and (free_rows or len(active) < self.max_batch_size):
            rows: list[int] = []
            while waiting and (free_rows or len(active) < self.max_batch_size):
                index, request = waiting.popleft()
                slot = self._new_slot(index, request)
                if len(slot.response_ids) >= request.sampling.max_new_tokens:
                    results[index] = slot.trajectory("length")
                    continue
                if free_rows:
                    row = free_rows.pop(0)
                else:
                    row = len(active)
                    active.append(None)
                active[row] = slot
                params = request.sampling
                self._temperature[row] = params.temperature
                self._top_k[row] = params.top_k
                self._top_p[row] = params.top_p
                rows.append(row)
            if not rows:
                break
            sequences = [list(active[row].request.prompt_ids) + active[row].response_ids for row in rows]
            with self._weights_lock, torch.no_grad():
                version = self._version
                logits = self._prefill(rows, sequences)
            free_rows = sorted(free_rows + self._sample_and_record(active, rows, logits, version, results))
        return free_rows

    def _compact(self, active: list[_Slot | None], free_rows: list[int]) -> None:
        """Keep active slots in rows [0, len(active)) by moving tail slots into the lowest holes,
        so a decode step never computes on empty rows."""
        holes = sorted(free_rows)
        while True:
            while active and active[-1] is None:
                active.pop()
            holes = [row for row in holes if row < len(active)]
            if not holes:
                return
            row, last = holes.pop(0), len(active) - 1
            slot = active[last]
            cached = len(slot.request.prompt_ids) + len(slot.response_ids) - 1
            for k_cache, v_cache in zip(self._k_cache, self._v_cache):
                k_cache[row, :, :cached] = k_cache[last, :, :cached]
                v_cache[row, :, :cached] = v_cache[last, :, :cached]
            for state in (self._positions, self._pending, self._temperature, self._top_k, self._top_p):
                state[row] = state[last]
            active[row] = slot
            active.pop()

    def _sample_and_record(self, active: list[_Slot | None], rows: list[int], logits: torch.Tensor,
                           version: int, results: list[Trajectory | None]) -> list[int]:
        """Sample one token for each row, append it with its log-prob and version, and finish
        slots that hit a stop token, a stop string or their length limit; returns freed rows."""
        index = torch.tensor(rows, device=self.device)
        noise = torch.rand(logits.shape, generator=self._generator, device=self.device)
        for j, row in enumerate(rows):
            generator = active[row].generator
            if generator is not None:
                noise[j] = torch.rand(logits.shape[-1], generator=generator, device=self.device)
        tokens, logprobs = sample_next_tokens(logits, self._temperature[index], self._top_k[index],
                                              self._top_p[index], noise, self.banned_token_id)
        self._pending[index] = tokens
        self._generated_tokens += len(rows)
        freed = []
        for row, token, logprob in zip(rows, tokens.tolist(), logprobs.tolist()):
            slot = active[row]
            slot.response_ids.append(token)
            slot.response_logprobs.append(logprob)
            slot.response_versions.append(version)
            reason = self._finish_reason(slot, token)
            if reason is not None:
                results[slot.index] = slot.trajectory(reason)
                active[row] = None
                freed.append(row)
        return freed

    def _finish_reason(self, slot: _Slot, token: int) -> str | None:
        if token in slot.stop_token_ids:
            return "stop"
        if slot.stop_window_tokens:
            # A stop string completed by this token lies within the last len(string) tokens
            # (every token decodes to at least one character); earlier ones would have stopped.
            tail = self.tokenizer.decode(slot.response_ids[-slot.stop_window_tokens:], skip_special_tokens=False)
            if any(stop in tail for stop in slot.request.sampling.stop_strings):
                return "stop"
        if len(slot.response_ids) >= slot.request.sampling.max_new_tokens:
            return "length"
        return None

    # ------------------------------------------------------------------ forward passes
    def _mlp_block(self, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
        h = rms_norm(x, layer.post_norm, self._eps)
        return x + layer.down(F.silu(layer.gate(h)) * layer.up(h))

    def _prefill(self, rows: list[int], sequences: list[list[int]]) -> torch.Tensor:
        """Run the prompts (plus carried partial responses) of new slots, right-padded into one
        batch, write their K/V into cache rows ``rows``; return fp32 logits at each last token."""
        n, lengths = len(rows), [len(seq) for seq in sequences]
        span = max(lengths)
        ids = torch.zeros(n, span, dtype=torch.long)
        for i, seq in enumerate(sequences):
            ids[i, :len(seq)] = torch.tensor(seq)
        ids = ids.to(self.device)
        lengths_t = torch.tensor(lengths, device=self.device)
        row_index = torch.tensor(rows, device=self.device)
        heads, kv_heads, head_dim = self._num_heads, self._num_kv_heads, self._head_dim
        keys = torch.arange(span, device=self.device)
        mask = (keys.unsqueeze(0) <= keys.unsqueeze(1)) & (keys < lengths_t.unsqueeze(-1)).view(n, 1, 1, span)
        cos, sin = self._cos[:span], self._sin[:span]
        x = F.embedding(ids, self._embed)
        for layer, k_cache, v_cache in zip(self._layers, self._k_cache, self._v_cache):
            h = rms_norm(x, layer.input_norm, self._eps)
            q = apply_rope(layer.q(h).view(n, span, heads, head_dim).transpose(1, 2), cos, sin)
            k = apply_rope(layer.k(h).view(n, span, kv_heads, head_dim).transpose(1, 2), cos, sin)
            v = layer.v(h).view(n, span, kv_heads, head_dim).transpose(1, 2)
            k_cache[row_index, :, :span] = k
            v_cache[row_index, :, :span] = v
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv_heads != heads)
            x = self._mlp_block(x + layer.o(attn.transpose(1, 2).reshape(n, span, heads * head_dim)), layer)
        self._positions[row_index] = lengths_t
        last = x[torch.arange(n, device=self.device), lengths_t - 1]
        return self._lm_head(rms_norm(last, self._final_norm, self._eps)).float()

    def _decode_step(self, num_active: int) -> torch.Tensor:
        """Feed each active slot's pending token at its own position, append its K/V to the
        cache, attend over that slot's cached keys only; return fp32 next-token logits."""
        n = num_active
        heads, kv_heads, head_dim = self._num_heads, self._num_kv_heads, self._head_dim
        positions = self._positions[:n]
        span = int(positions.max()) + 1
        mask = (torch.arange(span, device=self.device) <= positions.unsqueeze(-1)).view(n, 1, 1, span)
        cos, sin = self._cos[positions].unsqueeze(1), self._sin[positions].unsqueeze(1)
        batch = torch.arange(n, device=self.device)
        x = F.embedding(self._pending[:n], self._embed)
        for layer, k_cache, v_cache in zip(self._layers, self._k_cache, self._v_cache):
            h = rms_norm(x, layer.input_norm, self._eps)
            q = apply_rope(layer.q(h).view(n, heads, head_dim), cos, sin)
            k_cache[batch, :, positions] = apply_rope(layer.k(h).view(n, kv_heads, head_dim), cos, sin)
            v_cache[batch, :, positions] = layer.v(h).view(n, kv_heads, head_dim)
            # Query heads sharing a KV head become that head's "query positions": GQA without a copy.
            attn = F.scaled_dot_product_attention(q.view(n, kv_heads, heads // kv_heads, head_dim),
                                                  k_cache[:n, :, :span], v_cache[:n, :, :span], attn_mask=mask)
            x = self._mlp_block(x + layer.o(attn.reshape(n, heads * head_dim)), layer)
        self._positions[:n] += 1
        return self._lm_head(rms_norm(x, self._final_norm, self._eps)).float()
