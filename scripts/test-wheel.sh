#!/usr/bin/env bash
# Test the built distributions the way a user gets them, not the source tree:
#   1. check what the sdist and the wheel in DIST contain (sources in, build junk out);
#   2. install the wheel (with its [test] extra) into a fresh virtualenv outside the checkout;
#   3. run the test suite from a copy of tests/ outside the checkout, with the native core
#      required, after asserting that `import keyedexec` resolves to that virtualenv.
#
# usage: scripts/test-wheel.sh PYTHON [DIST]   (extra pytest arguments: PYTEST_ARGS)
# KEYEDEXEC_VERSION_TIMEOUT (seconds, default 900): the limit on the suite, as in test-versions.sh.
# PYTHON must be the interpreter the wheel was built for (any venv of it will do).
set -euo pipefail

python=${1:?usage: scripts/test-wheel.sh PYTHON [DIST]}
root=$(cd "$(dirname "$0")/.." && pwd)
dist=$(cd "${2:-$root/dist}" && pwd)
unset PYTHONPATH KEYEDEXEC_PURE_PYTHON

shopt -s nullglob
sdists=("$dist"/keyedexec-*.tar.gz)
wheels=("$dist"/keyedexec-*.whl)
shopt -u nullglob
if [ ${#sdists[@]} -ne 1 ] || [ ${#wheels[@]} -ne 1 ]; then
	echo "test-wheel: expected one sdist and one wheel in $dist, found: ${sdists[*]} ${wheels[*]}" >&2
	exit 1
fi
sdist=${sdists[0]}
wheel=${wheels[0]}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/keyedexec-wheel.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

echo "== contents of $(basename "$sdist") and $(basename "$wheel")"
"$python" - "$sdist" "$wheel" "$root" <<'EOF'
import fnmatch, pathlib, sys, tarfile, zipfile

sdist, wheel, root = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
with tarfile.open(sdist) as tf:
    # Drop the "keyedexec-X.Y.Z/" prefix.
    snames = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
with zipfile.ZipFile(wheel) as zf:
    wnames = set(zf.namelist())

def has(names, pattern):
    return any(fnmatch.fnmatch(n, pattern) for n in names)

problems = []
# The sdist builds on a bare machine: every source the build reads must be in it.
for pattern in ["pyproject.toml", "setup.py", "README.md", "LICENSE", "MANIFEST.in",
                "src/*.pyx", "src/*.h", "keyedexec/__init__.py", "keyedexec/py.typed",
                "tests/conftest.py"] + ["examples/*.py"] * (root / "examples").is_dir() \
        + ["tests/valgrind/run.sh", "tests/valgrind/python.supp"] * (root / "tests/valgrind").is_dir():
    if not has(snames, pattern):
        problems.append(f"sdist lacks {pattern}")
for pattern in ["*.so", "*.pyd", "*.pyc", "src/*.cpp", "src/*.c", "src/*.html", "build/*", ".venv*"]:
    if has(snames, pattern):
        problems.append(f"sdist ships {pattern}")
# The wheel: the package, its compiled core, typing markers; nothing generated or built alongside.
for pattern in ["keyedexec/__init__.py", "keyedexec/py.typed", "keyedexec-*.dist-info/licenses/LICENSE"]:
    if not has(wnames, pattern):
        problems.append(f"wheel lacks {pattern}")
# Every module and stub of the package, subpackages included (a subpackage missing from
# setuptools' package list installs nothing, silently).
for source in sorted((root / "keyedexec").rglob("*.py*")):
    name = source.relative_to(root).as_posix()
    if source.suffix in (".py", ".pyi") and name not in wnames:
        problems.append(f"wheel lacks {name}")
for pattern in ["*.pyx", "*.pxd", "*.cpp", "*.c", "*.h", "*.html", "src/*", "tests/*", "examples/*", "*.pyc"]:
    if has(wnames, pattern):
        problems.append(f"wheel ships {pattern}")
cores = [n for n in wnames if fnmatch.fnmatch(n, "keyedexec/_core.*") and n.endswith((".so", ".pyd"))]
if len(cores) != 1:
    problems.append(f"wheel has {len(cores)} compiled cores: {cores}")
if problems:
    sys.exit("test-wheel: " + "; ".join(problems))
print(f"sdist: {len(snames)} files; wheel: {len(wnames)} files, core {cores[0]}")
EOF

echo "== installing the wheel into a fresh virtualenv in $tmp"
"$python" -m venv "$tmp/venv"
venv_py="$tmp/venv/bin/python"
"$venv_py" -m pip install -q --upgrade pip
# As in cibuildwheel: an older pure-Python wheel of a test dependency beats a source build.
PIP_PREFER_BINARY=1 "$venv_py" -m pip install -q "$wheel[test]"

# A copy of the tests (and the examples they run) outside the checkout: nothing on
# sys.path leads back to the source tree.
mkdir "$tmp/project"
cp -r "$root/tests" "$root/pyproject.toml" "$tmp/project/"
if [ -d "$root/examples" ]; then cp -r "$root/examples" "$tmp/project/"; fi
cd "$tmp/project"
KEYEDEXEC_REQUIRE_NATIVE=1 "$venv_py" - "$tmp/venv" "$wheel" <<'EOF'
import importlib.metadata as md, pathlib, sys, sysconfig
import keyedexec
from keyedexec import _core

venv = pathlib.Path(sys.argv[1]).resolve()
site = pathlib.Path(sysconfig.get_path("purelib")).resolve()
for mod in (keyedexec, _core):
    path = pathlib.Path(mod.__file__).resolve()
    assert path.is_relative_to(site) and site.is_relative_to(venv), f"{mod.__name__} from {path}, not {site}"
assert keyedexec.NATIVE, "the installed wheel runs without its compiled core"
meta = md.metadata("keyedexec")
assert meta["Version"] == keyedexec.__version__, (meta["Version"], keyedexec.__version__)
assert meta["License-Expression"] == "MIT", meta["License-Expression"]
print(f"keyedexec {keyedexec.__version__} from {pathlib.Path(keyedexec.__file__).parent}, core {pathlib.Path(_core.__file__).name}")
EOF

echo "== test suite against the installed wheel"
# The time limit: a deadlock that leaves non-daemon threads behind keeps pytest from
# exiting even after pytest-timeout failed the test.
limit=${KEYEDEXEC_VERSION_TIMEOUT:-900}
rc=0
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
KEYEDEXEC_REQUIRE_NATIVE=1 timeout -k 30 "$limit" "$venv_py" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} || rc=$?
if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
	echo "test-wheel: pytest did not exit within $limit s (KEYEDEXEC_VERSION_TIMEOUT); killed" >&2
fi
exit $rc
