# The two commands of the README: `make demo` and `make test`. Both create .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

.PHONY: demo test lint bench
demo: $(BIN)/.installed
	$(BIN)/python -m suscept.demo

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 -q

bench: $(BIN)/.installed
	$(BIN)/python experiments/benchmarks/step_cost.py
	$(BIN)/python experiments/benchmarks/vs_devinterp.py
