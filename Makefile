# Two commands matter: `make run` (the whole gateway on this machine) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ENCODINGS := ext_proc/tokens/_tiktoken_cache/.complete

.PHONY: install run test lint typecheck unit integration e2e bench bench-smoke clean

install: $(STAMP) $(ENCODINGS)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,test]'
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

test: lint
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
