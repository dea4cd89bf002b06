#!/bin/sh
# Runs a CI-sized selection of the native tests under valgrind memcheck, then
# fails if any "definitely lost" block or invalid access involves keyedexec._core.
#   tests/valgrind/run.sh [PYTHON]        (make test-valgrind)
# Environment: KEYEDEXEC_STRESS (default 0.02: small workloads; valgrind is ~50x
# slower), VALGRIND_LOG_DIR (default build/valgrind), VALGRIND_TESTS (pytest -k).
set -u
PY=${1:-.venv/bin/python}
HERE=$(cd "$(dirname "$0")" && pwd)
LOG_DIR=${VALGRIND_LOG_DIR:-build/valgrind}
SELECT=${VALGRIND_TESTS:-"native and (leak or references or memory or exactly_once or shutdown_races_submitters or bad_submit or eq_raising or cancel_futures or map_results)"}

command -v valgrind >/dev/null || { echo "valgrind not found" >&2; exit 2; }
mkdir -p "$LOG_DIR"
rm -f "$LOG_DIR"/memcheck.*.log

# PYTHONMALLOC=malloc: every object goes through malloc, so valgrind sees it
# (pymalloc's arenas would hide leaks and confuse memcheck).
PYTHONMALLOC=malloc KEYEDEXEC_STRESS=${KEYEDEXEC_STRESS:-0.02} KEYEDEXEC_REQUIRE_NATIVE=1 \
valgrind --tool=memcheck --leak-check=full --show-leak-kinds=definite \
    --errors-for-leak-kinds=definite --num-callers=40 \
    --suppressions="$HERE/python.supp" --log-file="$LOG_DIR/memcheck.%p.log" \
    "$PY" -m pytest -p no:cacheprovider -q -o faulthandler_timeout=0 \
    tests/test_leaks.py tests/test_reliability.py -k "$SELECT"
tests_rc=$?

"$PY" "$HERE/check_log.py" "$LOG_DIR"/memcheck.*.log
check_rc=$?
[ "$tests_rc" -eq 0 ] || echo "valgrind: the selected tests failed under valgrind (exit $tests_rc)" >&2
[ "$check_rc" -eq 0 ] && [ "$tests_rc" -eq 0 ]
