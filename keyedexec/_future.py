"""KeyedFuture: a ``concurrent.futures.Future`` that is cheap to create and complete.

The stdlib's ``Future.__init__`` builds a ``threading.Condition`` (about half a
microsecond), and ``set_result`` takes it even when nobody waits. At millions of
tasks per second that is most of the cost, so this subclass:

* creates its condition, waiter list and callback list on first use only
  (:class:`_Lazy`), and keeps PENDING/None defaults on the class, so a new
  future is an empty object;
* lets the worker claim and complete it without the condition. PENDING is "no
  ``_state`` attribute yet" (the class default). The worker claims with an
  atomic PENDING -> RUNNING and ``cancel()`` with PENDING -> CANCELLED
  (``_set_state_if_pending``): whoever writes first wins. The native core does
  it in C, where nothing runs between the read and the write under the GIL (a
  single dict operation when free-threaded); without the core, one
  ``__dict__.setdefault``.
* completes by writing the outcome and then ``_state = FINISHED`` under a seal
  lock (``_seal``), unless someone watches. Anyone who waits creates the
  condition, and flags the future as watched, under the same seal: either the
  worker sees the flag and notifies under the condition, or the waiter sees
  FINISHED: no lost wake-up.

Every stdlib operation still works (``wait``, ``as_completed``,
``asyncio.wrap_future``, callbacks), because they all go through ``_condition``,
``_state``, ``_waiters`` and ``_done_callbacks``, which behave as before.
The native core performs the same claim and completion steps in C.
"""

from __future__ import annotations

import sys
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
from typing import Any, Callable, Generic, TypeVar

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


# Order "is anyone watching?" (a worker completing a future) against "start
# watching" (creating its condition). Striped by the future's address so that
# workers on a free-threaded build rarely meet on one lock. The native core on
# GIL builds needs none: its check and write run without a GIL switch between.
_SEALS = tuple(threading.Lock() for _ in range(64))


def _seal(fut: object) -> threading.Lock:
    return _SEALS[(id(fut) >> 4) & 63]  # the native core computes the same index


class _LazyCondition(_Lazy[threading.Condition]):
    """The condition, created on first use; also flags the future as watched.

    ``_watched`` tells the worker's completion path that someone may wait or
    has a callback (the native core checks it instead of the instance dict).
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


class KeyedFuture(Future[T]):
    """The future returned by ``KeyedExecutor.submit`` and friends.

    A ``concurrent.futures.Future`` in every respect; only cheaper.
    """

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
    # writes. With the native core's state change no dict is ever needed, and
    # keyedexec._core swaps this for object.__init__ on 3.11+ (attributes
    # inline); before 3.11 a first attribute write creates the dict lazily with
    # the same race, so it stays.
    def __init__(self) -> None:
        self.__dict__  # noqa: B018

    # -- lock-free reads: a single attribute read is atomic ---------------------

    def done(self) -> bool:
        return self._state in _DONE

    def cancelled(self) -> bool:
        return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED)

    def running(self) -> bool:
        return self._state == RUNNING

    def result(self, timeout: float | None = None) -> T:
        if self._state == FINISHED:
            exc = self._exception
            if exc is None:
                return self._result  # type: ignore[return-value]
            try:
                raise exc
            finally:
                del exc  # no reference cycle through the traceback
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
        if exception is None:
            self._result = result
        else:
            self._exception = exception
        with _seal(self):
            if not self._watched:
                # Nobody watches, and nobody can start before this write: no
                # waiter has seen the future unfinished. (_state exists since
                # the claim, so this replaces a value and allocates nothing.)
                self._state = FINISHED
                return
        self._finish_watched()

    def _finish_watched(self) -> None:
        """Completion when someone may wait: FINISHED under the condition, like
        Future.set_result, so a waiter that saw the future unfinished is notified
        once and one that saw it finished is not notified at all."""
        with self._condition:
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
        if _set_state_if_pending(self, RUNNING) == RUNNING:
            if as_result:
                self._set_outcome(exc, None)
            else:
                self._set_outcome(None, exc)
        else:
            self._cancel_queued()


def _set_state_if_pending_by_dict(fut: KeyedFuture[Any], state: str) -> str:
    """PENDING -> ``state``, atomically against any other thread; returns the
    state after the call (``state`` if it was set). One dict operation, atomic
    under the GIL or, free-threaded, the dict's own lock. The native core
    installs an equivalent that needs no instance dict on GIL builds."""
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


_set_state_if_pending: Callable[[KeyedFuture[Any], str], str] = _set_state_if_pending_by_dict


def _use_native_state_change(set_state_if_pending: Callable[[KeyedFuture[Any], str], str]) -> None:
    """Called by keyedexec._core when it is imported (see KeyedFuture.__init__)."""
    global _set_state_if_pending
    _set_state_if_pending = set_state_if_pending
    if sys.version_info >= (3, 11):
        KeyedFuture.__init__ = object.__init__  # type: ignore[method-assign]


def _teach_instance_attributes() -> None:
    """Register every instance attribute name with the class, before any real
    future exists.

    CPython (3.11+) keeps instance attributes inline, without a dict, only for
    names in the class's shared key table, and that table stops taking new
    names once a few dozen instances exist. If many futures are created before
    the first one completes (idle workers, a burst of submits), ``_result``
    would arrive too late, and from then on every future of the process would
    carry a full dict: twice the allocations and GC work per task.
    """
    primer = KeyedFuture.__new__(KeyedFuture)
    for name in ("_state", "_result", "_exception", "_watched", "_condition",
                 "_waiters", "_done_callbacks"):
        setattr(primer, name, None)


_teach_instance_attributes()
