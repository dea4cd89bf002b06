"""Torture tests: the guarantees that executors elsewhere shipped broken.

* exactly once and in order under concurrent submitters (tasks lost between
  "add" and "worker goes idle": netty);
* shutdown racing submitters: every submit is rejected or ends done, never
  accepted and forgotten (Elasticsearch, netty, the Go keyedexecutor);
* tasks raising BaseException or an ``on_error`` that raises: the worker lives on;
* bad input: a clear error, nothing queued, the executor still usable;
* the ThreadPoolExecutor behaviours CPython's test_concurrent_futures checks
  that apply to a keyed executor (rewritten as behaviours, not copied).

Process-level cases (interpreter exit, fork, signals) are in test_process.py,
leaks in test_leaks.py, the native-vs-pure model check in test_model.py.
"""

from __future__ import annotations

import concurrent.futures
import gc
import logging
import random
import sys
import sysconfig
import threading
import time
import weakref
from typing import Any

import pytest

from conftest import STRESS, wait_until
from keyedexec import Cancelled, QueueFull, background
from keyedexec.executor import default_workers


# Free-threaded builds use biased reference counting: an object that a worker
# created and this thread dropped is freed when that worker next runs Python
# code, or at gc.collect() (which merges every thread's queue). Not a leak.
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


class Boom(Exception):
    """The exception planted tasks raise."""


def _released(ref: weakref.ref[Any]) -> bool:
    """The referent is gone: by reference counting alone on GIL builds."""
    if FREE_THREADED:
        gc.collect()
    return ref() is None


def _scaled(n: int, minimum: int = 1) -> int:
    return max(minimum, int(n * STRESS))


def _quiet(key: object, exc: BaseException) -> None:
    """An on_error that swallows (tests that count failures another way)."""


def _settle(futures: list[Any], timeout: float = 10) -> list[Any]:
    """The futures not done after waiting up to ``timeout`` for each in turn.

    Waits per future rather than with concurrent.futures.wait(), whose early
    return is a separate bug (test_stdlib_wait_and_as_completed_count_each_future_once).
    """
    end = time.monotonic() + timeout
    for f in futures:
        try:
            f.exception(max(0.0, end - time.monotonic()))
        except (concurrent.futures.CancelledError, concurrent.futures.TimeoutError):
            pass
    return [f for f in futures if not f.done()]


# -- 1. exactly once, in order ------------------------------------------------------------


@pytest.mark.timeout(240)
def test_exactly_once_in_submitter_order(impl: Any) -> None:
    """8 threads submit to 10,000 keys (a skewed mix of execute, submit and
    execute_with_error, ~10% raising): every accepted task runs exactly once,
    each key runs each submitter's tasks in that submitter's order, and no two
    tasks of a key ever overlap."""
    submitters, nkeys = 8, 10_000
    per_thread = _scaled(20_000, 100)
    total = submitters * per_thread
    runs: list[list[tuple[int, int]]] = [[] for _ in range(nkeys)]
    active = [0] * nkeys
    overlaps: list[int] = []
    reported: list[tuple[object, BaseException]] = []

    def task(key: int, sub: int, seq: int, fail: bool, pause: bool) -> tuple[int, int]:
        if active[key]:
            overlaps.append(key)
        active[key] = 1
        runs[key].append((sub, seq))
        if pause:
            time.sleep(0)  # hand the GIL over while "inside" the key
        active[key] = 0
        if fail:
            raise Boom(sub, seq)
        return sub, seq

    # Per submitter: (key, seq, method, fail, future or None) in submission order.
    plans: list[list[tuple[int, int, str, bool, Any]]] = [[] for _ in range(submitters)]
    start = threading.Barrier(submitters)

    def submitter(ex: Any, sub: int) -> None:
        rng = random.Random(sub)
        plan = plans[sub]
        start.wait()
        for seq in range(per_thread):
            key = int(nkeys * rng.random() ** 3)  # skewed: a few long per-key chains
            fail = rng.random() < 0.1
            pause = rng.random() < 0.01
            how = rng.random()
            if how < 0.6:
                ex.execute(key, task, key, sub, seq, fail, pause)
                plan.append((key, seq, "execute", fail, None))
            elif how < 0.9:
                plan.append((key, seq, "submit", fail, ex.submit(key, task, key, sub, seq, fail, pause)))
            else:
                f = ex.execute_with_error(key, task, key, sub, seq, fail, pause)
                plan.append((key, seq, "error", fail, f))

    ex = impl.KeyedExecutor(8, on_error=lambda k, e: reported.append((k, e)))
    try:
        threads = [threading.Thread(target=submitter, args=(ex, s)) for s in range(submitters)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        ex.shutdown(wait=True)

    expected: list[list[tuple[int, int]]] = [[] for _ in range(nkeys)]
    for sub in range(submitters):
        for key, seq, _, _, _ in plans[sub]:
            expected[key].append((sub, seq))
    nfail = 0
    for sub in range(submitters):
        for key, seq, how, fail, fut in plans[sub]:
            nfail += fail
            if how == "submit":
                if fail:
                    assert isinstance(fut.exception(0), Boom)
                    assert fut.exception(0).args == (sub, seq)
                else:
                    assert fut.result(0) == (sub, seq)
            elif how == "error":
                err = fut.result(0)
                assert (err.args == (sub, seq)) if fail else err is None
    ran = sum(map(len, runs))
    for key in range(nkeys):
        # Exactly once and in order, per submitter: the key's log restricted to
        # one submitter is that submitter's submissions to the key.
        for sub in range(submitters):
            got = [seq for s, seq in runs[key] if s == sub]
            want = [seq for s, seq in expected[key] if s == sub]
            assert got == want, (key, sub)
    assert ran == total
    assert not overlaps
    # Fire-and-forget failures reach on_error once each, with their own key.
    executes_failed = {
        (key, sub, seq)
        for sub, plan in enumerate(plans)
        for key, seq, how, fail, _ in plan
        if how == "execute" and fail
    }
    assert len(reported) == len(executes_failed)
    assert {(k, *e.args) for k, e in reported} == executes_failed
    m = ex.metrics()
    assert (m.submitted, m.completed, m.failed, m.cancelled) == (total, total, nfail, 0)
    assert (m.pending, m.running, m.active_keys, m.workers) == (0, 0, 0, 0)
    busiest = max(map(len, runs))
    print(
        f"\n[{impl}] exactly-once: {total} tasks from {submitters} threads on "
        f"{sum(1 for r in runs if r)} keys (busiest key {busiest} tasks): ran {ran}, "
        f"raised {nfail} (reported to on_error {len(reported)}), overlaps {len(overlaps)}"
    )


# -- 3. shutdown racing submitters --------------------------------------------------------


def _race_round(impl: Any, rng: random.Random, wait: bool, cancel: bool) -> tuple[int, int]:
    """One round: 3 threads submit while the main thread shuts down.

    Returns (accepted, rejected) submits.
    """
    ex = impl.KeyedExecutor(2, on_error=_quiet)
    ran: list[int] = []
    futures: list[concurrent.futures.Future[Any]] = []
    accepted = [0, 0, 0]  # one slot per submitter: no shared counter to race on
    rejected = [0, 0, 0]
    go = threading.Barrier(4)

    def submitter(n: int) -> None:
        go.wait()
        for i in range(300):
            try:
                if i % 2:
                    futures.append(ex.submit(i % 7, ran.append, i))
                else:
                    ex.execute(i % 5, ran.append, i)
            except RuntimeError as exc:
                assert "after shutdown" in str(exc)
                rejected[n] += 1
                return
            accepted[n] += 1

    threads = [threading.Thread(target=submitter, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    go.wait()
    if rng.random() < 0.7:
        time.sleep(rng.choice([0, 0.00005, 0.0002, 0.001]))
    ex.shutdown(wait=wait, cancel_futures=cancel)
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    # Every accepted future ends done, whatever the variant (wait=False included).
    assert not _settle(futures)
    ex.shutdown(wait=True)
    m = ex.metrics()
    assert m.submitted == sum(accepted)
    # Nothing accepted is forgotten: each task ran or was cancelled, and is counted.
    assert len(ran) + m.cancelled == m.submitted
    assert m.completed == len(ran)
    assert (m.pending, m.running, m.workers, m.active_keys) == (0, 0, 0, 0)
    cancelled = sum(f.cancelled() for f in futures)
    if cancel:
        assert cancelled <= m.cancelled
    else:
        assert m.cancelled == 0 and cancelled == 0
        assert all(f.result(0) is None for f in futures)
    return sum(accepted), sum(rejected)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "wait, cancel", [(True, False), (True, True), (False, False), (False, True)],
    ids=["wait", "wait-cancel", "nowait", "nowait-cancel"],
)
def test_shutdown_races_submitters(impl: Any, wait: bool, cancel: bool) -> None:
    """Threads submit while shutdown() runs, many times over: each submit either
    raises RuntimeError or yields a task that ends done (ran, or cancelled by
    cancel_futures), counted in metrics; nothing hangs."""
    rng = random.Random(f"{wait}{cancel}")
    rounds = _scaled(40, 2)
    accepted = rejected = 0
    for _ in range(rounds):
        a, r = _race_round(impl, rng, wait, cancel)
        accepted += a
        rejected += r
    print(f"\n[{impl}] shutdown race x{rounds}: accepted {accepted}, rejected {rejected}")


@pytest.mark.timeout(60)
def test_stop_races_pool_submitters(impl: Any) -> None:
    """TaskPool: submits racing stop() are rejected, run, or counted as discarded."""
    rng = random.Random(7)
    for _ in range(_scaled(40, 2)):
        pool = impl.TaskPool(queue_size=50, max_workers=2)
        pool.start()
        ran: list[int] = []
        accepted = [0, 0, 0]
        go = threading.Barrier(4)

        def submitter(n: int) -> None:
            go.wait()
            for i in range(200):
                try:
                    pool.submit(i % 3, lambda ctx, i=i: ran.append(i), timeout=5)
                except RuntimeError:
                    return
                accepted[n] += 1

        threads = [threading.Thread(target=submitter, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        go.wait()
        time.sleep(rng.choice([0, 0.0001, 0.001]))
        assert pool.stop(timeout=10)
        for t in threads:
            t.join(10)
            assert not t.is_alive()
        m = pool.metrics()
        assert m.submitted == sum(accepted)
        assert len(ran) + m.discarded == sum(accepted)
        assert (m.pending, m.running, m.workers) == (0, 0, 0)


# -- re-entrancy: finalizers and shutdown from inside the executor -------------------------


class _Resubmitter:
    """Submits a follow-up to the executor when it is destroyed (a __del__ that
    runs wherever the scheduler drops its last reference)."""

    def __init__(self, ex: Any, out: list[str], tag: str) -> None:
        self.ex, self.out, self.tag = ex, out, tag

    def __hash__(self) -> int:
        return hash(self.tag)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Resubmitter) and other.tag == self.tag

    def __call__(self, *args: Any, fail: bool = False, **kwargs: Any) -> "_Resubmitter":
        if fail:
            raise Boom(self.tag)
        return _Resubmitter(self.ex, self.out, self.tag + "-result")

    def __del__(self) -> None:
        self.out.append(self.tag)
        try:
            self.ex.execute("follow-up", abs, -1)
        except RuntimeError:
            pass  # after shutdown: refused, as it should be


@pytest.mark.timeout(60)
def test_finalizers_that_submit_do_not_deadlock(impl: Any) -> None:
    """Keys, callables, arguments and results whose __del__ submits to the same
    executor, released on every path (run, failed, cancelled future, cancel_key,
    cancelled context, shutdown(cancel_futures=True)): no deadlock, and each
    follow-up is either run or refused after shutdown."""
    out: list[str] = []
    gate = threading.Event()
    ctx, cancel = background().with_cancel()
    ex = impl.KeyedExecutor(2, on_error=_quiet)
    try:
        def r(tag: str) -> _Resubmitter:
            return _Resubmitter(ex, out, tag)

        ex.submit("gate", gate.wait, 30)
        ex.submit(r("key-a"), r("fn-a"), r("arg-a"), kw=r("kw-a")).result(10)
        assert isinstance(ex.execute_with_error("k", r("fn-b"), r("arg-b"), fail=True).result(10), Boom)
        ex.submit("gate", r("fn-c"), r("arg-c")).cancel()
        ex.execute("gate", r("fn-d"), r("arg-d"))
        assert ex.cancel_key("gate") == 2
        ex.submit_with_context("gate", ctx, r("fn-e"))
        cancel()
        ex.execute("gate", r("fn-f"), r("arg-f"))
        ex.shutdown(wait=False, cancel_futures=True)
    finally:
        gate.set()
        ex.shutdown(wait=True)
    del r
    gc.collect()
    assert sorted(out) == sorted([
        "key-a", "fn-a", "arg-a", "kw-a", "fn-a-result", "fn-b", "arg-b",
        "fn-c", "arg-c", "fn-d", "arg-d", "fn-e", "fn-f", "arg-f",
    ])
    m = ex.metrics()
    assert m.completed + m.cancelled == m.submitted


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cancel", [False, True])
def test_shutdown_from_inside_a_task(impl: Any, cancel: bool) -> None:
    """A task may shut its own executor down (wait=True): it does not wait for its
    own worker; the other workers finish; queued work runs or is cancelled."""
    ran: list[int] = []
    with impl.KeyedExecutor(2) as ex:
        gate = threading.Event()
        ex.submit("other", gate.wait, 10)
        queued = [ex.submit("other", ran.append, i) for i in range(3)]

        def stopper() -> str:
            gate.set()
            ex.shutdown(wait=True, cancel_futures=cancel)
            return "stopped"

        assert ex.submit("self", stopper).result(10) == "stopped"
        assert not _settle(queued)
    if not cancel:
        assert ran == [0, 1, 2]
    else:  # the gate opened first: some may have run before the cancel, in order
        assert ran == list(range(len(ran)))
        assert sum(f.cancelled() for f in queued) == 3 - len(ran)
    assert ex.metrics().workers == 0


# -- 7. BaseException in tasks and in on_error ----------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt, GeneratorExit, Boom])
def test_task_raising_base_exception_keeps_worker(
    impl: Any, exc_type: type[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    """A task raising SystemExit/KeyboardInterrupt/GeneratorExit does not kill its
    worker: the next tasks run on the same thread; execute's failure is logged on
    "keyedexec" with its key, submit's future carries it."""

    def raiser() -> None:
        raise exc_type("planted")

    with caplog.at_level(logging.ERROR, logger="keyedexec"):
        with impl.KeyedExecutor(1) as ex:
            first = ex.submit("k", threading.get_ident).result(10)
            ex.execute("k", raiser)
            fut = ex.submit("other", raiser)
            after = [ex.submit(k, threading.get_ident) for k in ("k", "other", "new")]
            assert [f.result(10) for f in after] == [first] * 3
            assert isinstance(fut.exception(10), exc_type)
            assert ex.metrics().workers == 1
    m = ex.metrics()  # after shutdown: the last task's counters are in
    assert (m.completed, m.failed) == (6, 2)
    records = [r for r in caplog.records if r.name == "keyedexec"]
    assert len(records) == 1
    assert "'k'" in records[0].getMessage()
    assert records[0].exc_info is not None and records[0].exc_info[0] is exc_type


@pytest.mark.timeout(30)
@pytest.mark.parametrize("handler_exc", [ValueError, SystemExit, KeyboardInterrupt])
def test_on_error_that_raises_is_reported(
    impl: Any, handler_exc: type[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    """An on_error handler that itself raises (even BaseException) is reported on
    the "keyedexec" logger; the worker keeps serving."""
    seen: list[object] = []

    def handler(key: object, exc: BaseException) -> None:
        seen.append(key)
        raise handler_exc("handler broke")

    with caplog.at_level(logging.ERROR, logger="keyedexec"):
        with impl.KeyedExecutor(1, on_error=handler) as ex:
            ex.execute("k", _raise_boom)
            ex.execute("k2", _raise_boom)
            assert ex.submit("k", lambda: 42).result(10) == 42
    assert seen == ["k", "k2"]
    records = [r for r in caplog.records if r.name == "keyedexec"]
    assert len(records) == 2
    assert "on_error handler" in records[0].getMessage()
    assert records[0].exc_info is not None and records[0].exc_info[0] is handler_exc


def _raise_boom() -> None:
    raise Boom("task failed")


@pytest.mark.timeout(30)
def test_pool_job_raising_base_exception_is_logged(
    impl: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """TaskPool jobs have no future: their BaseExceptions are logged, the pool goes on."""
    done = threading.Event()

    def job(ctx: Any) -> None:
        raise SystemExit(3)

    with caplog.at_level(logging.ERROR, logger="keyedexec"):
        with impl.TaskPool(queue_size=4, max_workers=1) as pool:
            pool.submit("k", job)
            pool.submit("k", lambda ctx: done.set())
            assert done.wait(10)
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [SystemExit]


# -- 9. bad input ------------------------------------------------------------------------


class HashError(Exception):
    pass


class EqError(Exception):
    pass


class BadHash:
    def __hash__(self) -> int:
        raise HashError("no hash for you")


class Colliding:
    """Equal hashes; comparing two distinct instances raises."""

    def __hash__(self) -> int:
        return 12345

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        raise EqError("cannot compare")


def _submit_family(ex: Any, key: Any, fn: Any) -> list[Any]:
    """Every submit method of the executor, as thunks."""
    ctx = background()
    return [
        lambda: ex.execute(key, fn),
        lambda: ex.submit(key, fn),
        lambda: ex.execute_with_error(key, fn),
        lambda: ex.execute_with_context(key, ctx, fn),
        lambda: ex.submit_with_context(key, ctx, fn),
        lambda: ex.execute_with_context_error(key, ctx, fn),
    ]


def _footprint(ex: Any) -> tuple[Any, ...]:
    native = getattr(ex._sched, "_native_bytes", None)
    return (tuple(ex.metrics()), native() if native else None)


def _assert_usable(ex: Any, key: Any = "after") -> None:
    assert ex.submit(key, lambda: "fine").result(10) == "fine"


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "key, fn, error",
    [
        ([1, 2], print, TypeError),  # unhashable key
        ({"a": 1}, print, TypeError),
        (BadHash(), print, HashError),  # __hash__ raises: its own error comes through
        ("k", None, TypeError),  # not callable
        ("k", 42, TypeError),
        ("k", "print", TypeError),
    ],
    ids=["list-key", "dict-key", "hash-raises", "fn-None", "fn-int", "fn-str"],
)
def test_bad_submit_arguments_queue_nothing(
    impl: Any, key: Any, fn: Any, error: type[BaseException]
) -> None:
    """Each submit method rejects a bad key or callable with a clear error, queues
    nothing (counters and native memory unchanged) and stays usable."""
    with impl.KeyedExecutor(2) as ex:
        _assert_usable(ex)
        assert wait_until(lambda: ex.metrics().active_keys == 0)
        before = _footprint(ex)
        for call in _submit_family(ex, key, fn):
            with pytest.raises(error):
                call()
            assert _footprint(ex) == before
        _assert_usable(ex)


@pytest.mark.timeout(30)
def test_eq_raising_on_hash_collision(impl: Any) -> None:
    """A key whose __eq__ raises against a queued key with the same hash: the error
    comes through, nothing is queued, the queued key still runs; once it is gone
    the second key is accepted (no comparison needed)."""
    a, b = Colliding(), Colliding()
    gate = threading.Event()
    with impl.KeyedExecutor(1) as ex:
        fa = ex.submit(a, gate.wait, 10)
        assert wait_until(lambda: ex.metrics().running == 1)
        queued = ex.submit(a, lambda: "a2")
        before = _footprint(ex)
        for call in _submit_family(ex, b, print):
            with pytest.raises(EqError):
                call()
            assert _footprint(ex) == before
        with pytest.raises(EqError):
            ex.pending(b)
        with pytest.raises(EqError):
            ex.cancel_key(b)
        assert ex.pending(a) == 1
        gate.set()
        assert fa.result(10) is True
        assert queued.result(10) == "a2"
        assert wait_until(lambda: ex.metrics().active_keys == 0)
        assert ex.submit(b, lambda: "b").result(10) == "b"
        _assert_usable(ex)


@pytest.mark.timeout(30)
def test_bad_context_argument(impl: Any) -> None:
    """The context methods reject a ctx that is not a Context (TypeError), queue nothing."""
    with impl.KeyedExecutor(1) as ex:
        before = _footprint(ex)
        for method in (ex.execute_with_context, ex.submit_with_context,
                       ex.execute_with_context_error):
            for ctx in (None, object(), "ctx"):
                with pytest.raises(TypeError, match="Context"):
                    method("k", ctx, lambda c: None)
        assert _footprint(ex) == before
        _assert_usable(ex)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"workers": 0}, ValueError),
        ({"workers": -3}, ValueError),
        ({"workers": 2.5}, TypeError),
        ({"workers": "4"}, TypeError),
        ({"workers": True}, TypeError),
        ({"batch": 0}, ValueError),
        ({"batch": -1}, ValueError),
        ({"batch": 1.0}, TypeError),
        ({"on_error": 5}, TypeError),
        ({"name": 5}, TypeError),
    ],
)
def test_bad_executor_construction(impl: Any, kwargs: dict[str, Any], error: type) -> None:
    """Constructor arguments are checked before any thread or scheduler exists."""
    threads = threading.active_count()
    with pytest.raises(error):
        impl.KeyedExecutor(**kwargs)
    assert threading.active_count() == threads


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"queue_size": 0}, ValueError),
        ({"queue_size": -1}, ValueError),
        ({"queue_size": 1.5}, TypeError),
        ({"max_workers": 0}, ValueError),
        ({"max_workers": "2"}, TypeError),
        ({"idle_timeout": -1}, ValueError),
        ({"idle_timeout": float("nan")}, ValueError),
        ({"idle_timeout": None}, TypeError),
        ({"idle_timeout": "1"}, TypeError),
    ],
)
def test_bad_pool_construction(impl: Any, kwargs: dict[str, Any], error: type) -> None:
    """TaskPool's sizes and idle timeout are validated."""
    with pytest.raises(error):
        impl.TaskPool(**kwargs)


@pytest.mark.timeout(30)
def test_bad_timeouts_and_map_arguments(impl: Any) -> None:
    """Negative, NaN or non-numeric timeouts and non-callable map arguments are
    rejected up front; nothing is submitted."""
    with impl.KeyedExecutor(2) as ex:
        before = _footprint(ex)
        for timeout, error in ((-1, ValueError), (float("nan"), ValueError), ("1", TypeError)):
            with pytest.raises(error):
                ex.map(abs, [1, 2], timeout=timeout)
            with pytest.raises(error):
                ex.wait_key("k", timeout=timeout)
        with pytest.raises(TypeError):
            ex.map(None, [1])
        with pytest.raises(TypeError):
            ex.map(abs, [1], key=3)
        with pytest.raises(TypeError):
            ex.for_key([1])
        with pytest.raises(TypeError):
            ex.wait_key([1])
        with pytest.raises(TypeError):
            ex.pending([1])
        with pytest.raises(TypeError):
            ex.cancel_key([1])
        assert _footprint(ex) == before
        # A key function that raises part-way: the calls already submitted are
        # cancelled or done, and the error comes through.
        gate = threading.Event()
        blocker = ex.submit("block", gate.wait, 10)
        assert wait_until(blocker.running)

        def keyfn(x: int) -> str:
            if x == 3:
                raise Boom("bad key")
            return "block"

        with pytest.raises(Boom):
            ex.map(abs, range(5), key=keyfn)
        assert ex.pending("block") == 3  # cancelled futures stay queued until their turn
        gate.set()
        assert ex.wait_key("block", timeout=10)
        assert list(ex.map(abs, [-1, -2])) == [1, 2]
        m = ex.metrics()
        assert m.cancelled == 3


@pytest.mark.timeout(30)
def test_bad_pool_submit_arguments(impl: Any) -> None:
    """TaskPool.submit/try_submit: bad key, job or timeout raise, nothing queued."""
    with impl.TaskPool(queue_size=2, max_workers=1) as pool:
        for call, error in (
            (lambda: pool.submit([1], print), TypeError),
            (lambda: pool.submit(BadHash(), print), HashError),
            (lambda: pool.submit("k", None), TypeError),
            (lambda: pool.submit("k", print, timeout=-1), ValueError),
            (lambda: pool.submit("k", print, timeout="1"), TypeError),
            (lambda: pool.try_submit([1], print), TypeError),
            (lambda: pool.try_submit("k", 1), TypeError),
        ):
            with pytest.raises(error):
                call()
        with pytest.raises(ValueError):
            pool.stop(timeout=-1)
        m = pool.metrics()
        assert (m.submitted, m.pending, m.active_keys) == (0, 0, 0)
        done = threading.Event()
        pool.submit("k", lambda ctx: done.set())
        assert done.wait(10)


# -- 10. what CPython's test_concurrent_futures checks, for a keyed executor ---------------


def _capture(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
    return args, kwargs


@pytest.mark.timeout(30)
def test_submit_keywords_including_fn_and_key(impl: Any) -> None:
    """Keyword arguments reach the task, including ones named fn, key and self."""
    with impl.KeyedExecutor(2) as ex:
        assert ex.submit("k", pow, 2, exp=8).result(10) == 256
        got = ex.submit("k", _capture, 1, fn=2, key=3, self=4).result(10)
        assert got == ((1,), {"fn": 2, "key": 3, "self": 4})
        got = ex.execute_with_error("k", _capture, fn=1, key=2).result(10)
        assert got is None
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        ex.execute("k", lambda **kw: fut.set_result(kw), fn="f", key="k")
        assert fut.result(10) == {"fn": "f", "key": "k"}


@pytest.mark.timeout(30)
def test_map_results_exceptions_and_timeout(impl: Any) -> None:
    """map: results in input order over the shortest iterable; an exception is raised
    when its result is reached, after the earlier results; ``timeout`` raises
    TimeoutError for a call that does not finish; closing early cancels the rest."""
    with impl.KeyedExecutor(4) as ex:
        assert list(ex.map(pow, range(10), [2] * 10)) == [i * i for i in range(10)]
        assert list(ex.map(pow, range(10), [2, 3])) == [0, 1]
        assert list(ex.map(abs, [])) == []
        it = ex.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5], key=lambda a, b: "one")
        assert next(it) == (0, 1)
        assert next(it) == (0, 1)
        with pytest.raises(ZeroDivisionError):
            next(it)
        gate = threading.Event()
        quick: list[int] = []

        def slow_third(x: int) -> int:
            if x == 2:
                gate.wait(10)
            quick.append(x)
            return x

        try:
            it = ex.map(slow_third, [0, 1, 2, 3], timeout=0.5)
            # Results already there are returned even once the time is up.
            assert wait_until(lambda: {0, 1} <= set(quick))
            assert next(it) == 0
            assert next(it) == 1
            with pytest.raises(concurrent.futures.TimeoutError):
                next(it)
        finally:
            gate.set()
        # Closing after the first result cancels the calls that have not started
        # (x=1 is running; 2..5 are queued behind it).
        gate2 = threading.Event()
        ran: list[int] = []
        it = ex.map(lambda x: gate2.wait(10) if x == 1 else ran.append(x), range(6),
                    key=lambda x: "same")
        assert next(it) is None
        it.close()
        gate2.set()
        assert ex.wait_key("same", 10)
        assert ran == [0]


@pytest.mark.timeout(30)
def test_map_submits_without_iteration(impl: Any) -> None:
    """map() submits every call at once: they run even if nobody iterates."""
    seen: list[int] = []
    with impl.KeyedExecutor(2) as ex:
        ex.map(seen.append, range(10), key=lambda x: x % 2)
    assert sorted(seen) == list(range(10))


@pytest.mark.timeout(30)
def test_run_after_shutdown(impl: Any) -> None:
    """Every submit method raises RuntimeError after shutdown; nothing is accepted."""
    ex = impl.KeyedExecutor(2)
    ex.shutdown()
    assert ex.closed
    for call in _submit_family(ex, "k", print):
        with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
            call()
    with pytest.raises(RuntimeError):
        ex.map(abs, [1])
    ex.shutdown()  # again: harmless
    assert ex.metrics().submitted == 0


@pytest.mark.timeout(30)
def test_cancel_futures(impl: Any, thread_guard: None) -> None:
    """shutdown(cancel_futures=True): queued futures are cancelled at once (waiters
    see them done), the running task finishes, fire-and-forget tasks are dropped
    and counted; nothing queued runs."""
    gate = threading.Event()
    ran: list[int] = []
    ex = impl.KeyedExecutor(1)
    running = ex.submit("a", gate.wait, 10)
    assert wait_until(running.running)
    queued = [ex.submit(k, ran.append, k) for k in range(20)]
    for k in range(5):
        ex.execute("x", ran.append, k)
    ex.shutdown(wait=False, cancel_futures=True)
    assert not _settle(queued) and all(f.cancelled() for f in queued)
    assert not running.done()
    gate.set()
    ex.shutdown(wait=True)
    assert running.result(0) is True
    assert ran == []
    m = ex.metrics()
    assert (m.completed, m.cancelled, m.workers) == (1, 25, 0)


@pytest.mark.timeout(30)
def test_shutdown_no_wait_still_runs_queued(impl: Any, thread_guard: None) -> None:
    """shutdown(wait=False) returns at once; what was accepted still runs, in order,
    and the workers exit afterwards."""
    gate = threading.Event()
    ran: list[int] = []
    ex = impl.KeyedExecutor(2)
    ex.submit("k", gate.wait, 10)
    futures = [ex.submit("k", ran.append, i) for i in range(50)]
    ex.shutdown(wait=False)
    assert not any(f.done() for f in futures)
    gate.set()
    assert not _settle(futures)
    assert ran == list(range(50))
    assert wait_until(lambda: ex.metrics().workers == 0)


class _Obj:
    pass


class _Callable:
    def __call__(self, arg: object) -> str:
        return "done"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["submit", "execute", "execute_with_error"])
def test_no_stale_references_after_completion(impl: Any, how: str) -> None:
    """Once a task finished and its future is dropped, nothing keeps its callable
    or argument alive: they die by reference counting alone (no gc)."""
    with impl.KeyedExecutor(2) as ex:
        obj, fn = _Obj(), _Callable()
        refs = weakref.ref(obj), weakref.ref(fn)
        gc.disable()
        try:
            if how == "execute":
                ex.execute("k", fn, obj)
                assert ex.wait_key("k", 10)
            else:
                assert getattr(ex, how)("k", fn, obj).result(10) in ("done", None)
            del obj, fn
            assert wait_until(lambda: all(r() is None for r in refs))
        finally:
            gc.enable()


def _raise_with(arg: object) -> None:
    raise Boom("failed with an argument")


@pytest.mark.timeout(30)
def test_no_stale_references_after_failure(impl: Any, request: pytest.FixtureRequest) -> None:
    """Same for a task that raised: once the future (and its exception) is dropped,
    the argument dies without the cyclic gc (no frame/exception/future cycle)."""
    with impl.KeyedExecutor(1) as ex:
        obj = _Obj()
        ref = weakref.ref(obj)
        gc.disable()
        try:
            fut = ex.submit("k", _raise_with, obj)
            assert isinstance(fut.exception(10), Boom)
            del obj, fut
            assert wait_until(lambda: _released(ref), 1)
        finally:
            gc.enable()


@pytest.mark.timeout(30)
def test_results_released_while_iterating_map(impl: Any) -> None:
    """map() drops its reference to each result as it yields it."""
    with impl.KeyedExecutor(2) as ex:
        for obj in ex.map(lambda i: _Obj(), range(10)):
            ref = weakref.ref(obj)
            del obj
            # The worker may still be returning from the task that made it.
            assert wait_until(lambda: _released(ref))


@pytest.mark.timeout(30)
def test_dropped_executor_is_collected_and_threads_end(impl: Any, thread_guard: None) -> None:
    """An executor dropped without shutdown: the facade is collected at once, its
    accepted work still completes, then the workers exit and the scheduler is freed."""
    ex = impl.KeyedExecutor(3)
    gate = threading.Event()
    futures = [ex.submit(i % 4, gate.wait, 10) for i in range(12)]
    ref, sched_ref = weakref.ref(ex), weakref.ref(ex._sched)
    del ex
    gc.collect()
    assert ref() is None
    gate.set()
    assert not _settle(futures) and all(f.result() is True for f in futures)

    def scheduler_freed() -> bool:
        gc.collect()
        return sched_ref() is None

    assert wait_until(scheduler_freed)


def _below_task() -> tuple[int, Any]:
    """Run as a task: the worker's ident and the frame that called the task
    (a thread may walk its own frames safely)."""
    return threading.get_ident(), sys._getframe(1)


def _worker_idle(impl: Any, ex: Any, ident: int, below: Any) -> bool:
    """``ex``'s one worker waits for work. A pure worker has queued its waiter on
    the scheduler's work condition (under the lock that counts it idle); a native
    one is back in C with Thread.run (``below``) on top of its Python stack.

    Frames of another thread are compared, never read: on a free-threaded build
    reading a live frame that its thread pops meanwhile is a use-after-free
    (CPython gh-152355); sys._current_frames() itself stops the world."""
    if impl.name == "pure":
        return len(ex._sched._work._waiters) == 1
    return sys._current_frames().get(ident) is below


@pytest.mark.timeout(30)
def test_idle_worker_is_reused(impl: Any) -> None:
    """Sequential submits are served by one worker, not one thread per task."""
    with impl.KeyedExecutor(8, name="reuse") as ex:
        for i in range(5):
            ident, below = ex.submit(i, _below_task).result(10)
            assert wait_until(lambda: _worker_idle(impl, ex, ident, below))
        assert ex.metrics().workers == 1


@pytest.mark.timeout(30)
def test_worker_thread_names_and_default_size(impl: Any) -> None:
    """Workers are named after the executor; the default size is min(32, cpus + 4)."""
    with impl.KeyedExecutor(name="orders") as ex:
        assert ex.workers == default_workers()
        name = ex.submit("k", lambda: threading.current_thread().name).result(10)
        assert name.startswith("orders-worker-")


@pytest.mark.timeout(30)
def test_context_manager_joins_workers(impl: Any, thread_guard: None) -> None:
    """Leaving ``with`` runs everything accepted and joins the workers."""
    ran: list[int] = []
    with impl.KeyedExecutor(4) as ex:
        for i in range(100):
            ex.execute(i % 10, ran.append, i)
    assert len(ran) == 100
    assert ex.metrics().workers == 0


@pytest.mark.timeout(30)
def test_cancelled_context_tasks_are_skipped_not_lost(impl: Any) -> None:
    """Tasks whose context is cancelled before their turn are skipped, each future
    reports it, and the key goes on with the next task."""
    gate = threading.Event()
    ctx, cancel = background().with_cancel()
    with impl.KeyedExecutor(1) as ex:
        ex.submit("k", gate.wait, 10)
        skipped = ex.submit_with_context("k", ctx, lambda c: "ran")
        as_error = ex.execute_with_context_error("k", ctx, lambda c: "ran")
        ex.execute_with_context("k", ctx, lambda c: "ran")
        after = ex.submit("k", lambda: "after")
        cancel()
        gate.set()
        assert after.result(10) == "after"
        with pytest.raises(Cancelled):
            skipped.result(0)
        assert isinstance(as_error.result(0), Cancelled)
        assert ex.metrics().cancelled == 3


@pytest.mark.timeout(30)
def test_pool_submit_to_own_full_key_raises(impl: Any) -> None:
    """A job submitting to its own full key gets QueueFull instead of deadlocking."""
    out: list[BaseException] = []
    done = threading.Event()

    with impl.TaskPool(queue_size=1, max_workers=2) as pool:

        def job(ctx: Any) -> None:
            pool.submit("k", lambda c: None)  # fills the queue (1)
            try:
                pool.submit("k", lambda c: None)
            except QueueFull as exc:
                out.append(exc)
            done.set()

        pool.submit("k", job)
        assert done.wait(10)
    assert len(out) == 1


@pytest.mark.timeout(60)
def test_stdlib_wait_and_as_completed_count_each_future_once(
    impl: Any, request: pytest.FixtureRequest
) -> None:
    """concurrent.futures.wait() returns only when every future is done, and
    as_completed() yields each future exactly once, while workers complete
    them concurrently (the lazy condition must not notify a waiter about a
    future it already counted as finished)."""
    with impl.KeyedExecutor(2) as ex:
        for _ in range(_scaled(100, 10)):
            fs = [ex.submit(i, abs, -i) for i in range(2000)]
            done, not_done = concurrent.futures.wait(fs, timeout=30)
            assert not not_done
            fs = [ex.submit(i, abs, -i) for i in range(2000)]
            assert len(list(concurrent.futures.as_completed(fs, timeout=30))) == len(fs)
