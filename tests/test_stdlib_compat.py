"""Moving from ThreadPoolExecutor to KeyedExecutor changes the submit call and nothing else.

Each test pins a difference found by running CPython's own concurrent.futures
tests against KeyedExecutor (every task on its own key): ``map``'s arguments
and cancellation, the shutdown messages, the constructor's ``max_workers``,
``thread_name_prefix``, ``initializer`` and ``initargs`` (with BrokenThreadPool),
KeyedFuture's ``cancel`` and its done-callbacks. Where the stdlib's behaviour
is stable across the supported versions, the same scenario also runs on
ThreadPoolExecutor itself, as the reference.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import Future
from concurrent.futures.thread import BrokenThreadPool
from typing import Any, Callable

import pytest
from conftest import NATIVE_AVAILABLE, wait_until

from keyedexec import KeyedFuture, _future, background

pytestmark = pytest.mark.timeout(60)

T = 10.0
BROKEN = "A thread initializer failed, the thread pool is not usable anymore"


class Boom(Exception):
    pass


# -- map ------------------------------------------------------------------------------


def test_map_timeout_cancels_the_call_it_waited_for(h: Any) -> None:
    """When map's timeout fires, the call waited on is cancelled too, as in the stdlib:
    with the one worker busy, neither call ever runs."""
    ex = h.executor(1)
    gate, _ = h.block(ex, "busy")
    log: list[str] = []
    it = ex.map(log.append, ["second", "third"], timeout=0)
    with pytest.raises(cf.TimeoutError):
        next(it)
    it.close()
    gate.set()
    ex.shutdown(wait=True)
    assert log == []
    assert ex.metrics().cancelled == 2


def test_map_accepts_and_ignores_chunksize(h: Any) -> None:
    """Executor.map's chunksize is accepted; threads ignore it, as ThreadPoolExecutor does."""
    ex = h.executor(2)
    assert list(ex.map(abs, [-1, -2, -3], chunksize=2)) == [1, 2, 3]
    assert list(ex.map(abs, [-4], chunksize=1, key=lambda i: "k")) == [4]


def test_map_buffersize_submits_ahead_only_that_many(h: Any) -> None:
    """buffersize (Executor.map, 3.14): at most that many calls are submitted ahead
    of the consumer, so an endless input works; closing cancels the rest."""
    ex = h.executor(2)
    it = ex.map(lambda i: i * 10, itertools.count(), buffersize=3)
    assert wait_until(lambda: ex.metrics().submitted == 3)
    assert [next(it) for _ in range(5)] == [0, 10, 20, 30, 40]
    # Each result taken submitted one more call: 5 + 3 ahead.
    assert ex.metrics().submitted == 8
    it.close()
    assert wait_until(lambda: ex.metrics().pending == 0 and ex.metrics().running == 0)
    assert ex.metrics().submitted == 8


def test_map_buffersize_with_key_keeps_order(h: Any) -> None:
    ex = h.executor(3)
    assert list(ex.map(str, range(20), key=lambda i: i % 2, buffersize=4)) == [
        str(i) for i in range(20)
    ]


@pytest.mark.parametrize(
    "value, error",
    [(0, ValueError), (-1, ValueError), (2.0, TypeError), ("2", TypeError)],
)
def test_bad_map_buffersize(h: Any, value: Any, error: type) -> None:
    ex = h.executor(1)
    with pytest.raises(error, match="buffersize must"):
        ex.map(abs, [1], buffersize=value)
    assert ex.metrics().submitted == 0


# -- shutdown messages ------------------------------------------------------------------


def _refusal(submit: Callable[[], object]) -> tuple[type, str]:
    with pytest.raises(RuntimeError) as info:
        submit()
    return type(info.value), str(info.value)


def test_shutdown_message_is_the_stdlib_one(h: Any) -> None:
    """Code in the wild matches on the stdlib's text: it is the same, word for word."""
    tpe = cf.ThreadPoolExecutor(1)
    tpe.shutdown()
    expected = _refusal(lambda: tpe.submit(abs, 1))
    assert expected == (RuntimeError, "cannot schedule new futures after shutdown")
    ex = h.executor(1)
    ex.shutdown()
    assert _refusal(lambda: ex.submit("k", abs, 1)) == expected
    assert _refusal(lambda: ex.execute("k", abs, 1)) == expected


def test_interpreter_shutdown_message_is_the_stdlib_one(h: Any) -> None:
    ex = h.executor(1)
    ex._sched._close_for_exit()  # what keyedexec._lifecycle does at interpreter exit
    assert _refusal(lambda: ex.submit("k", abs, 1)) == (
        RuntimeError, "cannot schedule new futures after interpreter shutdown"
    )


def test_key_view_shutdown_message_contains_the_stdlib_one(h: Any) -> None:
    view = h.executor(1).for_key("k")
    view.shutdown()
    kind, message = _refusal(lambda: view.submit(abs, 1))
    assert kind is RuntimeError and "cannot schedule new futures after shutdown" in message


# -- constructor ----------------------------------------------------------------------


def test_max_workers_is_an_alias_of_workers(impl: Any) -> None:
    ex = impl.KeyedExecutor(max_workers=3)
    try:
        assert ex.workers == 3
    finally:
        ex.shutdown()
    with pytest.raises(TypeError, match="max_workers"):
        impl.KeyedExecutor(2, max_workers=3)
    with pytest.raises(ValueError, match="max_workers"):
        impl.KeyedExecutor(max_workers=0)


def _thread_names(submit: Callable[[Callable[[], str]], Future[str]], n: int) -> set[str]:
    """The names of the worker threads that run ``n`` calls held together."""
    barrier = threading.Barrier(n, timeout=T)

    def name() -> str:
        barrier.wait()
        return threading.current_thread().name

    return {f.result(T) for f in [submit(name) for _ in range(n)]}


def test_thread_name_prefix_names_workers_like_thread_pool_executor(impl: Any) -> None:
    with cf.ThreadPoolExecutor(2, thread_name_prefix="db") as tpe:
        expected = _thread_names(tpe.submit, 2)
    assert expected == {"db_0", "db_1"}
    ex = impl.KeyedExecutor(2, thread_name_prefix="db")
    try:
        assert _thread_names(lambda fn: ex.submit(object(), fn), 2) == expected
    finally:
        ex.shutdown()


def test_default_thread_names_are_unchanged(impl: Any) -> None:
    for prefix in ({}, {"thread_name_prefix": ""}):
        ex = impl.KeyedExecutor(2, name="orders", **prefix)
        try:
            names = _thread_names(lambda fn: ex.submit(object(), fn), 2)
            assert names == {"orders-worker-1", "orders-worker-2"}
        finally:
            ex.shutdown()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"thread_name_prefix": 3}, TypeError, "thread_name_prefix must"),
        ({"initializer": "not callable"}, TypeError, "initializer must"),
        ({"initializer": print, "initargs": 5}, TypeError, "initargs must"),
    ],
)
def test_bad_compat_arguments(impl: Any, kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        impl.KeyedExecutor(1, **kwargs)


def test_positional_arguments_in_thread_pool_executor_order(impl: Any) -> None:
    """ThreadPoolExecutor(max_workers, thread_name_prefix, initializer, initargs)."""
    seen: list[tuple[str, int]] = []
    ex = impl.KeyedExecutor(1, "pos", lambda n: seen.append((threading.current_thread().name, n)), (7,))
    try:
        assert ex.submit("k", lambda: threading.current_thread().name).result(T) == "pos_0"
    finally:
        ex.shutdown()
    assert seen == [("pos_0", 7)]


def test_initializer_runs_once_per_worker_before_any_task(impl: Any) -> None:
    lock = threading.Lock()
    initialized: dict[str, tuple[Any, ...]] = {}

    def init(*args: Any) -> None:
        with lock:
            assert threading.current_thread().name not in initialized
            initialized[threading.current_thread().name] = args

    def task(i: int) -> bool:
        return threading.current_thread().name in initialized

    ex = impl.KeyedExecutor(3, initializer=init, initargs=("a", 1))
    try:
        assert all(ex.map(task, range(200)))
        assert all(ex.map(task, range(200), key=lambda i: i % 7))
    finally:
        ex.shutdown()
    assert 1 <= len(initialized) <= 3
    assert set(initialized.values()) == {("a", 1)}


def _broken_pool_outcomes(submit: Callable[..., Any], release: threading.Event) -> list[Any]:
    """Queue three calls behind a worker whose initializer is about to fail, let it
    fail, then submit once more: what each call became, and the late submit's error."""
    fs = [submit(abs, -1), submit(abs, -2), submit(abs, -3)]
    release.set()
    outcomes: list[Any] = []
    for f in fs:
        exc = f.exception(T)
        outcomes.append((type(exc), str(exc)))
    assert wait_until(lambda: _refused(submit) is not None)
    outcomes.append(_refused(submit))
    return outcomes


def _refused(submit: Callable[..., Any]) -> tuple[type, str] | None:
    try:
        submit(abs, 1).cancel()
    except RuntimeError as exc:
        return type(exc), str(exc)
    return None


def _failing_initializer(release: threading.Event) -> Callable[[], None]:
    def init() -> None:
        release.wait(T)
        raise Boom("init failed")

    return init


def test_initializer_failure_breaks_the_pool_like_thread_pool_executor(
    impl: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """If a worker's initializer raises: logged; the queued calls fail with
    BrokenThreadPool; later submits raise it; the workers exit."""
    release = threading.Event()
    tpe = cf.ThreadPoolExecutor(1, initializer=_failing_initializer(release))
    with caplog.at_level(logging.CRITICAL, "concurrent.futures"):
        expected = _broken_pool_outcomes(tpe.submit, release)
    tpe.shutdown()
    assert expected == [(BrokenThreadPool, BROKEN)] * 4

    release = threading.Event()
    ex = impl.KeyedExecutor(1, initializer=_failing_initializer(release))
    with caplog.at_level(logging.ERROR, "keyedexec"):
        caplog.clear()
        assert _broken_pool_outcomes(lambda fn, *a: ex.submit(fn, fn, *a), release) == expected
    assert [r.exc_info[0] for r in caplog.records if r.name == "keyedexec"] == [Boom]
    assert wait_until(lambda: ex.metrics().workers == 0)
    assert ex.closed
    with pytest.raises(BrokenThreadPool, match=BROKEN):
        ex.execute("k", abs, 1)
    ex.shutdown(wait=True)  # harmless on a broken pool


def test_initializer_failure_fails_every_kind_of_queued_task(impl: Any) -> None:
    """Futures fail with BrokenThreadPool (execute_with_error's *result* is it);
    fire-and-forget tasks are dropped and counted as cancelled."""
    release = threading.Event()
    errors: list[Any] = []
    ex = impl.KeyedExecutor(
        1, initializer=_failing_initializer(release), on_error=lambda k, e: errors.append(e)
    )
    sub = ex.submit("k", abs, -1)
    ex.execute("k", abs, -2)
    errval = ex.execute_with_error("k", abs, -3)
    ctx_sub = ex.submit_with_context("j", background(), lambda c: 1)
    ex.execute_with_context("j", background(), lambda c: 1)
    release.set()
    assert isinstance(sub.exception(T), BrokenThreadPool)
    assert isinstance(errval.result(T), BrokenThreadPool)
    assert isinstance(ctx_sub.exception(T), BrokenThreadPool)
    assert wait_until(lambda: ex.metrics().workers == 0)
    m = ex.metrics()
    assert (m.submitted, m.completed, m.cancelled, m.pending, m.active_keys) == (5, 0, 5, 0, 0)
    assert errors == []
    ex.shutdown()


def test_initializer_failure_never_loses_an_accepted_task(impl: Any) -> None:
    """Submitters race a failing initializer: every submit either raises
    BrokenThreadPool or returns a future that ends done (result or BrokenThreadPool)."""
    calls = itertools.count()
    accepted: list[Future[Any]] = []
    refused: list[int] = []  # appends: += would race without a GIL

    def init() -> None:
        if next(calls) == 0:  # the first worker fails, once the others run tasks
            assert wait_until(lambda: len(accepted) >= 100)
            raise Boom("init failed")

    ex = impl.KeyedExecutor(4, initializer=init)

    def submitter(base: int) -> None:
        for i in range(300):
            try:
                accepted.append(ex.submit((base, i % 5), abs, -i))
            except BrokenThreadPool:
                refused.append(1)

    threads = [threading.Thread(target=submitter, args=(b,)) for b in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    done, not_done = cf.wait(accepted, timeout=T)
    assert not not_done
    assert len(accepted) + len(refused) == 1200
    broken = [f for f in done if f.exception() is not None]
    assert all(isinstance(f.exception(), BrokenThreadPool) for f in broken)
    assert wait_until(lambda: ex.metrics().workers == 0)
    assert ex.closed
    m = ex.metrics()
    assert m.submitted == len(accepted) == m.completed + m.cancelled
    assert m.cancelled == len(broken)
    ex.shutdown()


# -- KeyedFuture ------------------------------------------------------------------------


@pytest.fixture(params=["native", "by_dict"])
def state_change(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """KeyedFuture's PENDING -> state change: the native core's, or the pure one's."""
    if request.param == "by_dict":
        monkeypatch.setattr(_future, "_set_state_if_pending", _future._set_state_if_pending_by_dict)
    elif not NATIVE_AVAILABLE:
        pytest.skip("keyedexec._core is not built")


def test_future_with_assigned_state_can_be_cancelled(state_change: None) -> None:
    """The stdlib's tests build futures in a state by assigning ``_state``."""
    f: KeyedFuture[Any] = KeyedFuture()
    f._state = "PENDING"
    assert f.cancel() and f.cancelled()
    with pytest.raises(cf.CancelledError):
        f.result(0)


def test_future_through_future_init_can_be_cancelled_and_completed(state_change: None) -> None:
    class Sub(KeyedFuture[Any]):
        def __init__(self) -> None:
            Future.__init__(self)

    f = Sub()
    assert f.cancel() and f.cancelled() and f.done()
    g = Sub()
    waiter = threading.Thread(target=lambda: g.result(T))
    waiter.start()
    g.set_result(5)
    waiter.join(T)
    assert g.result(0) == 5 and not waiter.is_alive()


def test_callback_exception_is_logged_and_later_callbacks_run(
    h: Any, caplog: pytest.LogCaptureFixture
) -> None:
    ex = h.executor(1)
    gate, f = h.block(ex, "k")
    calls: list[str] = []

    def fail(fut: Any) -> None:
        calls.append("fail")
        raise Boom("callback")

    f.add_done_callback(fail)
    f.add_done_callback(lambda fut: calls.append("second"))
    with caplog.at_level(logging.ERROR):
        gate.set()
        assert ex.submit("k", lambda: "after").result(T) == "after"
    assert calls == ["fail", "second"]
    assert any(r.exc_info and r.exc_info[0] is Boom for r in caplog.records)


def test_base_exception_from_a_callback_run_by_cancel_reaches_the_caller() -> None:
    """On the caller's thread (cancel()), the remaining callbacks run, then the
    BaseException propagates as in the stdlib: Ctrl-C and sys.exit() keep working."""
    f: KeyedFuture[Any] = KeyedFuture()
    calls: list[str] = []

    def interrupt(fut: Any) -> None:
        calls.append("interrupt")
        raise KeyboardInterrupt

    f.add_done_callback(interrupt)
    f.add_done_callback(lambda fut: calls.append("second"))
    with pytest.raises(KeyboardInterrupt):
        f.cancel()
    assert calls == ["interrupt", "second"] and f.cancelled()


def _child_env(impl: Any) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("KEYEDEXEC_REQUIRE_NATIVE", None)
    env.pop("KEYEDEXEC_PURE_PYTHON", None)
    env["KEYEDEXEC_PURE_PYTHON" if impl.name == "pure" else "KEYEDEXEC_REQUIRE_NATIVE"] = "1"
    return env


def test_done_callback_raising_system_exit_is_logged_and_the_worker_goes_on(impl: Any) -> None:
    """sys.exit() in a done-callback run by a worker: logged, the next callback runs,
    the worker serves the next task, and the process exits normally (it used to
    exit with the callback's code, or hang)."""
    code = textwrap.dedent("""
        import sys, threading
        import keyedexec
        from keyedexec import KeyedExecutor

        assert keyedexec.NATIVE is {native}
        ex = KeyedExecutor(1)
        gate = threading.Event()
        f = ex.submit("k", gate.wait, 10)
        f.add_done_callback(lambda f: sys.exit(3))
        f.add_done_callback(lambda f: print("second callback", flush=True))
        gate.set()
        print(ex.submit("k", lambda: "next task").result(10), flush=True)
        ex.shutdown(wait=True)
        print("done", flush=True)
    """).format(native=impl.name == "native")
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_child_env(impl), capture_output=True,
        text=True, timeout=30,
    )
    assert (proc.returncode, proc.stdout.splitlines()) == (
        0, ["second callback", "next task", "done"]
    ), proc.stderr
    assert "SystemExit" in proc.stderr


def test_base_exception_from_a_callback_of_a_dropped_task_still_notifies_waiters(h: Any) -> None:
    """cancel_key on the caller's thread: a callback's KeyboardInterrupt reaches the
    caller, and the future is cancelled *and notified*, so wait() sees it done."""
    ex = h.executor(1)
    gate, _ = h.block(ex, "k")
    queued = ex.submit("k", abs, -1)
    other = ex.submit("k", abs, -2)

    def interrupt(fut: Any) -> None:
        raise KeyboardInterrupt

    queued.add_done_callback(interrupt)
    with pytest.raises(KeyboardInterrupt):
        ex.cancel_key("k")
    done, not_done = cf.wait([queued, other], timeout=0)
    assert done == {queued, other} and not not_done
    gate.set()
