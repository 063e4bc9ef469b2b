# The two entry points: `make run` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config/agentd.yaml

.PHONY: run test lint bench bench-quick clean chromium

$(BIN)/agentd: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/agentd

# checkov (tests/test_k8s_manifests.py scans deploy/k8s/ with it) in a venv of its own:
# it pins packaging<24 and brings ~70 packages (boto3, ...), which in .venv would
# downgrade pytest and packaging under the whole suite. Pinned: the scan's result is
# asserted, and new releases add checks. About 30 s to install, 290 MB.
CHECKOV_VERSION := 3.3.30
CHECKOV := $(VENV)/checkov/bin/checkov
$(CHECKOV): Makefile
	$(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install --quiet --upgrade pip
	$(VENV)/checkov/bin/pip install --quiet 'checkov==$(CHECKOV_VERSION)'
	touch $(CHECKOV)

# tests/test_console_browser.py drives the web console in Debian's chromium (Playwright,
# in .venv, never downloads a browser). Installed once per machine where apt-get can (as
# root; about a minute); elsewhere the test skips and says why.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends chromium >/dev/null \
	    || echo "make: installing chromium failed: the console's browser test will skip"; \
	  else echo "make: no chromium, and no apt-get as root: the console's browser test will skip"; fi; }

venv: $(BIN)/agentd $(CHECKOV)

run: $(BIN)/agentd
	$(BIN)/agentd run --config $(CONFIG)

lint: $(BIN)/agentd
	$(BIN)/ruff check agentd tests $(wildcard benchmarks)
	$(BIN)/ruff format --check agentd tests $(wildcard benchmarks)
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint $(CHECKOV) chromium
	$(BIN)/pytest -q

# The benchmark suite (benchmarks/README.md): full takes most of an hour; ARGS=--quick
# a few minutes. Peers are installed into their own venvs under ~/.cache/agentd-bench.
bench: $(BIN)/agentd
	$(BIN)/python -m benchmarks $(ARGS)

bench-quick: $(BIN)/agentd
	$(BIN)/python -m benchmarks --quick $(ARGS)

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
