# One entry point for people and CI. Every target creates what it needs on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: help venv serve test test-all lint model bench bench-quick grpc-stubs gpu-check gpu-wheels clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Serving only: numpy, FastAPI, ONNX Runtime (CPU). No torch.
$(VENV)/.serve-installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e ".[cpu]"
	touch $@

# Everything for training, export and tests. torch==2.13.0 first, so the range in pyproject
# is already satisfied and pip never pulls a CUDA build.
$(VENV)/.dev-installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[cpu,train,dev]"
	touch $@ $(VENV)/.serve-installed

venv: $(VENV)/.dev-installed  ## create .venv with everything (torch CPU, ONNX Runtime, dev tools)

serve: $(VENV)/.serve-installed  ## start the service on the embedded model at http://$(HOST):$(PORT)
	$(VENV)/bin/boostserve serve --host $(HOST) --port $(PORT)

test: $(VENV)/.dev-installed  ## run the default test suite (what CI runs)
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

test-all: $(VENV)/.dev-installed  ## run every suite, slow and container ones included
	$(PY) -m pytest -q -m ""

lint: $(VENV)/.dev-installed  ## ruff, mypy on service/, export/ and bench/, import contracts
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

model: $(VENV)/.dev-installed  ## retrain, export and calibrate the embedded Fashion-MNIST model from scratch
	bash scripts/make_embedded_model.sh

bench: $(VENV)/.dev-installed  ## full benchmarks on the embedded model, published to docs/benchmarks (~23 min)
	$(VENV)/bin/boostserve bench --publish --profile
	$(PY) scripts/render_readme.py  # the README's int8 table reads the published engine.json

bench-quick: $(VENV)/.dev-installed  ## quick benchmarks (< 3 min) into results/
	$(VENV)/bin/boostserve bench --quick

grpc-stubs: $(VENV)/.dev-installed  ## regenerate the checked-in gRPC message stubs (service/grpc/proto) with the pinned grpcio-tools
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. service/grpc/proto/grpc_predict_v2.proto

# No .venv prerequisite: a fresh GPU machine needs only python3 (>= 3.11); the script makes its own venv.
gpu-check:  ## on a GPU machine (<= 8 min): .[gpu] in build/gpu-venv, CUDA providers, gpu tests, CUDA vs CPU engine suite -> results/gpu-check (docs/gpu.md)
	bash scripts/gpu_check.sh

gpu-wheels:  ## wheels of .[gpu] for an offline GPU machine (CPython 3.12, manylinux x86_64) -> build/gpu-wheels; then GPU_WHEELS=build/gpu-wheels make gpu-check
	bash scripts/gpu_check.sh --fetch-wheels build/gpu-wheels

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
