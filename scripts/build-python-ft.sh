#!/usr/bin/env bash
# Builds a free-threaded CPython 3.13 ("python3.13t", --disable-gil) once and caches it
# outside the checkout; later runs only check the cache. The last line of stdout is the
# interpreter's path; progress goes to stderr, the compiler's output to a log file.
#
# The source comes from Debian's package archive (CPython's release tarball as Debian
# ships it in trixie), fetched with a private apt configuration in a temporary
# directory: the system's apt sources are not touched. Missing build dependencies are
# installed with the system's apt-get (root, or sudo).
#
#   KEYEDEXEC_FT_CACHE  install prefix (default ~/.cache/keyedexec/python3.13t)
#   KEYEDEXEC_FT_MIRROR Debian mirror (default: the first one in /etc/apt's sources)
#   KEYEDEXEC_FT_JOBS   make -j (default: number of CPUs)
set -euo pipefail

CACHE="${KEYEDEXEC_FT_CACHE:-$HOME/.cache/keyedexec/python3.13t}"
PY="$CACHE/bin/python3.13t"
LOG="$CACHE.build.log"
SUITE=trixie
JOBS="${KEYEDEXEC_FT_JOBS:-$(nproc 2>/dev/null || echo 2)}"

say() { echo "build-python-ft: $*" >&2; }
die() { say "error: $*"; exit 1; }

# A usable cache: a free-threaded interpreter (GIL off by default) with pip.
works() {
    [ -x "$PY" ] && "$PY" -c 'import sys, ssl, zlib, sqlite3, ctypes; assert not sys._is_gil_enabled()' \
        >/dev/null 2>&1 && "$PY" -m pip --version >/dev/null 2>&1
}

if works; then
    echo "$PY"
    exit 0
fi

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root (or sudo) to run: $*"
    fi
}

command -v apt-get >/dev/null || die "apt-get not found: this recipe needs a Debian-based machine"

# Build dependencies: a compiler plus the headers of the stdlib's C modules that the
# suite (and pip) need. Only missing packages are installed.
deps=(build-essential pkg-config xz-utils libssl-dev zlib1g-dev libffi-dev libbz2-dev
      liblzma-dev libsqlite3-dev libreadline-dev libncurses-dev uuid-dev)
missing=()
for p in "${deps[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing build dependencies: ${missing[*]}"
    as_root apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >&2
fi

# The mirror the machine already uses (one-line or deb822 format).
mirror="${KEYEDEXEC_FT_MIRROR:-}"
if [ -z "$mirror" ]; then
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
                 2>/dev/null \
             | grep -oE 'https?://[^ ]+/debian/?( |$)' | grep -v security | head -n1 | tr -d ' ') || true
    mirror="${mirror:-http://deb.debian.org/debian}"
fi
mirror="${mirror%/}"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -r "$keyring" ] || die "$keyring is missing (package debian-archive-keyring)"

work=$(mktemp -d "${TMPDIR:-/tmp}/python-ft.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/parts" "$work/src"
echo "deb-src [signed-by=$keyring] $mirror $SUITE main" >"$work/sources.list"
apt_private=(
    -o "Dir::Etc::SourceList=$work/sources.list"
    -o "Dir::Etc::SourceParts=$work/parts"
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::Cache=$work/cache"
    -o "Dir::Cache::archives=$work/archives"
    -o "APT::Sandbox::User=root"
    -o "Debug::NoLocking=1"
)

say "fetching python3.13 source package from $mirror $SUITE"
apt-get "${apt_private[@]}" -qq update >&2
(cd "$work/src" && apt-get "${apt_private[@]}" -qq source --download-only python3.13 >&2)
tarball=$(ls "$work"/src/python3.13_*.orig.tar.xz 2>/dev/null | head -n1)
[ -n "$tarball" ] || die "apt-get source did not produce python3.13_*.orig.tar.xz"
say "source: $(basename "$tarball")"
tar -xJf "$tarball" -C "$work/src"
srcdir=$(find "$work/src" -mindepth 1 -maxdepth 1 -type d -name 'Python-3.13*' | head -n1)
[ -n "$srcdir" ] || die "no Python-3.13* directory in $tarball"

# No --enable-optimizations (PGO runs the test suite: far too slow for CI).
mkdir -p "$(dirname "$CACHE")"
say "building into $CACHE (make -j$JOBS; log: $LOG)"
start=$(date +%s)
if ! (cd "$srcdir" \
        && ./configure --disable-gil --prefix="$CACHE" --with-ensurepip=no \
        && make -j"$JOBS" \
        && make altinstall) >"$LOG" 2>&1; then
    tail -n 40 "$LOG" >&2
    die "build failed; full log in $LOG"
fi
"$PY" -m ensurepip >>"$LOG" 2>&1 || { tail -n 20 "$LOG" >&2; die "ensurepip failed"; }
say "built in $(( $(date +%s) - start )) s"

works || die "$PY was installed but fails the checks (missing stdlib modules? see $LOG)"
echo "$PY"
