# Both targets create .venv and install what they need (CPU torch first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

RUN := runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test test-all bench layer-demo install clean

$(BIN)/moekit: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,hf]'
	touch $(BIN)/moekit

install: $(BIN)/moekit

demo: install  ## main job: train the small MoE LM on the Python stdlib (at most 8 min, any machine), then generate
	$(BIN)/moekit train --out $(RUN) --time-budget 8m
	$(BIN)/moekit generate $(RUN) --prompt "def " --max-new-tokens 80 --temperature 0.8 --top-p 0.95 --seed 0

layer-demo: install  ## train the tiny MoE layer on a toy task, then print a layer benchmark table
	$(BIN)/moekit bench

test: install  ## fast tier (CPU, < 15 min on 2 cores)
	$(BIN)/python -m pytest -q

test-all: install  ## fast + slow tiers
	$(BIN)/python -m pytest -q -m 'not gpu'

bench: install  ## MoE layer benchmark table (several minutes)
	$(BIN)/python benchmarks/moe_layer.py

clean:
	rm -rf $(VENV) .pytest_cache src/*.egg-info
