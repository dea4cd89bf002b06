"""Model check: the native scheduler and the pure-Python one behave alike.

A hypothesis state machine applies the same random operations to a native and
a pure-Python KeyedExecutor and compares everything observable: what each call
returns or raises, futures' outcomes and cancelled state, the global and
per-key execution order, ``pending(key)`` and ``metrics()``. A third,
trivial model (per-key lists) says which tasks must run and in what order.

Determinism: each executor has one worker, and a *gate* task (key GATE)
occupies it until the machine's ``release`` rule opens the gate. So while the
gate is shut, every other task is queued and nothing runs: the state is known
exactly, and when the gate opens both executors drain the same queues with
the same (FIFO, ``batch``-fair) policy, one task at a time.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from conftest import NATIVE_AVAILABLE, STRESS, wait_until
from keyedexec import Context, KeyedExecutor, _pure, background
from keyedexec._impl import _flag

if NATIVE_AVAILABLE:
    from keyedexec import _core

pytestmark = pytest.mark.skipif(
    not NATIVE_AVAILABLE or _flag("KEYEDEXEC_PURE_PYTHON"),
    reason="compares the compiled core with the pure model: needs the core",
)

GATE = "__gate__"
# 1 and 1.0 are one key (equal, not identical): the native table must compare them.
KEYS = st.sampled_from(["a", "b", "c", 1, 1.0, (2, "x")])
PLAIN = ("execute", "submit", "execute_with_error")
WITH_CTX = ("execute_with_context", "submit_with_context", "execute_with_context_error")


class Boom(Exception):
    pass


def _plain_task(log: list[int], tid: int, *, fail: bool) -> int:
    log.append(tid)
    if fail:
        raise Boom(tid)
    return tid * 10


def _ctx_task(log: list[int], tid: int, fail: bool, ctx: Context) -> int:
    log.append(tid)
    if fail:
        raise Boom(tid)
    return tid * 10


def _quiet(key: object, exc: BaseException) -> None:
    """on_error: the machine checks fire-and-forget failures through the log."""


def _outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", call()
    except Exception as exc:  # compared between the implementations
        return "raised", (type(exc), str(exc))


def _future_state(f: Any) -> tuple[Any, ...]:
    """A future's outcome, comparable across implementations (exceptions by type and args)."""
    if f.cancelled():
        return ("cancelled",)
    exc = f.exception(0)
    if exc is not None:
        return ("raised", type(exc), exc.args)
    result = f.result(0)
    if isinstance(result, BaseException):  # execute_with_error's result
        return ("error-value", type(result), result.args)
    return ("result", result)


class SchedulerModel(RuleBasedStateMachine):
    """Native and pure executors driven in lockstep (see the module docstring)."""

    futures = Bundle("futures")

    def __init__(self) -> None:
        super().__init__()
        self.exs: list[Any] = []
        self.logs: list[list[int]] = [[], []]
        for scheduler, log in ((_core.Scheduler, self.logs[0]), (_pure.Scheduler, self.logs[1])):
            cls = type("Ex", (KeyedExecutor,), {"_Scheduler": scheduler})
            self.exs.append(cls(1, batch=2, on_error=_quiet))
        self.next_tid = 0
        self.closed = False
        self.all_futures: list[tuple[int, Any, Any]] = []
        # The model: per key, the tasks that must still run, in order.
        self.queued: dict[Any, list[int]] = {}
        self.ctx_of: dict[int, Context] = {}
        self.contexts: list[tuple[Context, Callable[[], None]]] = [
            (background(), lambda: None),
            (background().with_value("v", 1), lambda: None),
        ]
        self.gate = threading.Event()
        self._shut_gate()

    # -- gate -------------------------------------------------------------------------

    def _shut_gate(self) -> None:
        self.gate = threading.Event()
        for ex in self.exs:
            ex.execute(GATE, self.gate.wait, 30)
        # Both workers are inside the gate task: everything else now queues.
        assert wait_until(lambda: all(ex.metrics().running == 1 for ex in self.exs))

    def _open_gate(self) -> None:
        self.gate.set()
        assert wait_until(
            lambda: all(m.pending == 0 and m.running == 0 for m in self._metrics())
        )
        expected = [tid for tid in self._model_order() if not self._skipped(tid)]
        self.queued.clear()
        assert self.logs[0] == self.logs[1], "native and pure ran different tasks/orders"
        # Per key, the model's order (the global interleaving of keys is compared above).
        for key_tids in self._by_key(expected):
            got = [t for t in self.logs[0] if t in key_tids]
            assert got == key_tids
        assert sorted(self.logs[0]) == sorted(expected)
        self.logs[0].clear()
        self.logs[1].clear()
        for tid, fn, fp in self.all_futures:
            assert fn.done() and fp.done(), tid
            assert _future_state(fn) == _future_state(fp), tid
        self.all_futures.clear()

    def _model_order(self) -> list[int]:
        return [tid for tids in self.queued.values() for tid in tids]

    def _by_key(self, tids: list[int]) -> list[list[int]]:
        keep = set(tids)
        return [[t for t in q if t in keep] for q in self.queued.values()]

    def _skipped(self, tid: int) -> bool:
        ctx = self.ctx_of.get(tid)
        return ctx is not None and ctx.cancelled

    def _metrics(self) -> list[Any]:
        return [ex.metrics() for ex in self.exs]

    def _both(self, op: Callable[[Any, list[int]], Any]) -> list[tuple[str, Any]]:
        outs = [_outcome(lambda ex=ex, log=log: op(ex, log)) for ex, log in zip(self.exs, self.logs)]
        assert (outs[0][0], outs[0][1] if outs[0][0] == "raised" else None) == (
            outs[1][0], outs[1][1] if outs[1][0] == "raised" else None
        ), outs
        return outs

    def _accepted(self, key: Any, outs: list[tuple[str, Any]], tid: int) -> Any:
        if outs[0][0] == "raised":
            assert self.closed and outs[0][1][0] is RuntimeError
            return None
        assert not self.closed
        self.queued.setdefault(key, []).append(tid)
        return outs

    # -- rules ------------------------------------------------------------------------

    @rule(target=futures, key=KEYS, how=st.sampled_from(PLAIN), fail=st.booleans())
    def submit(self, key: Any, how: str, fail: bool) -> Any:
        tid = self.next_tid = self.next_tid + 1
        outs = self._both(lambda ex, log: getattr(ex, how)(key, _plain_task, log, tid, fail=fail))
        if self._accepted(key, outs, tid) is None or how == "execute":
            return (tid, None, None)
        return self._track(tid, outs)

    @rule(target=futures, key=KEYS, how=st.sampled_from(WITH_CTX), which=st.integers(0, 7),
          fail=st.booleans())
    def submit_with_context(self, key: Any, how: str, which: int, fail: bool) -> Any:
        tid = self.next_tid = self.next_tid + 1
        ctx = self.contexts[which % len(self.contexts)][0]
        outs = self._both(
            lambda ex, log: getattr(ex, how)(key, ctx, lambda c, log=log: _ctx_task(log, tid, fail, c))
        )
        if self._accepted(key, outs, tid) is None:
            return (tid, None, None)
        self.ctx_of[tid] = ctx
        if how == "execute_with_context":
            return (tid, None, None)
        return self._track(tid, outs)

    def _track(self, tid: int, outs: list[tuple[str, Any]]) -> tuple[int, Any, Any]:
        entry = (tid, outs[0][1], outs[1][1])
        self.all_futures.append(entry)
        return entry

    @rule()
    def new_context(self) -> None:
        self.contexts.append(background().with_cancel())

    @rule(which=st.integers(0, 7))
    def cancel_context(self, which: int) -> None:
        self.contexts[which % len(self.contexts)][1]()

    @rule(entry=futures)
    def cancel_future(self, entry: tuple[int, Any, Any]) -> None:
        tid, fn, fp = entry
        if fn is None:
            return
        got = fn.cancel(), fp.cancel()
        assert got[0] == got[1]
        if got[0]:
            for tids in self.queued.values():
                if tid in tids:
                    tids.remove(tid)

    @rule(key=KEYS)
    def cancel_key(self, key: Any) -> None:
        counts = [ex.cancel_key(key) for ex in self.exs]
        assert counts[0] == counts[1]
        self.queued.pop(key, None)

    @rule(key=KEYS)
    def pending(self, key: Any) -> None:
        assert self.exs[0].pending(key) == self.exs[1].pending(key)

    @rule()
    def bad_submit(self) -> None:
        outs = self._both(lambda ex, log: ex.submit(["unhashable"], print))
        assert outs[0][1][0] is TypeError  # argument checks come first, closed or not

    @rule()
    def release(self) -> None:
        self._open_gate()
        if not self.closed:
            self._shut_gate()

    @rule(cancel=st.booleans())
    def shutdown_gated(self, cancel: bool) -> None:
        """shutdown(wait=False) while the gate holds everything queued."""
        for ex in self.exs:
            ex.shutdown(wait=False, cancel_futures=cancel)
        self.closed = True
        if cancel:
            self.queued.clear()

    @rule(cancel=st.booleans())
    def shutdown_drained(self, cancel: bool) -> None:
        """Open the gate, let both drain, then shutdown(wait=True)."""
        self._open_gate()
        for ex in self.exs:
            ex.shutdown(wait=True, cancel_futures=cancel)
        self.closed = True

    @invariant()
    def same_counters(self) -> None:
        ms = self._metrics()
        if self.closed:  # a closed worker exits on its own schedule: skip that field
            ms = [m._replace(workers=0) for m in ms]
        assert ms[0] == ms[1]
        assert self.exs[0].stats() == self.exs[1].stats()
        assert self.exs[0].closed == self.exs[1].closed == self.closed

    def teardown(self) -> None:
        self.gate.set()
        for ex in self.exs:
            ex.shutdown(wait=True)
        ms = self._metrics()
        assert ms[0] == ms[1]
        assert ms[0].workers == ms[0].pending == ms[0].running == ms[0].active_keys == 0
        assert ms[0].completed + ms[0].cancelled == ms[0].submitted


@pytest.mark.timeout(300)
def test_native_matches_pure() -> None:
    """Random operation sequences give the same observable results on both schedulers."""
    run_state_machine_as_test(
        SchedulerModel,
        settings=settings(
            max_examples=max(5, int(40 * STRESS)),
            stateful_step_count=40,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
