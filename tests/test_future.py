"""KeyedFuture is a concurrent.futures.Future in every respect that callers can see.

Its condition, waiter list and callbacks are created lazily and the worker
completes it without a lock (see keyedexec/_future.py), so these tests go
through the stdlib entry points that rely on them: ``wait``, ``as_completed``,
callbacks, ``cancel``, timeouts and ``asyncio.wrap_future``; on both schedulers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import os
import subprocess
import sys
import threading
import weakref
from typing import Any

import pytest
from conftest import wait_until

from keyedexec import KeyedExecutor, KeyedFuture, background
from keyedexec import _future

# Every test here waits on threads: a deadlock must fail, not hang.
pytestmark = pytest.mark.timeout(30)

T = 10.0


class Boom(Exception):
    pass


def boom() -> None:
    raise Boom("boom")


@pytest.fixture
def ex(impl: Any) -> Any:
    executor = impl.KeyedExecutor(4)
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)
    # Bounded, so that a broken scheduler fails the teardown instead of hanging it.
    assert wait_until(lambda: executor.metrics().workers == 0, T)
    executor.shutdown(wait=True)


@pytest.fixture
def gate() -> Any:
    """An Event opened at teardown, so a failed test never leaves a task blocked."""
    ev = threading.Event()
    yield ev
    ev.set()


def block(ex: KeyedExecutor[Any], key: Any, gate: threading.Event) -> KeyedFuture[Any]:
    """Occupy ``key`` with a running task until ``gate`` is set."""
    started = threading.Event()

    def blocker() -> str:
        started.set()
        gate.wait()
        return "blocker"

    fut = ex.submit(key, blocker)
    assert started.wait(T)
    return fut


def test_is_a_concurrent_futures_future(ex: Any) -> None:
    """Every future-returning method gives a KeyedFuture, a concurrent.futures.Future."""
    for fut in (
        ex.submit("k", int),
        ex.execute_with_error("k", int),
        ex.submit_with_context("k", background(), lambda c: 0),
    ):
        assert isinstance(fut, cf.Future) and isinstance(fut, KeyedFuture)
        assert type(fut) is _future.KeyedFuture
        assert fut.result(T) in (0, None)


def test_wait_and_as_completed(ex: Any, gate: threading.Event) -> None:
    """wait() splits done from not-done; as_completed yields each future once, as it finishes."""
    blocker = block(ex, "slow", gate)
    quick = [ex.submit(i, lambda i=i: i) for i in range(20)]
    done, not_done = cf.wait([blocker, *quick], timeout=T, return_when=cf.FIRST_COMPLETED)
    assert done and blocker in not_done
    done, not_done = cf.wait(quick, timeout=T)
    assert done == set(quick) and not not_done
    assert set(cf.as_completed(quick, timeout=T)) == set(quick)
    with pytest.raises(cf.TimeoutError):
        list(cf.as_completed([blocker], timeout=0.01))
    gate.set()
    assert next(cf.as_completed([blocker], timeout=T)) is blocker


def _collect_as_completed(fs: list[Any], out: list[Any]) -> threading.Thread:
    def run() -> None:
        out.extend(cf.as_completed(fs, timeout=T))

    t = threading.Thread(target=run)
    t.start()
    # Wait until as_completed has installed its waiter on every future, so the
    # cancellation below must reach it through the waiter, not a first look.
    assert wait_until(lambda: all(len(f._waiters) for f in fs))
    return t


@pytest.mark.parametrize("how", ["cancel_key", "shutdown(cancel_futures=True)"])
def test_as_completed_yields_futures_cancelled_by_the_executor(
    ex: Any, gate: threading.Event, how: str
) -> None:
    """as_completed and wait see futures the executor cancels, at once, via their waiters."""
    blocker = block(ex, "k", gate)
    queued = [ex.submit("k", int, i) for i in range(5)]
    out: list[Any] = []
    consumer = _collect_as_completed([blocker, *queued], out)
    if how == "cancel_key":
        assert ex.cancel_key("k") == 5
    else:
        ex.shutdown(wait=False, cancel_futures=True)
    # The cancelled ones arrive while the blocker still runs.
    assert wait_until(lambda: len(out) == 5)
    assert set(out) == set(queued) and all(f.cancelled() for f in out)
    done, not_done = cf.wait(queued, timeout=0)
    assert done == set(queued) and not not_done
    gate.set()
    consumer.join(T)
    assert out[-1] is blocker and len(out) == 6


def test_add_done_callback_called_exactly_once(ex: Any, gate: threading.Event) -> None:
    """Before completion: called once by the worker; after: called at once, in the caller."""
    calls: list[tuple[str, Any, str]] = []

    def cb(tag: str) -> Any:
        return lambda f: calls.append((tag, f, threading.current_thread().name))

    blocker = block(ex, "k", gate)
    pending = ex.submit("k", lambda: "value")
    cancelled = ex.submit("k", int)
    pending.add_done_callback(cb("before"))
    cancelled.add_done_callback(cb("cancelled"))
    assert cancelled.cancel()
    gate.set()
    assert pending.result(T) == "value"
    pending.add_done_callback(cb("after"))
    ex.submit("k", int).result(T)  # the worker has passed the cancelled task too
    assert blocker.result(T) == "blocker"
    me = threading.current_thread().name
    by_tag = {tag: (f, name) for tag, f, name in calls}
    assert len(calls) == len(by_tag) == 3
    assert by_tag["cancelled"] == (cancelled, me)  # run by cancel(), in this thread
    assert by_tag["after"] == (pending, me)  # already done: run at once
    assert by_tag["before"][0] is pending
    assert by_tag["before"][1].startswith("keyedexec-worker")  # run by the completing worker


def test_cancel_queued_running_and_finished(ex: Any, gate: threading.Event) -> None:
    """cancel(): True for a queued task, which then never runs; False once it started."""
    ran: list[str] = []
    running = block(ex, "k", gate)
    queued = ex.submit("k", ran.append, "queued")
    assert queued.cancel() and queued.cancel()  # idempotent
    assert queued.cancelled() and queued.done()
    assert not running.cancel() and running.running() and not running.done()
    gate.set()
    assert running.result(T) == "blocker"
    assert not running.cancel() and not running.cancelled()
    with pytest.raises(cf.CancelledError):
        queued.result(T)
    with pytest.raises(cf.CancelledError):
        queued.exception(T)
    ex.submit("k", int).result(T)
    assert ran == []
    assert wait_until(lambda: ex.metrics().cancelled == 1)


def test_result_and_exception_timeout_while_blocked(ex: Any, gate: threading.Event) -> None:
    """result(timeout) and exception(timeout) raise TimeoutError while the task waits."""
    block(ex, "k", gate)
    fut = ex.submit("k", lambda: 42)
    with pytest.raises(cf.TimeoutError):
        fut.result(timeout=0.01)
    with pytest.raises(cf.TimeoutError):
        fut.exception(timeout=0)
    assert not fut.done() and not fut.running()
    gate.set()
    assert fut.result(T) == 42


@pytest.mark.parametrize("how", ["result", "exception"])
def test_user_completing_a_running_future_is_not_overwritten(
    ex: Any, gate: threading.Event, how: str
) -> None:
    """set_result / set_exception by user code on a running task's future:
    its outcome stands when the task ends (the task's is dropped), the
    callbacks run once, and the worker carries on."""
    fut = block(ex, "k", gate)
    calls: list[Any] = []
    fut.add_done_callback(calls.append)
    if how == "result":
        fut.set_result("mine")
    else:
        fut.set_exception(Boom("mine"))
    gate.set()
    assert ex.wait_key("k", T)
    assert ex.submit("k", lambda: "next").result(T) == "next"
    if how == "result":
        assert fut.result(0) == "mine"
    else:
        assert str(fut.exception(0)) == "mine"
    assert calls == [fut]
    with pytest.raises(cf.InvalidStateError):
        fut.set_result("again")


def test_set_running_or_notify_cancel_twice_raises_as_the_stdlib() -> None:
    """Used as a plain Future (a hand-written executor): a second
    set_running_or_notify_cancel() is a RuntimeError, as on the stdlib's.
    (The pure future answered True again: PENDING -> RUNNING could not tell
    'I set RUNNING' from 'it was RUNNING already'.)"""
    for fut in (cf.Future(), KeyedFuture()):
        assert fut.set_running_or_notify_cancel() is True
        with pytest.raises(RuntimeError, match="unexpected state"):
            fut.set_running_or_notify_cancel()
        assert fut.running()
        fut.set_result(1)
        with pytest.raises(RuntimeError, match="unexpected state"):
            fut.set_running_or_notify_cancel()


def test_result_of_a_failed_future_makes_no_reference_cycle(ex: Any) -> None:
    """result() re-raises the task's exception without a cycle exception ->
    traceback -> result()'s frame -> future -> exception, as the stdlib does:
    the future (and what it holds) is freed by its last reference, and one
    whose exception outlives it (an exception object shared between tasks)
    is not kept alive by it. (The pure future's result() kept ``self`` in its
    frame: freed only by the cyclic GC, or never while the exception lived.)"""
    shared = Boom("shared")

    def raise_shared() -> None:
        raise shared

    for fn in (boom, raise_shared):
        fut = ex.submit("k", fn)
        assert isinstance(fut.exception(T), Boom)
        ref = weakref.ref(fut)
        gc.disable()
        try:
            with pytest.raises(Boom):
                fut.result()
            with pytest.raises(Boom):
                fut.result(T)
            del fut
            # Not at once: the worker drops its own reference to the task it finished
            # a moment after completing it (free-threaded builds show the gap).
            # A cycle never frees while the collector is off.
            assert wait_until(lambda: ref() is None, 5)
        finally:
            gc.enable()


def test_exception_for_failed_and_ok(ex: Any) -> None:
    """exception() is the raised exception, or None for a task that returned."""
    failed = ex.submit("k", boom)
    ok = ex.submit("k", int, "7")
    assert isinstance(failed.exception(T), Boom)
    assert ok.exception(T) is None and ok.result() == 7
    with pytest.raises(Boom):
        failed.result()


def test_asyncio_wrap_future(ex: Any, gate: threading.Event) -> None:
    """Awaiting wrap_future gives the result, whether the task finishes before or after."""
    done_first = ex.submit("a", lambda: "early")
    done_first.result(T)

    async def main() -> tuple[Any, ...]:
        early = await asyncio.wrap_future(done_first)
        block(ex, "b", gate)
        late = ex.submit("b", lambda: "late")
        failing = ex.submit("b", boom)
        waiter = asyncio.ensure_future(asyncio.wrap_future(late))
        await asyncio.sleep(0)
        assert not waiter.done()
        gate.set()
        with pytest.raises(Boom):
            await asyncio.wrap_future(failing)
        return early, await waiter

    assert asyncio.run(main()) == ("early", "late")


def test_repr_in_every_state(ex: Any, gate: threading.Event) -> None:
    """repr shows the stdlib states: pending, running, cancelled, finished."""
    running = block(ex, "k", gate)
    queued = ex.submit("k", int, 5)
    cancelled = ex.submit("k", int)
    cancelled.cancel()
    assert "state=running" in repr(running)
    assert "state=pending" in repr(queued)
    assert "state=cancelled" in repr(cancelled)
    gate.set()
    assert queued.result(T) == 5
    assert "state=finished returned int" in repr(queued)
    failed = ex.submit("k", boom)
    failed.exception(T)
    assert "state=finished raised Boom" in repr(failed)
    assert repr(queued).startswith("<KeyedFuture at 0x")


_BURST = """
import gc, threading
from keyedexec import KeyedExecutor
gate = threading.Event()
with KeyedExecutor(2) as ex:
    ex.execute("k", gate.wait, 10)
    futures = [ex.submit("k", abs, -i) for i in range(1000)]
    gate.set()
    assert [f.result(10) for f in futures] == list(range(1000))
# An instance's attributes are reported one by one when they sit inline, as
# one dict when the instance had to fall back to a dict of its own.
print(sum(any(type(r) is dict for r in gc.get_referents(f)) for f in futures))
"""


def test_futures_stay_dict_free_after_a_burst(impl: Any) -> None:
    """In a fresh interpreter, a thousand futures created before the first one
    completes still complete without a per-future dict: the native future
    keeps its state in C fields (an earlier design, built on CPython's shared
    attribute tables, gave every future a dict after such a burst)."""
    if impl.name != "native":
        pytest.skip("runs the native core in the child (without it futures carry a dict by design)")
    env = {k: v for k, v in os.environ.items() if k != "KEYEDEXEC_PURE_PYTHON"}
    proc = subprocess.run([sys.executable, "-c", _BURST], env=env, capture_output=True,
                          text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    assert proc.stdout.split() == ["0"]


def test_cancel_key_cancels_every_future_even_if_one_fails(ex: Any, gate: threading.Event) -> None:
    """If notifying one cancelled future raises (a Ctrl-C, say), the others are
    still cancelled, and the first error is raised after them."""
    block(ex, "k", gate)
    futures = [ex.submit("k", int, i) for i in range(5)]

    def interrupted() -> None:
        raise KeyboardInterrupt

    futures[1]._cancel_queued = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        ex.cancel_key("k")
    assert [f.cancelled() for f in futures] == [True, False, True, True, True]
    assert ex.metrics().pending == 0
