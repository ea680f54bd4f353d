# The two commands of the README. Both create .venv themselves on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION := false

.PHONY: test study env clean

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

study: $(STAMP)
	@if [ ! -f dvc.yaml ]; then echo "make study: the DVC pipeline (dvc.yaml) is not built yet (issue [order 5]); nothing was run."; exit 2; fi
	$(BIN)/nft check --config params.yaml
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc repro

clean:
	rm -rf $(VENV) .pytest_cache
