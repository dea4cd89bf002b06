#!/usr/bin/env bash
# The test suite, native core required, on every CPython 3.10-3.13 under ~/.pyenv/versions
# (the newest patch release of each minor version; pyenv's own free-threaded or dev builds
# are left out). Each gets a virtualenv .venv-3.X in the checkout, made once and refreshed
# when pyproject.toml or setup.py change; the extension is built in place, where each
# version's build (_core.cpython-3X-*.so) sits beside the others.
# Extra pytest arguments: PYTEST_ARGS. Other interpreter roots: PYENV_VERSIONS.
# KEYEDEXEC_VERSION_TIMEOUT (seconds, default 900): the limit on one version's suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# A release build of the core from this checkout, whatever the caller's environment says.
unset PYTHONPATH KEYEDEXEC_PURE_PYTHON KEYEDEXEC_LINETRACE KEYEDEXEC_ANNOTATE CYTHON_FORCE_REGEN

versions=${PYENV_VERSIONS:-$HOME/.pyenv/versions}
limit=${KEYEDEXEC_VERSION_TIMEOUT:-900}

# One run at a time per checkout: two would share the virtualenvs, the generated
# src/_core.cpp and the in-place builds.
mkdir -p build
exec 9>build/.test-versions.lock
if ! flock -n 9; then
	echo "== another test-versions run holds build/.test-versions.lock; waiting"
	flock 9
fi

hash_of() { sha256sum "$@" | sha256sum | cut -c1-64; }

# Builds keyedexec/_core for $py in place and makes sure it is not stale. setuptools
# rebuilds when src/ is newer than the .so (cythonize lists the .pyx's headers as
# dependencies), which misses a changed setup.py, a new Cython, and sources copied in
# with their old mtimes. So: the .so must be newer than every input, and when the inputs'
# content changed since the last build here while the .so did not, it is rebuilt anyway.
build_core() {
	local venv=$1 py=$2 so inputs src stamp old_src old_so stale=""
	so=keyedexec/_core$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
	shopt -s nullglob
	inputs=(setup.py src/*.pyx src/*.pxd src/*.h)
	shopt -u nullglob
	src=$( { hash_of "${inputs[@]}"; "$py" -c 'import sys, Cython; print(sys.version, Cython.__version__)'; } \
		| sha256sum | cut -c1-64)
	stamp="$venv/.core-stamp"
	"$py" setup.py -q build_ext --inplace
	for f in "${inputs[@]}"; do
		if [ "$f" -nt "$so" ]; then stale="$f is newer than $so"; fi
	done
	if [ -z "$stale" ] && [ -f "$stamp" ] && read -r old_src old_so <"$stamp" \
			&& [ "$old_src" != "$src" ] && [ "$old_so" = "$(hash_of "$so")" ]; then
		stale="the sources changed since $so was built"
	fi
	if [ -n "$stale" ]; then
		echo "   rebuilding: $stale"
		CYTHON_FORCE_REGEN=1 "$py" setup.py -q build_ext --inplace --force
	fi
	echo "$src $(hash_of "$so")" >"$stamp"
	# The suite must load that very file, not a keyedexec installed elsewhere.
	KEYEDEXEC_REQUIRE_NATIVE=1 "$py" -c "import os, sys, keyedexec._core as c
if os.path.realpath(c.__file__) != os.path.realpath(sys.argv[1]):
    sys.exit(f'keyedexec._core is {c.__file__}, not {sys.argv[1]}')" "$so"
}

failed=()
tested=()
total=$SECONDS
for minor in 10 11 12 13; do
	newest=$(find "$versions" -mindepth 1 -maxdepth 1 -name "3.$minor.*" -printf '%f\n' 2>/dev/null \
		| grep -E "^3\.$minor\.[0-9]+$" | sort -V | tail -n 1 || true)
	if [ -z "$newest" ]; then
		echo "== 3.$minor: not under $versions, skipped"
		continue
	fi
	python="$versions/$newest/bin/python3"
	venv=".venv-3.$minor"
	py="$venv/bin/python"
	echo "== CPython $newest ($venv)"
	start=$SECONDS
	if ! "$py" -c "import sys; sys.exit(sys.version.split()[0] != '$newest')" 2>/dev/null; then
		rm -rf "$venv"
		"$python" -m venv "$venv"
	fi
	if [ ! -f "$venv/.installed" ] || [ pyproject.toml -nt "$venv/.installed" ] \
			|| [ setup.py -nt "$venv/.installed" ]; then
		# Quiet unless it fails (the editable install's build warnings are noise here).
		if ! {
			"$py" -m pip install -q --upgrade pip &&
			"$py" -m pip install -q "setuptools>=77" "Cython>=3.1" wheel &&
			PIP_PREFER_BINARY=1 "$py" -m pip install -q --no-build-isolation -e ".[test]"
		} >"$venv/install.log" 2>&1; then
			cat "$venv/install.log"
			exit 1
		fi
		touch "$venv/.installed"
	fi
	build_core "$venv" "$py"
	# The summary line when it passes, the report (less its list of skips) when it does not.
	# The time limit: a deadlock that leaves non-daemon threads behind keeps pytest from
	# exiting even after pytest-timeout failed the test.
	rc=0
	# shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
	KEYEDEXEC_REQUIRE_NATIVE=1 timeout -k 30 "$limit" "$py" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} \
		>"$venv/pytest.log" 2>&1 9>&- || rc=$?
	if [ $rc -eq 0 ]; then
		tail -n 1 "$venv/pytest.log"
		tested+=("$newest")
	else
		grep -v '^SKIPPED' "$venv/pytest.log" || true
		if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
			echo "   pytest did not exit within $limit s (KEYEDEXEC_VERSION_TIMEOUT); killed"
		fi
		failed+=("$newest")
	fi
	echo "   ($((SECONDS - start)) s)"
done

if [ ${#tested[@]} -eq 0 ] && [ ${#failed[@]} -eq 0 ]; then
	echo "test-versions: no CPython 3.10-3.13 under $versions" >&2
	exit 1
fi
echo "== passed on: ${tested[*]:-none} ($((SECONDS - total)) s in all)"
if [ ${#failed[@]} -gt 0 ]; then
	echo "== FAILED on: ${failed[*]}" >&2
	exit 1
fi
