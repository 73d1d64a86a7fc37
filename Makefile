# Both targets create .venv and install what they need (CPU torch first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-all bench install clean

$(BIN)/moekit: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,hf]'
	touch $(BIN)/moekit

install: $(BIN)/moekit

demo: install  ## main job: train the tiny MoE layer on a toy task, then print a benchmark table
	$(BIN)/moekit bench

test: install  ## fast tier (CPU, < 15 min on 2 cores)
	$(BIN)/python -m pytest -q

test-all: install  ## fast + slow tiers
	$(BIN)/python -m pytest -q -m 'not gpu'

bench: install  ## MoE layer benchmark table (several minutes)
	$(BIN)/python benchmarks/moe_layer.py

clean:
	rm -rf $(VENV) .pytest_cache src/*.egg-info
