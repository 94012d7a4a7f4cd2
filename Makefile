# Thin wrappers; README.md documents each target.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The same package installed with its hot path compiled by mypyc (setup.py), not editable.
COMPILED := .venv-compiled
CBIN := $(COMPILED)/bin
EXAMPLE := examples/virtual
EXAMPLE_DB := build/virtual.lmdb

.PHONY: venv compiled run test check test-compiled test-debian-stack test-trixie-stack fuzz \
	system-deps clean deb bench

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

compiled: $(COMPILED)/.installed

# Rebuilt whenever a module changes: the install is a copy, not the source tree.
# First the dependencies (and a pure build), then the compiled build over it:
# mypyc must be importable at build time, hence --no-build-isolation.
$(COMPILED)/.installed: pyproject.toml setup.py scripts/system-deps.sh $(wildcard tcpmap_lmdb/*.py)
	sh scripts/system-deps.sh venv
	$(PYTHON) -m venv $(COMPILED)
	$(CBIN)/pip install -q --upgrade pip 'setuptools>=70'
	$(CBIN)/pip install -q '.[dev]'
	TCPMAP_MYPYC=1 $(CBIN)/pip install -q --no-build-isolation --no-deps --force-reinstall .
	$(CBIN)/python -P -m tcpmap_lmdb.compiled --require
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
	$(MAKE) test-compiled
	$(MAKE) test-debian-stack
	$(MAKE) test-trixie-stack

# The suite again against the compiled install. PYTHONSAFEPATH: neither pytest
# nor the servers the tests start (python -c/-m, from the checkout) may put the
# source tree on sys.path; TCPMAP_EXPECT_COMPILED makes conftest.py check that.
# The package's system test runs once, in the main suite.
test-compiled: compiled
	PYTHONSAFEPATH=1 TCPMAP_EXPECT_COMPILED=1 $(CBIN)/pytest --ignore=tests/test_system_deb.py

# The suite again on Debian 12's python3-gevent, python3-lmdb, python3-systemd,
# with the hot path compiled by Debian's mypyc, as the .deb ships it.
test-debian-stack:
	TCPMAP_MYPYC=1 sh scripts/test-debian-stack.sh

# The suite again on Debian 13's own stack and Postfix 3.10, in a debootstrapped
# trixie tree (systemd-nspawn; root), with the hot path compiled by Debian 13's
# mypyc, as the .deb ships it.
test-trixie-stack:
	TCPMAP_MYPYC=1 sh scripts/test-release-tree.sh trixie

FUZZ_SECONDS ?= 60
fuzz: venv
	$(BIN)/pip install -q atheris
	mkdir -p build/fuzz-corpus
	$(BIN)/python tests/fuzz/fuzz_codec.py -max_total_time=$(FUZZ_SECONDS) build/fuzz-corpus tests/fuzz/corpus

deb:
	sh scripts/build-deb.sh

# About 11 minutes (plus a few the first time, for the 10M-key table): tests/bench/
bench: venv compiled
	sh scripts/system-deps.sh test
	$(BIN)/python -m tests.bench
	.venv-bench/bin/python -m tests.bench.postfix_maps

clean:
	rm -rf $(VENV) $(COMPILED) .venv-debian .venv-bench build dist .mypy_cache .ruff_cache .pytest_cache .hypothesis
