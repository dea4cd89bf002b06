"""What operating an executor costs (issue 16): timing tasks, and hot_keys().

* Timing: the ``execute`` load (no-op tasks, 1,000 keys, 4 workers) with
  ``sample_timings=0`` (off), the default (1 task in 32 timed) and 1 (every
  task), their rounds interleaved so that the machine's load hits them alike;
  each figure is tasks / median round time (the fastest round is in the
  JSON too). All three stamp every task for hot_keys (not switchable).
* hot_keys(10) with 1,000,000 active keys (a task queued on each, the one
  worker held): the median call, and the longest the scan held the core's
  mutex in one go (what a worker may wait for it), as the core measures it.
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
from typing import Any

import pytest
from harness import BATCH, FULL, NATIVE_C, SIZES, TIMEOUT, WORKERS, keys_for, noop, record

pytestmark = pytest.mark.skipif(NATIVE_C is None, reason="needs the native core")

TIMED = {"execute-untimed": 0, "execute-timed": 32, "execute-timed-all": 1}
HOT_KEYS = 1_000_000
HOT_CALLS = 7


def _round(sample_timings: int, keys: list[Any]) -> float:
    """Seconds to run ``keys`` no-op tasks on a warm pool, until all have run."""
    assert NATIVE_C is not None
    ex = NATIVE_C.cls(WORKERS, batch=BATCH, sample_timings=sample_timings)
    barrier = threading.Barrier(WORKERS + 1, timeout=TIMEOUT)
    for i in range(WORKERS):
        ex.execute(("warm", i), barrier.wait)
    barrier.wait()
    gc.collect()
    execute = ex.execute
    t0 = time.perf_counter()
    for k in keys:
        execute(k, noop)
    ex.shutdown(wait=True)
    return time.perf_counter() - t0


@pytest.mark.benchmark(group="observability: execute with and without timing")
def test_timing_cost(benchmark: Any) -> None:
    """The execute load, timing off / default / every task, rounds interleaved."""
    n = SIZES.tasks
    keys = keys_for("uniform", n)
    rounds = 8 * SIZES.rounds  # a 5 % effect needs many rounds on a shared machine
    times: dict[str, list[float]] = {s: [] for s in TIMED}

    def run() -> None:
        for _ in range(rounds):
            for scenario, every in TIMED.items():
                times[scenario].append(_round(every, keys))

    benchmark.pedantic(run, rounds=1)
    for scenario, every in TIMED.items():
        median = statistics.median(times[scenario])
        record(scenario, "native", n / median, "tasks/s",
               baseline=("execute-untimed", "native"),
               extra={"tasks": n, "rounds": rounds, "median_s": median,
                      "fastest_s": min(times[scenario]), "sample_timings": every})


@pytest.mark.benchmark(group="observability: hot_keys(10), 1,000,000 active keys")
def test_hot_keys_cost(benchmark: Any) -> None:
    """hot_keys(10) over a million keys with a task queued each."""
    assert NATIVE_C is not None
    keys = list(range(HOT_KEYS))
    calls: list[float] = []
    holds: list[int] = []

    def run() -> None:
        gc.collect()
        ex = NATIVE_C.cls(1, batch=BATCH)
        release, started = threading.Event(), threading.Event()
        ex.execute("blocker", lambda: (started.set(), release.wait(TIMEOUT)))
        try:
            assert started.wait(TIMEOUT)
            execute = ex.execute
            for k in keys:
                execute(k, noop)
            for _ in range(3):
                execute(77, noop)
            for _ in range(HOT_CALLS):
                t0 = time.perf_counter()
                top, longest_hold_ns = ex._sched.hot_keys(10)
                calls.append(time.perf_counter() - t0)
                holds.append(longest_hold_ns)
            assert max(top, key=lambda e: e[1])[0] == 77
        finally:
            release.set()
            ex.shutdown(wait=True)

    benchmark.pedantic(run, rounds=1)
    extra = {"keys": HOT_KEYS, "calls": HOT_CALLS, "max_hold_us": max(holds) / 1000,
             "full": FULL}
    record("hot-keys", "native", statistics.median(calls) * 1e6, "us", extra=extra)
    record("hot-keys-hold", "native", statistics.median(holds) / 1000, "us", extra=extra)
