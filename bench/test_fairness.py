"""Fairness: one hot key with a long queue must not starve a cold key.

One worker, held by a blocker while hot_tasks tasks are queued on the hot
key and then one task on a cold key. The figure is how many hot tasks ran
before the cold one: keyedexec yields after ``batch`` (64) tasks of a key;
a FIFO pool runs the whole hot queue first.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import pytest
from harness import BATCH, EXECUTORS, SIZES, Competitor, record


@pytest.mark.benchmark(group="fairness: hot key queue, then one cold task, 1 worker")
@pytest.mark.parametrize("comp", EXECUTORS, ids=str)
def test_fairness(benchmark: Any, comp: Competitor) -> None:
    """Counts the hot tasks that ran before the cold task (time: the whole drain)."""
    n = SIZES.hot_tasks
    log: list[bool] = []  # True: a hot task ran; False: the cold one

    def run() -> None:
        log.clear()
        release = threading.Event()
        pool = comp.open(1)
        try:
            comp.block(pool, 1, release)
            comp.execute_all(pool, ["hot"] * n, functools.partial(log.append, True))
            comp.execute_all(pool, ["cold"], functools.partial(log.append, False))
        finally:
            release.set()
            comp.close(pool)

    benchmark.pedantic(run, rounds=1)
    assert len(log) == n + 1, "some tasks never ran"
    record("fairness", comp.name, log.index(False), "tasks", benchmark=benchmark,
           extra={"hot_tasks": n, "batch": BATCH})
