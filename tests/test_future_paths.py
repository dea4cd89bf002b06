"""Every fast path of KeyedFuture against its slow twin, and what it relies on.

A future nobody watches is completed by two field writes; one that somebody
watches (its condition exists: a waiter, ``result(timeout)``, ``cancel()``)
is completed under its condition, with waiters told and callbacks run. A
future already final when someone looks builds nothing. Each test here forces
both roads (``watched``) or both moments (before / after completion) and
checks the same outcome, on both schedulers. The last section checks the
CPython behaviour the native future relies on (src/_future.pxi), which the
CI runs on every CPython of its matrix.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import copy
import gc
import inspect
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any

import pytest
from conftest import wait_until
from test_future import T, Boom, block, boom, ex, gate  # noqa: F401  (fixtures)

from keyedexec import KeyedFuture, _future

try:
    from keyedexec import _core
except ImportError:  # pragma: no cover - exercised only without a build
    _core = None  # type: ignore[assignment]

pytestmark = pytest.mark.timeout(60)

NATIVE_FUTURE = _core is not None and issubclass(KeyedFuture, _core.FutureBase)
native_future = pytest.mark.skipif(not NATIVE_FUTURE, reason="KeyedFuture on the native core")


def watch(fut: Any, watched: bool) -> None:
    """Take the slow road: make the future's condition exist, as any waiter would."""
    if watched:
        with fut._condition:
            pass


both_roads = pytest.mark.parametrize("watched", [False, True], ids=["unwatched", "watched"])


# -- waiters: wait() and as_completed() ------------------------------------------------


@both_roads
def test_wait_all_first_completed_first_exception(ex: Any, gate: threading.Event,
                                                  watched: bool) -> None:
    """The three return_when modes over finished, failing and pending futures."""
    done_ok = ex.submit("a", int, 1)
    done_bad = ex.submit("a", boom)
    assert done_ok.result(T) == 1 and isinstance(done_bad.exception(T), Boom)
    blocker = block(ex, "k", gate)
    pending = [ex.submit("k", int, i) for i in range(3)]
    for f in (done_ok, done_bad, *pending):
        watch(f, watched)
    d, nd = cf.wait([done_ok, *pending], timeout=0, return_when=cf.FIRST_COMPLETED)
    assert d == {done_ok} and nd == set(pending)
    d, nd = cf.wait([done_bad, *pending], timeout=0, return_when=cf.FIRST_EXCEPTION)
    assert d == {done_bad} and nd == set(pending)
    d, nd = cf.wait([done_ok, *pending], timeout=0.01)
    assert d == {done_ok} and nd == set(pending)

    out: dict[str, Any] = {}
    waiter = threading.Thread(target=lambda: out.update(all=cf.wait([done_ok, *pending], T)))
    waiter.start()
    first = threading.Thread(
        target=lambda: out.update(first=cf.wait(pending, T, return_when=cf.FIRST_COMPLETED)))
    first.start()
    time.sleep(0.05)  # both waiting (a race here only moves a test to the other road)
    gate.set()
    waiter.join(T)
    first.join(T)
    assert out["all"].done == {done_ok, *pending} and not out["all"].not_done
    assert out["first"].done and out["first"].done <= set(pending)
    assert [f.result(0) for f in pending] == [0, 1, 2] and blocker.result(T) == "blocker"


@both_roads
def test_first_exception_wakes_on_a_task_that_fails_later(ex: Any, gate: threading.Event,
                                                          watched: bool) -> None:
    block(ex, "k", gate)
    bad = ex.submit("k", boom)
    never = ex.submit("other", threading.Event().wait, T)  # stays pending: wait returns early
    watch(bad, watched)
    threading.Timer(0.05, gate.set).start()
    d, nd = cf.wait([bad, never], timeout=T, return_when=cf.FIRST_EXCEPTION)
    assert d == {bad} and nd == {never}


@both_roads
def test_as_completed_over_a_mix_of_done_and_pending(ex: Any, gate: threading.Event,
                                                     watched: bool) -> None:
    done = [ex.submit("a", int, i) for i in range(5)]
    assert [f.result(T) for f in done] == list(range(5))
    block(ex, "k", gate)
    pending = [ex.submit("k", int, i) for i in range(5)]
    for f in done + pending:
        watch(f, watched)
    it = cf.as_completed(done + pending, timeout=T)
    first = [next(it) for _ in range(5)]
    assert set(first) == set(done)  # the finished ones first, before anything else finishes
    gate.set()
    assert list(it) == pending  # one key: they finish in order
    # Again, now that every one is final.
    assert set(cf.as_completed(done + pending, timeout=0)) == set(done + pending)


def test_waiters_removed_after_wait_and_as_completed(ex: Any, gate: threading.Event) -> None:
    """wait() and as_completed() take their waiter off every future when they return."""
    block(ex, "k", gate)
    pending = [ex.submit("k", int, i) for i in range(3)]
    cf.wait(pending, timeout=0.01)
    with pytest.raises(cf.TimeoutError):
        list(cf.as_completed(pending, timeout=0.01))
    assert all(len(f._waiters) == 0 for f in pending)
    gate.set()
    cf.wait(pending, T)
    assert all(len(f._waiters) == 0 for f in pending)


# -- result(timeout), from many threads --------------------------------------------------


def test_many_threads_polling_with_timeouts_while_it_completes(ex: Any,
                                                               gate: threading.Event) -> None:
    """16 threads loop on result(tiny timeout) on one future while it completes:
    every one gets the result, none hangs. (Found hangs in no build; kept as a
    guard on the condition's wait/timeout/notify hand-over.)"""
    for round_ in range(20):
        local_gate = threading.Event()
        ex.execute("b", local_gate.wait, T)
        fut = ex.submit("b", lambda: "v")
        results: list[str] = []

        def poll(timeout: float) -> None:
            while True:
                try:
                    results.append(fut.result(timeout=timeout))
                    return
                except cf.TimeoutError:
                    pass

        threads = [threading.Thread(target=poll, args=((0, 0.0001, 0.001)[i % 3],))
                   for i in range(16)]
        for t in threads:
            t.start()
        time.sleep(0.001 * (round_ % 5))
        local_gate.set()
        for t in threads:
            t.join(T)
        assert not any(t.is_alive() for t in threads)
        assert results == ["v"] * 16


def test_wait_over_thousands_from_several_threads_while_workers_complete(ex: Any) -> None:
    fs = [ex.submit(i % 50, abs, -i) for i in range(3000)]
    out: dict[str, Any] = {}
    threads = [
        threading.Thread(target=lambda: out.update(all=cf.wait(fs, T))),
        threading.Thread(target=lambda: out.update(ac=list(cf.as_completed(fs, T)))),
        threading.Thread(target=lambda: out.update(
            first=cf.wait(fs, T, return_when=cf.FIRST_EXCEPTION))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T * 2)
    assert not out["all"].not_done and not out["first"].not_done
    assert sorted(f.result() for f in out["ac"]) == list(range(3000))


# -- callbacks ----------------------------------------------------------------------------


@both_roads
def test_callbacks_before_and_after_completion(ex: Any, gate: threading.Event,
                                               watched: bool) -> None:
    calls: list[tuple[str, str]] = []

    def cb(tag: str) -> Any:
        return lambda f: calls.append((tag, threading.current_thread().name))

    block(ex, "k", gate)
    fut = ex.submit("k", lambda: 1)
    watch(fut, watched)
    fut.add_done_callback(cb("before-1"))
    fut.add_done_callback(cb("before-2"))
    gate.set()
    assert fut.result(T) == 1
    assert wait_until(lambda: len(calls) == 2)
    fut.add_done_callback(cb("after"))
    assert [tag for tag, _ in calls] == ["before-1", "before-2", "after"]
    assert calls[0][1] != threading.current_thread().name  # the worker ran them
    assert calls[2][1] == threading.current_thread().name  # done already: run at once


@both_roads
def test_callbacks_that_raise_are_logged_and_the_others_run(
    ex: Any, gate: threading.Event, watched: bool, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []

    def bad(f: Any) -> None:
        ran.append("bad")
        raise Boom("in callback")

    def exits(f: Any) -> None:
        ran.append("exit")
        raise SystemExit(3)  # on a worker: logged too, the worker goes on

    block(ex, "k", gate)
    fut = ex.submit("k", int, 5)
    watch(fut, watched)
    for cb in (bad, exits, lambda f: ran.append("good")):
        fut.add_done_callback(cb)
    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        gate.set()
        assert fut.result(T) == 5
        assert wait_until(lambda: len(ran) == 3)
        assert ran == ["bad", "exit", "good"]
        assert ex.submit("k", int, 6).result(T) == 6  # the worker survived
        fut.add_done_callback(bad)  # after completion: in the caller, logged as well
    assert ran[-1] == "bad"
    logged = [r for r in caplog.records if "exception calling callback" in r.getMessage()]
    assert len(logged) == 3


def test_callbacks_that_add_callbacks_and_read_the_result(ex: Any, gate: threading.Event) -> None:
    seen: list[Any] = []

    def outer(f: Any) -> None:
        seen.append(("outer", f.result(0), f.done()))
        f.add_done_callback(lambda g: seen.append(("inner", g.result(0))))

    block(ex, "k", gate)
    fut = ex.submit("k", int, 9)
    fut.add_done_callback(outer)
    gate.set()
    assert wait_until(lambda: len(seen) == 2)
    assert seen == [("outer", 9, True), ("inner", 9)]


def test_callback_raising_base_exception_on_the_caller_thread_is_raised(ex: Any,
                                                                        gate: threading.Event) -> None:
    """cancel() runs the callbacks in the caller: a KeyboardInterrupt there
    reaches the caller once all callbacks ran (as the stdlib lets it through)."""
    ran: list[str] = []

    def interrupt(f: Any) -> None:
        ran.append("interrupt")
        raise KeyboardInterrupt

    block(ex, "k", gate)
    fut = ex.submit("k", int)
    fut.add_done_callback(interrupt)
    fut.add_done_callback(lambda f: ran.append("next"))
    with pytest.raises(KeyboardInterrupt):
        fut.cancel()
    assert ran == ["interrupt", "next"] and fut.cancelled()


# -- cancel() at each moment ----------------------------------------------------------------


@both_roads
@pytest.mark.parametrize("moment", ["queued", "queued-with-waiter", "running", "done"])
def test_cancel_at_each_moment(ex: Any, gate: threading.Event, watched: bool,
                               moment: str) -> None:
    ran: list[int] = []
    calls: list[Any] = []
    out: dict[str, Any] = {}
    waiter = None
    if moment == "running":
        fut = block(ex, "k", gate)
    elif moment == "done":
        fut = ex.submit("k", ran.append, 1)
        fut.result(T)
    else:
        block(ex, "k", gate)
        fut = ex.submit("k", ran.append, 1)
        if moment == "queued-with-waiter":
            waiter = threading.Thread(target=lambda: out.update(w=cf.wait([fut], T)))
            waiter.start()
            assert wait_until(lambda: len(fut._waiters) == 1)
    watch(fut, watched)
    fut.add_done_callback(calls.append)
    expected = moment.startswith("queued")
    assert fut.cancel() is expected
    assert fut.cancel() is expected  # idempotent
    if expected:
        assert fut.cancelled() and fut.done() and calls == [fut]
        with pytest.raises(cf.CancelledError):
            fut.result(0)
    gate.set()
    ex.submit("k", int).result(T)  # the worker has passed the cancelled task
    if expected:
        assert ran == [] and calls == [fut]
        if waiter is not None:  # told as the stdlib tells: when the worker reaches the task
            waiter.join(T)
            assert out["w"].done == {fut}
        assert set(cf.as_completed([fut], timeout=0)) == {fut}
    else:
        assert not fut.cancelled() and fut.result(T) in (None, "blocker")
        assert wait_until(lambda: calls == [fut])


# -- asyncio --------------------------------------------------------------------------------


def test_wrap_future_cancelled_from_asyncio_cancels_a_queued_task(ex: Any,
                                                                  gate: threading.Event) -> None:
    ran: list[str] = []
    block(ex, "k", gate)
    queued = ex.submit("k", ran.append, "queued")

    async def main() -> None:
        wrapper = asyncio.wrap_future(queued)
        await asyncio.sleep(0)
        wrapper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await wrapper
        # _chain_future cancels the source from the loop: give it the turn.
        for _ in range(100):
            if queued.cancelled():
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert queued.cancelled()
    gate.set()
    ex.submit("k", int).result(T)
    assert ran == []


@both_roads
def test_wrap_future_before_and_after_completion(ex: Any, gate: threading.Event,
                                                 watched: bool) -> None:
    async def main() -> list[Any]:
        early = ex.submit("a", int, 1)
        early.result(T)
        block(ex, "k", gate)
        late = [ex.submit("k", int, i) for i in range(20)]
        bad = ex.submit("k", boom)
        for f in (early, *late, bad):
            watch(f, watched)
        wrapped = [asyncio.wrap_future(f) for f in (early, *late, bad)]
        gate.set()
        return await asyncio.gather(*wrapped, return_exceptions=True)

    out = asyncio.run(main())
    assert out[:21] == [1, *range(20)] and isinstance(out[21], Boom)


# -- copy and pickle --------------------------------------------------------------------------


def test_copy_of_a_finished_future_has_its_outcome(ex: Any) -> None:
    ok = ex.submit("k", int, 4)
    bad = ex.submit("k", boom)
    assert ok.result(T) == 4 and bad.exception(T) is not None
    assert copy.copy(ok).result(0) == 4
    assert isinstance(copy.copy(bad).exception(0), Boom)


class Tagged(KeyedFuture[Any]):
    """A subclass whose __init__ needs an argument, with an attribute of its own."""

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag


def test_copy_of_a_subclass_keeps_its_type_and_attributes() -> None:
    """copy.copy never calls __init__ (as for the stdlib's Future): a subclass
    whose __init__ takes arguments is copied too, with its own attributes.
    (The native copy called ``type(self)()``: TypeError, attributes lost.)"""
    fut = Tagged("t")
    fut.set_result(5)
    dup = copy.copy(fut)
    assert type(dup) is Tagged and dup.tag == "t" and dup.result(0) == 5


def test_pickling_a_future_is_a_clear_type_error(ex: Any, gate: threading.Event) -> None:
    """As the stdlib's Future (its lock cannot be pickled): in every state,
    watched or not. (The pure future pickled while nobody watched it: a queued
    task's future arrived elsewhere as a PENDING future that never ends.)"""
    fut = ex.submit("k", int, 4)
    fut.result(T)
    block(ex, "b", gate)
    queued = ex.submit("b", int, 5)
    for f in (fut, queued, KeyedFuture()):
        with pytest.raises(TypeError, match="cannot pickle 'KeyedFuture'"):
            pickle.dumps(f)
        with pytest.raises(TypeError, match="cannot pickle 'KeyedFuture'"):
            copy.deepcopy(f)
    gate.set()
    assert queued.result(T) == 5


# -- the native condition ----------------------------------------------------------------------


@native_future
def test_a_final_future_builds_no_condition() -> None:
    """wait() over finished futures, and a late add_done_callback, build nothing:
    every final future answers with one shared, lock-free condition."""
    a: KeyedFuture[Any] = KeyedFuture()
    b: KeyedFuture[Any] = KeyedFuture()
    for f in (a, b):
        assert f._claim()
        f._set_outcome(1, None)
    assert cf.wait([a, b], timeout=0).done == {a, b}
    assert a._condition is b._condition
    assert type(a._condition).__name__ == "_FinalCondition"
    pending: KeyedFuture[Any] = KeyedFuture()
    assert pending._condition is not a._condition and pending._condition is pending._condition


@native_future
def test_native_condition_behaves_like_threading_condition() -> None:
    cond = KeyedFuture()._condition
    with pytest.raises(RuntimeError):
        cond.release()
    with pytest.raises(RuntimeError):
        cond.wait(0)
    with pytest.raises(RuntimeError):
        cond.notify()
    with pytest.raises(ValueError):
        cond.acquire(False, 1)
    with cond:
        with cond:  # reentrant, as Future's RLock-based condition
            assert cond._is_owned()
        assert cond.wait(0.01) is False  # timed out, lock held again
        assert cond._is_owned()
        assert cond.wait_for(lambda: 42, 0) == 42
        other: dict[str, Any] = {}
        t = threading.Thread(target=lambda: other.update(got=cond.acquire(timeout=0.05),
                                                         now=cond.acquire(False)))
        t.start()
        t.join(T)
        assert other == {"got": False, "now": False}
    assert not cond._is_owned()

    woken: list[int] = []

    def waiter(i: int) -> None:
        with cond:
            if cond.wait(T):
                woken.append(i)

    threads = [threading.Thread(target=waiter, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()

    time.sleep(0.1)  # all three in wait()
    with cond:
        cond.notify(2)
    assert wait_until(lambda: len(woken) == 2)
    time.sleep(0.05)
    assert len(woken) == 2  # notify(2) woke two, not three
    with cond:
        cond.notify_all()
    for t in threads:
        t.join(T)
    assert sorted(woken) == [0, 1, 2]


@native_future
def test_worker_completes_a_future_whose_condition_is_a_threading_condition() -> None:
    """A subclass may run Future.__init__ (a threading.Condition): the native
    completion notifies through it too."""
    fut: KeyedFuture[Any] = KeyedFuture()
    fut._condition = threading.Condition()
    fut._waiters = []
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(cf.wait([fut], T)))
    t.start()
    assert wait_until(lambda: len(fut._waiters) == 1)
    assert fut._claim()
    fut._set_outcome(None, Boom("x"))
    t.join(T)
    assert out[0].done == {fut} and isinstance(fut.exception(0), Boom)


_SIGNALS = """
import signal, threading, time, concurrent.futures as cf
from keyedexec import KeyedExecutor
class Alarm(Exception): pass
def alarm(*a): raise Alarm()
ex = KeyedExecutor(2)
gate = threading.Event()
ex.execute("k", gate.wait, 30)
f = ex.submit("k", lambda: 7)
for wait in (lambda: f.result(20), lambda: cf.wait([f], 20), lambda: list(cf.as_completed([f], 20))):
    signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.05)
    try:
        wait()
        raise SystemExit("the handler's exception did not interrupt the wait")
    except Alarm:
        pass
    assert f._condition.acquire(timeout=5), "lock left held"
    f._condition.release()
hits = []
signal.signal(signal.SIGALRM, lambda *a: hits.append(1))
signal.setitimer(signal.ITIMER_REAL, 0.02, 0.02)
threading.Timer(0.2, gate.set).start()
assert f.result(20) == 7 and hits
signal.setitimer(signal.ITIMER_REAL, 0)
ex.shutdown()
print("ok")
"""


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs SIGALRM and setitimer")
def test_signal_handlers_run_during_waits_and_can_interrupt_them(impl: Any) -> None:
    """On the main thread, a wait runs signal handlers (Ctrl-C) while it waits:
    one that raises ends the wait and leaves the condition unlocked; one that
    does not lets the wait go on to the result."""
    proc = subprocess.run([sys.executable, "-c", _SIGNALS], env=_child_env(impl),
                          capture_output=True, text=True, timeout=45)
    assert (proc.returncode, proc.stdout.strip()) == (0, "ok"), proc.stderr


_FORK = """
import os, threading, time, concurrent.futures as cf
from keyedexec import KeyedExecutor
ex = KeyedExecutor(2)
gate = threading.Event()
running = ex.submit("k", gate.wait, 30)
queued = [ex.submit("k", int, i) for i in range(3)]
for f in queued:
    f.add_done_callback(lambda f: None)
waiters = [threading.Thread(target=lambda f=f: cf.wait([f], 30)) for f in [running, *queued]]
for t in waiters:
    t.start()
HOLD = os.environ["HOLD"] == "1"
held, release = threading.Event(), threading.Event()
def holder():
    with running._condition:
        held.set()
        release.wait(30)
if HOLD:
    threading.Thread(target=holder).start()
    held.wait(30)
time.sleep(0.1)
pid = os.fork()
if pid == 0:
    ok = running.cancelled() and all(f.cancelled() for f in queued)
    ok = ok and not cf.wait([running, *queued], timeout=10).not_done
    ok = ok and len(list(cf.as_completed(queued, timeout=10))) == 3
    with KeyedExecutor(1) as fresh:
        ok = ok and fresh.submit("x", int, 3).result(10) == 3
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
release.set()
gate.set()
assert [f.result(10) for f in queued] == [0, 1, 2]
ex.shutdown()
print(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("hold", [False, True], ids=["waiters", "condition-held"])
def test_fork_while_futures_are_watched(impl: Any, hold: bool) -> None:
    """A child forked while threads wait on futures (or hold a future's
    condition) finds them cancelled, can wait on them, and can run a new
    executor. (With the condition held by another thread at the fork, the
    child used to hang forever on it.)"""
    if hold and (impl.name == "pure" or not NATIVE_FUTURE):
        pytest.skip("the pure future's threading.Condition is not reset across fork")
    env = {**_child_env(impl), "HOLD": "1" if hold else "0"}
    proc = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-c", _FORK],
                          env=env, capture_output=True, text=True, timeout=45)
    assert (proc.returncode, proc.stdout.strip()) == (0, "0"), proc.stderr


def _child_env(impl: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KEYEDEXEC_PURE_PYTHON"}
    if impl.name == "pure":
        env["KEYEDEXEC_PURE_PYTHON"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(_future.__file__))),
         *filter(None, [env.get("PYTHONPATH")])])
    return env


# -- what the native future relies on in CPython (src/_future.pxi) -----------------------------


def test_future_init_sets_exactly_the_attributes_keyedfuture_provides() -> None:
    """KeyedFuture skips Future.__init__; it must provide everything that sets."""
    assert set(vars(Future())) == {"_condition", "_state", "_result", "_exception",
                                   "_waiters", "_done_callbacks"}


def test_the_stdlib_uses_only_what_the_native_condition_and_waiters_implement() -> None:
    """concurrent.futures and asyncio touch a future's condition, waiter list and
    waiters only through the calls FutureBase's stand-ins implement."""
    import asyncio.futures
    import concurrent.futures._base as base

    source = inspect.getsource(base)
    assert set(re.findall(r"_condition\.(\w+)", source)) <= {
        "acquire", "release", "wait", "wait_for", "notify", "notify_all"}
    assert set(re.findall(r"_waiters\.(\w+)", source)) <= {"append", "remove"}
    assert set(re.findall(r"waiter\.(add_\w+)", source)) <= {
        "add_result", "add_exception", "add_cancelled"}
    aio = inspect.getsource(asyncio.futures)
    assert "_condition" not in aio and "_waiters" not in aio


@native_future
def test_keyedfuture_layout_on_this_cpython() -> None:
    """A class deriving from the C type and from Future: the C fields hold the
    state the stdlib reads and writes (its properties win over the instance
    dict), Future.__init__ does not run, and no instance dict is ever made."""
    assert KeyedFuture.__mro__[1:] == (_core.FutureBase, Future, object)
    fut: KeyedFuture[Any] = KeyedFuture()
    assert isinstance(fut, Future) and fut._state == "PENDING" and not fut.done()
    Future.set_result(fut, 3)  # the stdlib's own code, through the properties
    assert fut.result(0) == 3 and fut._state == "FINISHED" and fut.done()
    assert not any(type(r) is dict for r in gc.get_referents(fut))


@native_future
def test_futures_of_a_busy_executor_never_get_an_instance_dict(ex: Any,
                                                               gate: threading.Event) -> None:
    block(ex, "k", gate)
    cancelled = ex.submit("k", int)
    queued = ex.submit("k", int, 7)
    watched = ex.submit("k", int, 8)
    watched.add_done_callback(lambda f: None)
    assert cancelled.cancel()
    gate.set()
    assert queued.result(T) == 7 and cf.wait([watched], T).done == {watched}
    for f in (cancelled, queued, watched):
        assert not any(type(r) is dict for r in gc.get_referents(f))
