# keyedexec developer commands. Each target sets up what it needs from a bare checkout.
#   make test     build the native core and run the test suite (both implementations)
#   make bench    run the benchmark comparison and print the table
# PYTHON picks the interpreter for the virtualenv (default: python3).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all venv build test test-pure test-dev bench bench-full annotate debug-build clean

all: test

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "setuptools>=68" "Cython>=3.1" wheel
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	touch $@

venv: $(STAMP)

# Rebuilds the extension in place when src/ changed (a no-op otherwise).
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest $(PYTEST_ARGS)

# The suite as a machine without the extension sees it.
test-pure: $(STAMP)
	KEYEDEXEC_PURE_PYTHON=1 KEYEDEXEC_REQUIRE_NATIVE= $(PY) -m pytest $(PYTEST_ARGS)

# Once under the development mode (extra runtime checks, ResourceWarnings).
test-dev: build
	$(PY) -X dev -m pytest $(PYTEST_ARGS)

bench: build
	$(PY) -m pytest bench $(PYTEST_ARGS)

bench-full: build
	KEYEDEXEC_BENCH=full $(PY) -m pytest bench $(PYTEST_ARGS)

# Cython's annotated HTML (src/_core.html): yellow lines touch the Python C-API.
annotate: $(STAMP)
	KEYEDEXEC_ANNOTATE=1 $(PY) setup.py -q build_ext --inplace --force
	@echo "open src/_core.html"

# Line tracing for coverage of the .pyx (slow; rebuild with 'make build' after).
debug-build: $(STAMP)
	KEYEDEXEC_LINETRACE=1 $(PY) setup.py -q build_ext --inplace --force

clean:
	rm -rf build dist *.egg-info keyedexec/*.so src/*.cpp src/*.html .pytest_cache .benchmarks
