# Everything a fresh machine needs: `make demo` and `make test` create .venv on first use.
# `make demo` installs the package with its `all` extra (train, serve, evaluate: what the demo
# runs); `make test` and `make install` add the dev extra (pytest, tritonclient, TorchServe, the
# deploy/ checkers). The serving images install only the `serve` extra.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BASE := $(VENV)/.installed-base
DEV := $(VENV)/.installed-dev

.PHONY: demo test bench soak experiment clean install

install: $(DEV)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(BASE): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[all]'
	touch $@

$(DEV): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(BASE)

demo: $(BASE)
	$(BIN)/bdserve demo

test: $(DEV)
	$(BIN)/python -m pytest -q

# Benchmarks print a table and write bench/results/ (the soak takes 5 minutes: make soak).
bench: $(DEV)
	$(BIN)/python bench/transforms_bench.py
	$(BIN)/python bench/serving_bench.py
	$(BIN)/python bench/eval_bench.py --model-dir model_store/demo

soak: $(DEV)
	$(BIN)/python bench/soak.py

experiment: $(BASE)
	$(BIN)/python experiments/tables.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
