"""asyncio: keyedexec against what asyncio users write today, no-op tasks, 1,000 keys.

* ``submit-async``: ``gather`` over ``KeyedExecutor.submit_async`` (4 workers),
  against ``gather`` over ``loop.run_in_executor(ThreadPoolExecutor(4))``.
* ``aio-submit``: ``AsyncKeyedExecutor.submit`` then ``gather``, against a
  hand-written per-key ``asyncio.Lock`` under a ``Semaphore(100)`` (the keyed
  pattern users write), and against a bare ``gather`` of the same coroutines
  with no keys at all.
* ``aio-execute``: ``AsyncKeyedExecutor.execute`` (no future), then ``aclose``.

Each round runs on one event loop kept for the whole benchmark; the figure is
tasks / median round time, over rounds enough to span about a second (after an
untimed one). The goals are ratios within this run (report.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import math
import time
from typing import Any, Awaitable, Callable, Coroutine, Iterator

import pytest
from harness import LABELS, SIZES, WORKERS, keys_for, noop, record_rate

from keyedexec import KeyedExecutor, _pure
from keyedexec.aio import AsyncKeyedExecutor, _PyCore

try:
    from keyedexec import _core
except ImportError:
    _core = None  # type: ignore[assignment]

N = SIZES.base_tasks
CONCURRENCY = 100  # AsyncKeyedExecutor's default, and the hand-written pattern's semaphore
WINDOW, MAX_ROUNDS = 1.0, 60  # each competitor's timed rounds span about WINDOW seconds

LABELS.update({
    "aio-native": "AsyncKeyedExecutor native",
    "aio-pure": "AsyncKeyedExecutor pure Python",
    "aio-lock": "asyncio.Lock per key + Semaphore",
    "aio-gather": "bare asyncio.gather, no keys",
    "submit-async": "KeyedExecutor.submit_async",
    "run-in-executor": "run_in_executor(ThreadPoolExecutor)",
})

Round = Callable[[], Coroutine[Any, Any, None]]


async def job() -> None:
    pass


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


def _bench(benchmark: Any, loop: asyncio.AbstractEventLoop, make_round: Callable[[], Round],
           scenario: str, competitor: str, baseline: tuple[str, str] | None) -> None:
    def setup() -> tuple[tuple[Round], dict[str, Any]]:
        gc.collect()  # the previous round's garbage is not this round's cost
        return (make_round(),), {}

    # Rounds enough to span WINDOW seconds: a fast competitor's few short rounds
    # would otherwise all fall in one burst of the machine's other load, or in
    # one lull, while its baseline's long rounds average over both.
    gc.collect()
    start = time.perf_counter()
    loop.run_until_complete(make_round()())  # also the warm-up round
    rounds = min(MAX_ROUNDS, max(SIZES.rounds, math.ceil(WINDOW / (time.perf_counter() - start))))
    benchmark.pedantic(lambda r: loop.run_until_complete(r()), setup=setup, rounds=rounds)
    record_rate(benchmark, scenario, competitor, N, baseline=baseline)


def _cores() -> list[Any]:
    cores = [pytest.param(_PyCore, id="aio-pure")]
    if _core is not None:
        cores.insert(0, pytest.param(_core.AsyncCore, id="aio-native"))
    return cores


def _executor_class(core: Any) -> type[AsyncKeyedExecutor[Any]]:
    return type("BenchAsyncKeyedExecutor", (AsyncKeyedExecutor,), {"_Core": core})


# -- AsyncKeyedExecutor against the hand-written patterns ----------------------------------


@pytest.mark.benchmark(group="asyncio: submit + gather, 1,000 keys")
@pytest.mark.parametrize("core", _cores())
def test_aio_submit(benchmark: Any, loop: asyncio.AbstractEventLoop, core: Any) -> None:
    """AsyncKeyedExecutor.submit for each task, then gather over the futures."""
    keys = keys_for("uniform", N)
    cls = _executor_class(core)

    def make_round() -> Round:
        async def run() -> None:
            async with cls(concurrency=CONCURRENCY) as ex:
                submit = ex.submit
                await asyncio.gather(*[submit(k, job) for k in keys])
        return run

    name = "aio-native" if core is not _PyCore else "aio-pure"
    _bench(benchmark, loop, make_round, "aio-submit", name, ("aio-submit", "aio-lock"))


@pytest.mark.benchmark(group="asyncio: submit + gather, 1,000 keys")
def test_aio_lock_pattern(benchmark: Any, loop: asyncio.AbstractEventLoop) -> None:
    """The keyed pattern written by hand: a Lock per key (created on demand,
    dropped when idle) under a Semaphore(100), a task per job via gather."""
    keys = keys_for("uniform", N)

    def make_round() -> Round:
        async def run() -> None:
            sem = asyncio.Semaphore(CONCURRENCY)
            locks: dict[Any, list[Any]] = {}  # key -> [lock, users]

            async def guarded(key: Any, fn: Callable[[], Awaitable[None]]) -> None:
                entry = locks.get(key)
                if entry is None:
                    entry = locks[key] = [asyncio.Lock(), 0]
                entry[1] += 1
                try:
                    async with entry[0]:
                        async with sem:
                            await fn()
                finally:
                    entry[1] -= 1
                    if not entry[1]:
                        del locks[key]

            await asyncio.gather(*[guarded(k, job) for k in keys])
        return run

    _bench(benchmark, loop, make_round, "aio-submit", "aio-lock", None)


@pytest.mark.benchmark(group="asyncio: submit + gather, 1,000 keys")
def test_aio_bare_gather(benchmark: Any, loop: asyncio.AbstractEventLoop) -> None:
    """The same coroutines with no keys and no bound: asyncio.gather makes a task each."""

    def make_round() -> Round:
        async def run() -> None:
            await asyncio.gather(*[job() for _ in range(N)])
        return run

    _bench(benchmark, loop, make_round, "aio-submit", "aio-gather", ("aio-submit", "aio-lock"))


@pytest.mark.benchmark(group="asyncio: execute (no future), 1,000 keys")
@pytest.mark.parametrize("core", _cores())
def test_aio_execute(benchmark: Any, loop: asyncio.AbstractEventLoop, core: Any) -> None:
    """AsyncKeyedExecutor.execute for each task, then aclose() waits for all."""
    keys = keys_for("uniform", N)
    cls = _executor_class(core)

    def make_round() -> Round:
        async def run() -> None:
            ex = cls(concurrency=CONCURRENCY)
            execute = ex.execute
            for k in keys:
                execute(k, job)
            await ex.aclose()
        return run

    name = "aio-native" if core is not _PyCore else "aio-pure"
    _bench(benchmark, loop, make_round, "aio-execute", name, ("aio-submit", "aio-lock"))


# -- blocking calls awaited from asyncio ----------------------------------------------------


def _warm(submit: Callable[..., concurrent.futures.Future[Any]], *key: Any) -> None:
    # Start every worker thread before the first timed round.
    for f in [submit(*key, noop) for _ in range(WORKERS * 4)]:
        f.result()


@pytest.mark.benchmark(group="asyncio: await a blocking call each, 1,000 keys")
@pytest.mark.parametrize("scheduler", [
    pytest.param(None if _core is None else _core.Scheduler, id="submit-async",
                 marks=pytest.mark.skipif(_core is None, reason="no native core")),
    pytest.param(_pure.Scheduler, id="submit-async-pure"),
])
def test_submit_async(benchmark: Any, loop: asyncio.AbstractEventLoop, scheduler: Any) -> None:
    """gather over KeyedExecutor.submit_async: one loop wake-up per batch of completions."""
    keys = keys_for("uniform", N)
    cls = type("BenchKeyedExecutor", (KeyedExecutor,), {"_Scheduler": scheduler})
    ex = cls(WORKERS)
    for k in range(WORKERS * 4):
        _warm(ex.submit, k)

    def make_round() -> Round:
        async def run() -> None:
            submit_async = ex.submit_async
            await asyncio.gather(*[submit_async(k, noop) for k in keys])
        return run

    try:
        name = "submit-async" if scheduler is not _pure.Scheduler else "submit-async-pure"
        _bench(benchmark, loop, make_round, "submit-async", name,
               ("submit-async", "run-in-executor"))
    finally:
        ex.shutdown()


@pytest.mark.benchmark(group="asyncio: await a blocking call each, 1,000 keys")
def test_run_in_executor(benchmark: Any, loop: asyncio.AbstractEventLoop) -> None:
    """gather over loop.run_in_executor(ThreadPoolExecutor(4), fn): no keys at all."""
    tpe = concurrent.futures.ThreadPoolExecutor(WORKERS)
    _warm(tpe.submit)

    def make_round() -> Round:
        async def run() -> None:
            running = asyncio.get_running_loop()
            await asyncio.gather(*[running.run_in_executor(tpe, noop) for _ in range(N)])
        return run

    try:
        _bench(benchmark, loop, make_round, "submit-async", "run-in-executor", None)
    finally:
        tpe.shutdown()
