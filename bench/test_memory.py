"""Memory: what a queued task and an active key cost, and whether it comes back.

Each run opens a pool, holds its workers with blockers, queues one no-op task
on each of N distinct keys (key objects created beforehand: they are the
user's), reads the memory, then releases the workers and drains.

* bytes per queued task: native bytes (the core's own C allocations, from
  ``_native_bytes()``) plus Python-side bytes (tracemalloc, a second run).
* RSS: resident memory before queueing, at the peak, and after the drain.
* TaskPool: the same per active key, one queued job per key.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import tracemalloc
from typing import Any

import pytest
from harness import (
    COMPETITORS,
    POOLS,
    SIZES,
    TIMEOUT,
    WORKERS,
    Competitor,
    noop,
    record,
    rss_bytes,
)

MB = 1 << 20


def _native_bytes(sched: Any) -> int:
    """C memory the native core holds (0 for the pure-Python scheduler)."""
    nbytes = getattr(sched, "_native_bytes", None)
    return 0 if nbytes is None else int(nbytes())


def _core_traced_bytes(sched: Any) -> int:
    """The native core's memory that tracemalloc also sees (its PyMem_Malloc
    blocks; its large blocks are mapped from the OS): subtracted from the traced
    figure so that it is not counted twice."""
    mapped = getattr(sched, "_mapped_bytes", None)
    return 0 if mapped is None else _native_bytes(sched) - int(mapped())


def _malloc_trim() -> bool:
    """Ask glibc to give freed heap memory back to the OS (False where unavailable)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


def _rss_run(comp: Competitor, keys: list[Any]) -> dict[str, float]:
    gc.collect()
    _malloc_trim()  # start from a trimmed heap, so that earlier tests' free memory is not reused
    release = threading.Event()
    pool = comp.open(WORKERS)
    try:
        comp.block(pool, WORKERS, release)
        sched = getattr(pool, "_sched", None)
        nb0, rss0 = _native_bytes(sched), rss_bytes()
        comp.execute_all(pool, keys, noop)
        nb1, rss1 = _native_bytes(sched), rss_bytes()
    finally:
        release.set()
        comp.close(pool)
    del pool
    gc.collect()
    rss2 = rss_bytes()
    # Drained: the core must hold (almost) nothing; a leak would show here.
    out = {"native_B": (nb1 - nb0) / len(keys), "native_kept_total_B": _native_bytes(sched)}
    if rss0 is not None and rss1 is not None and rss2 is not None:
        out.update(rss_peak_MB=(rss1 - rss0) / MB, rss_kept_MB=(rss2 - rss0) / MB)
        # Memory freed but kept by the C allocator (glibc's fastbins) comes
        # back here; a figure that stays high after the trim is held by Python.
        if _malloc_trim():
            rss3 = rss_bytes()
            if rss3 is not None:
                out["rss_kept_after_trim_MB"] = (rss3 - rss0) / MB
    return out


def _python_bytes(comp: Competitor, keys: list[Any]) -> float:
    gc.collect()
    release = threading.Event()
    pool = comp.open(WORKERS)
    try:
        comp.block(pool, WORKERS, release)
        sched = getattr(pool, "_sched", None)
        core0 = _core_traced_bytes(sched)
        tracemalloc.start()
        try:
            comp.execute_all(pool, keys, noop)
            traced = tracemalloc.get_traced_memory()[0] - (_core_traced_bytes(sched) - core0)
        finally:
            tracemalloc.stop()
    finally:
        release.set()
        comp.close(pool)
    return traced / len(keys)


@pytest.mark.benchmark(group="memory: one queued task on each of N keys")
@pytest.mark.parametrize("comp", COMPETITORS, ids=str)
def test_memory(benchmark: Any, comp: Competitor) -> None:
    """Bytes per queued task (native + Python) and RSS kept after the drain."""
    n = SIZES.base_tasks if comp.tpe_based else SIZES.memory_tasks
    keys = list(range(n))
    out: dict[str, float] = {}

    def run() -> None:
        out.update(_rss_run(comp, keys))
        out["python_B"] = _python_bytes(comp, keys)

    benchmark.pedantic(run, rounds=1)
    extra = {"tasks": n, **out}
    record("memory-bytes", comp.name, out["native_B"] + out["python_B"], "B",
           baseline=("memory-bytes", "tpe"), benchmark=benchmark, extra=extra)
    if comp.name == "native":
        record("memory-native", comp.name, out["native_B"], "B", extra=extra)
    if "rss_peak_MB" in out and out["rss_peak_MB"] > 0:
        kept = 100 * max(0.0, out["rss_kept_MB"]) / out["rss_peak_MB"]
        record("memory-rss", comp.name, kept, "%", extra=extra)
        if "rss_kept_after_trim_MB" in out:
            trimmed = 100 * max(0.0, out["rss_kept_after_trim_MB"]) / out["rss_peak_MB"]
            record("memory-rss-trim", comp.name, trimmed, "%", extra=extra)


def _job(ctx: Any) -> None:
    pass


@pytest.mark.benchmark(group="TaskPool: bytes per active key")
@pytest.mark.parametrize("name", list(POOLS))
def test_taskpool_bytes_per_key(benchmark: Any, name: str) -> None:
    """pool_keys keys with one queued job each, behind 2 blocked workers."""
    n = SIZES.pool_keys
    keys = list(range(n))
    out: dict[str, float] = {}

    def run() -> None:
        gc.collect()
        release = threading.Event()
        started = threading.Semaphore(0)

        def blocker(ctx: Any) -> None:
            started.release()
            release.wait(TIMEOUT)

        pool = POOLS[name](max_workers=2)
        pool.start()
        try:
            for i in range(2):
                pool.submit(("blocker", i), blocker)
            for _ in range(2):
                assert started.acquire(timeout=TIMEOUT)
            nb0, core0 = _native_bytes(pool._sched), _core_traced_bytes(pool._sched)
            tracemalloc.start()
            try:
                submit = pool.submit
                for k in keys:
                    submit(k, _job)
                traced = tracemalloc.get_traced_memory()[0] - (_core_traced_bytes(pool._sched) - core0)
            finally:
                tracemalloc.stop()
            out["native_B"] = (_native_bytes(pool._sched) - nb0) / n
            out["python_B"] = traced / n
            assert len(pool) == n + 2
        finally:
            release.set()
            assert pool.stop(timeout=TIMEOUT)

    benchmark.pedantic(run, rounds=1)
    record("pool-bytes", name, out["native_B"] + out["python_B"], "B",
           baseline=("pool-bytes", "pure"), benchmark=benchmark, extra={"keys": n, **out})
