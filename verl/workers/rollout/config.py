"""The ``rollout`` config section: which engine samples trajectories for the rollouter, and how.

Data flow: config -> ``build_rollout_engine`` (engine) and the rollouter (``n`` responses per
prompt, sampling parameters for training and validation requests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from verl.utils.config import ConfigError, check_choice, check_positive, check_range
from verl.workers.rollout.base import SamplingParams

ROLLOUT_BACKENDS: tuple[str, ...] = ("torch", "vllm")


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
