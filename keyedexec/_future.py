"""KeyedFuture: a ``concurrent.futures.Future`` that is cheap to create and complete.

The stdlib's ``Future.__init__`` builds a ``threading.Condition`` (about half a
microsecond), and ``set_result`` takes it even when nobody waits. At millions of
tasks per second that is most of the cost. KeyedFuture therefore skips
``Future.__init__`` and builds its condition, waiter list and callback list only
when someone first looks at them, and lets the worker claim and complete it
without a lock while nobody watches. It stays a ``concurrent.futures.Future``
subclass: ``wait``, ``as_completed``, callbacks and ``asyncio.wrap_future`` go
through ``_condition``, ``_state``, ``_waiters`` and ``_done_callbacks``, which
behave as the stdlib's.

Two implementations of that state, one class name:

* With the native core, KeyedFuture derives from ``keyedexec._core.FutureBase``
  (src/_future.pxi): the state lives in C fields, the condition is a C object,
  and the worker completes a watched future (waiters, condition, callbacks)
  from C. A future that is final when someone looks builds nothing at all.
  src/_future.pxi lists the CPython behaviour this relies on;
  tests/test_future_paths.py checks it on every CPython.
* Without it, :class:`_PyFutureBase` below, in Python:

  - PENDING/None defaults live on the class, so a new future is an empty
    object; the condition, waiter and callback lists are made on first use
    (:class:`_Lazy`).
  - The worker claims with an atomic PENDING -> RUNNING and ``cancel()`` with
    PENDING -> CANCELLED (``_set_state_if_pending``, one
    ``__dict__.setdefault``): whoever writes first wins.
  - It completes by writing the outcome and then ``_state = FINISHED`` under a
    seal lock (``_seal``), unless someone watches. Anyone who waits creates the
    condition, and flags the future as watched, under the same seal: either the
    worker sees the flag and notifies under the condition, or the waiter sees
    FINISHED: no lost wake-up.
"""

from __future__ import annotations

import copyreg
import os
import platform
import threading
from concurrent.futures import Future
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    LOGGER,
    PENDING,
    RUNNING,
)
from typing import TYPE_CHECKING, Any, Callable, Generic, TypeVar

__all__ = ["KeyedFuture"]

T = TypeVar("T")
_DONE = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)


class _Lazy(Generic[T]):
    """Non-data descriptor: builds the attribute on first access, once.

    After the first access the value is an instance attribute, which takes
    precedence over a non-data descriptor, so later reads are plain attribute
    reads. Waiter and callback lists are first used under the future's
    condition (or once it is final), so two threads never race to create one.
    The attribute is set, not written to ``__dict__``: on GIL builds a future
    keeps its attributes inline, and a materialised dict per waited-on future
    would cost an allocation and a GC-tracked object.
    """

    __slots__ = ("factory", "name")

    def __init__(self, factory: Callable[[], T]) -> None:
        self.factory = factory
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: Any = None) -> T:
        if obj is None:
            return self  # type: ignore[return-value]
        value: T = self.factory()
        setattr(obj, self.name, value)
        return value


# (_PyFutureBase) Order "is anyone watching?" (a worker completing a future)
# against "start watching" (creating its condition). Striped by the future's
# address so that workers on a free-threaded build rarely meet on one lock.
# Defined before the native core is imported (_native_base): the core imports
# keyedexec._lifecycle, which holds these across fork.
_SEALS = tuple(threading.Lock() for _ in range(64))


def _seal(fut: object) -> threading.Lock:
    return _SEALS[(id(fut) >> 4) & 63]


class _LazyCondition(_Lazy[threading.Condition]):
    """The condition, created on first use; also flags the future as watched.

    ``_watched`` tells the worker's completion path that someone may wait or
    has a callback.
    It is set after the condition exists and before the caller reads the
    state, which keeps the no-lost-wake-up argument above intact.
    """

    __slots__ = ()

    def __get__(self, obj: Any, objtype: Any = None) -> threading.Condition:
        if obj is None:
            return self  # type: ignore[return-value]
        fresh = threading.Condition()
        with _seal(obj):
            if obj._watched:  # another thread created it since our lookup
                cond: threading.Condition = obj._condition
            else:
                obj._condition = cond = fresh
                obj._watched = True
        return cond


class _PyFutureBase(Future[Any]):
    """KeyedFuture's state without the native core (see the module docstring)."""

    # Class-level defaults stand in for the attributes Future.__init__ would set.
    _state = PENDING
    _result = None
    _exception = None
    _watched = False
    _condition = _LazyCondition(threading.Condition)
    _waiters: _Lazy[list[Any]] = _Lazy(list)
    _done_callbacks: _Lazy[list[Callable[[Future[Any]], object]]] = _Lazy(list)

    # Future.__init__ is skipped: everything it builds is lazy here. This one
    # creates the instance dict up front, which the dict-based state change
    # (_set_state_if_pending) needs: creating the dict later, from a thread
    # racing a worker's attribute writes, can run the GC half-way (and so other
    # threads), and leave a dict that misses or miscounts the other thread's
    # writes.
    def __init__(self) -> None:
        self.__dict__  # noqa: B018

    # -- lock-free reads: a single attribute read is atomic ---------------------

    def done(self) -> bool:
        return self._state in _DONE

    def cancelled(self) -> bool:
        return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED)

    def running(self) -> bool:
        return self._state == RUNNING

    def result(self, timeout: float | None = None) -> Any:
        if self._state == FINISHED:
            exc = self._exception
            if exc is None:
                return self._result
            try:
                raise exc
            finally:
                # No reference cycle exception -> traceback -> this frame -> future
                # -> exception (as Future.result, which sets ``self = None``).
                del exc, self
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == FINISHED:
            return self._exception
        return super().exception(timeout)

    # -- state transitions ----------------------------------------------------

    def cancel(self) -> bool:
        with self._condition:
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            # Atomic against the worker's claim (see the module docstring).
            if _set_state_if_pending(self, CANCELLED) != CANCELLED:
                return False
            self._condition.notify_all()
        self._invoke_callbacks()
        return True

    def set_running_or_notify_cancel(self) -> bool:
        if self._state == RUNNING:
            # Running already: _set_state_if_pending would answer RUNNING as if
            # it had set it. (Another caller racing this one is a misuse anyway.)
            raise RuntimeError(f"Future in unexpected state: {RUNNING}")
        state = _set_state_if_pending(self, RUNNING)
        if state == RUNNING:
            return True
        if state == CANCELLED:
            with self._condition:
                self._state = CANCELLED_AND_NOTIFIED
                for waiter in self._waiters:
                    waiter.add_cancelled(self)
            return False
        raise RuntimeError(f"Future in unexpected state: {state}")

    def _set_outcome(self, result: Any, exception: BaseException | None) -> None:
        """Complete a claimed (RUNNING) future: the worker's fast path."""
        with _seal(self):
            if not self._watched:
                # Nobody watches, and nobody can start before this write: no
                # waiter has seen the future unfinished. (_state exists since
                # the claim, so this replaces a value and allocates nothing.)
                if exception is None:
                    self._result = result
                else:
                    self._exception = exception
                self._state = FINISHED
                return
        self._finish_watched(result, exception)

    def _finish_watched(self, result: Any, exception: BaseException | None) -> None:
        """Completion when someone may wait: FINISHED under the condition, like
        Future.set_result, so a waiter that saw the future unfinished is notified
        once and one that saw it finished is not notified at all. User code that
        completed the running future itself (set_result) came first: its outcome
        stands, the task's is dropped."""
        with self._condition:
            if self._state == FINISHED:
                return
            if exception is None:
                self._result = result
            else:
                self._exception = exception
            self._state = FINISHED
            failed = self._exception is not None
            for waiter in self._waiters:
                if failed:
                    waiter.add_exception(self)
                else:
                    waiter.add_result(self)
            self._condition.notify_all()
        self._invoke_callbacks(on_worker=True)

    def _invoke_callbacks(self, *, on_worker: bool = False) -> None:
        """Call the done-callbacks in order. As in the stdlib, one that raises is
        logged and the next one runs; so is one that raises a BaseException
        (``sys.exit()``): on a worker thread it would end the worker, or the
        process. On the caller's own thread (``cancel()``, ``set_result()``) the
        first such is raised again once every callback ran, so that Ctrl-C and
        ``sys.exit()`` still work there, as in the stdlib."""
        first: BaseException | None = None
        for callback in self._done_callbacks:
            try:
                callback(self)
            except BaseException as exc:
                if on_worker or isinstance(exc, Exception):
                    LOGGER.exception("exception calling callback for %r", self)
                elif first is None:
                    first = exc
        if first is not None:
            try:
                raise first
            finally:
                del first  # no reference cycle through the traceback

    def _claim(self) -> bool:
        """PENDING -> RUNNING unless cancel() came first: the worker's claim."""
        return _set_state_if_pending(self, RUNNING) == RUNNING

    # -- copy and pickle: as the native future -----------------------------------

    def __copy__(self) -> Any:
        """A snapshot: a new future in the same state (a final one's outcome),
        without the original's condition, waiters and callbacks. As copy.copy of
        the stdlib's Future, ``__init__`` is not called and a subclass's own
        attributes (instance dict, slots) are copied shallowly."""
        cls = type(self)
        dup = cls.__new__(cls)
        state = {k: v for k, v in self.__dict__.items() if k not in _WATCHING}
        if state.get("_state") == CANCELLED:
            state["_state"] = CANCELLED_AND_NOTIFIED
        dup.__dict__.update(state)
        for name in copyreg._slotnames(cls):  # type: ignore[attr-defined]
            if hasattr(self, name):
                setattr(dup, name, getattr(self, name))
        return dup

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Refused even while nobody watches (no lock to trip over, unlike the
        # stdlib's): an unpickled copy would be a future that never ends.
        raise TypeError(f"cannot pickle {type(self).__name__!r} object: a future is a handle "
                        "on a task of this process")


# What a future builds when watched: never shared by a copy.
_WATCHING = frozenset({"_condition", "_waiters", "_done_callbacks", "_watched"})


def _set_state_if_pending_by_dict(fut: _PyFutureBase, state: str) -> str:
    """PENDING -> ``state``, atomically against any other thread; returns the
    state after the call (``state`` if it was set). One dict operation, atomic
    under the GIL or, free-threaded, the dict's own lock. The native core
    keeps its own state (src/_future.pxi)."""
    d = fut.__dict__
    current: str = d.setdefault("_state", state)
    if current != PENDING:
        return current
    # PENDING was assigned explicitly (Future.__init__, a test building a future
    # in a state): no single dict operation swaps it, so whoever finds it so
    # (the worker's claim, cancel()) changes it under the future's seal.
    with _seal(fut):
        if d["_state"] == PENDING:
            d["_state"] = state
        return d["_state"]  # type: ignore[no-any-return]


_set_state_if_pending: Callable[[_PyFutureBase, str], str] = _set_state_if_pending_by_dict


def _native_base() -> type[Any] | None:
    """FutureBase when the native core will be the scheduler, else None: the
    rule of keyedexec._impl, which cannot be imported yet (keyedexec._pure
    imports this module). keyedexec._core imports keyedexec._lifecycle, which
    imports _SEALS from here: it is defined above."""
    flag = os.environ.get("KEYEDEXEC_PURE_PYTHON", "").strip().lower()
    if flag not in ("", "0", "false", "no") or platform.python_implementation() != "CPython":
        return None
    try:
        from ._core import FutureBase
    except ImportError:
        return None  # keyedexec._impl warns, or raises (KEYEDEXEC_REQUIRE_NATIVE)
    return FutureBase


if TYPE_CHECKING:
    _Base = _PyFutureBase
else:
    _Base = _native_base() or _PyFutureBase


class KeyedFuture(_Base, Future[T]):
    """The future returned by ``KeyedExecutor.submit`` and friends.

    A ``concurrent.futures.Future`` in every respect; only cheaper.
    """

    if TYPE_CHECKING:  # the result's type, which the untyped base cannot carry

        def result(self, timeout: float | None = None) -> T: ...

    def _cancel_queued(self) -> None:
        """Cancel a future whose task will never run, and notify its waiters.

        Used when the scheduler drops a queued task (``cancel_futures``, a
        cancelled context): ``wait``/``as_completed`` see it as done at once.
        """
        try:
            self.cancel()  # may raise a callback's BaseException (_invoke_callbacks)
        finally:
            if self.cancelled():
                try:
                    self.set_running_or_notify_cancel()
                except RuntimeError:
                    pass  # already notified

    def _fail_queued(self, exc: BaseException, as_result: bool) -> None:
        """Fail a future whose task will never run (its pool broke) with ``exc``,
        or make ``exc`` its result (``as_result``: the execute_with_error kinds).
        One that its caller cancelled first stays cancelled."""
        if self._claim():
            if as_result:
                self._set_outcome(exc, None)
            else:
                self._set_outcome(None, exc)
        else:
            self._cancel_queued()


if _Base is not _PyFutureBase:
    from . import _core

    _core._install_future_class(KeyedFuture)
