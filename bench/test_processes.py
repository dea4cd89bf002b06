"""ProcessKeyedExecutor (keyedexec.process): every core for keyed work, under the GIL.

* ``process-cpu``: CPU-bound pure-Python tasks of about 1 ms (a fixed amount
  of work, calibrated once: a loaded machine slows it down instead of
  shortening the work), 100 keys, 2 processes, against the threaded
  KeyedExecutor with 2 workers and ProcessPoolExecutor(2) (no ordering at all),
  and next to ``capacity``: 2 processes running the same work with no executor
  (each its half in one call), what the machine's two cores give in this run.
  The four run in interleaved rounds.
* ``process-submit``: no-op tasks over 1,000 keys, ``submit`` then every
  ``result()``, against ``ProcessPoolExecutor.submit``: batching pays for the
  pipe once per batch.
* ``process-rss``: RSS of one idle child (MB); ``process-bytes``: bytes per task
  queued in the parent (tracemalloc), both reported without a goal.

Pools are started and warmed before the clock starts. The children import this
module (spawn): it stays light.
"""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing
import os
import time
import tracemalloc
from typing import Any, Callable

import pytest
from harness import FULL, TIMEOUT, interleaved, record, record_rate

from keyedexec import KeyedExecutor
from keyedexec.process import ProcessKeyedExecutor

PROCESSES = 2
CPU_TASKS = 2_000 if FULL else 1_000
SUBMIT_TASKS = 100_000 if FULL else 20_000
PPE_SUBMIT_TASKS = 20_000 if FULL else 4_000
QUEUED_TASKS = 100_000 if FULL else 20_000
ROUNDS = 3
CPU_ROUNDS = 7 if FULL else 5


def _work(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def _calibrate() -> int:
    """Loop count for about 1 ms of work on this machine (best of 5: the least loaded)."""
    n = 20_000
    best = min(_timed(lambda: _work(n)) for _ in range(5))
    return max(1, int(n * 0.001 / best))


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


LOOPS = _calibrate() if __name__ != "__mp_main__" else 0  # children get it as an argument


def cpu_task(n: int) -> int:
    return _work(n)


def noop() -> None:
    pass


def _collect() -> None:
    gc.collect()  # the previous round's garbage is not this round's cost


def _ctx() -> Any:
    return multiprocessing.get_context("spawn")


def _open(name: str) -> Any:
    if name == "process":
        ex: Any = ProcessKeyedExecutor(PROCESSES, 1, mp_context="spawn")
        for f in [ex.submit(k, noop) for k in range(100)]:  # children up and warm
            f.result(TIMEOUT)
    elif name == "native":
        ex = KeyedExecutor(PROCESSES)
    else:  # ppe, capacity
        ex = concurrent.futures.ProcessPoolExecutor(PROCESSES, mp_context=_ctx())
        for f in [ex.submit(noop) for _ in range(100)]:
            f.result(TIMEOUT)
    return ex


def _submit_all(name: str, ex: Any, n: int, keys: int, fn: Callable[..., Any],
                *args: Any) -> None:
    submit = ex.submit
    if name == "ppe":
        futures = [submit(fn, *args) for _ in range(n)]
    else:
        futures = [submit(i % keys, fn, *args) for i in range(n)]
    for f in futures:
        f.result(TIMEOUT)


def _run(benchmark: Any, name: str, n: int, keys: int, fn: Callable[..., Any],
         *args: Any) -> None:
    ex = _open(name)
    try:
        benchmark.pedantic(lambda: _submit_all(name, ex, n, keys, fn, *args),
                           setup=_collect, rounds=ROUNDS)
    finally:
        ex.shutdown(wait=True)


def cpu_share(tasks: int, n: int) -> None:
    """One process's share of the CPU work, run with no executor at all."""
    for _ in range(tasks):
        _work(n)


def _capacity_run(pool: Any, tasks: int) -> Callable[[], None]:
    """The machine's capacity: each process runs its half in one call."""
    def run() -> None:
        share = tasks // PROCESSES
        for f in [pool.submit(cpu_share, share, LOOPS) for _ in range(PROCESSES)]:
            f.result(TIMEOUT)
    return run


@pytest.mark.benchmark(group="process: CPU-bound ~1 ms tasks, 100 keys, 2 processes")
def test_process_cpu(benchmark: Any) -> None:
    """All competitors in interleaved rounds, next to the machine's capacity:
    how fast 2 processes run the same work with no executor. On a VM whose second
    core comes and goes, that says what 2 processes could reach in this run."""
    pools = {name: _open(name) for name in ("process", "native", "ppe", "capacity")}
    runs: dict[str, Callable[[], object]] = {
        name: (lambda name=name: _submit_all(name, pools[name], CPU_TASKS, 100, cpu_task, LOOPS))
        for name in ("process", "native", "ppe")
    }
    runs["capacity"] = _capacity_run(pools["capacity"], CPU_TASKS)
    try:
        medians = interleaved(benchmark, runs, CPU_ROUNDS, setup=_collect)
    finally:
        for pool in pools.values():
            pool.shutdown(wait=True)
    for name, seconds in medians.items():
        record("process-cpu", name, CPU_TASKS / seconds, "tasks/s",
               baseline=("process-cpu", "native"),
               extra={"tasks": CPU_TASKS, "median_s": seconds, "rounds": CPU_ROUNDS})


@pytest.mark.benchmark(group="process: no-op submit + result, 1,000 keys")
@pytest.mark.parametrize("name", ["process", "ppe"])
def test_process_submit(benchmark: Any, name: str) -> None:
    n = SUBMIT_TASKS if name == "process" else PPE_SUBMIT_TASKS
    _run(benchmark, name, n, 1000, noop)
    record_rate(benchmark, "process-submit", name, n, baseline=("process-submit", "ppe"))


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="Linux /proc")
@pytest.mark.benchmark(group="process: memory")
def test_process_memory(benchmark: Any) -> None:
    """RSS of an idle child; bytes per task queued in the parent (not yet sent)."""
    out: dict[str, float] = {}

    def run() -> None:
        ex = _open("process")
        try:
            time.sleep(0.2)
            out["rss_child_MB"] = min(_rss_mb(pid) for pid in ex.pids())
        finally:
            ex.shutdown(wait=True)
        # A linger that never ends: the tasks stay queued here.
        ex = ProcessKeyedExecutor(1, mp_context="spawn", linger=3600, batch_size=2**30)
        try:
            keys = list(range(QUEUED_TASKS))
            gc.collect()
            tracemalloc.start()
            try:
                submit = ex.submit
                futures = [submit(k, noop) for k in keys]
                out["queued_B"] = tracemalloc.get_traced_memory()[0] / len(keys)
            finally:
                tracemalloc.stop()
            del futures
        finally:
            ex.shutdown(wait=True, cancel_futures=True)

    benchmark.pedantic(run, rounds=1)
    record("process-rss", "process", out["rss_child_MB"], "MB", benchmark=benchmark,
           extra=dict(out))
    record("process-bytes", "process", out["queued_B"], "B", benchmark=benchmark,
           extra={"tasks": QUEUED_TASKS, **out})
