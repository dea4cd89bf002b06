"""I/O-like tasks that release the GIL: time.sleep(0.001), at 1 ... 64 workers.

Many keys, so ordering never limits parallelism: the figure is how
throughput scales with the pool, as a ratio to the same competitor's
1-worker throughput in this run (goal for keyedexec: >= 0.9 * W).
"""

from __future__ import annotations

import functools
import gc
import time
from typing import Any, Callable

import pytest
from harness import EXECUTORS, SIZES, Competitor, record_rate

_sleep_1ms = functools.partial(time.sleep, 0.001)


def _call(run: Callable[[], None]) -> None:
    run()


@pytest.mark.parametrize("workers", SIZES.io_workers)
@pytest.mark.parametrize("comp", EXECUTORS, ids=str)
def test_io(benchmark: Any, comp: Competitor, workers: int) -> None:
    """io_per_worker sleeping tasks per worker, fire and forget, until all have run."""
    benchmark.group = f"io: time.sleep(0.001), {workers} workers"
    n = SIZES.io_per_worker * workers
    keys = [i % 10_000 for i in range(n)]

    def setup() -> tuple[tuple[Callable[[], None]], dict[str, Any]]:
        gc.collect()
        return (comp.execute_round(workers, keys, _sleep_1ms),), {}

    benchmark.pedantic(_call, setup=setup, rounds=comp.rounds())
    base = f"io-w{SIZES.io_workers[0]}"
    record_rate(benchmark, f"io-w{workers}", comp.name, n, baseline=(base, comp.name))
