# keyedexec developer commands. Each target sets up what it needs from a bare checkout.
#   make test     build the native core and run the test suite (both implementations)
#   make bench    run the benchmark comparison and print the table
# PYTHON picks the interpreter for the virtualenv (default: python3).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all venv build test test-pure test-dev typecheck bench bench-full annotate debug-build clean

all: test

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "setuptools>=77" "Cython>=3.1" wheel
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench,uvloop,typing,ray]"
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

# The typing promise: mypy --strict on the package (and its .pyi stubs) and on examples/.
typecheck: $(STAMP)
	$(PY) -m mypy --strict keyedexec examples

# The comparison table (bench/README.md): quick sizes, a few minutes on 2 cores.
# Results: bench/results/ (latest.json, benchmark.json, bench.png with the 'chart' extra).
# Then the submitters x workers matrix (bench/freethreaded.py) on this interpreter and,
# when the free-threaded 3.13t is cached (make test-ft), on that one too.
bench: build
	$(PY) -m pytest bench $(PYTEST_ARGS)
	$(PY) bench/freethreaded.py --json bench/results/freethreaded-gil.json
	@if [ -x "$(FT_CACHE)/bin/python3.13t" ]; then $(MAKE) --no-print-directory bench-ft; \
	else echo "no free-threaded 3.13t cached in $(FT_CACHE): 'make test-ft' builds one"; fi

# Full sizes (1 M tasks, 1 ... 64 I/O workers); tens of minutes. Single benchmarks
# outlast faulthandler_timeout there, which would only dump stacks: off.
bench-full: build
	KEYEDEXEC_BENCH=full $(PY) -m pytest bench -o faulthandler_timeout=0 $(PYTEST_ARGS)

# Cython's annotated HTML (src/_core.html): yellow lines touch the Python C-API.
annotate: $(STAMP)
	KEYEDEXEC_ANNOTATE=1 $(PY) setup.py -q build_ext --inplace --force
	@echo "open src/_core.html"

# Line tracing for coverage of the .pyx (slow; rebuild with 'make build' after).
debug-build: $(STAMP)
	KEYEDEXEC_LINETRACE=1 $(PY) setup.py -q build_ext --inplace --force

clean:
	rm -rf build dist *.egg-info keyedexec/*.so src/*.cpp src/*.html .pytest_cache .benchmarks

# The suite on a free-threaded CPython 3.13 (GIL disabled). The interpreter is built
# once by scripts/build-python-ft.sh (a few minutes) and cached outside the checkout
# ($(FT_CACHE)); its venv is $(FT_VENV). The cp313t extension sits next to the
# cp311 one in keyedexec/, so 'make test' and 'make test-ft' do not disturb each other.
FT_CACHE ?= $(HOME)/.cache/keyedexec/python3.13t
FT_VENV ?= .venv-ft
FT_PY := $(FT_VENV)/bin/python

.PHONY: test-ft ft-build bench-ft

# The free-threaded venv and the cp313t extension in place (no tests).
ft-build:
	@ft=$$(KEYEDEXEC_FT_CACHE="$(FT_CACHE)" scripts/build-python-ft.sh) || exit 1; \
	ft=$$(printf '%s\n' "$$ft" | tail -n 1); \
	if ! $(FT_PY) -c 'import sys; assert not sys._is_gil_enabled()' 2>/dev/null; then \
		echo "creating $(FT_VENV) with $$ft"; rm -rf $(FT_VENV) && "$$ft" -m venv $(FT_VENV) || exit 1; \
	fi
	@# --prefer-binary: the newest hypothesis releases are compiled, without cp313t
	@# wheels; an older pure-Python wheel beats building them from source.
	@if [ ! -f $(FT_VENV)/.installed ] || [ pyproject.toml -nt $(FT_VENV)/.installed ] \
			|| [ setup.py -nt $(FT_VENV)/.installed ]; then \
		$(FT_PY) -m pip install -q --upgrade pip && \
		$(FT_PY) -m pip install -q "setuptools>=77" "Cython>=3.1" wheel && \
		$(FT_PY) -m pip install -q --prefer-binary --no-build-isolation -e ".[test]" && \
		touch $(FT_VENV)/.installed; \
	fi
	$(FT_PY) setup.py -q build_ext --inplace
	KEYEDEXEC_REQUIRE_NATIVE=1 $(FT_PY) -c "import sys, keyedexec; assert keyedexec.NATIVE; \
		assert not sys._is_gil_enabled(), 'importing keyedexec re-enabled the GIL'; \
		print('keyedexec', keyedexec.__version__, 'native core on', sys.version.split()[0], 'GIL disabled')"

test-ft: ft-build
	KEYEDEXEC_REQUIRE_NATIVE=1 $(FT_PY) -m pytest $(PYTEST_ARGS)

# The submitters x workers matrix on the free-threaded 3.13t (part of 'make bench').
bench-ft: ft-build
	$(FT_PY) bench/freethreaded.py --json bench/results/freethreaded-ft.json

# Packaging. 'make wheel' builds the sdist, then the wheel from that sdist (python -m build,
# isolated), into dist/. 'make test-wheel' installs that wheel into a fresh virtualenv
# outside the checkout and runs the suite against it (scripts/test-wheel.sh).
# 'make test-versions' runs the suite on every CPython 3.10-3.13 under ~/.pyenv/versions.
.PHONY: wheel test-wheel test-versions

wheel: $(STAMP)
	$(PY) -m pip install -q build
	rm -rf dist
	$(PY) -m build --outdir dist .

test-wheel: wheel
	scripts/test-wheel.sh $(PY) dist

test-versions:
	scripts/test-versions.sh

# The native leak tests and an executor smoke under valgrind memcheck (slow: minutes).
# Fails if a "definitely lost" block or an invalid access involves keyedexec._core.
# See tests/valgrind/README.md.
.PHONY: test-valgrind

test-valgrind: build
	tests/valgrind/run.sh $(PY)
