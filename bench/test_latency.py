"""Latency from the submit call to the task's start, at light load.

One task at a time on a 4-worker pool whose workers are idle: the sample is
the time from just before the call to the first line of the task
(perf_counter_ns); the next task is submitted once the previous one ran.
Figures: the median over rounds of each round's p50 and p99.
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
from typing import Any, Callable

import pytest
from harness import EXECUTORS, SIZES, TIMEOUT, WORKERS, Competitor, percentile, record


def _samples(execute: Callable[[Any, Callable[[], object]], object], n: int) -> list[int]:
    perf = time.perf_counter_ns
    done = threading.Lock()
    done.acquire()
    starts: list[int] = []

    def task() -> None:
        starts.append(perf())
        done.release()

    sent = []
    for i in range(n):
        t0 = perf()
        execute(i % 1000, task)
        if not done.acquire(timeout=TIMEOUT):
            raise RuntimeError("a latency sample never ran")
        sent.append(t0)
    return [s - t for s, t in zip(starts, sent)]


@pytest.mark.benchmark(group="latency: submit -> start, one task at a time")
@pytest.mark.parametrize("comp", EXECUTORS, ids=str)
def test_latency(benchmark: Any, comp: Competitor) -> None:
    """p50 and p99 of submit -> start over latency_samples tasks per round."""
    p50s: list[float] = []
    p99s: list[float] = []

    def setup() -> tuple[tuple[Any], dict[str, Any]]:
        gc.collect()
        return (comp.open(WORKERS),), {}

    def run(pool: Any) -> None:
        try:
            lat = sorted(_samples(comp.execute_fn(pool), SIZES.latency_samples))
        finally:
            comp.close(pool)
        p50s.append(percentile(lat, 0.50) / 1000)
        p99s.append(percentile(lat, 0.99) / 1000)

    benchmark.pedantic(run, setup=setup, rounds=SIZES.rounds)
    p50, p99 = statistics.median(p50s), statistics.median(p99s)
    extra = {"p50_us": p50, "p99_us": p99, "samples_per_round": SIZES.latency_samples}
    record("latency-p50", comp.name, p50, "us", baseline=("latency-p50", "tpe"), extra=extra)
    record("latency-p99", comp.name, p99, "us", baseline=("latency-p99", "tpe"), extra=extra)
    benchmark.extra_info.update(extra)
