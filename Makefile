# Two commands matter: `make run` (the whole gateway on this machine) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ENCODINGS := ext_proc/tokens/_tiktoken_cache/.complete

.PHONY: install run test lint typecheck unit integration e2e browser loadgen bench bench-smoke clean

install: $(STAMP) $(ENCODINGS)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,test]'
	$(BIN)/python -m ext_proc.wheel_overlaps
	@touch $@

# tiktoken's o200k_base / cl100k_base files, taken once from the litellm wheel so
# nothing downloads at run time (DESIGN.md "Chosen dependencies").
$(ENCODINGS): $(STAMP)
	$(BIN)/python -m ext_proc.tokens.fetch

run: install
	$(BIN)/ext-proc dev

lint: install
	$(BIN)/ruff check ext_proc tests bench
	$(BIN)/ruff format --check ext_proc tests bench
	$(BIN)/mypy

# The console's browser tests drive Debian's chromium and chromium-driver: installed here
# when missing and we may (root, apt-get); otherwise tests/e2e/test_console.py skips.
CHROMIUM := /usr/bin/chromium
CHROMEDRIVER := /usr/bin/chromedriver

browser:
	@if [ -x $(CHROMIUM) ] && [ -x $(CHROMEDRIVER) ]; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium and chromium-driver (the console's browser tests) ..."; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else \
		echo "note: $(CHROMIUM) or $(CHROMEDRIVER) is missing and apt-get cannot run here" \
			"(not root, or no apt-get): the console's browser tests will be skipped;" \
			"install Debian's chromium and chromium-driver packages to run them."; \
	fi

# The benchmarks' load generators (the bench smoke and spike tests use them).
loadgen:
	@if command -v wrk >/dev/null && command -v h2load >/dev/null; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing wrk and nghttp2-client (h2load) for the benchmark tests ..."; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nghttp2-client; \
	else \
		echo "note: wrk or h2load is missing and apt-get cannot run here: the benchmark" \
			"tests will be skipped; install Debian's wrk and nghttp2-client packages."; \
	fi

test: lint browser loadgen
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

unit: install
	$(BIN)/python -m pytest -q tests/unit

integration: install
	$(BIN)/python -m pytest -q tests/integration

e2e: install
	$(BIN)/python -m pytest -q tests/e2e

bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-smoke: install
	$(BIN)/python -m bench --smoke

clean:
	rm -rf $(VENV) .data .mypy_cache .ruff_cache .pytest_cache ext_proc/tokens/_tiktoken_cache
