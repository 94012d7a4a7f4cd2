# Thin wrappers; README.md documents each target.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXAMPLE := examples/virtual
EXAMPLE_DB := build/virtual.lmdb

.PHONY: venv run test check system-deps clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/system-deps.sh
	sh scripts/system-deps.sh venv
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

run: venv
	mkdir -p $(dir $(EXAMPLE_DB))
	$(BIN)/tcpmap-build -o $(EXAMPLE_DB) $(EXAMPLE)
	exec $(BIN)/tcpmap-server --db $(EXAMPLE_DB) --listen 127.0.0.1:4242

check: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: venv
	sh scripts/system-deps.sh test
	$(MAKE) check
	$(BIN)/pytest

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache .hypothesis
