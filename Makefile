# The two commands of the README: `make demo` and `make test`. Both create their virtual
# environments themselves. .venv has TransformerLens 3.x (HookedTransformer); .venv-tl4 has
# 4.x (TransformerBridge): the observables tests run in both.
PY ?= python3
TL3 := transformer-lens==3.9.0
TL4 := transformer-lens==4.3.0
export HF_HUB_OFFLINE := 1

.venv/.installed: pyproject.toml constraints.txt
	$(PY) -m venv .venv
	.venv/bin/pip install --quiet --upgrade pip
	.venv/bin/pip install --quiet -c constraints.txt -e ".[test]" "$(TL3)"
	touch $@

.venv-tl4/.installed: pyproject.toml constraints.txt
	$(PY) -m venv .venv-tl4
	.venv-tl4/bin/pip install --quiet --upgrade pip
	.venv-tl4/bin/pip install --quiet -c constraints.txt -e ".[test]" "$(TL4)"
	touch $@

.PHONY: demo test lint bench lds
demo: .venv/.installed
	.venv/bin/python -m experiments.demo
	.venv/bin/python -m experiments.circuit_recovery --quick

test: .venv/.installed .venv-tl4/.installed
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -n 2 --dist loadfile -q
	.venv-tl4/bin/python -m pytest -n 2 -q tests/test_observables.py tests/test_susceptibility.py \
		tests/test_zoo.py tests/test_architectures.py tests/test_pretrained.py tests/test_text.py \
		tests/test_tables.py

lint: .venv/.installed
	.venv/bin/ruff check .

bench: .venv/.installed
	.venv/bin/python experiments/benchmarks/step_cost.py
	.venv/bin/python experiments/benchmarks/vs_devinterp.py
	.venv/bin/python experiments/benchmarks/plan_cost.py
	.venv/bin/python experiments/benchmarks/sweep.py --threads 1
	.venv/bin/python experiments/benchmarks/cost_scaling.py --threads 1 --dense
	.venv/bin/python experiments/benchmarks/distributed_speedup.py
	.venv/bin/python experiments/benchmarks/graph_scale.py

lds: .venv/.installed
	.venv/bin/python -m experiments.lds
