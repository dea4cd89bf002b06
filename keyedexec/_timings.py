"""Wait and run times, and hot keys: the structures every executor returns.

A task's *wait* is the time from its submit to the moment a worker calls it;
its *run* is the time from that call to its end (returning or raising). Tasks
that never run (cancelled, skipped) are not timed. Both go into histograms
with fixed log2 buckets: up to 1 us, 2 us, 4 us ... 2**26 us (67 s), and
+Inf. The threaded schedulers time one task in ``sample_every`` (chosen at
submit, evenly spread: see ``KeyedExecutor``), the monotonic clock read three
times for it and never for the others, so no histogram counts every task
unless ``sample_every`` is 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["BUCKETS", "HotKey", "Histogram", "Recorder", "Timings", "bucket_of", "hot_keys"]

#: Upper bounds of the histogram buckets, in seconds (the native core's NBUCKETS).
BUCKETS: tuple[float, ...] = tuple(2**k / 1e6 for k in range(27)) + (math.inf,)
_NBUCKETS = len(BUCKETS)


def bucket_of(ns: int) -> int:
    """The bucket of a duration in nanoseconds (as the core's ke_bucket)."""
    return min(((ns - 1) // 1000).bit_length() if ns > 0 else 0, _NBUCKETS - 1)


@dataclass(frozen=True, slots=True)
class Histogram:
    """Durations in fixed buckets. ``counts[i]`` holds those above
    ``buckets[i - 1]`` and up to ``buckets[i]`` (not cumulative)."""

    buckets: tuple[float, ...]
    """Upper bounds in seconds; the last is ``math.inf``."""
    counts: tuple[int, ...]
    count: int
    """Durations recorded: ``sum(counts)``."""
    sum: float
    """Their total, in seconds."""

    @classmethod
    def from_ns(cls, counts: tuple[int, ...], sum_ns: int) -> Histogram:
        return cls(BUCKETS, tuple(counts), sum(counts), sum_ns / 1e9)

    def cumulative(self) -> list[tuple[float, int]]:
        """``[(upper bound, durations up to it)]``: Prometheus's ``le`` buckets."""
        out, total = [], 0
        for bound, n in zip(self.buckets, self.counts):
            total += n
            out.append((bound, total))
        return out


class Timings(NamedTuple):
    """``timings()``: the wait and run time histograms of the timed tasks."""

    wait: Histogram
    """Submit -> start."""
    run: Histogram
    """Start -> end."""
    sample_every: int
    """1 task in this many is timed (1: every task; 0: timing is off)."""


class HotKey(NamedTuple):
    """One of ``hot_keys()``'s answers."""

    key: Any
    queued: int
    """Its tasks queued and not started."""
    running: bool
    """Whether one of its tasks runs now."""
    oldest_wait: float | None
    """Seconds its oldest queued task has waited so far (to a few ms: the
    coarse clock stamps untimed tasks); None if nothing is queued."""


def timings_from(raw: tuple[int, tuple[int, ...], int, tuple[int, ...], int]) -> Timings:
    """A scheduler's ``timings()`` tuple as a Timings."""
    every, wait, wait_ns, run, run_ns = raw
    return Timings(Histogram.from_ns(wait, wait_ns), Histogram.from_ns(run, run_ns), every)


def check_n(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return n


def hot_keys(entries: list[tuple[Any, int, bool, int | None]], n: int) -> list[HotKey]:
    """A scheduler's ``hot_keys()`` entries, sorted (most queued, running,
    longest waiting first), each key once, at most ``n``."""
    entries = sorted(entries, key=lambda e: (e[1], e[2], -1 if e[3] is None else e[3]),
                     reverse=True)
    seen: set[int] = set()
    out: list[HotKey] = []
    for key, queued, running, oldest_ns in entries:
        if id(key) in seen:  # met twice by a scan the table moved under
            continue
        seen.add(id(key))
        out.append(HotKey(key, queued, running, None if oldest_ns is None else oldest_ns / 1e9))
        if len(out) == n:
            break
    return out


_SEED = 0x9E3779B97F4A7C15  # the native core's SAMPLE_SEED
_MASK = (1 << 64) - 1


class Recorder:
    """The histograms and the sampling rule in Python (the pure scheduler,
    AsyncKeyedExecutor): the native core's arrays and arithmetic, the same
    tasks chosen for the same submit order."""

    __slots__ = ("sample_every", "_countdown", "_rng", "wait", "wait_ns", "run", "run_ns")

    def __init__(self, sample_every: int) -> None:
        self.sample_every = sample_every
        self._countdown = 1  # the first task is timed
        self._rng = _SEED
        self.wait = [0] * _NBUCKETS
        self.run = [0] * _NBUCKETS
        self.wait_ns = self.run_ns = 0

    def take(self) -> bool:
        """Called once per accepted task: whether to time it. The gaps between
        timed tasks are random in [1, 2 * sample_every - 1] (xorshift64, a fixed
        seed), so that no periodic pattern of submits is in step with them."""
        if not self.sample_every:
            return False
        self._countdown -= 1
        if self._countdown:
            return False
        x = self._rng
        x ^= (x << 13) & _MASK
        x ^= x >> 7
        x ^= (x << 17) & _MASK
        self._rng = x
        self._countdown = 1 + x % (2 * self.sample_every - 1)
        return True

    def record(self, stamp: int, started: int, ended: int) -> None:
        wait, run = max(0, started - stamp), max(0, ended - started)
        self.wait[bucket_of(wait)] += 1
        self.wait_ns += wait
        self.run[bucket_of(run)] += 1
        self.run_ns += run

    def raw(self) -> tuple[int, tuple[int, ...], int, tuple[int, ...], int]:
        """The native core's ``timings()`` tuple."""
        return (self.sample_every, tuple(self.wait), self.wait_ns, tuple(self.run), self.run_ns)
