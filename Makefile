# Everything a fresh machine needs: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench soak experiment clean install

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bdserve demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Benchmarks print a table and write bench/results/ (the soak takes 5 minutes: make soak).
bench: $(STAMP)
	$(BIN)/python bench/transforms_bench.py
	$(BIN)/python bench/serving_bench.py
	$(BIN)/python bench/eval_bench.py --model-dir model_store/demo

soak: $(STAMP)
	$(BIN)/python bench/soak.py

experiment: $(STAMP)
	$(BIN)/python experiments/tables.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
