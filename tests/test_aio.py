"""Behaviour of keyedexec.aio.AsyncKeyedExecutor (issue 8).

Every test drives its own event loop through the ``run`` fixture: plain
asyncio, and uvloop when it is installed. Jobs that must stay queued sit behind
a job held on an ``asyncio.Event``, so no assertion depends on timing; every
wait is bounded (``within``) so that a scheduling bug fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextvars
import gc
import logging
import sys
import threading
import weakref
from typing import Any, Awaitable, Callable, Coroutine

import pytest

from keyedexec import Metrics, Stats
from keyedexec._impl import _flag
from keyedexec.aio import AsyncKeyedExecutor, _PyCore

try:
    from keyedexec._core import AsyncCore
except ImportError:  # pragma: no cover - exercised only without a build
    AsyncCore = None

pytestmark = pytest.mark.timeout(30)

T = 10.0  # seconds any single wait may take before the test fails

Runner = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=["native", "pure"], autouse=True)
def core(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Every test runs on both hot-path implementations (keyedexec._core.AsyncCore, _PyCore)."""
    if request.param == "native":
        if AsyncCore is None:
            if _flag("KEYEDEXEC_REQUIRE_NATIVE"):
                pytest.fail("keyedexec._core is missing and KEYEDEXEC_REQUIRE_NATIVE=1")
            pytest.skip("keyedexec._core is not built")
        chosen: Any = AsyncCore
    else:
        chosen = _PyCore
    monkeypatch.setattr(AsyncKeyedExecutor, "_Core", chosen)
    return chosen


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Runs a coroutine to completion on a fresh loop of the parametrized kind."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.run  # type: ignore[no-any-return]
    return asyncio.run


@pytest.fixture(params=["asyncio", "uvloop"])
def new_loop(request: pytest.FixtureRequest) -> Callable[[], asyncio.AbstractEventLoop]:
    """Makes event loops of the parametrized kind, for tests that drive a loop by hand."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.new_event_loop  # type: ignore[no-any-return]
    return asyncio.new_event_loop


async def within(aw: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(aw, T)


async def block(ex: AsyncKeyedExecutor[Any], key: Any) -> tuple[asyncio.Event, asyncio.Future[str]]:
    """Occupy ``key`` with a running job until the returned gate is set."""
    started, gate = asyncio.Event(), asyncio.Event()

    async def blocker() -> str:
        started.set()
        await gate.wait()
        return "blocker"

    fut = ex.submit(key, blocker)
    await within(started.wait())
    return gate, fut


def check_counters(m: Metrics) -> None:
    """Every accepted job is queued, running, finished or cancelled: exactly one of them."""
    assert m.submitted == m.pending + m.running + m.completed + m.cancelled, m


# -- ordering and concurrency ------------------------------------------------------


def test_jobs_of_one_key_run_in_submission_order_one_at_a_time(run: Runner) -> None:
    """Per-key FIFO and exclusion, while other keys interleave."""
    log: dict[str, list[int]] = {k: [] for k in "abcd"}
    active: dict[str, int] = {k: 0 for k in "abcd"}

    async def job(key: str, i: int) -> int:
        active[key] += 1
        assert active[key] == 1, "two jobs of one key overlap"
        for _ in range(i % 3):  # uneven lengths shuffle the keys against each other
            await asyncio.sleep(0)
        log[key].append(i)
        active[key] -= 1
        return i

    async def main() -> None:
        async with AsyncKeyedExecutor[Any](concurrency=3) as ex:
            futs = [ex.submit(k, job, k, i) for i in range(50) for k in "abcd"]
            assert await within(asyncio.gather(*futs)) == [i for i in range(50) for _ in "abcd"]

    run(main())
    assert all(v == list(range(50)) for v in log.values())


def test_different_keys_run_concurrently(run: Runner) -> None:
    """Each job waits for the other key's job to start: only parallel keys finish."""

    async def main() -> None:
        a, b = asyncio.Event(), asyncio.Event()

        async def meet(mine: asyncio.Event, other: asyncio.Event) -> str:
            mine.set()
            await other.wait()
            return "met"

        async with AsyncKeyedExecutor[Any](concurrency=2) as ex:
            fa, fb = ex.submit("a", meet, a, b), ex.submit("b", meet, b, a)
            assert await within(asyncio.gather(fa, fb)) == ["met", "met"]

    run(main())


def test_never_more_than_concurrency_jobs_at_once(run: Runner) -> None:
    """``concurrency`` bounds running jobs; the rest wait queued and run later."""

    async def main() -> None:
        gate = asyncio.Event()
        now = peak = 0

        async def job() -> None:
            nonlocal now, peak
            now += 1
            peak = max(peak, now)
            await gate.wait()
            now -= 1

        async with AsyncKeyedExecutor[Any](concurrency=3) as ex:
            futs = [ex.submit(k, job) for k in range(10)]
            while ex.metrics().running < 3:
                await asyncio.sleep(0)
            for _ in range(20):  # give extra jobs every chance to start
                await asyncio.sleep(0)
            m = ex.metrics()
            assert (m.running, m.pending, m.workers, m.active_keys) == (3, 7, 3, 10)
            assert ex.stats() == Stats(3, 10)
            gate.set()
            await within(asyncio.gather(*futs))
        assert peak == 3

    run(main())


def test_hot_key_yields_to_other_keys_after_batch_jobs(run: Runner) -> None:
    """With one runner, a key runs ``batch`` jobs, then goes behind the waiting keys."""
    order: list[str] = []

    async def job(tag: str) -> None:
        order.append(tag)

    async def main() -> None:
        async with AsyncKeyedExecutor[Any](concurrency=1, batch=2) as ex:
            for i in range(6):
                ex.execute("a", job, f"a{i}")
            for i in range(2):
                ex.execute("b", job, f"b{i}")

    run(main())
    assert order == ["a0", "a1", "b0", "b1", "a2", "a3", "a4", "a5"]


def test_job_submitting_to_its_own_key_runs_after_it(run: Runner) -> None:
    """A job may queue more work on its own key without deadlocking."""
    order: list[str] = []

    async def main() -> None:
        async with AsyncKeyedExecutor[Any](concurrency=2) as ex:

            async def second() -> None:
                order.append("second")

            async def first() -> asyncio.Future[None]:
                fut = ex.submit("k", second)
                order.append("first")
                return fut

            inner = await within(ex.submit("k", first))
            await within(inner)

    run(main())
    assert order == ["first", "second"]


def test_order_holds_while_a_keys_queue_wraps_around_and_grows(run: Runner) -> None:
    """Jobs that each queue two more on their own key, while earlier ones drain:
    the key's queue wraps around and grows mid-wrap, and keeps FIFO order."""
    ran: list[int] = []

    async def main() -> None:
        async with AsyncKeyedExecutor[Any](concurrency=1, batch=3) as ex:
            submitted = 0

            def submit() -> None:
                nonlocal submitted
                ex.execute("k", job, submitted)
                submitted += 1

            async def job(i: int) -> None:
                ran.append(i)
                if submitted < 300:
                    submit()
                    submit()
                if i % 5 == 0:
                    await asyncio.sleep(0)

            async def all_ran() -> None:
                while len(ran) < submitted or submitted < 300:
                    await asyncio.sleep(0)

            ex.execute("other", asyncio.sleep, 0)  # another key takes turns (batch)
            for _ in range(3):
                submit()
            await within(all_ran())

    run(main())
    assert ran == list(range(len(ran))) and len(ran) >= 300


def test_queued_jobs_keep_their_contexts_across_cycle_collections(run: Runner) -> None:
    """Contexts wait in the queue out of the collector's sight: collections while
    jobs are queued (values in reference cycles) leave every job its context."""
    var: contextvars.ContextVar[Any] = contextvars.ContextVar("var")

    class Node:
        def __init__(self, i: int) -> None:
            self.i, self.me = i, self

    async def job(i: int) -> bool:
        if i % 50 == 0:
            gc.collect()
        if i % 3 == 0:
            await asyncio.sleep(0)
        return bool(var.get().i == i)

    async def main() -> None:
        async with AsyncKeyedExecutor[Any](concurrency=4) as ex:
            futs = []
            for i in range(600):
                var.set(Node(i))
                futs.append(ex.submit(i % 7, job, i))
                if i % 100 == 0:
                    gc.collect()
            assert all(await within(asyncio.gather(*futs)))

    run(main())


# -- results and exceptions --------------------------------------------------------


def test_future_carries_result_or_exception_and_the_key_goes_on(run: Runner) -> None:
    """An exception lands in its own future; the key's next job still runs."""

    async def boom() -> None:
        raise ValueError("boom")

    async def add(a: int, b: int = 0) -> int:
        return a + b

    async def main() -> None:
        async with AsyncKeyedExecutor[Any](concurrency=2) as ex:
            bad, good = ex.submit("k", boom), ex.submit("k", add, 1, b=2)
            with pytest.raises(ValueError, match="boom"):
                await within(bad)
            assert await within(good) == 3
            m = ex.metrics()
        assert (m.completed, m.failed) == (2, 1)

    run(main())


def test_coro_fn_that_raises_or_returns_no_awaitable_fails_its_future(run: Runner) -> None:
    """The call itself is part of the job: its failures go to the future, in order."""

    def raises() -> Awaitable[None]:
        raise KeyError("sync")

    def not_awaitable() -> Awaitable[int]:
        return 42  # type: ignore[return-value]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        done.set_result("plain future")
        async with AsyncKeyedExecutor[Any]() as ex:
            f1, f2 = ex.submit("k", raises), ex.submit("k", not_awaitable)
            f3 = ex.submit("k", lambda: done)  # any awaitable is accepted
            with pytest.raises(KeyError):
                await within(f1)
            with pytest.raises(TypeError):
                await within(f2)
            assert await within(f3) == "plain future"
            assert ex.metrics().failed == 2

    run(main())


def test_coro_fn_raising_cancelled_error_when_called_cancels_that_job_only(run: Runner) -> None:
    """CancelledError raised by the call itself cancels that job, as it would cancel a task."""
    ran: list[str] = []

    def cancels() -> Awaitable[None]:
        raise asyncio.CancelledError

    async def job(tag: str) -> None:
        await asyncio.sleep(0)
        ran.append(tag)

    async def main() -> None:
        ex: AsyncKeyedExecutor[str] = AsyncKeyedExecutor(concurrency=1)
        gate, _ = await block(ex, "k")
        doomed = ex.submit("k", cancels)
        ex.execute("k", cancels)
        later = ex.submit("k", job, "later")
        ex.execute("other", job, "other")
        gate.set()
        await within(ex.shutdown())
        assert doomed.cancelled() and later.done()
        m = ex.metrics()
        assert (m.cancelled, m.completed, m.failed, m.workers, m.active_keys) == (2, 3, 0, 0, 0)
        check_counters(m)

    run(main())
    assert ran == ["later", "other"]


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_coro_fn_raising_keyboardinterrupt_or_systemexit_when_called(
    new_loop: Callable[[], asyncio.AbstractEventLoop], exc_type: type[BaseException]
) -> None:
    """As from a job's task: the future carries it and it stops the loop; the key goes on."""
    ran: list[str] = []

    def raises() -> Awaitable[None]:
        raise exc_type("stop")

    async def job(tag: str) -> None:
        ran.append(tag)

    ex: AsyncKeyedExecutor[str] = AsyncKeyedExecutor()
    futs: list[asyncio.Future[None]] = []

    async def start() -> None:
        futs.extend([ex.submit("k", raises), ex.submit("k", job, "later")])
        await asyncio.sleep(T)  # the loop stops long before this ends

    loop = new_loop()
    try:
        task = loop.create_task(start())
        with pytest.raises(exc_type, match="stop"):
            loop.run_until_complete(task)
        task.cancel()
        loop.run_until_complete(within(ex.shutdown()))  # the loop runs again: the key goes on
        bad, later = futs
        assert isinstance(bad.exception(), exc_type) and later.result() is None
        assert ran == ["later"]
        m = ex.metrics()
        assert (m.completed, m.failed, m.workers, m.active_keys) == (2, 1, 0, 0)
        check_counters(m)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def test_jobs_that_return_the_same_future_each_complete(run: Runner) -> None:
    """Two running jobs may await one shared future: each gets its own task and result."""

    async def main() -> None:
        shared: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        ex: AsyncKeyedExecutor[str] = AsyncKeyedExecutor(concurrency=2)
        a, b = ex.submit("a", lambda: shared), ex.submit("b", lambda: shared)
        while ex.metrics().running < 2:
            await within(asyncio.sleep(0))
        shared.set_result("once")
        assert await within(asyncio.gather(a, b)) == ["once", "once"]
        await within(ex.aclose())

    run(main())


def test_execute_hands_exceptions_to_on_error(run: Runner) -> None:
    """Fire-and-forget: on_error(key, exc) gets the exception, with its key."""
    seen: list[tuple[Any, BaseException]] = []

    async def boom(n: int) -> None:
        raise RuntimeError(n)

    async def main() -> None:
        async with AsyncKeyedExecutor[Any](on_error=lambda k, e: seen.append((k, e))) as ex:
            ex.execute("x", boom, 1)
            ex.execute(("t", 2), boom, 2)

    run(main())
    assert sorted((k if isinstance(k, str) else "t", e.args[0]) for k, e in seen) == [
        ("t", 2),
        ("x", 1),
    ]


def test_default_on_error_logs_key_and_traceback(
    run: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    """Without on_error, a fire-and-forget failure is logged on "keyedexec"."""

    async def boom() -> None:
        raise ValueError("lost")

    async def main() -> None:
        async with AsyncKeyedExecutor[Any]() as ex:
            ex.execute("user-7", boom)

    with caplog.at_level(logging.ERROR, logger="keyedexec"):
        run(main())
    [record] = caplog.records
    assert "'user-7'" in record.getMessage()
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)


def test_on_error_that_raises_is_logged_and_work_goes_on(
    run: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    """A broken on_error is reported; the key's next job still runs."""

    def handler(key: Any, exc: BaseException) -> None:
        raise OSError("handler broke")

    async def boom() -> None:
        raise ValueError

    async def ok() -> str:
        return "ok"

    async def main() -> None:
        async with AsyncKeyedExecutor[Any](on_error=handler) as ex:
            ex.execute("k", boom)
            assert await within(ex.submit("k", ok)) == "ok"

    with caplog.at_level(logging.ERROR, logger="keyedexec"):
        run(main())
    assert any("on_error handler" in r.getMessage() for r in caplog.records)


def test_jobs_run_in_a_copy_of_the_submitters_context(run: Runner) -> None:
    """Like create_task: a job sees the submitter's contextvars; its changes stay its own."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    async def job() -> str:
        seen = var.get()
        var.set("changed by job")
        return seen

    async def main() -> None:
        async with AsyncKeyedExecutor[Any]() as ex:
            var.set("first")
            f1 = ex.submit("k", job)
            var.set("second")
            f2 = ex.submit("k", job)
            assert await within(asyncio.gather(f1, f2)) == ["first", "second"]
            assert var.get() == "second"

    run(main())


# -- cancellation ------------------------------------------------------------------


def test_cancelling_a_queued_future_skips_its_job(run: Runner) -> None:
    """A job whose future was cancelled before its turn never runs."""
    ran: list[int] = []

    async def job(i: int) -> None:
        ran.append(i)

    async def main() -> None:
        async with AsyncKeyedExecutor[Any]() as ex:
            gate, _ = await block(ex, "k")
            futs = [ex.submit("k", job, i) for i in range(3)]
            assert futs[1].cancel()
            gate.set()
            await within(asyncio.gather(futs[0], futs[2]))
            m = ex.metrics()
        assert (m.completed, m.cancelled) == (3, 1)
        check_counters(m)

    run(main())
    assert ran == [0, 2]


def test_cancelling_a_running_job_cancels_its_task(run: Runner) -> None:
    """Cancelling the future of a running job throws CancelledError into it; the key goes on."""
    seen: list[str] = []

    async def main() -> None:
        started = asyncio.Event()

        async def long() -> None:
            started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

        async def after() -> str:
            return "next"

        async with AsyncKeyedExecutor[Any]() as ex:
            fut, nxt = ex.submit("k", long), ex.submit("k", after)
            await within(started.wait())
            fut.cancel()
            assert await within(nxt) == "next"
            assert fut.cancelled()
            m = ex.metrics()
        assert (m.completed, m.cancelled) == (1, 1)

    run(main())
    assert seen == ["cancelled"]


def test_cancelling_the_awaiting_task_cancels_the_job_unless_shielded(run: Runner) -> None:
    """As with any future: a cancelled awaiter cancels the job; asyncio.shield keeps it."""
    ran: list[str] = []

    async def job(tag: str) -> None:
        ran.append(tag)

    async def main() -> None:
        async with AsyncKeyedExecutor[Any]() as ex:
            gate, _ = await block(ex, "k")
            plain = asyncio.ensure_future(ex.submit("k", job, "plain"))
            shielded = asyncio.ensure_future(asyncio.shield(ex.submit("k", job, "shielded")))
            await asyncio.sleep(0)
            plain.cancel()
            shielded.cancel()
            await asyncio.sleep(0)
            gate.set()

    run(main())
    assert ran == ["shielded"]


def test_cancel_key_cancels_queued_jobs_of_that_key_only(run: Runner) -> None:
    """cancel_key: the count; those futures cancelled; the running job and other keys go on."""

    async def noop(i: int) -> int:
        return i

    async def main() -> None:
        async with AsyncKeyedExecutor[Any](concurrency=4) as ex:
            gate_a, running = await block(ex, "a")
            gate_b, other_running = await block(ex, "b")
            queued = [ex.submit("a", noop, i) for i in range(4)]
            ex.execute("a", noop, 99)
            others = [ex.submit("b", noop, i) for i in range(2)]
            assert ex.pending("a") == 5
            assert ex.cancel_key("a") == 5
            assert ex.cancel_key("a") == 0
            assert ex.cancel_key("never seen") == 0
            assert all(f.cancelled() for f in queued)
            assert ex.pending("a") == 0 and ex.pending("b") == 2
            gate_a.set()
            gate_b.set()
            assert await within(running) == "blocker"
            assert await within(asyncio.gather(other_running, *others)) == ["blocker", 0, 1]
            m = ex.metrics()
        assert (m.cancelled, m.completed, m.active_keys) == (5, 4, 0)
        check_counters(m)

    run(main())


def test_cancel_key_on_a_key_waiting_for_a_runner_frees_it_at_once(run: Runner) -> None:
    """A key with nothing running is forgotten as soon as its jobs are cancelled."""

    async def noop() -> None:
        pass

    async def main() -> None:
        async with AsyncKeyedExecutor[Any](concurrency=1) as ex:
            gate, _ = await block(ex, "busy")
            futs = [ex.submit("waiting", noop) for _ in range(3)]
            assert ex.metrics().active_keys == 2
            assert ex.cancel_key("waiting") == 3
            assert ex.metrics().active_keys == 1
            assert all(f.cancelled() for f in futs)
            gate.set()

    run(main())


# -- shutdown ----------------------------------------------------------------------


def test_shutdown_wait_runs_everything_accepted(run: Runner) -> None:
    """shutdown(wait=True) returns after the queued jobs ran; later submits are refused."""
    ran: list[int] = []

    async def job(i: int) -> None:
        await asyncio.sleep(0)
        ran.append(i)

    async def main() -> None:
        ex: AsyncKeyedExecutor[int] = AsyncKeyedExecutor(concurrency=2)
        for i in range(20):
            ex.execute(i % 3, job, i)
        await within(ex.shutdown(wait=True))
        assert ex.closed
        assert sorted(ran) == list(range(20))
        m = ex.metrics()
        assert (m.workers, m.running, m.pending, m.active_keys) == (0, 0, 0, 0)
        with pytest.raises(RuntimeError, match="cannot schedule new tasks after shutdown"):
            ex.submit(0, job, 1)
        with pytest.raises(RuntimeError, match="after shutdown"):
            ex.execute(0, job, 1)
        await within(ex.shutdown())  # a second call is harmless
        await within(ex.aclose())

    run(main())


def test_shutdown_cancel_futures_cancels_queued_and_finishes_running(run: Runner) -> None:
    """cancel_futures=True: queued jobs are cancelled, the running ones complete."""

    async def noop() -> None:
        pass

    async def main() -> None:
        ex: AsyncKeyedExecutor[str] = AsyncKeyedExecutor(concurrency=1)  # nothing else starts
        gate, running = await block(ex, "a")
        queued = [ex.submit(k, noop) for k in ("a", "a", "b", "c")]
        ex.execute("d", noop)
        closing = asyncio.ensure_future(ex.shutdown(wait=True, cancel_futures=True))
        await asyncio.sleep(0)
        assert all(f.cancelled() for f in queued)
        assert not closing.done()  # still waiting for the running job
        gate.set()
        await within(closing)
        assert running.result() == "blocker"
        m = ex.metrics()
        assert (m.completed, m.cancelled, m.active_keys, m.workers) == (1, 5, 0, 0)
        check_counters(m)

    run(main())


def test_shutdown_without_wait_returns_while_jobs_finish_later(run: Runner) -> None:
    """wait=False closes at once; accepted jobs still run to the end."""

    async def main() -> None:
        ex: AsyncKeyedExecutor[str] = AsyncKeyedExecutor()
        gate, running = await block(ex, "k")
        later = ex.submit("k", asyncio.sleep, 0, "later")
        await within(ex.shutdown(wait=False))
        assert ex.closed and not later.done()
        gate.set()
        assert await within(later) == "later"
        await within(ex.aclose())
        assert running.result() == "blocker"

    run(main())


def test_shutdown_awaited_from_a_job_does_not_wait_for_itself(run: Runner) -> None:
    """A job may shut its executor down; it waits for the other runners only."""

    async def main() -> None:
        ex: AsyncKeyedExecutor[str] = AsyncKeyedExecutor(concurrency=2)
        other_done = asyncio.Event()

        async def other() -> None:
            await asyncio.sleep(0)
            other_done.set()

        async def closer() -> bool:
            ex.submit("other", other)
            await ex.shutdown(wait=True)
            return other_done.is_set()

        assert await within(ex.submit("self", closer)) is True
        await within(ex.aclose())

    run(main())


def test_jobs_that_each_await_shutdown_all_complete(run: Runner) -> None:
    """A job in shutdown waits for the other jobs, except those also in shutdown."""

    async def main() -> None:
        ex: AsyncKeyedExecutor[str] = AsyncKeyedExecutor(concurrency=3)
        gate, busy = await block(ex, "busy")
        seen: list[tuple[str, bool]] = []

        async def closer(tag: str) -> str:
            await ex.shutdown()
            seen.append((tag, busy.done()))
            return tag

        a, b = ex.submit("a", closer, "a"), ex.submit("b", closer, "b")
        closing = asyncio.ensure_future(ex.shutdown())  # from outside: waits for everything
        for _ in range(20):
            await asyncio.sleep(0)
        assert not (a.done() or b.done() or closing.done())  # all wait for the busy job
        gate.set()
        assert await within(asyncio.gather(a, b)) == ["a", "b"]
        assert sorted(seen) == [("a", True), ("b", True)]
        await within(closing)
        assert ex.metrics().workers == 0

    run(main())


def test_shutdown_awaited_in_a_task_a_job_started_does_not_wait_for_that_job(run: Runner) -> None:
    """gather, wait_for (a task on Python 3.11) or create_task inside a job: still the job."""

    async def main() -> None:
        ex: AsyncKeyedExecutor[str] = AsyncKeyedExecutor(concurrency=3)

        async def via_gather() -> str:
            await asyncio.gather(ex.shutdown())
            return "gather"

        async def via_wait_for() -> str:
            await asyncio.wait_for(ex.shutdown(), T)
            return "wait_for"

        async def via_task() -> str:
            await asyncio.create_task(ex.shutdown())
            return "task"

        futs = [ex.submit(f.__name__, f) for f in (via_gather, via_wait_for, via_task)]
        assert await within(asyncio.gather(*futs)) == ["gather", "wait_for", "task"]
        await within(ex.aclose())

    run(main())


def test_async_with_drains_even_when_the_body_raises(run: Runner) -> None:
    """Leaving ``async with`` by an exception still runs what was accepted."""
    ran: list[int] = []

    async def job(i: int) -> None:
        await asyncio.sleep(0)
        ran.append(i)

    async def main() -> None:
        with pytest.raises(ZeroDivisionError):
            async with AsyncKeyedExecutor[Any]() as ex:
                for i in range(5):
                    ex.execute("k", job, i)
                1 / 0
        assert ex.closed

    run(main())
    assert ran == list(range(5))


def test_leftover_jobs_when_the_loop_ends_without_shutdown(run: Runner) -> None:
    """No shutdown: asyncio.run cancels the running job and the queued one; nothing is warned."""
    seen: list[str] = []

    async def long() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def never() -> None:
        seen.append("never")

    async def main() -> AsyncKeyedExecutor[str]:
        ex: AsyncKeyedExecutor[str] = AsyncKeyedExecutor()
        ex.execute("k", long)
        ex.execute("k", never)
        while not ex.metrics().running:
            await asyncio.sleep(0)
        return ex

    ex = run(main())
    assert seen == ["cancelled"]
    m = ex.metrics()
    assert (m.workers, m.running, m.pending, m.cancelled, m.active_keys) == (0, 0, 0, 2, 0)


# -- threads and loops -------------------------------------------------------------


def test_submit_threadsafe_from_four_threads_keeps_each_threads_order(run: Runner) -> None:
    """Jobs from several threads: per key, each thread's jobs run in its call order."""
    seen: dict[int, list[tuple[int, int]]] = {k: [] for k in range(3)}

    async def job(key: int, thread: int, seq: int) -> int:
        await asyncio.sleep(0)
        seen[key].append((thread, seq))
        return seq

    async def main() -> None:
        async with AsyncKeyedExecutor[Any](concurrency=2) as ex:
            futures: list[list[cf.Future[int]]] = [[] for _ in range(4)]
            start = threading.Barrier(4)

            def producer(t: int) -> None:
                start.wait(T)
                for i in range(60):
                    futures[t].append(ex.submit_threadsafe(i % 3, job, i % 3, t, i))

            threads = [threading.Thread(target=producer, args=(t,)) for t in range(4)]
            for th in threads:
                th.start()
            for th in threads:
                await asyncio.to_thread(th.join, T)
            results = [await within(asyncio.wrap_future(f)) for fs in futures for f in fs]
            assert results == [i for _ in range(4) for i in range(60)]
            assert ex.metrics().completed == 240

    run(main())
    for per_key in seen.values():
        for t in range(4):
            mine = [seq for thread, seq in per_key if thread == t]
            assert mine == sorted(mine) and len(mine) == 20


def test_submit_threadsafe_futures_carry_exceptions_and_cancellation(run: Runner) -> None:
    """The concurrent future reflects the job's exception; cancelling it cancels the job."""

    async def boom() -> None:
        raise ValueError("from loop")

    async def main() -> None:
        async with AsyncKeyedExecutor[Any]() as ex:
            gate, _ = await block(ex, "k")

            def from_thread() -> tuple[cf.Future[None], cf.Future[None]]:
                return ex.submit_threadsafe("k", boom), ex.submit_threadsafe("k", boom)

            bad, doomed = await asyncio.to_thread(from_thread)
            await asyncio.sleep(0)  # let the loop queue both
            assert doomed.cancel()
            gate.set()
            with pytest.raises(ValueError, match="from loop"):
                await within(asyncio.wrap_future(bad))
            assert doomed.cancelled()
            m = ex.metrics()
        assert (m.failed, m.cancelled) == (1, 1)

    run(main())


def test_threads_blocked_on_threadsafe_futures_are_released_when_the_loop_ends(
    run: Runner,
) -> None:
    """asyncio.run ends with one job running and one queued: both waiting threads see cancelled."""
    ex: AsyncKeyedExecutor[str] = AsyncKeyedExecutor()
    submitted = threading.Barrier(3)
    outcomes: list[str] = []

    async def forever() -> None:
        await asyncio.Event().wait()

    def wait_on(key: str) -> None:
        fut = ex.submit_threadsafe(key, forever)
        submitted.wait(T)
        try:
            fut.result(timeout=T)
        except cf.CancelledError:
            outcomes.append("cancelled")
        except cf.TimeoutError:
            outcomes.append("still pending")

    threads = [threading.Thread(target=wait_on, args=(key,)) for key in ("running", "queued")]

    async def main() -> None:
        await block(ex, "queued")  # never released: the second job stays queued
        for th in threads:
            th.start()
        await asyncio.to_thread(submitted.wait, T)
        while ex.metrics().running < 2 or ex.pending("queued") < 1:
            await within(asyncio.sleep(0))

    run(main())  # returns with both jobs unfinished and no shutdown
    for th in threads:
        th.join(T + 1)
    assert outcomes == ["cancelled", "cancelled"]
    m = ex.metrics()
    assert (m.running, m.pending, m.cancelled) == (0, 0, 3)
    with pytest.raises(RuntimeError, match="event loop .*ended"):
        ex.submit_threadsafe("k", forever)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.Runner is new in 3.11")
def test_threadsafe_submission_not_yet_on_the_loop_when_it_ends(
    new_loop: Callable[[], asyncio.AbstractEventLoop], caplog: pytest.LogCaptureFixture
) -> None:
    """Queued from a thread while the loop is stopped, then the runner closes: cancelled."""

    async def forever() -> None:
        await asyncio.Event().wait()

    async def make() -> AsyncKeyedExecutor[str]:
        return AsyncKeyedExecutor()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        with asyncio.Runner(loop_factory=new_loop) as runner:
            ex = runner.run(make())
            fut = ex.submit_threadsafe("k", forever)  # the loop is not running: it waits
        gc.collect()
    assert fut.cancelled()
    assert not caplog.records  # no task left pending at close, no error in a callback


def test_loop_closed_by_hand_then_shutdown_elsewhere_releases_waiting_threads(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """loop.close() without shutdown_asyncgens: shutdown() on another loop ends the futures."""

    async def noop() -> None:
        pass

    async def make() -> AsyncKeyedExecutor[str]:
        return AsyncKeyedExecutor()

    loop = new_loop()
    ex = loop.run_until_complete(make())
    fut = ex.submit_threadsafe("k", noop)  # the loop is not running: the call waits
    outcome: list[str] = []

    def wait() -> None:
        try:
            fut.result(timeout=T)
            outcome.append("ran")
        except cf.CancelledError:
            outcome.append("cancelled")
        except cf.TimeoutError:
            outcome.append("still pending")

    waiter = threading.Thread(target=wait)
    waiter.start()
    loop.close()  # drops the queued call
    asyncio.run(within(ex.shutdown()))
    waiter.join(T + 1)
    assert outcome == ["cancelled"]
    with pytest.raises(RuntimeError, match="event loop .*ended"):
        ex.submit_threadsafe("k", noop)

    async def elsewhere() -> None:
        with pytest.raises(RuntimeError, match="event loop .*ended"):
            ex.submit("k", noop)

    asyncio.run(elsewhere())


def test_submit_threadsafe_after_shutdown_or_before_any_loop(run: Runner) -> None:
    """RuntimeError at once when closed, or when no loop is known yet."""

    async def noop() -> None:
        pass

    unbound: AsyncKeyedExecutor[str] = AsyncKeyedExecutor()
    with pytest.raises(RuntimeError, match="no event loop yet"):
        unbound.submit_threadsafe("k", noop)

    async def main() -> None:
        ex: AsyncKeyedExecutor[str] = AsyncKeyedExecutor()
        await ex.aclose()
        with pytest.raises(RuntimeError, match="after shutdown"):
            await asyncio.to_thread(ex.submit_threadsafe, "k", noop)

    run(main())


def test_submit_off_the_loop_thread_points_to_submit_threadsafe(run: Runner) -> None:
    """submit() from another thread, or another loop, is refused with a hint."""

    async def noop() -> None:
        pass

    async def main() -> AsyncKeyedExecutor[str]:
        ex: AsyncKeyedExecutor[str] = AsyncKeyedExecutor()
        with pytest.raises(RuntimeError, match="submit_threadsafe"):
            await asyncio.to_thread(ex.submit, "k", noop)
        return ex

    ex = run(main())

    async def after_its_loop() -> None:
        with pytest.raises(RuntimeError, match="event loop .*has ended"):
            ex.submit("k", noop)

    run(after_its_loop())

    first = asyncio.new_event_loop()
    try:
        ex = first.run_until_complete(main())

        async def other_loop() -> None:
            with pytest.raises(RuntimeError, match="another event loop"):
                ex.submit("k", noop)

        run(other_loop())
    finally:
        first.run_until_complete(first.shutdown_asyncgens())
        first.close()


def test_submit_on_the_loops_thread_while_the_loop_is_stopped_is_refused(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """The loop's own thread, between two runs of the loop: no loop runs the call."""

    async def noop() -> None:
        pass

    async def adopt() -> AsyncKeyedExecutor[str]:
        ex: AsyncKeyedExecutor[str] = AsyncKeyedExecutor()
        await within(ex.submit("k", noop))
        return ex

    loop = new_loop()
    try:
        ex = loop.run_until_complete(adopt())
        for call in (ex.submit, ex.execute):
            with pytest.raises(RuntimeError, match="event loop's thread"):
                call("k", noop)
        assert ex.metrics().submitted == 1
        loop.run_until_complete(ex.aclose())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def test_submit_takes_its_futures_from_the_loops_own_create_future() -> None:
    """A loop that overrides create_future gets its own futures; the core builds
    asyncio.Future itself only in place of BaseEventLoop.create_future."""

    class MyFuture(asyncio.Future):  # type: ignore[type-arg]
        pass

    class MyLoop(asyncio.SelectorEventLoop):
        def create_future(self) -> asyncio.Future[Any]:
            return MyFuture(loop=self)

    async def job() -> int:
        return 7

    async def main() -> type:
        async with AsyncKeyedExecutor[Any]() as ex:
            fut = ex.submit("k", job)
            assert fut.get_loop() is asyncio.get_running_loop()
            assert await within(fut) == 7
            return type(fut)

    for loop_type, future_type in [(asyncio.SelectorEventLoop, asyncio.Future),
                                   (MyLoop, MyFuture)]:
        loop = loop_type()
        try:
            assert loop.run_until_complete(main()) is future_type
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def test_base_event_loop_keeps_the_thread_running_it_in_thread_id() -> None:
    """The CPython detail the native core's submit relies on (src/_aio.pxi,
    _loop_for_call): a BaseEventLoop's ``_thread_id`` is the running thread's
    ident while it runs, None otherwise."""
    seen: list[Any] = []

    async def main() -> None:
        seen.append(asyncio.get_running_loop()._thread_id)  # type: ignore[attr-defined]
        await asyncio.sleep(0)
        seen.append(asyncio.get_running_loop()._thread_id)  # type: ignore[attr-defined]

    loop = asyncio.new_event_loop()
    try:
        assert isinstance(loop, asyncio.BaseEventLoop)
        assert loop._thread_id is None  # type: ignore[attr-defined]
        loop.run_until_complete(main())
        assert seen == [threading.get_ident()] * 2
        assert loop._thread_id is None  # type: ignore[attr-defined]
    finally:
        loop.close()


def test_executor_created_outside_a_loop_binds_to_its_first(run: Runner) -> None:
    """Constructed before asyncio.run, it adopts the loop of its first use."""
    ex: AsyncKeyedExecutor[str] = AsyncKeyedExecutor()

    async def main() -> str:
        async with ex:
            result: str = await within(ex.submit("k", asyncio.sleep, 0, "bound"))
            return result

    assert run(main()) == "bound"


# -- bookkeeping and validation ----------------------------------------------------


def test_idle_keys_are_reclaimed_by_the_time_the_result_is_seen(run: Runner) -> None:
    """A key is freed when its last job ends: no growth with the number of keys ever seen."""

    async def job(i: int) -> int:
        return i

    async def main() -> None:
        async with AsyncKeyedExecutor[Any](concurrency=8) as ex:
            assert await within(ex.submit("solo", job, 1)) == 1
            assert ex.metrics().active_keys == 0
            futs = [ex.submit(f"user-{i}", job, i) for i in range(1000)]
            assert ex.metrics().active_keys == 1000
            await within(asyncio.gather(*futs))
            m = ex.metrics()
            assert (m.active_keys, m.running, m.pending) == (0, 0, 0)
            assert (m.submitted, m.completed, m.failed, m.cancelled) == (1001, 1001, 0, 0)
        assert ex.metrics().workers == 0

    run(main())


def test_a_dropped_executor_is_freed_without_the_cycle_collector(run: Runner) -> None:
    """Watching for the loop's end keeps no reference cycle through the executor."""

    async def job() -> int:
        return 1

    async def main() -> bool:
        ex: AsyncKeyedExecutor[str] = AsyncKeyedExecutor()
        async with ex:
            assert await within(ex.submit("k", job)) == 1
        await asyncio.sleep(0)  # the finished runner's done callback runs
        ref = weakref.ref(ex)
        del ex
        return ref() is None

    gc.disable()
    try:
        assert run(main())
    finally:
        gc.enable()


@pytest.mark.parametrize("suspends", [False, True])
def test_a_finished_jobs_arguments_and_context_are_freed_without_the_cycle_collector(
    run: Runner, suspends: bool
) -> None:
    """Fast path and slow path: nothing a job held (its arguments, the values it
    set in its context) outlives it waiting for the cycle collector."""
    var: contextvars.ContextVar[Any] = contextvars.ContextVar("var")

    class Thing:
        pass

    async def job(arg: Thing) -> None:
        var.set(Thing())
        refs.append(weakref.ref(var.get()))
        if suspends:
            await asyncio.sleep(0)

    refs: list[weakref.ref[Thing]] = []

    async def main() -> None:
        async with AsyncKeyedExecutor[Any]() as ex:
            arg = Thing()
            refs.append(weakref.ref(arg))
            await within(ex.submit("k", job, arg))
            del arg
            ex.execute("k", job, Thing())
        await asyncio.sleep(0)
        assert len(refs) == 3 and [r() for r in refs] == [None] * 3

    gc.disable()
    try:
        run(main())
    finally:
        gc.enable()


def test_saved_bound_methods_keep_their_executor_alive(run: Runner) -> None:
    """``submit = AsyncKeyedExecutor().submit``: like any bound method, it keeps
    working after the last other reference to the executor is gone."""

    async def job(x: int) -> int:
        return x

    async def main() -> list[int]:
        ex: AsyncKeyedExecutor[str] = AsyncKeyedExecutor()
        submit, execute = ex.submit, ex.execute
        ref = weakref.ref(ex)
        del ex
        gc.collect()
        assert ref() is not None
        execute("k", job, 0)
        out = await within(asyncio.gather(submit("k", job, 1), submit("j", job, 2)))
        ex = ref()
        assert ex is not None
        await ex.aclose()
        assert ex.metrics().completed == 3
        return out

    assert run(main()) == [1, 2]


def test_repr_and_properties(run: Runner) -> None:
    """repr shows state and counts; concurrency and closed are exposed."""

    async def main() -> None:
        ex: AsyncKeyedExecutor[str] = AsyncKeyedExecutor(concurrency=5)
        assert ex.concurrency == 5 and not ex.closed
        gate, _ = await block(ex, "k")
        assert "open concurrency=5 running=1 pending=0 keys=1" in repr(ex)
        gate.set()
        await ex.aclose()
        assert "closed" in repr(ex)

    run(main())


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"concurrency": 0}, ValueError, "concurrency"),
        ({"concurrency": 2.0}, TypeError, "concurrency"),
        ({"concurrency": True}, TypeError, "concurrency"),
        ({"batch": 0}, ValueError, "batch"),
        ({"on_error": "log"}, TypeError, "on_error"),
        ({"name": 3}, TypeError, "name"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict[str, Any], error: type, name: str) -> None:
    """Each bad argument is rejected with an error that names it."""
    with pytest.raises(error, match=name):
        AsyncKeyedExecutor(**kwargs)


def test_bad_key_or_coro_fn_is_rejected_without_queueing(run: Runner) -> None:
    """Unhashable keys and non-callables raise TypeError and queue nothing."""

    async def noop() -> None:
        pass

    async def main() -> None:
        async with AsyncKeyedExecutor[Any]() as ex:
            for submit in (ex.submit, ex.execute):
                with pytest.raises(TypeError, match="key must be hashable"):
                    submit(["list"], noop)
                with pytest.raises(TypeError, match="coro_fn must be callable"):
                    submit("k", 42)  # type: ignore[arg-type]
            coro = noop()
            with pytest.raises(TypeError, match="not a coroutine"):
                ex.submit("k", coro)  # type: ignore[arg-type]
            coro.close()
            with pytest.raises(TypeError, match="key must be hashable"):
                ex.cancel_key(["list"])
            with pytest.raises(TypeError, match="key must be hashable"):
                await asyncio.to_thread(ex.submit_threadsafe, {}, noop)
            assert ex.metrics().submitted == 0

    run(main())
