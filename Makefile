# The README's two commands. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test setup

$(BIN)/python:
	$(PY) -m venv $(VENV)
	# The CPU build of torch first: the project's open range would otherwise pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'

setup: $(BIN)/python

test: $(BIN)/python
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)
