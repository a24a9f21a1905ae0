"""The ``rollout`` config section: which engine samples trajectories for the rollouter, and how.

Data flow: config -> ``build_rollout_engine`` (engine) and the rollouter (``n`` responses per
prompt, sampling parameters for training and validation requests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from verl.utils.config import ConfigError, check_choice, check_positive, check_range
from verl.workers.rollout.base import SamplingParams

ROLLOUT_BACKENDS: tuple[str, ...] = ("torch", "vllm")
VLLM_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
VLLM_LOGPROBS_MODES: tuple[str, ...] = ("processed_logprobs", "raw_logprobs")


def _check_sampling(prefix: str, temperature: float, top_p: float, top_k: int) -> None:
    check_positive(f"{prefix}.temperature", temperature, allow_zero=True)
    check_range(f"{prefix}.top_p", top_p, 0.0, 1.0)
    if top_p <= 0:
        raise ConfigError(f"{prefix}.top_p", top_p, "must be in (0, 1]")
    if top_k != -1 and top_k < 1:
        raise ConfigError(f"{prefix}.top_k", top_k, "must be -1 (disabled) or >= 1")


@dataclass
class ValKwargs:
    """Validation sampling: greedy single response by default (the reported accuracy), plus
    ``mean_at_n_samples`` extra sampled responses per prompt at ``mean_at_n_temperature`` for
    mean@n (0 turns mean@n off)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    n: int = 1
    mean_at_n_samples: int = 0
    mean_at_n_temperature: float = 1.0

    def validate(self, prefix: str) -> None:
        _check_sampling(prefix, self.temperature, self.top_p, self.top_k)
        check_positive(f"{prefix}.n", self.n)
        check_positive(f"{prefix}.mean_at_n_samples", self.mean_at_n_samples, allow_zero=True)
        check_positive(f"{prefix}.mean_at_n_temperature", self.mean_at_n_temperature)


@dataclass
class VLLMConfig:
    """Knobs of the vLLM engine (``rollout.name=vllm``); the torch engine ignores them.

    ``logprobs_mode`` picks which log-prob vLLM reports for each sampled token y (z = logits,
    T = temperature, S = the tokens sampling may pick: top-k/top-p kept set minus the pad token):
    ``processed_logprobs`` gives log q(y) = log_softmax_S(z / T)[y], the distribution actually
    sampled from, equal to the engine contract's full-vocabulary log_softmax(z / T)[y] up to
    -log mu(S); ``raw_logprobs`` gives log_softmax(z)[y] before temperature and truncation,
    which equals the contract exactly at T = 1 whatever the truncation.
    ``kv_cache_space_gib`` sizes the KV cache on CPU (``VLLM_CPU_KVCACHE_SPACE``);
    ``gpu_memory_utilization`` is its GPU counterpart. ``in_process`` runs vLLM's engine core in
    this process (starts in seconds on CPU); tensor parallelism > 1 needs it off.
    """

    dtype: str = "float32"
    logprobs_mode: str = "processed_logprobs"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    kv_cache_space_gib: int = 1
    enforce_eager: bool = True
    enable_prefix_caching: bool = False
    in_process: bool = True

    def validate(self, prefix: str) -> None:
        check_choice(f"{prefix}.dtype", self.dtype, VLLM_DTYPES)
        check_choice(f"{prefix}.logprobs_mode", self.logprobs_mode, VLLM_LOGPROBS_MODES)
        check_positive(f"{prefix}.tensor_parallel_size", self.tensor_parallel_size)
        check_range(f"{prefix}.gpu_memory_utilization", self.gpu_memory_utilization, 0.01, 1.0)
        check_positive(f"{prefix}.kv_cache_space_gib", self.kv_cache_space_gib)
        if self.tensor_parallel_size > 1 and self.in_process:
            raise ConfigError(f"{prefix}.in_process", self.in_process,
                              f"must be false when {prefix}.tensor_parallel_size={self.tensor_parallel_size} "
                              "(tensor-parallel workers are separate processes)")


@dataclass
class RolloutConfig:
    """Engine choice and sampling for training rollouts.

    ``max_new_tokens`` is veRL's ``response_length``; ``max_seq_len`` is the engine's KV-cache
    length per sequence (prompt + response), so it must exceed ``max_new_tokens``.
    """

    name: str = "torch"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    n: int = 1
    max_new_tokens: int = 256
    max_seq_len: int = 512
    max_batch_size: int = 64
    stop_strings: list[str] = field(default_factory=list)
    seed: int = 0
    val_kwargs: ValKwargs = field(default_factory=ValKwargs)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    def validate(self, prefix: str) -> None:
        check_choice(f"{prefix}.name", self.name, ROLLOUT_BACKENDS)
        _check_sampling(prefix, self.temperature, self.top_p, self.top_k)
        check_positive(f"{prefix}.n", self.n)
        check_positive(f"{prefix}.max_new_tokens", self.max_new_tokens)
        check_positive(f"{prefix}.max_batch_size", self.max_batch_size)
        if self.max_seq_len <= self.max_new_tokens:
            raise ConfigError(f"{prefix}.max_seq_len", self.max_seq_len,
                              f"must exceed {prefix}.max_new_tokens={self.max_new_tokens} (room for the prompt)")
        if any(not s for s in self.stop_strings):
            raise ConfigError(f"{prefix}.stop_strings", self.stop_strings, "must not contain empty strings")
        self.val_kwargs.validate(f"{prefix}.val_kwargs")
        self.vllm.validate(f"{prefix}.vllm")

    def sampling_params(self, stop_token_ids: tuple[int, ...] = ()) -> SamplingParams:
        """Per-request settings for a training rollout."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, stop_token_ids=tuple(stop_token_ids),
                              stop_strings=tuple(self.stop_strings))

    def val_sampling_params(self, mean_at_n: bool = False, stop_token_ids: tuple[int, ...] = ()) -> SamplingParams:
        """Per-request settings for validation: ``val_kwargs`` (greedy by default), or the
        mean@n sampler (``mean_at_n_temperature``, no truncation) when ``mean_at_n``."""
        val = self.val_kwargs
        temperature, top_p, top_k = ((val.mean_at_n_temperature, 1.0, -1) if mean_at_n
                                     else (val.temperature, val.top_p, val.top_k))
        return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                              max_new_tokens=self.max_new_tokens, stop_token_ids=tuple(stop_token_ids),
                              stop_strings=tuple(self.stop_strings))
