# The two commands of the README: `make demo` (the whole pipeline on the built-in demo catalogue) and
# `make test` (the test suite). Each creates the virtual environment .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= demo-workdir

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/python -m jobs.pipeline --workdir $(WORKDIR)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -ra

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -ra -m "not slow"

.PHONY: install demo test test-fast
