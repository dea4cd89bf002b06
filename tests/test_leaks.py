"""Leak checks: references, Python memory, threads and the native core's C memory.

After many tasks (args, kwargs, results and exceptions passing through every
submit method, plus the cancel and error paths), the objects involved are back
to their starting reference counts, Python's traced memory has not grown, the
thread count is back where it started and the native core holds no key state.
The native core's C allocations are checked under valgrind (tests/valgrind/).
"""

from __future__ import annotations

import concurrent.futures
import gc
import sys
import sysconfig
import threading
import tracemalloc
import weakref
from typing import Any

import pytest

from conftest import STRESS, wait_until
from keyedexec import background


class Boom(Exception):
    pass


class _Obj:
    """A plain object whose reference count the tests watch."""


class _Key:
    """A key type with Python-level __hash__/__eq__ (the slow path of the key table)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __hash__(self) -> int:
        return hash(self.n)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Key) and other.n == self.n


# Free-threaded builds use biased reference counting: an object that a worker
# created and another thread dropped is freed when the worker next runs Python
# code, or at gc.collect() (which merges every thread's queue). Not a leak.
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


def _scaled(n: int, minimum: int = 1) -> int:
    return max(minimum, int(n * STRESS))


def _quiet(key: object, exc: BaseException) -> None:
    """on_error that keeps nothing (the default would log every planted failure)."""


def _task(arg: Any, *, kw: Any, result: Any, payload: Any, fail: bool) -> Any:
    if fail:
        raise Boom(payload)
    return result


def _ctx_task(ctx: Any) -> Any:
    return ctx.value("result")


def _workload(ex: Any, n: int, objs: dict[str, Any], keys: list[Any]) -> None:
    """``n`` tasks through every submit method; one in ten raises.

    Futures are collected and dropped in chunks so memory stays flat."""
    arg, kw, result, payload = objs["arg"], objs["kw"], objs["result"], objs["payload"]
    ctx = objs["ctx"]
    pending: list[concurrent.futures.Future[Any]] = []
    nkeys = len(keys)
    for i in range(n):
        key = keys[i % nkeys]
        fail = i % 10 == 0
        how = i % 5
        if how == 0:
            ex.execute(key, _task, arg, kw=kw, result=result, payload=payload, fail=fail)
        elif how == 1:
            pending.append(ex.submit(key, _task, arg, kw=kw, result=result, payload=payload,
                                     fail=fail))
        elif how == 2:
            pending.append(ex.execute_with_error(key, _task, arg, kw=kw, result=result,
                                                 payload=payload, fail=fail))
        elif how == 3:
            pending.append(ex.submit_with_context(key, ctx, _ctx_task))
        else:
            ex.execute_with_context(key, ctx, _ctx_task)
        if len(pending) >= 5000:
            _settle(pending)
    _settle(pending)


def _settle(futures: list[concurrent.futures.Future[Any]]) -> None:
    """Wait for each future and read its outcome, as a caller would; then drop them."""
    for f in futures:
        f.exception(60)
    futures.clear()


def _worker_threads(name: str) -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith(f"{name}-worker-"))


def _new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before and t.is_alive()]


def _objs() -> dict[str, Any]:
    result = _Obj()
    objs = {
        "arg": _Obj(), "kw": _Obj(), "result": result, "payload": _Obj(), "fn": _task,
        "ctx": background().with_value("result", result),
    }
    if FREE_THREADED:
        del objs["fn"]  # functions use deferred reference counting there: no count to compare
    return objs


@pytest.mark.timeout(240)
def test_many_tasks_leave_no_references_memory_or_threads(impl: Any) -> None:
    """100k tasks (STRESS scales): reference counts of everything passed in return
    to the start, traced Python memory does not grow between two equal rounds,
    the pool holds exactly ``workers`` threads and none after shutdown."""
    n = _scaled(100_000, 1000)
    name = f"leak-{impl}"
    objs = _objs()
    keys: list[Any] = [*(f"key-{i}" for i in range(500)), *(_Key(i) for i in range(500))]
    key_refs = [sys.getrefcount(k) for k in keys]
    gc.collect()
    before = {k: sys.getrefcount(v) for k, v in objs.items()}
    start_threads = set(threading.enumerate())
    ex = impl.KeyedExecutor(4, name=name, on_error=_quiet)
    rounds = 3
    try:
        # Round 1 sizes every cache and table, round 2 does the same for what
        # tracing itself adds (per-thread state on free-threaded builds); round 3
        # must not grow anything.
        _workload(ex, n // rounds, objs, keys)
        assert wait_until(lambda: ex.metrics().active_keys == 0)
        tracemalloc.start()
        try:
            for _ in range(rounds - 1):
                gc.collect()
                base, _ = tracemalloc.get_traced_memory()
                _workload(ex, n // rounds, objs, keys)
                assert wait_until(lambda: ex.metrics().active_keys == 0)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        assert _worker_threads(name) == 4
        assert len(_new_threads(start_threads)) == 4  # the workers and nothing else
    finally:
        ex.shutdown(wait=True)
    m = ex.metrics()
    total = n // rounds * rounds
    assert (m.submitted, m.completed + m.cancelled) == (total, total)
    assert m.failed == sum(1 for i in range(n // rounds) if i % 10 == 0 and i % 5 < 3) * rounds
    gc.collect()
    after = {k: sys.getrefcount(v) for k, v in objs.items()}
    assert after == before
    assert [sys.getrefcount(k) for k in keys] == key_refs
    assert _worker_threads(name) == 0
    assert not _new_threads(start_threads)
    # "Near zero": nothing per task (the smallest leaked object per task would
    # be over 500 KiB here). GIL builds show a few KiB of interpreter bookkeeping;
    # free-threaded ones up to ~100 KiB of per-thread allocator and deferred-free
    # state that varies from round to round without growing.
    print(f"\n[{impl}] {total} tasks: traced memory growth over the last "
          f"{n // rounds}: {grown} bytes")
    assert grown < (256 if FREE_THREADED else 64) * 1024


@pytest.mark.timeout(60)
def test_cancel_and_error_paths_release_references(impl: Any) -> None:
    """Tasks dropped by cancel_key, a cancelled future, a cancelled context or
    shutdown(cancel_futures=True), and submits rejected (bad key, closed
    executor), keep no reference to their callable or arguments."""
    n = _scaled(2000, 100)
    arg, fn = _Obj(), _CountedCallable()
    gc.collect()
    refs = sys.getrefcount(arg), sys.getrefcount(fn)
    gate = threading.Event()
    ctx, cancel = background().with_cancel()
    ex = impl.KeyedExecutor(1, on_error=_quiet)
    try:
        ex.submit("gate", gate.wait, 30)
        for i in range(n):
            ex.execute("a", fn, arg)
            ex.submit("b", fn, arg).cancel()
            ex.submit_with_context("c", ctx, fn)
            ex.execute("d", fn, arg)
            with pytest.raises(TypeError):
                ex.submit([i], fn, arg)
        assert ex.cancel_key("a") == n
        cancel()
        ex.shutdown(wait=False, cancel_futures=True)
        with pytest.raises(RuntimeError):
            ex.submit("e", fn, arg)
        gate.set()
    finally:
        gate.set()
        ex.shutdown(wait=True)
    assert fn.calls == 0
    assert ex.metrics().cancelled == 4 * n
    gc.collect()
    assert (sys.getrefcount(arg), sys.getrefcount(fn)) == refs


class _CountedCallable:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: Any) -> None:
        self.calls += 1


@pytest.mark.timeout(60)
def test_keys_are_released_when_idle(impl: Any, request: pytest.FixtureRequest) -> None:
    """A key object is held only while it has work: afterwards it can be collected."""
    with impl.KeyedExecutor(2) as ex:
        keys = [_Key(i) for i in range(100)]
        refs = [weakref.ref(k) for k in keys]
        for k in keys:
            ex.execute(k, abs, -1)
        del k, keys
        assert wait_until(lambda: ex.metrics().active_keys == 0)
        assert wait_until(lambda: all(r() is None for r in refs), 2)


@pytest.mark.native_only
@pytest.mark.timeout(60)
def test_native_memory_returns_to_baseline(impl: Any) -> None:
    """The native core's C memory (key table, key states, rings) grows with a
    burst of keys and deep queues and returns exactly to its baseline once the
    work drains: no key state is kept for idle keys, the table shrinks back."""
    gate = threading.Event()
    ex = impl.KeyedExecutor(1)
    try:
        baseline = ex._sched._native_bytes()
        ex.submit("gate", gate.wait, 30)  # holds the only worker: everything queues
        for i in range(10_000):
            ex.execute(i, abs, -i)
        for i in range(2_000):
            ex.execute("deep", abs, -i)  # one key with a long ring
        peak = ex._sched._native_bytes()
        assert peak > baseline + 10_000 * 8
        gate.set()
        assert wait_until(lambda: ex.metrics().active_keys == 0)
        assert ex._sched._native_bytes() == baseline
        # And again: a second burst does not ratchet anything up.
        for i in range(10_000):
            ex.execute(("k", i), abs, -i)
        assert wait_until(lambda: ex.metrics().active_keys == 0)
        assert ex._sched._native_bytes() == baseline
    finally:
        gate.set()
        ex.shutdown()


@pytest.mark.native_only
@pytest.mark.timeout(60)
def test_native_memory_after_cancel_and_pool_stop(impl: Any) -> None:
    """cancel_key, cancel_futures and TaskPool.stop also give all C memory back."""
    gate = threading.Event()
    ex = impl.KeyedExecutor(1)
    baseline = ex._sched._native_bytes()
    try:
        ex.submit("gate", gate.wait, 30)
        for i in range(3000):
            ex.execute(i % 300, abs, -i)
        assert ex.cancel_key(7) == 10
        ex.shutdown(wait=False, cancel_futures=True)
        gate.set()
        ex.shutdown(wait=True)
        assert ex._sched._native_bytes() == baseline
    finally:
        gate.set()
        ex.shutdown()
    pool = impl.TaskPool(queue_size=10, max_workers=2)
    pool.start()
    try:
        base = pool._sched._native_bytes()
        block = threading.Event()
        for i in range(200):
            pool.submit(i, lambda ctx: block.wait(30))
            pool.try_submit(i, lambda ctx: None)
    finally:
        block.set()
        assert pool.stop(timeout=30)
    assert pool._sched._native_bytes() == base
    assert len(pool) == 0
