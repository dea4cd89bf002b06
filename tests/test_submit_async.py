"""KeyedExecutor.submit_async: completions reach the loop in batches (keyedexec._loopbridge).

Each fast path is checked against its slow twin: completion before or after the
await starts, one wake-up for a burst against one per completion, cancellation
queued, running or done, tasks the scheduler drops without running them
(their futures cancelled or failed unrun), a loop closed with completions in flight, and
many loops in many threads sharing one executor. On both implementations.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import threading
import weakref
from typing import Any

import pytest
from conftest import wait_until

from keyedexec import _loopbridge
from keyedexec.errors import BrokenThreadPool

pytestmark = pytest.mark.timeout(60)

T = 10.0


def test_result_ready_before_or_after_the_await_starts(h: Any) -> None:
    """A task that finished before anyone awaits, and one that finishes later: same results."""
    ex = h.executor(2)

    async def main() -> tuple[int, int]:
        early = ex.submit_async("a", lambda: 1)
        assert ex.wait_key("a", T)  # finished; its outcome waits in the inbox
        gate, _ = h.block(ex, "b")
        late = ex.submit_async("b", lambda: 2)
        waiter = asyncio.ensure_future(late)
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.wait_for(early, T), await asyncio.wait_for(waiter, T)

    assert asyncio.run(main()) == (1, 2)


def test_a_burst_of_completions_wakes_the_loop_once(h: Any, monkeypatch: pytest.MonkeyPatch
                                                    ) -> None:
    """Everything that finished while the loop was busy is settled by one wake-up, in order."""
    ex = h.executor(1)
    drains: list[int] = []
    drain = _loopbridge._Inbox._drain

    def counting(self: Any, batch: Any) -> None:
        drains.append(len(batch))
        drain(self, batch)

    monkeypatch.setattr(_loopbridge._Inbox, "_drain", counting)

    async def main() -> list[int]:
        futs = [ex.submit_async("k", int, i) for i in range(50)]
        assert ex.wait_key("k", T)  # the loop is blocked here while all 50 finish
        return list(await asyncio.wait_for(asyncio.gather(*futs), T))

    assert asyncio.run(main()) == list(range(50))
    assert drains == [50]


def test_completions_one_at_a_time_each_wake_the_loop(h: Any, monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    """The slow twin: a completion that finds no wake-up pending schedules one."""
    ex = h.executor(1)
    drains: list[int] = []
    drain = _loopbridge._Inbox._drain
    monkeypatch.setattr(_loopbridge._Inbox, "_drain",
                        lambda self, batch: (drains.append(len(batch)), drain(self, batch)))

    async def main() -> None:
        for i in range(3):
            assert await asyncio.wait_for(ex.submit_async("k", int, i), T) == i

    asyncio.run(main())
    assert drains == [1, 1, 1]


def test_cancel_while_running_or_after_done(h: Any) -> None:
    """Cancelled while running: the task still runs once, its outcome is dropped. Done: no-op."""
    ex = h.executor(2)
    ran: list[str] = []

    async def main() -> None:
        started, gate = threading.Event(), h.gate()

        def slow() -> str:
            started.set()
            gate.wait(T)
            ran.append("slow")
            return "slow"

        running = ex.submit_async("k", slow)
        assert await asyncio.to_thread(started.wait, T)
        assert running.cancel()
        gate.set()
        done = ex.submit_async("k", ran.append, "done")
        await asyncio.wait_for(done, T)
        assert not done.cancel() and done.result() is None
        assert running.cancelled()

    asyncio.run(main())
    assert ran == ["slow", "done"]
    m = ex.metrics()
    assert (m.completed, m.cancelled) == (2, 0)


@pytest.mark.parametrize("how", ["cancel_key", "shutdown"])
def test_tasks_dropped_by_the_scheduler_cancel_their_awaitables(h: Any, how: str) -> None:
    """cancel_key and shutdown(cancel_futures=True) drop queued tasks: the awaiter sees it."""
    ex = h.executor(1)
    ran: list[int] = []

    async def main() -> None:
        gate, _ = h.block(ex, "k")
        futs = [ex.submit_async("k", ran.append, i) for i in range(3)]
        if how == "cancel_key":
            assert ex.cancel_key("k") == 3
        else:
            ex.shutdown(wait=False, cancel_futures=True)
        gate.set()
        for f in futs:
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(f, T)

    asyncio.run(main())
    assert ran == []
    assert ex.metrics().cancelled == 3


def test_tasks_dropped_by_a_broken_pool_fail_their_awaitables(h: Any) -> None:
    """An initializer that raises breaks the pool: queued tasks fail with BrokenThreadPool."""
    go = threading.Event()

    def initializer() -> None:
        go.wait(T)
        raise OSError("no database")

    ex = h.executor(1, initializer=initializer)

    async def main() -> None:
        fut = ex.submit_async("k", int, 1)
        go.set()
        with pytest.raises(BrokenThreadPool):
            await asyncio.wait_for(fut, T)

    asyncio.run(main())


def test_exceptions_reach_the_awaiter_stopiteration_too(h: Any) -> None:
    """The task's exception is raised by the await; StopIteration (which an asyncio
    future refuses) arrives as RuntimeError instead of leaving the awaiter hanging."""
    ex = h.executor(1)

    def stop() -> None:
        raise StopIteration

    async def main() -> None:
        with pytest.raises(KeyError):
            await asyncio.wait_for(ex.submit_async("k", {}.__getitem__, "x"), T)
        with pytest.raises(RuntimeError, match="StopIteration"):
            await asyncio.wait_for(ex.submit_async("k", stop), T)

    asyncio.run(main())
    # The outcome is posted before the worker's own accounting: wait for it.
    assert wait_until(lambda: ex.metrics().failed == 2)


def test_concurrent_futures_errors_arrive_as_asyncio_errors_as_with_wrap_future(h: Any) -> None:
    """A task that raises concurrent.futures' CancelledError, TimeoutError or
    InvalidStateError (it waited on another future): the await raises what
    ``asyncio.wrap_future`` and ``run_in_executor`` raise, asyncio's own classes.
    (submit_async raised the concurrent.futures classes: a CancelledError that
    ``except Exception`` catches, unlike the one asyncio code expects.)"""
    ex = h.executor(1)

    def fail(exc: BaseException) -> None:
        raise exc

    async def main() -> None:
        for exc in (cf.CancelledError("c"), cf.TimeoutError("t"), cf.InvalidStateError("i")):
            outcomes = []
            for awaitable in (asyncio.wrap_future(ex.submit("k", fail, exc)),
                              ex.submit_async("k", fail, exc)):
                try:
                    await asyncio.wait_for(awaitable, T)
                except BaseException as error:  # noqa: BLE001 - the class is the point
                    outcomes.append((type(error), error.args))
            assert outcomes[1] == outcomes[0]
            assert not issubclass(outcomes[0][0], cf.CancelledError)

    asyncio.run(main())


def test_loop_closed_with_completions_in_flight(h: Any) -> None:
    """The loop ends while tasks run: their completions are dropped quietly, the
    worker raises nothing, and nothing keeps the closed loop alive."""
    errors: list[tuple[Any, BaseException]] = []
    ex = h.executor(2, on_error=lambda key, exc: errors.append((key, exc)))
    gate, _ = h.block(ex, "k")
    loop = asyncio.new_event_loop()

    async def submit() -> list[asyncio.Future[int]]:
        return [ex.submit_async("k", int, i) for i in range(5)]

    futs = loop.run_until_complete(submit())
    loop.close()
    ref = weakref.ref(loop)
    del loop, futs
    gate.set()
    assert ex.wait_key("k", T)
    gc.collect()
    assert ref() is None
    assert errors == []
    assert ex.metrics().completed == 7  # the blocker, 5 tasks, wait_key's barrier


def test_many_loops_in_many_threads_share_one_executor(h: Any) -> None:
    """Each thread's loop gets its own results, whatever the other loops do."""
    ex = h.executor(4)
    results: dict[int, list[int]] = {}

    def thread(t: int) -> None:
        async def main() -> list[int]:
            futs = [ex.submit_async(i % 7, int, t * 1000 + i) for i in range(200)]
            return list(await asyncio.wait_for(asyncio.gather(*futs), T))

        for _ in range(3):  # a new loop each time in the same thread
            results[t] = asyncio.run(main())

    threads = [threading.Thread(target=thread, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(T * 3)
    assert results == {t: [t * 1000 + i for i in range(200)] for t in range(4)}


def test_bad_arguments_queue_nothing(h: Any) -> None:
    """Unhashable or failing keys and non-callables raise at once; nothing is queued."""
    ex = h.executor(1)

    class BadHash:
        def __hash__(self) -> int:
            raise ValueError("no hash")

    async def main() -> None:
        with pytest.raises(TypeError, match="key must be hashable"):
            ex.submit_async(["list"], int)
        with pytest.raises(ValueError, match="no hash"):
            ex.submit_async(BadHash(), int)
        with pytest.raises(TypeError, match="fn must be callable"):
            ex.submit_async("k", 42)

    asyncio.run(main())
    assert ex.metrics().submitted == 0
