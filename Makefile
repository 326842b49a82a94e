# Every target does its own set-up from a fresh clone: a .venv, torch==2.13.0 first when torch is missing
# (an open range would pull a multi-GB CUDA build), then the package in editable mode with its extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diffattn-installed
OFFLINE := HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False

.PHONY: setup test lint demo app bench gpu clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev,ui,video,train]"
	@touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(OFFLINE) TRITON_INTERPRET=1 $(PY) -m pytest -q --durations=15

demo: setup
	$(OFFLINE) $(VENV)/bin/diffattn demo --out outputs/demo

app: setup
	$(OFFLINE) $(PY) app.py

bench: setup
	$(PY) benchmarks/block_sparse_attention.py

# On a machine with a CUDA GPU: the launch sweep for this GPU model (stored in diffattn/kernels/launch_configs.json)
# and the full benchmark, then the GPU tests (real Triton, fp16/bf16/fp32, with the configs just stored); results
# committed under benchmarks/results/ with the GPU's name.
gpu: setup
	$(PY) benchmarks/block_sparse_attention.py --sweep --write-launch-configs diffattn/kernels/launch_configs.json
	$(OFFLINE) $(PY) -m pytest -q -m gpu tests

clean:
	rm -rf outputs .pytest_cache .ruff_cache build dist *.egg-info
