# Thin wrappers; README.md documents each target.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXAMPLE := examples/virtual
EXAMPLE_DB := build/virtual.lmdb

.PHONY: venv run test check test-debian-stack test-trixie-stack fuzz system-deps clean deb bench

venv: $(VENV)/.installed

# What running needs: the package and its dependencies, nothing else.
$(VENV)/.run-installed: pyproject.toml scripts/system-deps.sh
	sh scripts/system-deps.sh venv
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

# Linters and test tools too (the dev extra), for make check, test, fuzz, bench.
$(VENV)/.installed: $(VENV)/.run-installed
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

run: $(VENV)/.run-installed
	mkdir -p $(dir $(EXAMPLE_DB))
	$(BIN)/tcpmap-build -o $(EXAMPLE_DB) $(EXAMPLE)
	exec $(BIN)/tcpmap-server --db $(EXAMPLE_DB) --listen 127.0.0.1:4242

check: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# .ci/run runs these same steps one by one, timed: keep the two in step.
test: venv
	sh scripts/system-deps.sh test
	$(MAKE) check
	$(BIN)/pytest
	$(MAKE) test-debian-stack
	$(MAKE) test-trixie-stack

# The suite again on Debian 12's python3-gevent, python3-lmdb, python3-systemd.
test-debian-stack:
	sh scripts/test-debian-stack.sh

# The suite again on Debian 13's own stack and Postfix 3.10, in a debootstrapped
# trixie tree (systemd-nspawn; root).
test-trixie-stack:
	sh scripts/test-release-tree.sh trixie

FUZZ_SECONDS ?= 60
fuzz: venv
	$(BIN)/pip install -q atheris
	mkdir -p build/fuzz-corpus
	$(BIN)/python tests/fuzz/fuzz_codec.py -max_total_time=$(FUZZ_SECONDS) build/fuzz-corpus tests/fuzz/corpus

deb:
	sh scripts/build-deb.sh

# About 4 minutes (plus about 2 the first time, for the 10M-key table): tests/bench/
bench: venv
	sh scripts/system-deps.sh test
	$(BIN)/python -m tests.bench

clean:
	rm -rf $(VENV) .venv-debian .venv-bench build dist .mypy_cache .ruff_cache .pytest_cache .hypothesis
