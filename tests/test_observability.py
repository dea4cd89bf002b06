"""Operating an executor (issue 16): wait/run time histograms, hot keys, the slow-task log.

On both schedulers (``impl``), plus TaskPool and AsyncKeyedExecutor. Durations
are only ever asserted from below (a task held on a gate for 60 ms waited at
least that long), never from above, so no assertion depends on the machine's
speed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import threading
import time
import weakref
from typing import Any

import pytest
from conftest import wait_until

try:
    from keyedexec import _core
except ImportError:  # pragma: no cover - exercised only without a build
    _core = None  # type: ignore[assignment]

from keyedexec import AsyncKeyedExecutor
from keyedexec.aio import _PyCore
from keyedexec._timings import BUCKETS, Histogram, Recorder, bucket_of, hot_keys

pytestmark = pytest.mark.timeout(60)

T = 10.0  # seconds any single wait may take before the test fails


def timed_among(submits: range, every: int) -> list[int]:
    """The submits a scheduler times with ``sample_timings=every`` (the documented rule)."""
    rule = Recorder(every)
    return [i for i in submits if rule.take()]


def over(h: Histogram, seconds: float) -> int:
    """Durations recorded in buckets whose upper bound is above ``seconds``: these
    include every duration of at least ``seconds``."""
    return sum(n for bound, n in zip(h.buckets, h.counts) if bound > seconds)


def noop() -> None:
    pass


def boom() -> None:
    raise ValueError("boom")


# -- the histogram structure --------------------------------------------------------------


def test_buckets_are_log2_microseconds_up_to_a_minute_and_inf() -> None:
    assert BUCKETS[0] == 1e-6 and BUCKETS[1] == 2e-6 and BUCKETS[-2] == 2**26 / 1e6
    assert BUCKETS[-1] == math.inf and len(BUCKETS) == 28
    assert [bucket_of(ns) for ns in (0, 1, 1000, 1001, 2000, 2001, 4001)] == [0, 0, 0, 1, 1, 2, 3]
    assert bucket_of(10**15) == len(BUCKETS) - 1


def test_bucket_of_puts_each_duration_under_its_upper_bound() -> None:
    for ns in [1, 999, 1000, 1001, 123_456, 2**20 * 1000, 2**20 * 1000 + 1, 60 * 10**9]:
        k = bucket_of(ns)
        assert ns / 1e9 <= BUCKETS[k] + 1e-15
        assert k == 0 or ns / 1e9 > BUCKETS[k - 1]


def test_hot_keys_entries_are_sorted_and_deduplicated() -> None:
    """A key met twice by a scan the table moved under is reported once."""
    a, b, c = "a", ("b",), 3
    out = hot_keys([(c, 1, False, None), (a, 5, False, 10), (b, 5, True, 5), (a, 5, False, 10)], 3)
    assert [(k.key, k.queued, k.running) for k in out] == [(b, 5, True), (a, 5, False), (c, 1, False)]
    assert out[1].oldest_wait == 10e-9 and out[2].oldest_wait is None


# -- timings ---------------------------------------------------------------------------------


def test_every_task_that_ran_is_timed_with_sample_timings_1(h: Any) -> None:
    ex = h.executor(4, sample_timings=1)
    futs = [ex.submit(i % 7, noop) for i in range(200)] + [ex.submit("x", boom) for _ in range(5)]
    for i in range(50):
        ex.execute(i, noop)
    for f in futs:
        f.exception(T)
    assert wait_until(lambda: ex.metrics().completed == 255)
    t = ex.timings()
    assert t.sample_every == 1
    for hist in (t.wait, t.run):
        assert hist.count == sum(hist.counts) == 255
        assert hist.buckets == BUCKETS and len(hist.counts) == len(BUCKETS)
        assert hist.sum >= 0


def test_wait_and_run_times_land_in_their_buckets(h: Any) -> None:
    """A task queued behind a 60 ms gate waited >= 60 ms; a task sleeping 30 ms ran >= 30 ms."""
    ex = h.executor(2, sample_timings=1)
    gate, blocker = h.block(ex, "k")
    behind = ex.submit("k", noop)
    time.sleep(0.06)
    gate.set()
    behind.result(T)
    blocker.result(T)
    sleeper = ex.submit("s", time.sleep, 0.03)
    sleeper.result(T)
    assert wait_until(lambda: ex.timings().run.count == 3)
    t = ex.timings()
    assert over(t.wait, 0.06) >= 1  # the task behind the gate
    assert t.wait.sum >= 0.06
    assert over(t.run, 0.06) >= 1  # the blocker held its key that long
    assert over(t.run, 0.03) >= 2
    assert t.run.sum >= 0.09


def test_tasks_that_never_ran_are_not_timed(h: Any) -> None:
    ex = h.executor(1, sample_timings=1)
    gate, blocker = h.block(ex, "k")
    dropped = [ex.submit("k", noop) for _ in range(3)]
    assert ex.cancel_key("k") == 3
    gate.set()
    blocker.result(T)
    assert all(f.cancelled() for f in dropped)
    assert wait_until(lambda: ex.timings().run.count == 1)
    assert ex.timings().wait.count == 1 and ex.metrics().cancelled == 3


def test_default_times_one_task_in_32_evenly_spread(h: Any) -> None:
    """The first task is timed; which others are follows the documented rule, the same
    on both schedulers, and a pattern with the sampling period is not aliased."""
    ex = h.executor(4)
    assert ex.timings().sample_every == 32
    ex.submit(0, noop).result(T)
    assert wait_until(lambda: ex.timings().run.count == 1)
    # Every 32nd submit sleeps 2 ms: a counter-based sampler would time only those.
    futs = [ex.submit(i % 50, time.sleep, 0.002 if i % 32 == 0 else 0) for i in range(1, 3201)]
    for f in futs:
        f.result(T)
    expected = timed_among(range(3201), 32)
    assert wait_until(lambda: ex.timings().run.count == len(expected))
    slow = [i for i in expected if i % 32 == 0 and i > 0]
    run = ex.timings().run
    assert 0 < len(slow) < len(expected) - 1  # the rule times both kinds of task
    assert over(run, 0.002) >= len(slow)
    assert run.count - over(run, 0.0019) >= 1  # and no-ops too


def test_sample_timings_0_turns_timing_off(h: Any) -> None:
    ex = h.executor(1, sample_timings=0)
    gate, blocker = h.block(ex, "k")
    ex.execute("k", noop)
    [hot] = ex.hot_keys()
    assert (hot.key, hot.queued, hot.running) == ("k", 1, True)
    assert hot.oldest_wait is not None  # hot_keys' stamps do not depend on timing
    gate.set()
    blocker.result(T)
    assert wait_until(lambda: ex.metrics().completed == 2)
    t = ex.timings()
    assert t.sample_every == 0 and t.wait.count == t.run.count == 0 and t.run.sum == 0


@pytest.mark.parametrize(
    ("value", "error"),
    [(-1, ValueError), (2**32, ValueError), (1.5, TypeError), ("32", TypeError), (True, TypeError)],
)
def test_sample_timings_is_validated(impl: Any, value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="sample_timings"):
        impl.KeyedExecutor(2, sample_timings=value)
    with pytest.raises(error, match="sample_timings"):
        impl.TaskPool(sample_timings=value)
    with pytest.raises(error, match="sample_timings"):
        AsyncKeyedExecutor(sample_timings=value)


# -- hot keys -------------------------------------------------------------------------------


def test_hot_keys_ranks_keys_by_queued_tasks(h: Any) -> None:
    ex = h.executor(2)
    gate0, b0 = h.block(ex, "b0")
    gate1, b1 = h.block(ex, "b1")
    for key, n in [("warm", 3), ("hot", 5), ("cold", 1), ("b0", 2)]:
        for _ in range(n):
            ex.execute(key, noop)
    time.sleep(0.05)
    top = ex.hot_keys(3)
    assert [(k.key, k.queued, k.running) for k in top] == [
        ("hot", 5, False), ("warm", 3, False), ("b0", 2, True)
    ]
    assert all(k.oldest_wait is not None and k.oldest_wait >= 0.05 for k in top)
    every = ex.hot_keys(100)
    assert [k.key for k in every] == ["hot", "warm", "b0", "cold", "b1"]
    assert (every[-1].queued, every[-1].running, every[-1].oldest_wait) == (0, True, None)
    assert [k[:3] for k in ex.hot_keys()] == [k[:3] for k in every]  # default n=10
    gate0.set()
    gate1.set()
    b0.result(T)
    b1.result(T)
    assert wait_until(lambda: ex.metrics().active_keys == 0)
    assert ex.hot_keys() == []


def test_hot_keys_oldest_wait_is_the_head_task_s(h: Any) -> None:
    """After the oldest queued task starts, the next one's wait is reported."""
    ex = h.executor(1, sample_timings=1)
    gate, blocker = h.block(ex, "k")
    first = ex.submit("k", noop)
    time.sleep(0.2)
    ex.submit("k", noop)
    [k] = [k for k in ex.hot_keys() if k.key == "k"]
    assert k.queued == 2 and k.oldest_wait is not None and k.oldest_wait >= 0.2
    gate.set()
    first.result(T)
    # The second task is submitted 0.2 s after the first: reported younger.
    assert wait_until(lambda: ex.metrics().pending == 0)


def test_hot_keys_scans_many_keys(h: Any) -> None:
    """More keys than one chunk of the native scan: still the true top n, each once."""
    ex = h.executor(1)
    gate, blocker = h.block(ex, "blocker")
    for i in range(20_000):
        ex.execute(i, noop)
    for i in (7, 12_345, 19_999):
        for _ in range(i % 5 + 2):
            ex.execute(i, noop)
    top = ex.hot_keys(3)
    assert [(k.key, k.queued) for k in top] == [(19_999, 7), (7, 5), (12_345, 3)]
    assert len({k.key for k in ex.hot_keys(50)}) == 50
    gate.set()
    blocker.result(T)


@pytest.mark.parametrize(("n", "error"), [(0, ValueError), (-3, ValueError), ("3", TypeError),
                                          (2.0, TypeError), (True, TypeError), (None, TypeError)])
def test_hot_keys_n_is_validated(h: Any, n: Any, error: type[Exception]) -> None:
    ex = h.executor(1)
    with pytest.raises(error, match=r"\bn\b"):
        ex.hot_keys(n)
    with pytest.raises(error, match=r"\bn\b"):
        h.impl.TaskPool().hot_keys(n)


# -- the slow-task log ---------------------------------------------------------------------


def slow_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "slow_task_threshold" in r.getMessage()]


def test_a_slow_task_is_logged_once_with_its_key(h: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="keyedexec")
    ex = h.executor(2, slow_task_threshold=0.05, name="svc")
    gate, blocker = h.block(ex, ("account", 42))
    for i in range(20):
        ex.execute("fast", noop)
    assert wait_until(lambda: len(slow_records(caplog)) >= 1)
    time.sleep(0.2)  # several more checks: still logged once
    gate.set()
    blocker.result(T)
    [record] = slow_records(caplog)
    assert record.levelno == logging.WARNING and record.name == "keyedexec"
    assert "('account', 42)" in record.getMessage() and "svc" in record.getMessage()
    assert "fast" not in record.getMessage()


def test_the_next_slow_task_on_the_same_worker_is_logged_too(
    h: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="keyedexec")
    ex = h.executor(1, slow_task_threshold=0.03)
    for key in ("first", "second"):
        gate, blocker = h.block(ex, key)
        assert wait_until(lambda: any(key in r.getMessage() for r in slow_records(caplog)))
        gate.set()
        blocker.result(T)
    assert len(slow_records(caplog)) == 2


@pytest.mark.parametrize(("value", "error", "match"), [
    (0, ValueError, "must be > 0"), (-1, ValueError, "must be > 0"),  # not ">= 0": 0 is refused
    (math.nan, ValueError, "must be > 0"), ("1", TypeError, "must be a number of seconds")])
def test_slow_task_threshold_is_validated(
        impl: Any, value: Any, error: type[Exception], match: str) -> None:
    match = "slow_task_threshold " + match
    with pytest.raises(error, match=match):
        impl.KeyedExecutor(2, slow_task_threshold=value)
    with pytest.raises(error, match=match):
        impl.TaskPool(slow_task_threshold=value)
    with pytest.raises(error, match=match):
        AsyncKeyedExecutor(slow_task_threshold=value)


def watchdogs() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.endswith("-watchdog")]


def test_no_watchdog_thread_unless_asked(h: Any) -> None:
    before = watchdogs()
    h.executor(2)
    h.executor(2, slow_task_threshold=math.inf)  # inf: off
    assert watchdogs() == before


def test_the_watchdog_stops_at_shutdown(impl: Any) -> None:
    ex = impl.KeyedExecutor(2, slow_task_threshold=1.0, name="stops-at-shutdown")
    ex.submit("k", noop).result(T)
    assert [t.name for t in watchdogs()].count("stops-at-shutdown-watchdog") == 1
    ex.shutdown(wait=True)
    assert wait_until(lambda: "stops-at-shutdown-watchdog" not in [t.name for t in watchdogs()])


def test_the_watchdog_does_not_keep_the_executor_alive(impl: Any) -> None:
    ex = impl.KeyedExecutor(2, slow_task_threshold=5.0, name="dropped")
    ex.submit("k", noop).result(T)
    sched = weakref.ref(ex._sched)
    del ex
    gc.collect()
    assert wait_until(lambda: sched() is None)
    assert wait_until(lambda: "dropped-watchdog" not in [t.name for t in watchdogs()])


# -- TaskPool ------------------------------------------------------------------------------


def test_taskpool_timings_and_hot_keys(impl: Any) -> None:
    pool = impl.TaskPool(queue_size=10, max_workers=1, sample_timings=1)
    assert pool.timings().run.count == 0 and pool.timings().sample_every == 1
    assert pool.hot_keys() == []
    with pool:
        started, gate = threading.Event(), threading.Event()
        pool.submit("b", lambda ctx: (started.set(), gate.wait(T)))
        assert started.wait(T)
        for _ in range(4):
            pool.submit("hot", lambda ctx: None)
        pool.submit("cold", lambda ctx: None)
        assert [(k.key, k.queued, k.running) for k in pool.hot_keys(2)] == [
            ("hot", 4, False), ("cold", 1, False)
        ]
        gate.set()
        assert wait_until(lambda: pool.metrics().completed == 6)
    assert pool.timings().run.count == pool.timings().wait.count == 6


def test_taskpool_logs_a_slow_job(impl: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="keyedexec")
    with impl.TaskPool(slow_task_threshold=0.03) as pool:
        gate = threading.Event()
        pool.submit("stuck-partner", lambda ctx: gate.wait(T))
        try:
            assert wait_until(lambda: len(slow_records(caplog)) == 1)
        finally:
            gate.set()
    assert "stuck-partner" in slow_records(caplog)[0].getMessage()


# -- AsyncKeyedExecutor ------------------------------------------------------------------


@pytest.fixture(params=["native", "pure"])
def aio_core(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """AsyncKeyedExecutor on each of its cores (keyedexec._core.AsyncCore, aio._PyCore)."""
    if request.param == "native":
        core = getattr(_core, "AsyncCore", None) if _core is not None else None
        if core is None:
            pytest.skip("keyedexec._core is not built")
    else:
        core = _PyCore
    monkeypatch.setattr(AsyncKeyedExecutor, "_Core", core)
    return core


def test_async_executor_times_jobs_and_reports_hot_keys(aio_core: Any) -> None:
    async def main() -> None:
        async with AsyncKeyedExecutor(concurrency=1, sample_timings=1) as ex:
            gate = asyncio.Event()
            blocker = ex.submit("b", gate.wait)
            await asyncio.sleep(0)
            jobs = [ex.submit(k, asyncio.sleep, 0) for k in ["hot"] * 3 + ["cold"]]
            ex.submit("fast", _return)  # never suspends: the core's fast path
            await asyncio.sleep(0.05)
            assert [(k.key, k.queued, k.running) for k in ex.hot_keys()] == [
                ("hot", 3, False), ("cold", 1, False), ("fast", 1, False), ("b", 0, True)
            ]
            oldest = ex.hot_keys(1)[0].oldest_wait
            assert oldest is not None and oldest >= 0.05
            gate.set()
            await asyncio.wait_for(asyncio.gather(blocker, *jobs), T)
            for failing in (ex.submit("x", _raise), ex.submit("x", _raise_at_once)):
                with pytest.raises(ValueError):
                    await asyncio.wait_for(failing, T)
            ex.submit("never", asyncio.sleep, 1).cancel()
        t = ex.timings()
        assert t.sample_every == 1
        assert t.run.count == t.wait.count == ex.metrics().completed == 8
        assert over(t.run, 0.05) >= 1 and over(t.wait, 0.05) >= 5

    asyncio.run(main())


def test_async_hot_keys_age_follows_the_queue_head(aio_core: Any) -> None:
    """oldest_wait is the age of the job now at the head of the key's queue:
    once the older head starts, the next job's (later) stamp counts."""

    async def main() -> None:
        first, second = asyncio.Event(), asyncio.Event()
        async with AsyncKeyedExecutor(concurrency=1, sample_timings=0) as ex:
            try:
                blocker = ex.submit("k", first.wait)
                await asyncio.sleep(0)
                older = ex.submit("k", second.wait)
                await asyncio.sleep(0.2)
                before_newer = time.monotonic()
                newer = ex.submit("k", _return)
                [hot] = ex.hot_keys()
                assert (hot.queued, hot.running) == (2, True)
                assert hot.oldest_wait is not None and hot.oldest_wait >= 0.15  # older's
                first.set()
                await asyncio.wait_for(blocker, T)
                await asyncio.sleep(0)  # older is running now, newer heads the queue
                [hot] = ex.hot_keys()
                assert (hot.queued, hot.running) == (1, True)
                # The coarse clock may lag a tick; older's stamp is >= 0.2 s older.
                assert hot.oldest_wait is not None
                assert hot.oldest_wait <= time.monotonic() - before_newer + 0.05
            finally:
                first.set()
                second.set()
            await asyncio.wait_for(asyncio.gather(older, newer), T)
            assert ex.hot_keys() == []

    asyncio.run(main())


async def _return() -> int:
    return 1


async def _raise() -> None:
    await asyncio.sleep(0)
    raise ValueError("job failed")


def _raise_at_once() -> Any:
    raise ValueError("the call failed")


def test_async_executor_times_one_job_in_32_by_default(aio_core: Any) -> None:
    async def main() -> None:
        async with AsyncKeyedExecutor() as ex:
            await asyncio.gather(*(ex.submit(i % 10, _return) for i in range(500)))
        t = ex.timings()
        assert t.sample_every == 32 and t.run.count == len(timed_among(range(500), 32))

    asyncio.run(main())


def test_async_executor_logs_a_slow_job(aio_core: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="keyedexec")

    async def main() -> None:
        async with AsyncKeyedExecutor(slow_task_threshold=0.03) as ex:
            await asyncio.wait_for(ex.submit("slow-job", asyncio.sleep, 0.2), T)
            await asyncio.wait_for(ex.submit("quick", asyncio.sleep, 0), T)

    asyncio.run(main())
    [record] = slow_records(caplog)
    assert "slow-job" in record.getMessage()


def test_hot_keys_accepts_any_large_n(h: Any) -> None:
    ex = h.executor(1)
    gate, blocker = h.block(ex, "k")
    assert [k.key for k in ex.hot_keys(2**70)] == ["k"]
    assert [k.key for k in h.impl.TaskPool().hot_keys(2**70)] == []


@pytest.mark.parametrize("sample_timings", [1, 32])
def test_a_submit_that_waited_for_space_counts_from_its_acceptance(
    impl: Any, sample_timings: int
) -> None:
    """TaskPool.submit blocked on a full key: its wait, and its age in hot_keys,
    count from when it got in, timed or not."""
    with impl.TaskPool(queue_size=1, max_workers=1, sample_timings=sample_timings) as pool:
        gates = [threading.Event(), threading.Event()]
        running = [threading.Event(), threading.Event()]

        def job(i: int) -> Any:
            return lambda ctx: (running[i].set(), gates[i].wait(T))

        pool.submit("k", job(0))
        assert running[0].wait(T)
        pool.submit("k", job(1))  # fills the key
        third = threading.Thread(target=pool.submit, args=("k", lambda ctx: None))
        third.start()
        time.sleep(1.0)  # the third submit waits for space all along
        released = time.monotonic()
        gates[0].set()
        assert running[1].wait(T)
        third.join(T)
        [hot] = pool.hot_keys()
        assert hot.queued == 1 and hot.oldest_wait is not None
        assert hot.oldest_wait <= time.monotonic() - released + 0.05  # not since its call
        gates[1].set()
        assert wait_until(lambda: pool.metrics().completed == 3)
    wait = pool.timings().wait
    if sample_timings == 1:
        assert wait.count == 3
        assert over(wait, 1.0) == 1  # the second job; not the third, though its call began as early
