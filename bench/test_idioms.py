"""The ways services wait for futures: ``wait``, ``as_completed``, callbacks, asyncio.

Each round opens a pool (workers started), submits no-op tasks over 1,000 keys
and waits for all of them through one idiom, then closes the pool; the figure
is tasks / median round time. Every competitor runs the same idiom on its own
futures; for ``asyncio.wrap_future`` ThreadPoolExecutor is driven the way
asyncio code does it, through ``loop.run_in_executor``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import threading
from typing import Any, Callable

import pytest
from harness import (
    NATIVE_C,
    PURE,
    SIZES,
    TIMEOUT,
    TPE,
    WORKERS,
    Competitor,
    keys_for,
    noop,
    record_rate,
)

COMPETITORS = [c for c in (NATIVE_C, PURE, TPE) if c is not None]


def _wait_all(fs: list[Any]) -> None:
    done, not_done = concurrent.futures.wait(fs, timeout=TIMEOUT)
    if not_done:
        raise RuntimeError("wait() timed out")


def _as_completed(fs: list[Any]) -> None:
    n = 0
    for _f in concurrent.futures.as_completed(fs, timeout=TIMEOUT):
        n += 1
    assert n == len(fs)


def _round_sync(comp: Competitor, keys: list[Any], idiom: str) -> Callable[[], None]:
    pool = comp.open(WORKERS)

    def run() -> None:
        try:
            if idiom == "callback":
                # Count completions in a callback; done once the count is reached.
                lock, finished = threading.Lock(), threading.Event()
                left = [len(keys)]

                def count(_f: Any) -> None:
                    with lock:
                        left[0] -= 1
                        if not left[0]:
                            finished.set()

                for f in comp.submit_all(pool, keys, noop):
                    f.add_done_callback(count)
                if not finished.wait(TIMEOUT):
                    raise RuntimeError("the callbacks did not all run")
            elif idiom == "wait":
                _wait_all(comp.submit_all(pool, keys, noop))
            else:
                _as_completed(comp.submit_all(pool, keys, noop))
        finally:
            comp.close(pool)

    return run


def _round_asyncio(comp: Competitor, keys: list[Any]) -> Callable[[], None]:
    pool = comp.open(WORKERS)
    loop = asyncio.new_event_loop()

    async def keyed() -> None:
        wrap, submit = asyncio.wrap_future, pool.submit
        await asyncio.gather(*[wrap(submit(k, noop)) for k in keys])

    async def tpe() -> None:
        run_in_executor = asyncio.get_running_loop().run_in_executor
        await asyncio.gather(*[run_in_executor(pool, noop) for _k in keys])

    def run() -> None:
        try:
            loop.run_until_complete(tpe() if comp is TPE else keyed())
        finally:
            comp.close(pool)
            loop.close()

    return run


def _tasks(comp: Competitor, idiom: str) -> int:
    if comp.tpe_based or idiom == "wrap-future" or comp is PURE:
        return SIZES.base_tasks  # tens of thousands of tasks/s at best
    return SIZES.tasks // 4


def _measure(benchmark: Any, comp: Competitor, idiom: str) -> None:
    n = _tasks(comp, idiom)
    keys = keys_for("uniform", n)

    def setup() -> tuple[tuple[Callable[[], None]], dict[str, Any]]:
        gc.collect()  # the previous round's garbage is not this round's cost
        prepare = _round_asyncio(comp, keys) if idiom == "wrap-future" else _round_sync(comp, keys, idiom)
        return (prepare,), {}

    rounds = 3 if comp.tpe_based or comp is PURE else SIZES.rounds
    benchmark.pedantic(lambda run: run(), setup=setup, rounds=rounds)
    record_rate(benchmark, idiom, comp.name, n, baseline=(idiom, "tpe"))


@pytest.mark.benchmark(group="submit + concurrent.futures.wait(fs), 1,000 keys")
@pytest.mark.parametrize("comp", COMPETITORS, ids=str)
def test_wait(benchmark: Any, comp: Competitor) -> None:
    """submit every task, then one wait(fs) over all the futures."""
    _measure(benchmark, comp, "wait")


@pytest.mark.benchmark(group="submit + as_completed(fs), 1,000 keys")
@pytest.mark.parametrize("comp", COMPETITORS, ids=str)
def test_as_completed(benchmark: Any, comp: Competitor) -> None:
    """submit every task, then iterate as_completed(fs) to the end."""
    _measure(benchmark, comp, "as-completed")


@pytest.mark.benchmark(group="submit + add_done_callback on each, 1,000 keys")
@pytest.mark.parametrize("comp", COMPETITORS, ids=str)
def test_add_done_callback(benchmark: Any, comp: Competitor) -> None:
    """submit every task with a callback that counts; wait until all counted."""
    _measure(benchmark, comp, "callback")


@pytest.mark.benchmark(group="await asyncio.wrap_future(submit(...)), 1,000 keys")
@pytest.mark.parametrize("comp", COMPETITORS, ids=str)
def test_wrap_future(benchmark: Any, comp: Competitor) -> None:
    """gather of wrap_future(submit) on an event loop; ThreadPoolExecutor
    through loop.run_in_executor, as asyncio code calls it."""
    _measure(benchmark, comp, "wrap-future")
