"""``actor_rollout_ref.rollout``: which engine samples trajectories for the rollouter, and how.

Data flow: config -> ``build_rollout_engine`` (engine) and the rollouter (``n`` responses per
prompt, sampling parameters for training and validation requests). Keys are veRL's; vLLM-only
knobs are passed to vLLM and, with the torch engine, logged at start-up as having no effect.
"""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt

from verl.utils.config import ConfigError, config_section
from verl.workers.rollout.base import SamplingParams

ROLLOUT_BACKENDS: tuple[str, ...] = ("torch", "vllm")
TopP = Annotated[float, Field(gt=0.0, le=1.0)]


def _check_top_k(key: str, top_k: int) -> None:
    if top_k != -1 and top_k < 1:
        raise ConfigError(key, top_k, "must be -1 (disabled) or >= 1")


@config_section
class ValKwargs:
    """``actor_rollout_ref.rollout.val_kwargs``: validation sampling. ``do_sample=false`` scores one greedy response
    per prompt (``val/greedy_acc``); ``true`` scores ``n`` responses at ``temperature``/``top_p``/
    ``top_k`` (``val/mean_at_<n>_acc``)."""

    do_sample: bool = False
    """Sample validation responses (true) or decode greedily (false)."""
    temperature: NonNegativeFloat = 0.0
    """Sampling temperature when ``do_sample``."""
    top_p: TopP = 1.0
    """Nucleus sampling mass when ``do_sample``."""
    top_k: int = -1
    """Top-k when ``do_sample`` (-1: off)."""
    n: PositiveInt = 1
    """Responses per prompt when ``do_sample`` (mean@n)."""
    report_greedy: bool = False
    """With ``do_sample``, also score one greedy response per prompt (``val/greedy_acc``)."""


@config_section
class MultiTurnConfig:
    """``actor_rollout_ref.rollout.multi_turn``: the tool-use agent loop (not in this build)."""

    enable: bool = False
    """Multi-turn rollouts with tool calls."""
    format: str = "simple-tir"
    """Tool-call format of the agent loop."""
    tool_config_path: str | None = None
    """Tool configuration file."""
    max_assistant_turns: PositiveInt | None = None
    """Most model turns per trajectory."""


@config_section
class VLLMEngineKwargs:
    """``actor_rollout_ref.rollout.engine_kwargs.vllm``: vLLM knobs beyond veRL's common rollout keys.

    ``logprobs_mode`` picks which log-prob vLLM reports for each sampled token y (z = logits,
    T = temperature, S = the tokens sampling may pick: top-k/top-p kept set minus the pad token):
    ``processed_logprobs`` gives log q(y) = log_softmax_S(z / T)[y], the distribution actually
    sampled from, equal to the engine contract's full-vocabulary log_softmax(z / T)[y] up to
    -log mu(S); ``raw_logprobs`` gives log_softmax(z)[y] before temperature and truncation,
    which equals the contract exactly at T = 1 whatever the truncation."""

    logprobs_mode: Literal["processed_logprobs", "raw_logprobs"] = "processed_logprobs"
    """Which log-prob vLLM returns per sampled token (see docs/vllm.md)."""
    kv_cache_space_gib: PositiveInt = 1
    """KV cache size on CPU (``VLLM_CPU_KVCACHE_SPACE``); ``gpu_memory_utilization`` is its GPU counterpart."""
    in_process: bool | None = None
    """Run vLLM's engine core in this process (starts in seconds on CPU); null: yes unless tensor parallel."""


@config_section
class EngineKwargs:
    """``actor_rollout_ref.rollout.engine_kwargs``: per-engine extras."""

    vllm: VLLMEngineKwargs = field(default_factory=VLLMEngineKwargs)


@config_section
class RolloutConfig:
    """``actor_rollout_ref.rollout``: engine choice and sampling for training rollouts.

    ``prompt_length``/``response_length`` are derived from ``data.max_prompt_length``/
    ``data.max_response_length`` (set those); the engine holds ``max_model_len`` tokens per
    sequence, by default prompt + response."""

    name: Literal["torch", "vllm"] = "torch"
    """Engine: ``torch`` (built in; CPU or GPU) or ``vllm``."""
    mode: Literal["async", "sync"] = "async"
    """veRL's server mode; the rollouter always drives its engine asynchronously."""
    temperature: NonNegativeFloat = 1.0
    """Sampling temperature of training rollouts (also divides the actor's logits)."""
    top_p: TopP = 1.0
    """Nucleus sampling mass."""
    top_k: int = -1
    """Top-k (-1: off)."""
    n: PositiveInt = 8
    """Responses per prompt (the GRPO group)."""
    prompt_length: PositiveInt | None = None
    """Derived: ``data.max_prompt_length``."""
    response_length: PositiveInt | None = None
    """Derived: ``data.max_response_length`` (the most new tokens per response)."""
    max_model_len: PositiveInt | None = None
    """Tokens per sequence the engine holds (null: prompt_length + response_length)."""
    max_num_seqs: PositiveInt = 64
    """Sequences an engine decodes together."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype in the engine (float32 keeps behaviour log-probs comparable with an fp32 actor)."""
    calculate_log_probs: bool = True
    """Return the behaviour log-prob of every sampled token (required: every loss here uses them)."""
    log_prob_micro_batch_size_per_gpu: PositiveInt | None = None
    """Trajectories per forward when the actor recomputes old log-probs (null: ``actor.ppo_micro_batch_size_per_gpu``)."""
    log_prob_use_dynamic_bsz: bool = False
    """Old-log-prob micro-batches by token budget (not in this build)."""
    tensor_model_parallel_size: PositiveInt = 1
    """GPUs per vLLM engine replica."""
    gpu_memory_utilization: Annotated[float, Field(ge=0.01, le=1.0)] = 0.5
    """Fraction of GPU memory vLLM may take (GPU only)."""
    enforce_eager: bool = True
    """vLLM: no CUDA graphs."""
    enable_prefix_caching: bool = False
    """vLLM: reuse KV blocks of shared prompt prefixes."""
    enable_chunked_prefill: bool | None = None
    """vLLM: split long prefills into chunks (null: vLLM's default)."""
    max_num_batched_tokens: PositiveInt | None = None
    """vLLM: token budget of one engine step (null: vLLM's default)."""
    stop_strings: list[str] = field(default_factory=list)
    """Stop a response when it ends with one of these strings."""
    seed: NonNegativeInt = 0
    """Base of every request's sampling seed."""
    val_kwargs: ValKwargs = field(default_factory=ValKwargs)
    multi_turn: MultiTurnConfig = field(default_factory=MultiTurnConfig)
    engine_kwargs: EngineKwargs = field(default_factory=EngineKwargs)

    @property
    def vllm_in_process(self) -> bool:
        in_process = self.engine_kwargs.vllm.in_process
        return self.tensor_model_parallel_size == 1 if in_process is None else in_process

    @property
    def max_new_tokens(self) -> int:
        if self.response_length is None:
            raise ValueError("rollout.response_length is derived from data.max_response_length; build the "
                             "config with TrainerConfig or set it")
        return self.response_length

    @property
    def max_seq_len(self) -> int:
        if self.max_model_len is not None:
            return self.max_model_len
        if self.prompt_length is None:
            raise ValueError("rollout.prompt_length is derived from data.max_prompt_length; build the "
                             "config with TrainerConfig or set max_model_len")
        return self.prompt_length + self.max_new_tokens

    def validate(self, prefix: str) -> None:
        _check_top_k(f"{prefix}.top_k", self.top_k)
        _check_top_k(f"{prefix}.val_kwargs.top_k", self.val_kwargs.top_k)
        if self.max_model_len is not None and self.prompt_length is not None and self.response_length is not None:
            needed = self.prompt_length + self.response_length
            if self.max_model_len < needed:
                raise ConfigError(f"{prefix}.max_model_len", self.max_model_len,
                                  f"must be >= data.max_prompt_length + data.max_response_length = {needed}")
        if any(not s for s in self.stop_strings):
            raise ConfigError(f"{prefix}.stop_strings", self.stop_strings, "must not contain empty strings")
        if not self.calculate_log_probs:
            raise ConfigError(f"{prefix}.calculate_log_probs", False,
                              "must be true: every loss and VCPO statistic here needs the behaviour log-probs")
        if self.log_prob_use_dynamic_bsz:
            raise ConfigError(f"{prefix}.log_prob_use_dynamic_bsz", True,
                              "dynamic batch sizes are not available in this build; set it to false")
        if self.multi_turn.enable:
            raise ConfigError(f"{prefix}.multi_turn.enable", True,
                              "multi-turn tool use (the SimpleTIR agent loop and its sandbox) is not available in "
                              "this build yet; set it to false")
        if self.tensor_model_parallel_size > 1 and self.engine_kwargs.vllm.in_process:
            # Explicitly true only: null follows the tensor-parallel size.
            raise ConfigError(f"{prefix}.engine_kwargs.vllm.in_process", True,
                              f"must be false when {prefix}.tensor_model_parallel_size="
                              f"{self.tensor_model_parallel_size} (tensor-parallel workers are separate processes)")

    def sampling_params(self, stop_token_ids: tuple[int, ...] = ()) -> SamplingParams:
        """Per-request settings for a training rollout."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, stop_token_ids=tuple(stop_token_ids),
                              stop_strings=tuple(self.stop_strings))

    def val_sampling_params(self, sampled: bool = False, stop_token_ids: tuple[int, ...] = ()) -> SamplingParams:
        """Per-request settings for validation: greedy, or ``val_kwargs``' sampler when ``sampled``."""
        val = self.val_kwargs
        temperature, top_p, top_k = (val.temperature, val.top_p, val.top_k) if sampled else (0.0, 1.0, -1)
        return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                              max_new_tokens=self.max_new_tokens, stop_token_ids=tuple(stop_token_ids),
                              stop_strings=tuple(self.stop_strings))
