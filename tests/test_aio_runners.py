"""AsyncKeyedExecutor's shared runners: what a job sees when jobs share a task.

Jobs do not get a task each: a runner task drives them one after another (see
keyedexec/aio.py). These tests pin what that means for cancellation,
``asyncio.current_task()``, timeouts, contextvars and the loop's fairness, on
both hot-path implementations and on uvloop; each fast path (a job that
finishes without suspending) is checked against its slow twin (one that
suspends).
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import sys
import weakref
from typing import Any

import pytest

from keyedexec.aio import AsyncKeyedExecutor
from test_aio import Runner, core, run, within  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(30)


def test_cancelling_a_running_job_does_not_touch_the_next_one(run: Runner) -> None:
    """One runner: job 1 cancelled while suspended; job 2, on the same runner, runs normally."""

    async def main() -> None:
        started = asyncio.Event()

        async def first() -> None:
            started.set()
            await asyncio.sleep(60)

        async def second() -> str:
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            return "second"

        async with AsyncKeyedExecutor[Any](concurrency=1) as ex:
            f1, f2 = ex.submit("k", first), ex.submit("k", second)
            await within(started.wait())
            f1.cancel()
            assert await within(f2) == "second"
            m = ex.metrics()
        assert (m.cancelled, m.completed) == (1, 1)

    run(main())


def test_a_job_that_swallows_its_cancellation_finishes_but_its_future_stays_cancelled(
    run: Runner,
) -> None:
    """CancelledError caught inside the job: it goes on; the runner's next job is untouched."""
    seen: list[str] = []

    async def main() -> None:
        started = asyncio.Event()

        async def stubborn() -> str:
            started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                seen.append("caught")
            await asyncio.sleep(0)
            seen.append("finished")
            return "ignored"

        async def after() -> str:
            await asyncio.sleep(0)
            return "after"

        async with AsyncKeyedExecutor[Any](concurrency=1) as ex:
            f1, f2 = ex.submit("k", stubborn), ex.submit("other", after)
            await within(started.wait())
            f1.cancel()
            assert await within(f2) == "after"
            assert f1.cancelled()

    run(main())
    assert seen == ["caught", "finished"]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is new in 3.11")
def test_asyncio_timeout_inside_a_job_concerns_that_job_only(run: Runner) -> None:
    """The timeout cancels the current task (the runner) and takes it back: TimeoutError
    in the job, and the same runner goes on with the next job."""

    async def main() -> None:
        async def slow() -> str:
            try:
                async with asyncio.timeout(0.01):
                    await asyncio.sleep(60)
            except TimeoutError:
                return "timed out"
            return "not reached"

        async def nxt() -> Any:
            await asyncio.sleep(0)
            return asyncio.current_task()

        async with AsyncKeyedExecutor[Any](concurrency=1) as ex:
            f1, f2 = ex.submit("k", slow), ex.submit("k", nxt)
            assert await within(f1) == "timed out"
            runner = await within(f2)
            assert runner is not None and runner.get_name().startswith("keyedexec-aio-runner")
            assert ex.metrics().cancelled == 0

    run(main())


def test_current_task_is_the_runner_and_cancelling_it_stops_that_runner(run: Runner) -> None:
    """asyncio.current_task() in a job is its runner; cancelling it cancels the job and
    ends the runner; the queued jobs run on a new runner (next submit, or shutdown)."""
    tasks: list[Any] = []
    ran: list[str] = []

    async def main() -> None:
        async def whoami(tag: str) -> None:
            tasks.append(asyncio.current_task())
            ran.append(tag)

        async def suicide() -> None:
            me = asyncio.current_task()
            assert me is not None
            me.cancel()
            await asyncio.sleep(0)
            ran.append("not reached")

        ex: AsyncKeyedExecutor[str] = AsyncKeyedExecutor(concurrency=1)
        ex.execute("k", whoami, "a")
        ex.execute("k", whoami, "b")
        doomed = ex.submit("k", suicide)
        ex.execute("k", whoami, "c")
        with pytest.raises(asyncio.CancelledError):
            await within(doomed)
        await within(ex.shutdown())  # starts a runner for what is left
        m = ex.metrics()
        assert (m.cancelled, m.completed, m.pending, m.workers) == (1, 3, 0, 0)

    run(main())
    assert ran == ["a", "b", "c"]
    assert tasks[0] is tasks[1] and tasks[2] is not tasks[0]


def test_jobs_left_without_a_runner_are_cancelled_when_the_executor_is_dropped(
    run: Runner,
) -> None:
    """Its runner stopped, the executor dropped before any submit or shutdown
    started another: the queued jobs' futures are cancelled, not left pending."""

    async def main() -> None:
        async def suicide() -> None:
            me = asyncio.current_task()
            assert me is not None
            me.cancel()
            await asyncio.sleep(0)

        async def job(i: int) -> int:
            return i

        ex: AsyncKeyedExecutor[str] = AsyncKeyedExecutor(concurrency=1)
        doomed = ex.submit("k", suicide)
        left = [ex.submit(k, job, i) for i, k in enumerate("kkj")]
        ex.execute("k", job, 3)
        with pytest.raises(asyncio.CancelledError):
            await within(doomed)
        ref = weakref.ref(ex)
        del ex
        for _ in range(10):  # the stopped runner's done callbacks run, and let go of it
            await asyncio.sleep(0)
            gc.collect()
            if ref() is None:
                break
        assert ref() is None
        await within(asyncio.wait(left))
        assert all(f.cancelled() for f in left)

    run(main())


@pytest.mark.parametrize("suspends", [False, True])
def test_each_job_runs_in_its_own_copy_of_the_submitters_context(run: Runner,
                                                                 suspends: bool) -> None:
    """Fast path (no await) and slow path (awaits between steps): the job sees the
    submitter's values and its own changes, never another job's, never the runner's."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    async def main() -> None:
        async def job(tag: str) -> tuple[str, str]:
            seen = var.get()
            var.set(tag)
            if suspends:
                await asyncio.sleep(0)
                await asyncio.sleep(0)
            return seen, var.get()

        async with AsyncKeyedExecutor[Any](concurrency=2) as ex:
            futs = []
            for i in range(6):
                var.set(f"sub{i}")
                futs.append(ex.submit(i % 2, job, f"job{i}"))
            results = await within(asyncio.gather(*futs))
        assert results == [(f"sub{i}", f"job{i}") for i in range(6)]

    run(main())


def test_jobs_that_never_await_do_not_starve_the_loop(run: Runner) -> None:
    """A runner lets the loop run every ``batch`` jobs that finished without suspending."""

    async def main() -> None:
        done = 0
        seen_midway: list[int] = []

        async def quick() -> None:
            nonlocal done
            done += 1

        async def ticker() -> None:
            while done < 1000:
                if done:
                    seen_midway.append(done)
                await asyncio.sleep(0)

        async with AsyncKeyedExecutor[Any](concurrency=1, batch=10) as ex:
            tick = asyncio.ensure_future(ticker())
            for _ in range(1000):
                ex.execute("k", quick)
            await within(tick)
        assert seen_midway and seen_midway[0] < 1000

    run(main())


def test_a_key_whose_eq_raises_never_breaks_a_runner(run: Runner) -> None:
    """Keys of one hash whose __eq__ raises: the submit raises, nothing is lost or stuck."""

    class Touchy:
        def __hash__(self) -> int:
            return 1

        def __eq__(self, other: object) -> bool:
            if self is other:
                return True
            raise ValueError("cannot compare")

    async def main() -> None:
        async def job(i: int) -> int:
            await asyncio.sleep(0)
            return i

        a, b = Touchy(), Touchy()
        async with AsyncKeyedExecutor[Any](concurrency=2) as ex:
            fa = ex.submit(a, job, 1)
            with pytest.raises(ValueError, match="cannot compare"):
                ex.submit(b, job, 2)
            fa2 = ex.submit(a, job, 3)
            assert await within(asyncio.gather(fa, fa2)) == [1, 3]
            m = ex.metrics()
        assert (m.submitted, m.completed, m.active_keys) == (2, 2, 0)

    run(main())
