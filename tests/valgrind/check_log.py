"""Fail if a memcheck log blames keyedexec's native core.

Usage: python check_log.py LOG [LOG ...]

A record fails the check when it is a "definitely lost" leak, or an invalid
read, write or free, and one of its stack frames is in keyedexec._core (the
extension's file name, its C++ source, or a Cython-generated function). Other
records (CPython's own, or leaks that are merely "still reachable") are only
counted. Prints a summary; exit status 1 on failure, 2 if no log was found.
"""

from __future__ import annotations

import re
import sys

OURS = re.compile(r"keyedexec/_core|_core\.cpython|_core\.cpp|__pyx_")
SERIOUS = re.compile(r"definitely lost in loss record|^Invalid (read|write|free)|Mismatched free")
ERROR = re.compile(r"^(Invalid |Mismatched free|Conditional jump|Use of uninitialised|Syscall param|Source and destination)")
PREFIX = re.compile(r"^==\d+== ?")


def records(text: str) -> list[list[str]]:
    """Split a log into its records (blank '==pid==' lines separate them)."""
    out: list[list[str]] = [[]]
    for raw in text.splitlines():
        line = PREFIX.sub("", raw)
        if not line.strip():
            if out[-1]:
                out.append([])
        else:
            out[-1].append(line)
    return [r for r in out if r]


def main(paths: list[str]) -> int:
    if not paths:
        print("check_log: no valgrind log to check", file=sys.stderr)
        return 2
    bad: list[str] = []
    totals = {"definitely lost": 0, "ours": 0, "other errors": 0}
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        for m in re.finditer(r"definitely lost: ([\d,]+) bytes", text):
            totals["definitely lost"] += int(m.group(1).replace(",", ""))
        for rec in records(text):
            head = rec[0]
            ours = any(OURS.search(line) for line in rec)
            if SERIOUS.search(head) and ours:
                totals["ours"] += 1
                bad.append(f"{path}:\n    " + "\n    ".join(rec[:25]))
            elif ERROR.search(head):
                totals["other errors"] += 1
    print(
        f"valgrind: {len(paths)} log(s); definitely lost (all code): "
        f"{totals['definitely lost']} bytes; records blaming keyedexec._core: {totals['ours']}; "
        f"other memcheck errors (not failing): {totals['other errors']}"
    )
    for b in bad:
        print(b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
