"""The rollout-engine contract: what the rollouter asks of any generation backend (torch, vLLM).

Data flow: dataset -> rollouter -> [engine.generate] -> trajectories -> queue -> trainer;
the trainer's weights come back through ``update_weights`` (param sync).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Iterable, Literal

import torch

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings. ``temperature == 0`` means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: disabled
    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class GenerationRequest:
    """One sequence to sample. ``response_ids``/``response_logprobs`` carry a partial response
    to continue (partial rollouts): the engine appends to them instead of starting over."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    response_ids: list[int] = field(default_factory=list)
    response_logprobs: list[float] = field(default_factory=list)
    response_versions: list[int] = field(default_factory=list)


@dataclass
class Trajectory:
    """A finished (or aborted) generation.

    ``response_logprobs[t]`` is the behaviour log-prob of ``response_ids[t]`` under the
    distribution actually sampled from (after temperature, before top-p/top-k truncation),
    and ``response_versions[t]`` the weight version that produced it.
    """

    request_id: str
    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]
    response_versions: list[int]
    finish_reason: FinishReason

    @property
    def param_version_start(self) -> int:
        return self.response_versions[0] if self.response_versions else -1

    @property
    def param_version_end(self) -> int:
        return self.response_versions[-1] if self.response_versions else -1


def check_request(request: GenerationRequest, max_seq_len: int, has_tokenizer: bool, max_seq_len_note: str = "") -> None:
    """Reject a request an engine cannot serve, naming it and the violated bound."""
    params = request.sampling
    if not request.prompt_ids:
        raise ValueError(f"request {request.request_id!r}: empty prompt_ids")
    if not (len(request.response_ids) == len(request.response_logprobs) == len(request.response_versions)):
        raise ValueError(f"request {request.request_id!r}: response_ids, response_logprobs and "
                         "response_versions must have equal lengths")
    if params.temperature < 0 or not (0 < params.top_p <= 1) or params.max_new_tokens < 1:
        raise ValueError(f"request {request.request_id!r}: need temperature >= 0, 0 < top_p <= 1, "
                         f"max_new_tokens >= 1; got {params}")
    if len(request.prompt_ids) + params.max_new_tokens > max_seq_len:
        raise ValueError(f"request {request.request_id!r}: prompt ({len(request.prompt_ids)} tokens) + "
                         f"max_new_tokens ({params.max_new_tokens}) exceeds max_seq_len={max_seq_len}"
                         f"{max_seq_len_note}")
    if params.stop_strings and not has_tokenizer:
        raise ValueError(f"request {request.request_id!r}: stop_strings need a tokenizer")


class RolloutEngine(abc.ABC):
    """A generation backend. Implementations: ``TorchRolloutEngine`` (default), vLLM."""

    @property
    @abc.abstractmethod
    def version(self) -> int:
        """The weight version currently loaded (0 = initial weights)."""

    @abc.abstractmethod
    def generate(self, requests: list[GenerationRequest]) -> list[Trajectory]:
        """Sample every request to completion (or until aborted); results in request order."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load new weights (HF parameter names) in place and record their version."""

    @abc.abstractmethod
    def pause(self) -> None:
        """Stop scheduling new decode steps; in-flight state is kept."""

    @abc.abstractmethod
    def resume(self) -> None:
        """Continue after ``pause``."""

    @abc.abstractmethod
    def abort_all(self) -> list[Trajectory]:
        """Abort in-flight generations; return them as partial trajectories
        (``finish_reason == "abort"``) so they can be resumed under new weights."""
