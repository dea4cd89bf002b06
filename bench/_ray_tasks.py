"""Task functions and the naive actor for bench/test_ray.py, imported by Ray workers.

A module of its own, so that a worker imports this (and nothing of pytest).
"""

from __future__ import annotations

from typing import Any, Callable


def noop() -> None:
    pass


def work(n: int) -> int:
    """Pure-Python CPU work: ``n`` loop steps."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def work_many(tasks: int, n: int) -> None:
    """``tasks`` pieces of ``work(n)`` in one call: an actor's share, no executor."""
    for _ in range(tasks):
        work(n)


class NaiveShard:
    """The naive ordered pattern: a plain synchronous actor per shard runs one
    caller's calls in order, one remote call per task."""

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)
