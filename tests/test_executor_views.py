"""KeyedExecutor's asyncio bridge and per-key tools (issue 8), on both schedulers.

``submit_async``, ``for_key`` views (``concurrent.futures.Executor`` bound to
one key, for ``loop.run_in_executor``), ``wait_key``, ``cancel_key`` and the
``copy_context`` option. Tasks that must stay queued sit behind a running task
held on a gate, so no assertion depends on timing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextvars
import gc
import threading
from typing import Any

import pytest

from keyedexec import background

pytestmark = pytest.mark.timeout(30)

T = 10.0  # seconds any single wait may take before the test fails

var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")


class Overlap:
    """Records, per key, how many calls run at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now: dict[Any, int] = {}
        self.peak: dict[Any, int] = {}
        self.order: dict[Any, list[int]] = {}

    def call(self, key: Any, i: int) -> int:
        with self.lock:
            self.now[key] = self.now.get(key, 0) + 1
            self.peak[key] = max(self.peak.get(key, 0), self.now[key])
        threading.Event().wait(0.001)  # leave room for an overlap to show
        with self.lock:
            self.now[key] -= 1
            self.order.setdefault(key, []).append(i)
        return i


# -- for_key views -------------------------------------------------------------------


def test_run_in_executor_on_a_view_serializes_calls_per_key(h: Any) -> None:
    """run_in_executor(ex.for_key(k), fn): calls on one key never overlap, in call order."""
    ex = h.executor(4)
    rec = Overlap()

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        views = {k: ex.for_key(k) for k in "ab"}
        calls = [loop.run_in_executor(views[k], rec.call, k, i) for i in range(20) for k in "ab"]
        return await asyncio.wait_for(asyncio.gather(*calls), T)

    assert asyncio.run(main()) == [i for i in range(20) for _ in "ab"]
    assert rec.peak == {"a": 1, "b": 1}
    assert rec.order == {"a": list(range(20)), "b": list(range(20))}


def test_views_of_different_keys_run_in_parallel(h: Any) -> None:
    """Two views' calls meet at a barrier: only parallel keys get through."""
    ex = h.executor(2)
    barrier = threading.Barrier(2, timeout=T)

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        calls = [loop.run_in_executor(ex.for_key(k), barrier.wait) for k in ("a", "b")]
        return await asyncio.wait_for(asyncio.gather(*calls), T)

    assert sorted(asyncio.run(main())) == [0, 1]


def test_view_shutdown_closes_the_view_not_the_executor(h: Any) -> None:
    """A closed view refuses work and waits for its own tasks; the executor stays open."""
    ex = h.executor(2)
    with ex.for_key("k") as view:
        assert view.key == "k"
        futs = [view.submit(lambda i=i: i * 2) for i in range(5)]
    assert all(f.done() for f in futs)  # __exit__ waited for them
    assert [f.result() for f in futs] == [0, 2, 4, 6, 8]
    with pytest.raises(RuntimeError, match="view was shut down"):
        view.submit(print)
    assert "closed" in repr(view)
    assert not ex.closed
    assert ex.submit("k", lambda: "still open").result(T) == "still open"
    assert ex.for_key("k").submit(lambda: "new view").result(T) == "new view"


def test_view_shutdown_cancel_futures_cancels_its_queued_tasks(h: Any) -> None:
    """view.shutdown(cancel_futures=True): its queued tasks are cancelled, the running one ends."""
    ex = h.executor(2)
    view = ex.for_key("k")
    gate, running = h.block_with(view.submit)
    queued = [view.submit(lambda: None) for _ in range(3)]
    direct = ex.submit("k", lambda: "not through the view")
    view.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    gate.set()
    view.shutdown(wait=True)  # again: waits for the running one
    assert running.done() and running.result() == "blocker"
    assert direct.result(T) == "not through the view"


def test_view_shutdown_cancels_last_first(h: Any) -> None:
    """A worker racing view.shutdown(cancel_futures=True) must never start a task
    after an earlier one of the key was cancelled: the view cancels its tasks
    last submitted first, as Executor.map and the stdlib do."""
    ex = h.executor(2)
    view = ex.for_key("k")
    gate, running = h.block_with(view.submit)
    order: list[int] = []
    queued = [view.submit(lambda: None) for _ in range(40)]
    for i, f in enumerate(queued):
        f.add_done_callback(lambda _f, i=i: order.append(i))
    view.shutdown(wait=False, cancel_futures=True)
    gate.set()
    assert order == list(range(39, -1, -1))
    assert running.result(T) == "blocker"


def test_finalizer_submitting_through_a_view_inside_its_submit(h: Any) -> None:
    """A collection inside view.submit (it allocates under the view's lock) runs
    a finalizer that submits through the same view: no deadlock, both run."""
    ex = h.executor(2)
    view = ex.for_key("k")
    ran: list[str] = []

    class Cycle:
        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            view.submit(ran.append, "from-del")

    threshold = gc.get_threshold()
    try:
        for t in range(1, 31):  # some collection lands under the lock
            gc.collect()
            gc.disable()
            Cycle()
            gc.set_threshold(t)
            gc.enable()
            view.submit(ran.append, "task").result(T)
            gc.set_threshold(*threshold)
    finally:
        gc.set_threshold(*threshold)
        gc.enable()
    gc.collect()
    view.shutdown(wait=True)
    assert ran.count("task") == 30 and ran.count("from-del") == 30


def test_view_map_and_unhashable_key(h: Any) -> None:
    """A view is a full Executor (map included); an unhashable key fails at for_key."""
    ex = h.executor(2)
    with ex.for_key(1) as view:
        assert list(view.map(lambda x: x + 1, range(5), timeout=T)) == [1, 2, 3, 4, 5]
    with pytest.raises(TypeError):
        ex.for_key(["unhashable"])


# -- submit_async --------------------------------------------------------------------


def test_submit_async_results_exceptions_and_call_order(h: Any) -> None:
    """Awaiting gives the result or raises; tasks of a key run in the order of the calls."""
    ex = h.executor(4)
    order: list[int] = []

    def record(i: int) -> int:
        order.append(i)
        return i * i

    def boom() -> None:
        raise KeyError("nope")

    async def main() -> list[int]:
        futs = [ex.submit_async("k", record, i) for i in range(30)]
        failing = ex.submit_async("k", boom)
        with pytest.raises(KeyError, match="nope"):
            await asyncio.wait_for(failing, T)
        return await asyncio.wait_for(asyncio.gather(*futs), T)

    assert asyncio.run(main()) == [i * i for i in range(30)]
    assert order == list(range(30))


def test_cancelling_the_awaitable_cancels_a_queued_task(h: Any) -> None:
    """Cancelling submit_async's future before the task starts means it never runs."""
    ex = h.executor(2)
    ran: list[str] = []

    async def main() -> None:
        gate, _ = h.block(ex, "k")
        doomed = ex.submit_async("k", ran.append, "doomed")
        kept = ex.submit_async("k", ran.append, "kept")
        doomed.cancel()
        await asyncio.sleep(0)  # let the cancellation reach the task's future
        gate.set()
        await asyncio.wait_for(kept, T)
        assert doomed.cancelled()

    asyncio.run(main())
    assert ran == ["kept"]
    assert ex.metrics().cancelled == 1


def test_submit_async_needs_a_running_loop(h: Any) -> None:
    """Outside a loop there is nothing to deliver the result to: RuntimeError, nothing queued."""
    ex = h.executor(1)
    with pytest.raises(RuntimeError):
        ex.submit_async("k", print)
    assert ex.metrics().submitted == 0


# -- wait_key ------------------------------------------------------------------------


def test_wait_key_times_out_then_returns_true_once_drained(h: Any) -> None:
    """False while the key's tasks are held; True once they (and only they) finished."""
    ex = h.executor(2)
    done: list[int] = []
    gate, _ = h.block(ex, "k")
    for i in range(3):
        ex.execute("k", done.append, i)
    other_gate, other = h.block(ex, "other")
    assert ex.wait_key("k", timeout=0.05) is False
    gate.set()
    assert ex.wait_key("k", timeout=T) is True
    assert done == [0, 1, 2]
    assert not other.done()  # another key's running task is not waited for
    assert ex.wait_key("never used", timeout=T) is True
    other_gate.set()


def test_wait_key_from_a_task_of_that_key_raises(h: Any) -> None:
    """Waiting for one's own key would wait forever: RuntimeError instead."""
    ex = h.executor(2)

    def waits_for_own_key() -> bool:
        return ex.wait_key("k", timeout=T)

    with pytest.raises(RuntimeError, match="deadlock"):
        ex.submit("k", waits_for_own_key).result(T)
    # Waiting for a *different* key from a task is fine.
    assert ex.submit("k", lambda: ex.wait_key("j", timeout=T)).result(T) is True


def test_wait_key_after_shutdown(h: Any) -> None:
    """After shutdown(wait=False), wait_key waits for the drain of everything accepted."""
    ex = h.executor(2)
    done: list[int] = []
    gate, _ = h.block(ex, "k")
    ex.execute("k", done.append, 1)
    ex.shutdown(wait=False)
    assert ex.wait_key("k", timeout=0.05) is False
    gate.set()
    assert ex.wait_key("k", timeout=T) is True
    assert done == [1]


def test_wait_key_on_an_idle_key_is_true_even_with_zero_timeout(h: Any) -> None:
    """Nothing queued for the key: there is nothing to wait for, whatever the timeout."""
    ex = h.executor(1)
    ex.submit("warm", lambda: None).result(T)  # the worker exists and idles
    assert all(ex.wait_key("idle", timeout=0) for _ in range(20))


def test_wait_key_rejects_bad_timeouts(h: Any) -> None:
    """timeout must be a non-negative number of seconds, or None."""
    ex = h.executor(1)
    with pytest.raises(ValueError, match="timeout"):
        ex.wait_key("k", timeout=-1)
    with pytest.raises(TypeError, match="timeout"):
        ex.wait_key("k", timeout="1")


# -- cancel_key ----------------------------------------------------------------------


def test_cancel_key_cancels_that_keys_queued_tasks_only(h: Any) -> None:
    """Returns the count; their futures are cancelled; running task and other keys untouched."""
    ex = h.executor(3)
    gate_a, running_a = h.block(ex, "a")
    gate_b, running_b = h.block(ex, "b")
    queued_a = [ex.submit("a", lambda: "a") for _ in range(4)]
    ex.execute("a", print, "never printed")
    queued_b = [ex.submit("b", lambda: "b") for _ in range(2)]
    assert ex.pending("a") == 5
    assert ex.cancel_key("a") == 5
    assert ex.cancel_key("a") == 0
    assert all(f.cancelled() for f in queued_a)
    assert cf.wait(queued_a, timeout=0).not_done == set()  # waiters are notified
    assert ex.pending("b") == 2 and not any(f.done() for f in queued_b)
    gate_a.set()
    gate_b.set()
    assert running_a.result(T) == running_b.result(T) == "blocker"
    assert [f.result(T) for f in queued_b] == ["b", "b"]
    assert ex.metrics().cancelled == 5


# -- copy_context --------------------------------------------------------------------


def _read_var(*_: Any) -> str:
    return var.get()


def test_tasks_do_not_see_the_submitters_context_by_default(h: Any) -> None:
    """Default, like ThreadPoolExecutor: a task runs in its worker thread's context."""
    ex = h.executor(2)
    token = var.set("submitter")
    try:
        assert ex.submit("k", _read_var).result(T) == "unset"
    finally:
        var.reset(token)


@pytest.mark.parametrize(
    "method",
    ["submit", "execute", "execute_with_error", "execute_with_context", "map"],
)
def test_copy_context_runs_tasks_in_the_submitters_context(h: Any, method: str) -> None:
    """copy_context=True, like asyncio.to_thread: each submit family member sees the value."""
    ex = h.executor(2, copy_context=True)
    seen: list[str] = []
    token = var.set("submitter")
    try:
        if method == "submit":
            seen.append(ex.submit("k", _read_var).result(T))
        elif method == "execute":
            ex.execute("k", lambda: seen.append(var.get()))
        elif method == "execute_with_error":
            assert ex.execute_with_error("k", lambda: seen.append(var.get())).result(T) is None
        elif method == "execute_with_context":
            ex.execute_with_context("k", background(), lambda ctx: seen.append(var.get()))
        else:
            seen.extend(ex.map(_read_var, range(3), key=lambda _: "k", timeout=T))
    finally:
        var.reset(token)
    assert ex.wait_key("k", timeout=T)
    assert seen and set(seen) == {"submitter"}


def test_copy_context_snapshot_is_taken_at_submit(h: Any) -> None:
    """Each task sees the value at its own submit, and its changes do not leak back."""
    ex = h.executor(2, copy_context=True)

    def set_and_read() -> str:
        before = var.get()
        var.set("changed in task")
        return before

    gate, _ = h.block(ex, "k")
    token = var.set("one")
    try:
        f1 = ex.submit("k", set_and_read)
        var.set("two")
        f2 = ex.submit("k", set_and_read)
        gate.set()
        assert (f1.result(T), f2.result(T)) == ("one", "two")
        assert var.get() == "two"
    finally:
        var.reset(token)
