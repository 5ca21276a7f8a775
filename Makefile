# The README's two commands. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: quickstart test setup

$(BIN)/python:
	$(PY) -m venv $(VENV)
	# The CPU build of torch first: the project's open range would otherwise pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'

setup: $(BIN)/python

# The quick start: DreamBooth of the toy world's held-out subject (a half red, half white circle, "sks") from 5
# images on the shipped toy model, with prior preservation; then a before/after grid. A few minutes on 2 CPU cores.
QUICK ?= quickstart
MODEL ?= toy
STEPS ?= 1000
SAMPLE_STEPS ?= 25
quickstart: $(BIN)/python
	@if [ -e $(QUICK) ]; then echo "$(QUICK): already exists; remove it or pass QUICK=another-folder"; exit 2; fi
	$(BIN)/python datasets/toyworld/generate.py $(QUICK)/data --split subject --count 5
	$(BIN)/lora-train --model $(MODEL) --data $(QUICK)/data --mode dreambooth --class-prompt "a circle on a blue background" \
	  --num-class-images 10 --resolution 64 --rank 8 --lr 2e-3 --min-snr-gamma 5 --steps $(STEPS) \
	  --validation-steps $(SAMPLE_STEPS) -o $(QUICK)/sks.safetensors
	$(BIN)/lora-generate --model $(MODEL) --lora $(QUICK)/sks.safetensors --prompt "a sks circle on a green background" \
	  --steps $(SAMPLE_STEPS) --guidance 4 -n 4 --compare -o $(QUICK)/samples
	@echo "quick start done: $(QUICK)/sks.safetensors, before/after in $(QUICK)/samples/compare.png"

test: $(BIN)/python
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)
