"""Completions from worker threads to an event loop, one wake-up per batch.

``KeyedExecutor.submit_async`` runs its call inside a :class:`_LoopCall`: the
worker that finishes it appends the outcome to the loop's :class:`_Inbox` and
wakes the loop (``call_soon_threadsafe``, a lock and a self-pipe write) only if
no wake-up is pending already. The loop then settles every asyncio future that
arrived since, in completion order, in one callback: however many tasks
finished while the loop was busy, it pays for one wake-up.

Lifetimes: the inbox holds its loop weakly and the open batch weakly; the
batch is owned by the wake-up scheduled on the loop. A loop that is closed
with completions in flight (or never runs again) is therefore not kept alive
by this module, and a worker finishing after the loop closed drops its
outcome silently: nobody can await it any more.

The cancellation of the asyncio future reaches the task through
:class:`_AsyncResult` (cancelling it cancels the task if it has not started);
a task the scheduler drops without running it (``cancel_key``,
``shutdown(cancel_futures=True)``, a broken pool) is seen when its
:class:`_LoopCall` is released unrun, and the asyncio future gets the task
future's fate (cancelled, or its exception). Known limitation on free-threaded
builds: a LoopCall dropped by another thread than the loop's (a broken pool,
``cancel_key`` called from a thread) is released, and so reports, only when the
loop's thread next runs Python code (biased reference counting merges the
count in the owning thread).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import Any, Callable

__all__ = ["AsyncResult", "LoopCall", "inbox_for"]


class _Batch(list):  # type: ignore[type-arg]
    """Outcomes waiting for one wake-up: (future, result, exception) triples.
    A list subclass only to be weakly referenced by its inbox."""

    __slots__ = ("__weakref__",)


def _no_batch() -> None:
    return None


class _Inbox:
    """One event loop's inbox of completed calls (see the module docstring)."""

    __slots__ = ("__weakref__", "_lock", "_loop", "_open")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)
        self._lock = threading.Lock()
        # The batch a wake-up is already scheduled for, or None: new outcomes join it.
        self._open: Callable[[], _Batch | None] = _no_batch

    def post(self, fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
        """From any thread: settle ``fut`` on its loop (never raises)."""
        with self._lock:
            batch = self._open()
            if batch is not None:
                batch.append((fut, result, exc))
                return
            batch = _Batch()
            batch.append((fut, result, exc))
            self._open = weakref.ref(batch)
        loop = self._loop()
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._drain, batch)
        except RuntimeError:
            pass  # the loop is closed: nobody can await these futures any more

    def _drain(self, batch: _Batch) -> None:
        # On the loop: close the batch (later outcomes start a new one), then settle it.
        with self._lock:
            if self._open() is batch:
                self._open = _no_batch
        for fut, result, exc in batch:
            if fut.done():  # cancelled by its awaiter meanwhile
                continue
            if exc is None:
                fut.set_result(result)
            elif exc is _CANCEL:
                fut.cancel()
            else:
                if isinstance(exc, StopIteration):  # asyncio futures refuse it
                    exc = RuntimeError(f"task raised {exc!r}")
                fut.set_exception(exc)


# The inbox of the loop this thread ran last: a running loop belongs to one
# thread, so no lookup table (and nothing that outlives the loop) is needed.
_local = threading.local()


def inbox_for(loop: asyncio.AbstractEventLoop) -> _Inbox:
    """The inbox of ``loop``, the running loop of the calling thread."""
    inbox: _Inbox | None = getattr(_local, "inbox", None)
    if inbox is None or inbox._loop() is not loop:
        inbox = _local.inbox = _Inbox(loop)
    return inbox


class AsyncResult(asyncio.Future[Any]):
    """The asyncio future of a ``submit_async`` call: cancelling it cancels the
    task if the task has not started (a race the task may win, as in
    ``concurrent.futures``)."""

    __slots__ = ("_task",)
    _task: Any  # the task's KeyedFuture

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg=msg):
            return False
        task = getattr(self, "_task", None)
        if task is not None:
            task.cancel()
        return True


class LoopCall:
    """The callable a worker runs for ``submit_async``: calls ``fn``, posts the
    outcome to the loop, and re-raises an exception so that the scheduler
    counts the task as failed. Released without being called, it settles the
    asyncio future from the task future's fate (see the module docstring)."""

    __slots__ = ("_args", "_fn", "_fut", "_inbox", "_kwargs", "task")

    def __init__(
        self,
        inbox: _Inbox,
        fut: asyncio.Future[Any],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self._inbox = inbox
        self._fut: asyncio.Future[Any] | None = fut
        self._fn = fn
        self._args = args
        self._kwargs = kwargs
        # The scheduler's future of this call, once submitted; None if submit raised.
        self.task: Any = None

    def __call__(self) -> None:
        fut = self._fut
        self._fut = None  # ran: nothing for __del__ to do
        try:
            result = self._fn(*self._args, **self._kwargs)
        except BaseException as exc:
            if fut is not None:
                self._inbox.post(fut, None, exc)
            raise
        if fut is not None:
            self._inbox.post(fut, result, None)

    def __del__(self) -> None:
        fut, task = self._fut, self.task
        if fut is None or task is None:
            return  # ran, or never accepted (submit raised to its caller)
        # Dropped unrun: the task future says why (cancelled, or a broken pool).
        exc = None if task.cancelled() or not task.done() else task.exception()
        if exc is None:
            self._inbox.post(fut, None, _CANCEL)
        else:
            self._inbox.post(fut, None, exc)


class _Cancel(BaseException):
    """Posted for a task dropped unrun: the drain cancels the future instead."""


_CANCEL = _Cancel()
