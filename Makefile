# The two entry points: `make run` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config/agentd.yaml

.PHONY: run test lint bench bench-quick clean

$(BIN)/agentd: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/agentd

venv: $(BIN)/agentd

run: $(BIN)/agentd
	$(BIN)/agentd run --config $(CONFIG)

lint: $(BIN)/agentd
	$(BIN)/ruff check agentd tests $(wildcard benchmarks)
	$(BIN)/ruff format --check agentd tests $(wildcard benchmarks)
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest -q

# The benchmark suite (benchmarks/README.md): full takes most of an hour; ARGS=--quick
# a few minutes. Peers are installed into their own venvs under ~/.cache/agentd-bench.
bench: $(BIN)/agentd
	$(BIN)/python -m benchmarks $(ARGS)

bench-quick: $(BIN)/agentd
	$(BIN)/python -m benchmarks --quick $(ARGS)

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
