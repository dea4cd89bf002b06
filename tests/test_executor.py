"""Behaviour of KeyedExecutor (issue 2), on both schedulers via ``impl``.

Per-key order and exclusion, cross-key parallelism, slow and colliding keys,
exceptions, the ``execute_with_*`` family, shutdown, counters, contexts,
``map``, input validation, worker threads, fairness and re-entrancy.
Tasks that must stay queued sit behind a *blocker* (a running task held on a
gate), so no assertion depends on timing.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import random
import threading
import time
import uuid
from typing import Any, Callable

import pytest
from conftest import wait_until

from keyedexec import (
    Cancelled,
    Context,
    DeadlineExceeded,
    KeyedExecutor,
    Metrics,
    Stats,
    background,
)

# Every test here waits on threads: a deadlock must fail, not hang.
pytestmark = pytest.mark.timeout(30)

T = 10.0  # seconds any single wait may take before the test fails


class Collide:
    """A key equal by value whose hash the test picks (default: all collide)."""

    __slots__ = ("v", "h")

    def __init__(self, v: int, h: int = 42) -> None:
        self.v = v
        self.h = h

    def __hash__(self) -> int:
        return self.h

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Collide) and other.v == self.v

    def __repr__(self) -> str:
        return f"Collide({self.v})"


class Boom(Exception):
    pass


def boom(msg: str = "boom") -> None:
    raise Boom(msg)


def noop(*_: Any) -> None:
    pass


def stopped(ex: KeyedExecutor[Any]) -> bool:
    return ex.metrics().workers == 0


def quiescent(ex: KeyedExecutor[Any]) -> bool:
    m = ex.metrics()
    return m.running == 0 and m.pending == 0 and m.active_keys == 0


# -- 1. per-key order and exclusion --------------------------------------------------


@pytest.mark.parametrize("keys", ["ints", "colliding"])
def test_per_key_fifo_and_exclusive_under_concurrent_submitters(h: Any, keys: str) -> None:
    """Each submitter's sequence per key runs in order, and a key never runs two tasks at once.

    "colliding" makes a fresh, equal-by-value key object per submit with only
    seven distinct hashes, so the key table works through long collision
    chains while keys come and go.
    """
    nkeys, submitters, per = 200, 4, 5
    ex = h.executor(8)
    lock = threading.Lock()
    in_flight = [0] * nkeys
    worst = [0]
    seen: list[list[tuple[int, int]]] = [[] for _ in range(nkeys)]

    def make_key(k: int) -> Any:
        return k if keys == "ints" else Collide(k, k % 7)

    def task(k: int, sid: int, n: int) -> None:
        with lock:
            in_flight[k] += 1
            worst[0] = max(worst[0], in_flight[k])
        time.sleep(0)  # give another worker the chance to overlap, if it could
        with lock:
            seen[k].append((sid, n))
            in_flight[k] -= 1

    start = threading.Barrier(submitters, timeout=T)

    def submitter(sid: int) -> None:
        order = list(range(nkeys))
        random.Random(sid).shuffle(order)
        start.wait()
        for n in range(per):
            for k in order:
                ex.execute(make_key(k), task, k, sid, n)

    threads = [threading.Thread(target=submitter, args=(s,)) for s in range(submitters)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    ex.shutdown(wait=True)

    assert worst[0] == 1
    for k in range(nkeys):
        assert len(seen[k]) == submitters * per
        for sid in range(submitters):
            assert [n for s, n in seen[k] if s == sid] == list(range(per)), (k, sid)
    total = nkeys * submitters * per
    m = ex.metrics()
    assert (m.submitted, m.completed, m.failed, m.cancelled) == (total, total, 0, 0)


def test_equal_keys_share_one_queue(h: Any) -> None:
    """Keys are compared by equality, not identity: equal objects queue behind each other."""
    ex = h.executor(4)
    gate, _ = h.block(ex, Collide(1))
    later = ex.submit(Collide(1), lambda: "after")
    assert ex.pending(Collide(1)) == 1
    assert not later.done()
    gate.set()
    assert later.result(T) == "after"


# -- 2. cross-key parallelism ---------------------------------------------------------


def test_distinct_keys_run_in_parallel(h: Any) -> None:
    """Four tasks on four keys with four workers are all running at the same moment."""
    ex = h.executor(4)
    barrier = threading.Barrier(4, timeout=T)
    fs = [ex.submit(f"key-{i}", barrier.wait) for i in range(4)]
    assert sorted(f.result(T) for f in fs) == [0, 1, 2, 3]


def test_never_more_than_workers_tasks_at_once(h: Any) -> None:
    """Ten keys of blocking tasks on three workers: exactly three run, seven wait."""
    ex = h.executor(3)
    gate = h.gate()
    lock = threading.Lock()
    running = [0]
    peak = [0]

    def task() -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        gate.wait()
        with lock:
            running[0] -= 1

    fs = [ex.submit(k, task) for k in range(10)]
    assert wait_until(lambda: running[0] == 3)
    m = ex.metrics()
    assert (m.workers, m.running, m.pending, m.active_keys) == (3, 3, 7, 10)
    gate.set()
    assert not cf.wait(fs, timeout=T).not_done
    assert peak[0] == 3


# -- 3. a slow key does not hold up others, whatever their hashes ---------------------

# (slow key, other keys): the others collide with the slow key's hash, or with
# each other modulo a power of two (the native table indexes by hash bits).
COLLIDING: dict[str, tuple[Any, list[Any]]] = {
    "constant-hash": (Collide(0), [Collide(i) for i in range(1, 40)]),
    "ints-equal-mod-2**k": (
        0,
        [j << k for k in (6, 8, 16, 32, 48, 63, 64) for j in (1, 2, 3)]
        + [j * (2**61 - 1) for j in (1, 2, 3)],  # hash(j * (2**61 - 1)) == 0 == hash(0)
    ),
    "hash(-1)==hash(-2)": (-1, [-2, -(2**61 + 1), -(2**61 + 2), 2**61 - 3]),
}


@pytest.mark.parametrize("family", list(COLLIDING))
def test_blocked_key_does_not_hold_up_other_keys(h: Any, family: str) -> None:
    """While one key's task blocks, every other key's tasks complete; its own queue waits."""
    slow, others = COLLIDING[family]
    ex = h.executor(2)
    gate, blocker = h.block(ex, slow)
    behind = ex.submit(slow, lambda: "behind")
    fs = [ex.submit(k, lambda k=k, n=n: (k, n)) for n in range(2) for k in others]
    done, not_done = cf.wait(fs, timeout=T)
    assert not not_done
    assert [f.result() for f in fs] == [(k, n) for n in range(2) for k in others]
    assert not blocker.done() and not behind.done()
    assert ex.pending(slow) == 1
    gate.set()
    assert behind.result(T) == "behind"
    assert wait_until(lambda: quiescent(ex))
    # The key table still finds every key after all that churn.
    assert [ex.submit(k, lambda k=k: k).result(T) for k in [slow, *others]] == [slow, *others]


# -- 4. exceptions --------------------------------------------------------------------


def test_future_carries_the_exception_and_the_worker_goes_on(h: Any) -> None:
    """submit(): the future holds the exception; the same worker serves the next task."""
    ex = h.executor(1)
    ident = ex.submit("k", threading.get_ident).result(T)
    fut = ex.submit("k", boom, "from task")
    exc = fut.exception(T)
    assert isinstance(exc, Boom) and exc.args == ("from task",)
    with pytest.raises(Boom, match="from task"):
        fut.result()
    assert ex.submit("k", threading.get_ident).result(T) == ident
    assert wait_until(lambda: ex.metrics().completed == 3)
    assert ex.metrics().failed == 1


def test_execute_hands_exceptions_to_on_error(h: Any) -> None:
    """execute(): the exception goes to on_error(key, exc), in the worker, before the next task."""
    errors: list[tuple[Any, BaseException]] = []
    ex = h.executor(1, on_error=lambda key, exc: errors.append((key, exc)))
    ident = ex.submit("a", threading.get_ident).result(T)
    ex.execute("a", boom, "first")
    ex.execute(("b", 2), boom, "second")
    ex.execute_with_context("c", background(), lambda ctx: boom("third"))
    for key in ("a", ("b", 2), "c"):
        assert ex.submit(key, threading.get_ident).result(T) == ident
    assert sorted((repr(k), str(e), type(e)) for k, e in errors) == [
        ("'a'", "first", Boom),
        ("'c'", "third", Boom),
        ("('b', 2)", "second", Boom),
    ]
    assert wait_until(lambda: ex.metrics().failed == 3)


def test_default_on_error_logs_key_and_traceback(h: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Without on_error, a failed execute() is logged on "keyedexec" with key and traceback."""
    caplog.set_level(logging.ERROR, logger="keyedexec")
    ex = h.executor(1)
    ex.execute("user-7", boom, "logged")
    # The report happens before the key's next task starts.
    assert ex.submit("user-7", lambda: "alive").result(T) == "alive"
    [rec] = [r for r in caplog.records if r.name == "keyedexec"]
    assert rec.levelno == logging.ERROR
    assert "'user-7'" in rec.getMessage()
    assert rec.exc_info is not None and rec.exc_info[0] is Boom
    assert str(rec.exc_info[1]) == "logged"
    assert "Traceback" in caplog.text and "in boom" in caplog.text


def test_on_error_that_raises_is_logged_and_worker_survives(
    h: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An on_error that raises is itself reported on the logger; the worker keeps serving."""
    caplog.set_level(logging.ERROR, logger="keyedexec")

    def bad_handler(key: Any, exc: BaseException) -> None:
        raise RuntimeError("handler broke")

    ex = h.executor(1, on_error=bad_handler)
    ident = ex.submit("k", threading.get_ident).result(T)
    ex.execute("k", boom)
    assert ex.submit("k", threading.get_ident).result(T) == ident
    [rec] = [r for r in caplog.records if r.name == "keyedexec"]
    assert "on_error" in rec.getMessage() and "'k'" in rec.getMessage()
    assert rec.exc_info is not None and rec.exc_info[0] is RuntimeError
    assert ex.metrics().workers == 1


@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt])
def test_base_exceptions_in_tasks_do_not_kill_the_worker(
    h: Any, exc_type: type[BaseException]
) -> None:
    """SystemExit / KeyboardInterrupt from a task reach its future or on_error, not the worker."""
    errors: list[BaseException] = []
    ex = h.executor(1, on_error=lambda key, exc: errors.append(exc))

    def raise_it() -> None:
        raise exc_type("from task")

    ident = ex.submit("k", threading.get_ident).result(T)
    fut = ex.submit("k", raise_it)
    assert type(fut.exception(T)) is exc_type
    with pytest.raises(exc_type):
        fut.result()
    ex.execute("k", raise_it)
    assert type(ex.execute_with_error("k", raise_it).result(T)) is exc_type
    assert ex.submit("k", threading.get_ident).result(T) == ident
    assert [type(e) for e in errors] == [exc_type]
    assert ex.metrics().workers == 1
    assert wait_until(lambda: ex.metrics().failed == 3)


# -- 5. the execute_with_* family ----------------------------------------------------


def test_execute_with_error_result_is_the_exception_or_none(h: Any) -> None:
    """Go's ExecuteWithError: the result is the raised exception or None; never raised."""
    ex = h.executor(2)
    ok = ex.execute_with_error("k", lambda a, b=0: a + b, 1, b=2)  # the return value is dropped
    bad = ex.execute_with_error("k", boom, "bad")
    assert ok.result(T) is None
    err = bad.result(T)
    assert isinstance(err, Boom) and str(err) == "bad"
    assert bad.exception() is None
    assert wait_until(lambda: ex.metrics().completed == 2)
    assert ex.metrics().failed == 1


def test_arguments_reach_the_task_even_when_named_key_or_fn(h: Any) -> None:
    """key and fn are positional-only: keyword arguments of those names belong to the task."""
    ex = h.executor(2)

    def task(*args: Any, **kwargs: Any) -> Any:
        return args, kwargs

    assert ex.submit("k", task, 1, 2, key="kw", fn=3).result(T) == ((1, 2), {"key": "kw", "fn": 3})
    got: list[Any] = []
    ex.execute("k", lambda *a, **kw: got.append((a, kw)), 1, key=2)
    ex.submit("k", noop).result(T)
    assert got == [((1,), {"key": 2})]


def test_execute_with_context_error_and_submit_with_context(h: Any) -> None:
    """fn(ctx) runs with the given ctx; errors are the result (…_error) or raised (submit_…)."""
    ex = h.executor(2)
    ctx = background().with_value("user", "u1")

    def read(c: Any) -> Any:
        return c.value("user")

    def fail(c: Any) -> None:
        raise Boom(c.value("user"))

    assert ex.execute_with_context_error("k", ctx, read).result(T) is None
    err = ex.execute_with_context_error("k", ctx, fail).result(T)
    assert isinstance(err, Boom) and str(err) == "u1"
    assert ex.submit_with_context("k", ctx, read).result(T) == "u1"
    with pytest.raises(Boom, match="u1"):
        ex.submit_with_context("k", ctx, fail).result(T)


# -- 6. shutdown ----------------------------------------------------------------------


def test_shutdown_wait_runs_everything_accepted(h: Any) -> None:
    """shutdown(wait=True) returns only after every accepted task ran, queued ones included."""
    ex = h.executor(2)
    gate, blocker = h.block(ex, "k0")
    lock = threading.Lock()
    count = [0]

    def task() -> None:
        with lock:
            count[0] += 1

    for i in range(500):
        ex.execute(f"k{i % 20}", task)
    closer = threading.Thread(target=ex.shutdown)
    closer.start()
    assert wait_until(lambda: ex.closed)
    assert closer.is_alive()  # the blocker still runs, and k0's tasks wait behind it
    gate.set()
    closer.join(T)
    assert not closer.is_alive()
    assert count[0] == 500 and blocker.result(0) == "blocker"
    m = ex.metrics()
    assert (m.completed, m.pending, m.running, m.workers) == (501, 0, 0, 0)


def test_every_future_is_done_when_shutdown_returns(h: Any) -> None:
    """No future is left pending by shutdown(wait=True), with or without cancel_futures."""
    for cancel in (False, True):
        ex = h.executor(2)
        fs = [ex.submit(i % 7, time.sleep, 0) for i in range(300)]
        ex.shutdown(wait=True, cancel_futures=cancel)
        assert all(f.done() for f in fs)
        if not cancel:
            assert not any(f.cancelled() for f in fs)
        m = ex.metrics()
        assert m.completed + m.cancelled == m.submitted == 300
        assert sum(f.cancelled() for f in fs) == m.cancelled


def test_shutdown_cancel_futures_cancels_queued_and_finishes_running(h: Any) -> None:
    """cancel_futures=True: queued tasks never run (cancelled); the running one completes."""
    ex = h.executor(1)
    ran: list[Any] = []
    gate, running = h.block(ex, "busy")
    queued = [ex.submit(k % 3, ran.append, k) for k in range(10)]
    ex.execute("fire-and-forget", ran.append, "dropped")
    closer = threading.Thread(target=ex.shutdown, kwargs={"cancel_futures": True})
    closer.start()
    assert wait_until(lambda: all(f.cancelled() for f in queued))
    assert closer.is_alive()  # still waiting for the running task
    assert not running.done()
    gate.set()
    closer.join(T)
    assert not closer.is_alive()
    assert running.result(0) == "blocker"
    assert all(f.done() for f in queued) and ran == []
    m = ex.metrics()
    assert (m.submitted, m.completed, m.cancelled, m.pending, m.running, m.workers) == (
        12,
        1,
        11,
        0,
        0,
        0,
    )


@pytest.mark.parametrize("cancel_futures", [False, True])
def test_submits_racing_shutdown_are_either_rejected_or_completed(
    h: Any, cancel_futures: bool
) -> None:
    """Submitters running into shutdown: every accepted future ends done, none is lost."""
    ex = h.executor(2)
    accepted: list[list[cf.Future[Any]]] = [[] for _ in range(4)]
    go = threading.Barrier(5, timeout=T)

    def submitter(i: int) -> None:
        go.wait()
        # Bounded, so that a scheduler that never rejects cannot spin forever.
        for n in range(200_000):
            try:
                accepted[i].append(ex.submit((i, n % 5), noop))
            except RuntimeError:
                return

    threads = [threading.Thread(target=submitter, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    go.wait()
    assert wait_until(lambda: sum(map(len, accepted)) >= 200)
    ex.shutdown(wait=True, cancel_futures=cancel_futures)
    for t in threads:
        t.join(T)
    assert not any(t.is_alive() for t in threads)  # each one was turned away
    fs = [f for part in accepted for f in part]
    assert all(f.done() for f in fs)
    if not cancel_futures:
        assert not any(f.cancelled() for f in fs)
    m = ex.metrics()
    assert m.submitted == len(fs) == m.completed + m.cancelled
    assert m.cancelled == sum(f.cancelled() for f in fs)


def test_no_lost_wakeup_when_submitting_to_an_idle_worker(h: Any) -> None:
    """Submit-then-wait in a tight loop: each task lands just as its worker goes idle."""
    for workers in (1, 2):
        ex = h.executor(workers)
        for i in range(1000):
            assert ex.submit(i % 3, int, i).result(T) == i


def test_second_shutdown_is_harmless(h: Any) -> None:
    """shutdown() again, with any arguments, is a no-op."""
    ex = h.executor(2)
    assert ex.submit("k", lambda: 1).result(T) == 1
    ex.shutdown()
    ex.shutdown()
    ex.shutdown(wait=False, cancel_futures=True)
    assert ex.closed and ex.metrics().workers == 0


SUBMIT_FAMILY: dict[str, Callable[[KeyedExecutor[Any]], object]] = {
    "execute": lambda ex: ex.execute("k", noop),
    "submit": lambda ex: ex.submit("k", noop),
    "execute_with_error": lambda ex: ex.execute_with_error("k", noop),
    "execute_with_context": lambda ex: ex.execute_with_context("k", background(), noop),
    "execute_with_context_error": lambda ex: ex.execute_with_context_error(
        "k", background(), noop
    ),
    "submit_with_context": lambda ex: ex.submit_with_context("k", background(), noop),
    "map": lambda ex: ex.map(noop, [1, 2]),
}


@pytest.mark.parametrize("method", list(SUBMIT_FAMILY))
def test_submit_after_shutdown_raises_and_queues_nothing(h: Any, method: str) -> None:
    """After shutdown every submit method raises RuntimeError and counts nothing."""
    ex = h.executor(2)
    ex.submit("k", noop).result(T)
    ex.shutdown()
    before = ex.metrics()
    with pytest.raises(RuntimeError, match="shutdown"):
        SUBMIT_FAMILY[method](ex)
    assert ex.metrics() == before
    assert ex.pending("k") == 0


def test_with_statement_shuts_down_and_waits(impl: Any) -> None:
    """Leaving the with block shuts down and waits for every accepted task."""
    done: list[int] = []
    with impl.KeyedExecutor(2) as ex:
        for i in range(50):
            ex.execute(i % 5, done.append, i)
    assert ex.closed
    assert sorted(done) == list(range(50))
    assert ex.metrics().workers == 0
    with pytest.raises(RuntimeError):
        ex.execute("k", noop)


def test_shutdown_without_wait_returns_while_tasks_finish_later(h: Any) -> None:
    """shutdown(wait=False) returns at once; what was accepted still runs afterwards."""
    ex = h.executor(1)
    gate, first = h.block(ex, "k")
    second = ex.submit("k", lambda: "second")
    other = ex.submit("other", lambda: "other")
    ex.shutdown(wait=False)  # with the gate closed, waiting here would hang the test
    assert ex.closed and not first.done() and not second.done()
    gate.set()
    assert (second.result(T), other.result(T)) == ("second", "other")
    ex.shutdown(wait=True)
    assert ex.metrics().workers == 0


# -- 7. idle keys and counters --------------------------------------------------------


def test_idle_keys_reclaimed_and_counters_add_up(h: Any) -> None:
    """Keys are freed once drained, and submitted == completed + cancelled + pending + running."""
    ex = h.executor(4)
    gate, _ = h.block(ex, "blocked")
    for i in range(100):
        ex.execute(i, noop)
    failing = [ex.submit(i, boom) for i in range(10)]
    for _ in range(3):
        ex.execute("blocked", noop)
    assert ex.cancel_key("blocked") == 3
    user_cancelled = ex.submit("blocked", noop)
    assert user_cancelled.cancel()
    ctx, cancel = background().with_cancel()
    ex.execute_with_context("blocked", ctx, noop)
    cancel()
    last = ex.submit("blocked", lambda: "last")

    def adds_up(m: Metrics) -> bool:
        return m.submitted == m.completed + m.cancelled + m.pending + m.running

    assert adds_up(ex.metrics())  # a consistent snapshot even mid-flight
    assert wait_until(lambda: ex.metrics().active_keys == 1)  # only "blocked" is left
    m = ex.metrics()
    assert (m.running, m.pending) == (1, 3) and adds_up(m)
    assert ex.stats() == Stats(4, 4) and ex.stats() == (4, 4)
    gate.set()
    assert last.result(T) == "last"
    assert all(isinstance(f.exception(T), Boom) for f in failing)
    assert wait_until(lambda: quiescent(ex))
    m = ex.metrics()
    assert adds_up(m)
    assert (m.submitted, m.completed, m.failed, m.cancelled) == (117, 112, 10, 5)
    stats = ex.stats()
    assert isinstance(stats, Stats) and isinstance(stats, tuple)
    assert (stats.workers, stats.pending) == (4, 0) and stats._fields == ("workers", "pending")


# -- 8. contexts -----------------------------------------------------------------------


def test_context_values_reach_the_task(h: Any) -> None:
    """fn receives the very ctx given, values included."""
    ex = h.executor(2)
    ctx = background().with_value("user", "u1").with_value("trace", 7)
    got: list[Any] = []
    ex.execute_with_context("k", ctx, lambda c: got.append((c, c.value("user"), c.value("trace"))))
    ex.submit("k", noop).result(T)
    assert got == [(ctx, "u1", 7)]


def test_cancelled_context_skips_queued_task(h: Any) -> None:
    """A task whose ctx is cancelled before its turn is not run, whichever method queued it."""
    ex = h.executor(2)
    gate, _ = h.block(ex, "k")
    ran: list[str] = []
    ctx, cancel = background().with_cancel()
    ex.execute_with_context("k", ctx, lambda c: ran.append("execute"))
    err_fut = ex.execute_with_context_error("k", ctx, lambda c: ran.append("error"))
    sub_fut = ex.submit_with_context("k", ctx, lambda c: ran.append("submit"))
    cancel()
    gate.set()
    assert ex.submit("k", lambda: "after").result(T) == "after"
    assert ran == []
    assert type(err_fut.result(T)) is type(ctx.err()) is Cancelled
    with pytest.raises(Cancelled):
        sub_fut.result(T)
    assert type(sub_fut.exception()) is Cancelled and not sub_fut.cancelled()
    assert wait_until(lambda: quiescent(ex))
    m = ex.metrics()
    assert (m.cancelled, m.completed, m.failed) == (3, 2, 0)


def test_deadline_expiry_is_reported_as_deadline_exceeded(h: Any) -> None:
    """A deadline that passes while the task is queued skips it with DeadlineExceeded."""
    ex = h.executor(2)
    gate, _ = h.block(ex, "k")
    ctx, cancel = background().with_timeout(0.05)
    try:
        fut = ex.execute_with_context_error("k", ctx, lambda c: "ran")
        sub = ex.submit_with_context("k", ctx, lambda c: "ran")
        assert ctx.wait(T)  # the deadline passes while the task is queued
        gate.set()
        err = fut.result(T)
        assert type(err) is type(ctx.err()) is DeadlineExceeded
        with pytest.raises(DeadlineExceeded):
            sub.result(T)
    finally:
        cancel()


def test_parent_cancel_skips_child_context_task(h: Any) -> None:
    """Cancelling a parent context skips a queued task of a derived context."""
    ex = h.executor(2)
    gate, _ = h.block(ex, "k")
    parent, cancel_parent = background().with_cancel()
    child, cancel_child = parent.with_value("v", 1).with_cancel()
    ran: list[int] = []
    fut = ex.execute_with_context_error("k", child, lambda c: ran.append(1))
    cancel_parent()
    gate.set()
    assert type(fut.result(T)) is type(child.err()) is Cancelled
    assert ran == []
    cancel_child()


def test_context_cancelled_while_running_does_not_stop_the_task(h: Any) -> None:
    """Skipping happens only before a task starts; a running task sees ctx.cancelled itself."""
    ex = h.executor(2)
    ctx, cancel = background().with_cancel()
    started = threading.Event()

    def task(c: Any) -> bool:
        started.set()
        return c.wait(T)

    fut = ex.submit_with_context("k", ctx, task)
    assert started.wait(T)
    cancel()
    assert fut.result(T) is True


class BrokenContext(Context):
    """A Context whose err() raises, as one whose done callback raises BaseException does."""

    __slots__ = ()

    def err(self) -> Any:
        raise Boom("err() broke")


def test_context_whose_err_raises_fails_the_task(h: Any) -> None:
    """The error goes where the task's own would: the future, the result, or on_error."""
    errors: list[tuple[Any, BaseException]] = []
    ex = h.executor(2, on_error=lambda key, exc: errors.append((key, exc)))
    ran: list[int] = []
    sub = ex.submit_with_context("k", BrokenContext(), ran.append)
    err = ex.execute_with_context_error("k", BrokenContext(), ran.append)
    ex.execute_with_context("k", BrokenContext(), ran.append)
    ex.shutdown(wait=True)
    with pytest.raises(Boom, match="err"):
        sub.result(0)
    assert isinstance(err.result(0), Boom)
    assert [(k, type(e)) for k, e in errors] == [("k", Boom)]
    assert ran == []
    m = ex.metrics()
    assert (m.completed, m.failed, m.cancelled) == (3, 3, 0)


# -- 9. map ----------------------------------------------------------------------------


def test_map_results_in_input_order_without_key(h: Any) -> None:
    """Without key every call is independent: the last may finish first; results stay in order."""
    ex = h.executor(4)
    last_ran = threading.Event()

    def fn(i: int) -> int:
        if i == 0:
            assert last_ran.wait(T)  # 0 finishes only after 9 has run
        if i == 9:
            last_ran.set()
        return i * i

    assert list(ex.map(fn, range(10))) == [i * i for i in range(10)]


def test_map_with_key_runs_calls_of_one_key_in_input_order(h: Any) -> None:
    """map(key=...): calls sharing a key run in input order; results stay in input order."""
    ex = h.executor(4)
    lock = threading.Lock()
    order: dict[int, list[int]] = {0: [], 1: [], 2: []}

    def fn(i: int) -> int:
        with lock:
            order[i % 3].append(i)
        time.sleep(0)
        return -i

    assert list(ex.map(fn, range(90), key=lambda i: i % 3)) == [-i for i in range(90)]
    assert order == {k: list(range(k, 90, 3)) for k in range(3)}


def test_map_with_multiple_iterables(h: Any) -> None:
    """map over several iterables: zip semantics, and key gets every argument."""
    ex = h.executor(2)
    assert list(ex.map(pow, [2, 3, 4], [5, 2, 1])) == [32, 9, 4]
    # zip semantics: the shortest iterable ends it; key gets every argument
    keys: list[tuple[int, int]] = []

    def key(a: int, b: int) -> int:
        keys.append((a, b))
        return a

    assert list(ex.map(lambda a, b: a + b, [1, 2, 3], [10, 20], key=key)) == [11, 22]
    assert keys == [(1, 10), (2, 20)]


def test_map_raises_exception_when_its_result_is_reached(h: Any) -> None:
    """map yields the results before a failed call, then raises its exception."""
    ex = h.executor(2)

    def fn(i: int) -> int:
        if i == 3:
            raise Boom(f"bad {i}")
        return i

    it = ex.map(fn, range(6), key=lambda i: "k")
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(Boom, match="bad 3"):
        next(it)


def test_map_timeout(h: Any) -> None:
    """timeout bounds the whole iteration: a blocked call raises TimeoutError."""
    ex = h.executor(2)
    gate = h.gate()
    it = ex.map(lambda i: gate.wait() and i, range(3), timeout=0.05)
    with pytest.raises(cf.TimeoutError):
        next(it)
    gate.set()


def test_closing_map_early_cancels_calls_not_started(h: Any) -> None:
    """Closing map's iterator cancels the calls that have not started."""
    ex = h.executor(1)
    started, gate = threading.Event(), h.gate()
    ran: list[int] = []

    def fn(i: int) -> int:
        ran.append(i)
        if i == 1:
            started.set()
            gate.wait()
        return i

    it = ex.map(fn, range(10))
    assert next(it) == 0
    assert started.wait(T)  # call 1 runs; 2..9 are queued behind it on the one worker
    it.close()
    gate.set()
    assert wait_until(lambda: quiescent(ex))
    assert ran == [0, 1]
    m = ex.metrics()
    assert (m.completed, m.cancelled) == (2, 8)


# -- 10. bad input ---------------------------------------------------------------------


class HashBoom(Exception):
    pass


class BadHash:
    def __hash__(self) -> int:
        raise HashBoom("no hash")


class BadEq:
    """Every instance hashes alike and refuses comparison (identity still matches)."""

    def __hash__(self) -> int:
        return 7

    def __eq__(self, other: object) -> bool:
        raise HashBoom("no eq")


KEYED: dict[str, Callable[..., object]] = {
    "execute": lambda ex, key, fn: ex.execute(key, fn),
    "submit": lambda ex, key, fn: ex.submit(key, fn),
    "execute_with_error": lambda ex, key, fn: ex.execute_with_error(key, fn),
    "execute_with_context": lambda ex, key, fn: ex.execute_with_context(key, background(), fn),
    "execute_with_context_error": lambda ex, key, fn: ex.execute_with_context_error(
        key, background(), fn
    ),
    "submit_with_context": lambda ex, key, fn: ex.submit_with_context(key, background(), fn),
}


def assert_usable_and_nothing_queued(ex: KeyedExecutor[Any], before: Metrics) -> None:
    assert ex.metrics().submitted == before.submitted
    assert ex.submit("after", lambda: "ok").result(T) == "ok"


@pytest.mark.parametrize("method", list(KEYED))
def test_bad_key_or_fn_is_rejected_without_queueing(h: Any, method: str) -> None:
    """Unhashable key, failing __hash__, non-callable fn: raised at submit, nothing queued."""
    ex = h.executor(2)
    call = KEYED[method]
    before = ex.metrics()
    with pytest.raises(TypeError, match="key"):
        call(ex, ["unhashable"], noop)
    with pytest.raises(HashBoom):
        call(ex, BadHash(), noop)
    with pytest.raises(TypeError, match="fn"):
        call(ex, "k", "not callable")
    assert ex.pending("k") == 0
    assert_usable_and_nothing_queued(ex, before)


def test_key_whose_eq_raises_on_collision(h: Any) -> None:
    """A colliding key whose __eq__ raises: that exception, nothing queued, the other key intact."""
    ex = h.executor(2)
    first = BadEq()
    gate, _ = h.block(ex, first)
    before = ex.metrics()
    with pytest.raises(HashBoom):
        ex.submit(BadEq(), noop)
    assert ex.metrics().submitted == before.submitted
    behind = ex.submit(first, lambda: "behind")  # the identical object still finds its queue
    gate.set()
    assert behind.result(T) == "behind"
    assert_usable_and_nothing_queued(ex, ex.metrics())


@pytest.mark.parametrize("method", [m for m in KEYED if "context" in m])
def test_ctx_must_be_a_context(h: Any, method: str) -> None:
    """The context methods reject anything that is not a keyedexec Context."""
    ex = h.executor(2)
    before = ex.metrics()
    for bad in (None, {"user": "u1"}):
        with pytest.raises(TypeError, match="ctx"):
            getattr(ex, method)("k", bad, noop)
    assert_usable_and_nothing_queued(ex, before)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"workers": 0}, ValueError),
        ({"workers": -1}, ValueError),
        ({"workers": "4"}, TypeError),
        ({"workers": 4.0}, TypeError),
        ({"workers": True}, TypeError),
        ({"workers": 2, "batch": 0}, ValueError),
        ({"workers": 2, "batch": -3}, ValueError),
        ({"workers": 2, "batch": 8.0}, TypeError),
        ({"workers": 2, "on_error": "log"}, TypeError),
    ],
)
def test_bad_constructor_arguments(impl: Any, kwargs: dict[str, Any], error: type) -> None:
    """workers and batch must be positive ints (bool excluded); on_error callable."""
    with pytest.raises(error):
        impl.KeyedExecutor(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"workers": 2**31}, "workers"),
        ({"workers": 2**64}, "workers"),
        ({"workers": 2, "batch": 2**31}, "batch"),
        ({"workers": 2, "batch": 2**64}, "batch"),
    ],
)
def test_too_large_sizes_are_a_value_error_naming_the_argument(
    impl: Any, kwargs: dict[str, Any], argument: str
) -> None:
    """Sizes past what the native core holds (C ints) are a ValueError, not OverflowError."""
    with pytest.raises(ValueError, match=argument):
        impl.KeyedExecutor(**kwargs)


def test_largest_sizes_are_accepted(impl: Any) -> None:
    """workers and batch up to 2**31 - 1 (threads start lazily, so this is cheap)."""
    ex = impl.KeyedExecutor(2**31 - 1, batch=2**31 - 1)
    try:
        assert ex.submit("k", lambda: 7).result(T) == 7
    finally:
        ex.shutdown()


@pytest.mark.parametrize("forever", [math.inf, 1e10, threading.TIMEOUT_MAX])
def test_infinite_or_huge_timeouts_mean_no_limit(h: Any, forever: float) -> None:
    """wait_key and map accept timeout=inf (or too large to wait for) as "no limit"."""
    ex = h.executor(2)
    gate, _ = h.block(ex, "k")
    fut = ex.submit("k", lambda: 1)
    waiter = cf.ThreadPoolExecutor(1)
    try:
        waited = waiter.submit(ex.wait_key, "k", timeout=forever)
        mapped = waiter.submit(lambda: list(ex.map(abs, [-1, -2], timeout=forever)))
        gate.set()
        assert waited.result(T) is True
        assert mapped.result(T) == [1, 2]
        assert fut.result(T) == 1
    finally:
        gate.set()
        waiter.shutdown()


def test_minus_infinity_timeout_is_rejected(h: Any) -> None:
    """Only +inf means no limit: -inf is a ValueError naming the argument, like -1."""
    ex = h.executor(2)
    before = ex.metrics()
    with pytest.raises(ValueError, match="timeout"):
        ex.wait_key("k", timeout=-math.inf)
    with pytest.raises(ValueError, match="timeout"):
        ex.map(noop, [1], timeout=-math.inf)
    assert_usable_and_nothing_queued(ex, before)


def test_bad_map_arguments(h: Any) -> None:
    """map validates timeout, fn and key before submitting anything."""
    ex = h.executor(2)
    before = ex.metrics()
    with pytest.raises(ValueError, match="timeout"):
        ex.map(noop, [1, 2], timeout=-1)
    with pytest.raises(TypeError, match="fn"):
        ex.map(None, [1, 2])
    with pytest.raises(TypeError, match="key"):
        ex.map(noop, [1, 2], key="not callable")
    assert_usable_and_nothing_queued(ex, before)


def test_map_with_unhashable_derived_key_cancels_what_it_queued(h: Any) -> None:
    """A bad key from map's keyfunc raises, and cancels the calls map had queued."""
    ex = h.executor(1)
    gate, _ = h.block(ex, "busy")
    with pytest.raises(TypeError, match="key"):
        ex.map(noop, range(5), key=lambda i: [i] if i == 3 else i)
    gate.set()
    assert wait_until(lambda: quiescent(ex))
    m = ex.metrics()
    # The three calls queued before the bad key were cancelled and never ran.
    assert (m.submitted, m.completed, m.cancelled) == (4, 1, 3)
    assert_usable_and_nothing_queued(ex, m)


# -- 11. worker threads ---------------------------------------------------------------


def test_workers_are_named_threads_started_lazily_and_joined(h: Any) -> None:
    """Workers are named threading.Threads, started on demand, gone after shutdown."""
    name = f"kx-{uuid.uuid4().hex[:8]}"

    def ours() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith(name)]

    before = set(threading.enumerate())
    ex = h.executor(4, name=name)
    assert ex.metrics().workers == 0 and ours() == []
    gate, _ = h.block(ex, "a")
    assert ex.metrics().workers == 1
    threads = ours()
    assert len(threads) == 1 and isinstance(threads[0], threading.Thread)
    h.block(ex, "b")
    h.block(ex, "c")
    assert ex.metrics().workers == 3 and len(ours()) == 3
    for i in range(20):
        ex.execute(i, noop)
    assert 3 <= ex.metrics().workers <= 4 and len(ours()) <= 4
    for g in h.gates:
        g.set()
    ex.shutdown(wait=True)
    assert ours() == [] and ex.metrics().workers == 0
    assert [t for t in threading.enumerate() if t not in before] == []


# -- 12. fairness ----------------------------------------------------------------------


def test_hot_key_yields_to_a_cold_key_after_batch_tasks(h: Any) -> None:
    """workers=1, batch=8: a cold key's task runs after at most a batch of the hot key's 1000."""
    batch = 8
    ex = h.executor(1, batch=batch)
    order: list[Any] = []
    gate, _ = h.block(ex, "hot")  # holds the one worker while everything queues
    for i in range(999):
        ex.execute("hot", order.append, i)
    ex.execute("cold", order.append, "cold")
    gate.set()
    ex.submit("hot", noop).result(T)
    assert wait_until(lambda: quiescent(ex))
    hot_before_cold = order.index("cold") + 1  # + the blocker, the hot key's first task
    assert hot_before_cold <= batch + 1
    assert [x for x in order if x != "cold"] == list(range(999))


# -- 13. re-entrancy -------------------------------------------------------------------


def test_task_submitting_to_its_own_key_runs_after_it(h: Any) -> None:
    """A task may submit to its own key: the new task runs after it returns."""
    ex = h.executor(2)
    order: list[str] = []

    def outer() -> cf.Future[None]:
        order.append("outer start")
        inner = ex.submit("k", order.append, "inner")
        order.append("outer end")
        return inner

    inner = ex.submit("k", outer).result(T)
    inner.result(T)
    assert order == ["outer start", "outer end", "inner"]


def test_task_waiting_on_another_keys_task(h: Any) -> None:
    """A task may block on the future of another key's task."""
    ex = h.executor(2)
    first = ex.submit("b", lambda: "from b")

    def wait_for_b() -> str:
        later = ex.submit("b", lambda: "b again")
        return f"{first.result(T)} / {later.result(T)}"

    assert ex.submit("a", wait_for_b).result(T) == "from b / b again"
