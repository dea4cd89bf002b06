"""Completions from worker threads to an event loop, one wake-up per batch.

``KeyedExecutor.submit_async`` submits the call as usual and gives its
KeyedFuture one done-callback: :meth:`AsyncResult._task_done`. That callback
(run by the worker that finished the task, or by whoever cancelled or failed it
unrun: ``cancel_key``, ``shutdown(cancel_futures=True)``, a broken pool) appends
the task to the loop's :class:`_Inbox` and wakes the loop
(``call_soon_threadsafe``, a lock and a self-pipe write) only if no wake-up is
pending already. The loop then settles every asyncio future that arrived
since, in completion order, in one callback: however many tasks finished while
the loop was busy, it pays for one wake-up.

Lifetimes: the inbox holds its loop weakly and the open batch weakly; the
batch is owned by the wake-up scheduled on the loop. A loop that is closed
with completions in flight (or never runs again) is therefore not kept alive
by this module, and a task finishing after the loop closed is dropped
silently: nobody can await it any more.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import weakref
from concurrent.futures import Future
from typing import Any, Callable

__all__ = ["AsyncResult", "inbox_for"]


class _Batch(list):  # type: ignore[type-arg]
    """Tasks waiting for one wake-up: (asyncio future, finished task future) pairs.
    A list subclass only to be weakly referenced by its inbox."""

    __slots__ = ("__weakref__",)


def _no_batch() -> None:
    return None


class _Inbox:
    """One event loop's inbox of finished tasks (see the module docstring)."""

    __slots__ = ("__weakref__", "_lock", "_loop", "_open")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)
        self._lock = threading.Lock()
        # The batch a wake-up is already scheduled for, or None: new outcomes join it.
        self._open: Callable[[], _Batch | None] = _no_batch

    def post(self, fut: AsyncResult, task: Future[Any]) -> None:
        """From any thread: settle ``fut`` from its finished ``task`` on the loop
        (never raises)."""
        with self._lock:
            batch = self._open()
            if batch is not None:
                batch.append((fut, task))
                return
            batch = _Batch()
            batch.append((fut, task))
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
        for fut, task in batch:
            fut._task = None  # no cycle through the task's callback list
            if fut.done():  # cancelled by its awaiter meanwhile
                continue
            if task.cancelled():  # dropped unrun: cancel_key, shutdown(cancel_futures=True)
                fut.cancel()
                continue
            exc = task.exception()
            if exc is None:
                fut.set_result(task.result())
            else:
                fut.set_exception(_for_asyncio(exc))


# concurrent.futures' errors that asyncio has classes of its own for (TimeoutError
# is one class since 3.11).
_ASYNCIO_ERRORS: dict[type[BaseException], type[BaseException]] = {
    cf.CancelledError: asyncio.CancelledError,
    cf.InvalidStateError: asyncio.InvalidStateError,
}
if cf.TimeoutError is not asyncio.TimeoutError:
    _ASYNCIO_ERRORS[cf.TimeoutError] = asyncio.TimeoutError


def _for_asyncio(exc: BaseException) -> BaseException:
    """The exception the awaiter gets: as ``asyncio.wrap_future`` converts it
    (concurrent.futures' errors become asyncio's, traceback kept), and
    StopIteration, which asyncio futures refuse, becomes a RuntimeError
    instead of leaving the awaiter hanging."""
    cls = _ASYNCIO_ERRORS.get(type(exc))
    if cls is not None:
        return cls(*exc.args).with_traceback(exc.__traceback__)
    if isinstance(exc, StopIteration):
        return RuntimeError(f"task raised {exc!r}")
    return exc


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

    __slots__ = ("_inbox", "_task")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._inbox = inbox_for(loop)
        self._task: Future[Any] | None = None  # the task's KeyedFuture, until settled

    def _task_done(self, task: Future[Any]) -> None:
        # The task's done-callback, in whatever thread ended it.
        self._inbox.post(self, task)

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg=msg):
            return False
        task = self._task
        if task is not None:
            task.cancel()
        return True


def awaitable(task: Future[Any]) -> AsyncResult:
    """``task`` (an executor's future, just submitted) as an asyncio future of
    the running loop: the body of every ``submit_async``."""
    fut = AsyncResult(asyncio.get_running_loop())
    fut._task = task
    task.add_done_callback(fut._task_done)
    return fut
