"""The README's Python snippets, and examples/, pass ``mypy --strict`` as written.

Every fenced block that opens with three backticks and ``python`` in README.md
is checked (found automatically, so new blocks are covered too). A snippet is
a fragment, not a program, so it is checked under two conventions:

* Names it uses but never defines (``events``, ``fn``, ``key``...) stand for
  the reader's own objects and are declared ``Any``. Names that keyedexec
  exports, and standard-library modules, are not: a snippet must import them
  itself, as a reader copying it would have to.
* It is checked as the body of an ``async def``, so that ``await`` and
  ``async with`` work at the top level, as in ``python -m asyncio``.

A block that is not meant to type-check at all (pseudo-code) is skipped when
the line before its fence is the HTML comment ``<!-- not-a-program -->``;
keep that rare. Errors are reported with README.md line numbers.

Skipped where mypy is not installed (the ``typing`` extra installs it) or the
README is not next to the tests (a wheel's tests run from a copy).
"""

from __future__ import annotations

import builtins
import importlib.util
import os
import re
import subprocess
import symtable
import sys
import textwrap
from pathlib import Path

import pytest

import keyedexec
import keyedexec.aio

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXAMPLES = ROOT / "examples"

SKIP_MARKER = "<!-- not-a-program -->"
WRAPPER = "async def _readme_snippet() -> None:"
# A python block (its fences may be indented, in a list item), with the line
# before it (for the skip marker).
_BLOCK = re.compile(
    r"^(?P<before>[^\n]*)\n[ \t]*```python[ \t]*\n(?P<body>.*?)^[ \t]*```[ \t]*$", re.M | re.S
)

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed"),
    pytest.mark.skipif(not README.is_file(), reason="README.md is not next to the tests"),
    pytest.mark.timeout(300),
]

# Names a snippet must import itself rather than get as an Any placeholder.
_MUST_IMPORT = (
    set(keyedexec.__all__) | set(keyedexec.aio.__all__) | {"keyedexec"} | sys.stdlib_module_names
)


def readme_snippets() -> list[tuple[int, str]]:
    """(README line of the snippet's first line, its source) for every python block."""
    text = README.read_text(encoding="utf-8")
    snippets = []
    for m in _BLOCK.finditer("\n" + text):  # "\n": a block on line 1 has a line before it
        if m.group("before").strip() == SKIP_MARKER:
            continue
        first_line = text.count("\n", 0, m.start("body") - 1) + 1
        snippets.append((first_line, textwrap.dedent(m.group("body"))))
    return snippets


def placeholders(body: str) -> list[str]:
    """The names ``body`` reads but never binds, other than builtins and _MUST_IMPORT."""
    top = symtable.symtable(f"{WRAPPER}\n{textwrap.indent(body, '    ')}", "<snippet>", "exec")
    free: set[str] = set()
    tables = list(top.get_children())
    while tables:
        table = tables.pop()
        tables.extend(table.get_children())
        for sym in table.get_symbols():
            if sym.is_referenced() and sym.is_global() and not sym.is_declared_global():
                free.add(sym.get_name())
    return sorted(free - set(dir(builtins)) - _MUST_IMPORT)


def as_module(body: str) -> tuple[str, int]:
    """The snippet as a module mypy can check, and how many lines precede the snippet."""
    try:
        names = placeholders(body)
    except SyntaxError:
        names = []  # mypy reports it, with its line
    header = [
        "from typing import Any",
        "; ".join(f"{name}: Any" for name in names) or "pass",
        WRAPPER,
    ]
    return "\n".join(header) + "\n" + textwrap.indent(body, "    ") + "    pass\n", len(header)


def test_readme_finds_the_snippets() -> None:
    """The extraction sees the README's blocks (a broken pattern would check nothing)."""
    snippets = readme_snippets()
    assert len(snippets) >= 3
    assert any("KeyedExecutor(" in body for _, body in snippets)
    assert all(body.strip() for _, body in snippets)


def test_placeholders_are_the_readers_names_only() -> None:
    body = textwrap.dedent(
        """
        from keyedexec import TaskPool
        with TaskPool() as pool:
            for event in events:
                pool.submit(event.user_id, lambda ctx, e=event: send(ctx, e))
        print(KeyedExecutor, asyncio)
        """
    )
    assert placeholders(body) == ["events", "send"]


def test_readme_snippets_and_examples_pass_mypy_strict(tmp_path: Path) -> None:
    """``mypy --strict`` on every README snippet (as described above) and on examples/."""
    first_lines: dict[str, tuple[int, int]] = {}
    files = []
    for first_line, body in readme_snippets():
        source, offset = as_module(body)
        path = tmp_path / f"readme_line_{first_line}.py"
        path.write_text(source, encoding="utf-8")
        first_lines[path.name] = (first_line, offset)
        files.append(str(path))
    if EXAMPLES.is_dir():
        files.extend(str(p) for p in sorted(EXAMPLES.glob("*.py")))
    env = dict(os.environ, MYPYPATH=str(ROOT))  # the package under test, from this checkout
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
         "--cache-dir", str(tmp_path / "mypy_cache"), *files],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240,
    )

    def in_readme(match: re.Match[str]) -> str:
        # readme_line_12.py:5: error ... -> README.md:14: error ...
        first_line, offset = first_lines[match.group(1)]
        return f"README.md:{first_line + int(match.group(2)) - offset - 1}:"

    report = re.sub(r"\S*?(readme_line_\d+\.py):(\d+):", in_readme, proc.stdout)
    assert proc.returncode == 0, report + proc.stderr
