"""AsyncKeyedExecutor: per-key serial execution of coroutines on one event loop.

The asyncio twin of :class:`keyedexec.KeyedExecutor`, in pure asyncio (no
threads): jobs that share a key run one at a time, in submission order; jobs
with different keys run concurrently, at most ``concurrency`` at once.

Design (the threaded scheduler's, on the loop): a dict maps each key with work
to its deque of jobs; a deque of ready keys feeds up to ``concurrency`` runner
tasks, created on demand. A runner takes the next ready key, runs at most
``batch`` of its jobs one after another, then puts the key back at the tail of
the ready queue if more remain (fairness). A key is freed as soon as it has no
job queued or running; a runner exits when no key is ready.

Each job runs as its own ``asyncio.Task``, created when its turn comes, in a
copy of the submitter's contextvars (as ``asyncio.create_task`` would) so that
``asyncio.current_task()``, timeouts and cancellation inside a job concern that
job alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
from collections import deque
from typing import Any, Awaitable, Callable, Generic, ParamSpec, TypeVar

from ._report import log_task_error, report_failure
from ._typevars import K
from .executor import ErrorHandler, Metrics, Stats, _check_count

__all__ = ["AsyncKeyedExecutor"]

R = TypeVar("R")
P = ParamSpec("P")

# (coro_fn, args, kwargs, future or None, the submitter's context)
_Job = tuple[
    Callable[..., Awaitable[Any]],
    tuple[Any, ...],
    "dict[str, Any]",
    "asyncio.Future[Any] | None",
    contextvars.Context,
]

# _KeyState.serving
_QUEUED, _SERVED, _ORPHANED = 0, 1, 2

_CLOSED = "cannot schedule new tasks after shutdown"


class _KeyState:
    __slots__ = ("key", "jobs", "serving")

    def __init__(self, key: Any) -> None:
        self.key = key
        self.jobs: deque[_Job] = deque()
        # _QUEUED: in the ready queue; _SERVED: held by a runner; _ORPHANED: its
        # runner was cancelled while a job ran (the job's end releases the key).
        self.serving = _QUEUED


class _Run:
    """A started job: its task, its future, and the runner waiting for it."""

    __slots__ = ("ks", "fut", "task", "waiter", "runner")

    def __init__(
        self,
        ks: _KeyState,
        fut: asyncio.Future[Any] | None,
        task: asyncio.Future[Any],
        waiter: asyncio.Future[None],
        runner: asyncio.Task[Any],
    ) -> None:
        self.ks = ks
        self.fut = fut
        self.task = task
        self.waiter = waiter
        self.runner = runner

    def future_done(self, fut: asyncio.Future[Any]) -> None:
        # The caller cancelled the job's future while the job runs: cancel the job.
        if fut.cancelled():
            self.task.cancel()


def _not_callable(fn: object) -> str:
    msg = f"coro_fn must be callable, got {type(fn).__name__}"
    if asyncio.iscoroutine(fn):
        msg += " (pass the coroutine function and its arguments, not a coroutine)"
    return msg


def _start_job(
    loop: asyncio.AbstractEventLoop,
    fn: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> asyncio.Future[Any]:
    aw = fn(*args, **kwargs)
    if asyncio.iscoroutine(aw):
        return loop.create_task(aw)
    return asyncio.ensure_future(aw, loop=loop)  # any awaitable; TypeError otherwise


class AsyncKeyedExecutor(Generic[K]):
    """Run coroutines concurrently; those that share a key run one at a time, in order.

    ``submit(key, coro_fn, *args, **kwargs)`` calls ``coro_fn(*args, **kwargs)``
    when the jobs queued before it on ``key`` have finished, and returns an
    ``asyncio.Future`` of its result. At most ``concurrency`` jobs run at once
    (default 100, a typical connection-pool size); a key runs at most ``batch``
    jobs in a row while other keys wait.

    The executor belongs to one event loop: the one running when it is created,
    or else the one of its first ``submit`` or ``async with``. ``submit`` must
    be called on that loop; other threads use :meth:`submit_threadsafe`.

    Cancellation: cancelling a job's future before its turn means it never
    runs; cancelling it while the job runs cancels the job's task (the job sees
    CancelledError). As with any future, a task cancelled while it awaits
    ``submit``'s future cancels the job too (``asyncio.shield`` prevents it).
    Jobs run in a copy of the submitter's contextvars.

    Shut it down with ``async with``, :meth:`aclose` or :meth:`shutdown`. If
    the loop ends first (``asyncio.run`` cancelling leftover tasks), running
    jobs are cancelled with it and queued ones never run.
    """

    def __init__(
        self,
        concurrency: int = 100,
        *,
        on_error: ErrorHandler | None = None,
        batch: int = 64,
        name: str = "keyedexec-aio",
    ) -> None:
        self._concurrency = _check_count("concurrency", concurrency)
        self._batch = _check_count("batch", batch)
        if on_error is not None and not callable(on_error):
            raise TypeError(f"on_error must be callable, got {type(on_error).__name__}")
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        self._on_error: ErrorHandler = on_error or log_task_error
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._keys: dict[Any, _KeyState] = {}
        self._ready: deque[_KeyState] = deque()
        self._runners: set[asyncio.Task[Any]] = set()
        self._spawned = 0
        # Started jobs by task: keeps each task referenced until it ends (the loop
        # holds tasks weakly) and tells shutdown() which runner a job belongs to.
        self._runs: dict[asyncio.Future[Any], _Run] = {}
        self._closed = False
        self._running = self._pending = 0
        self._submitted = self._completed = self._failed = self._cancelled = 0

    # -- submission ---------------------------------------------------------------

    def submit(
        self, key: K, coro_fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> asyncio.Future[R]:
        """Run ``await coro_fn(*args, **kwargs)`` after the jobs queued for ``key``.

        Returns an ``asyncio.Future`` of its result (or exception). Raises
        TypeError (unhashable key, coro_fn not callable) or RuntimeError (after
        shutdown; called off the loop) without queueing anything.
        """
        loop = self._bind()
        fut: asyncio.Future[R] = loop.create_future()
        self._push(key, coro_fn, args, kwargs, fut, contextvars.copy_context())
        return fut

    def execute(
        self, key: K, coro_fn: Callable[P, Awaitable[object]], /, *args: P.args, **kwargs: P.kwargs
    ) -> None:
        """Like :meth:`submit`, fire and forget: an exception goes to ``on_error(key, exc)``."""
        self._bind()
        self._push(key, coro_fn, args, kwargs, None, contextvars.copy_context())

    def submit_threadsafe(
        self, key: K, coro_fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[R]:
        """:meth:`submit` from any thread; returns a ``concurrent.futures.Future``.

        The job is queued when the loop next runs its callbacks: calls from one
        thread keep their order. Cancelling the returned future cancels the job
        (queued or running), as with :meth:`submit`.
        """
        if not callable(coro_fn):
            raise TypeError(_not_callable(coro_fn))
        try:
            hash(key)
        except TypeError as exc:
            raise TypeError(f"key must be hashable, got {type(key).__name__}") from exc
        if self._closed:
            raise RuntimeError(_CLOSED)
        loop = self._loop
        if loop is None:
            raise RuntimeError(
                "this AsyncKeyedExecutor has no event loop yet: create it in a coroutine, "
                "or use it in the loop (submit or 'async with') first"
            )
        cf: concurrent.futures.Future[R] = concurrent.futures.Future()
        ctx = contextvars.copy_context()
        loop.call_soon_threadsafe(self._submit_from_thread, key, coro_fn, args, kwargs, cf, ctx)
        return cf

    def _submit_from_thread(
        self,
        key: Any,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        cf: concurrent.futures.Future[Any],
        ctx: contextvars.Context,
    ) -> None:
        if cf.cancelled():
            return
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        try:
            self._push(key, fn, args, kwargs, fut, ctx)
        except Exception as exc:  # shut down since the call, typically
            if cf.set_running_or_notify_cancel():
                cf.set_exception(exc)
            return
        fut.add_done_callback(functools.partial(_copy_outcome, cf))
        cf.add_done_callback(functools.partial(_cancel_soon, self._loop, fut))

    def _bind(self) -> asyncio.AbstractEventLoop:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "AsyncKeyedExecutor must be used from its event loop's thread; "
                "from other threads use submit_threadsafe()"
            ) from None
        if self._loop is None:
            self._loop = running
        elif self._loop is not running:
            raise RuntimeError("this AsyncKeyedExecutor belongs to another event loop")
        return running

    def _push(
        self,
        key: Any,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        fut: asyncio.Future[Any] | None,
        ctx: contextvars.Context,
    ) -> None:
        if not callable(fn):
            raise TypeError(_not_callable(fn))
        try:
            ks = self._keys.get(key)
        except TypeError as exc:
            raise TypeError(f"key must be hashable, got {type(key).__name__}") from exc
        if self._closed:
            raise RuntimeError(_CLOSED)
        new = ks is None
        if ks is None:
            ks = self._keys[key] = _KeyState(key)
            self._ready.append(ks)
        ks.jobs.append((fn, args, kwargs, fut, ctx))
        self._pending += 1
        self._submitted += 1
        if new and len(self._runners) < self._concurrency:
            self._spawn()

    # -- runners ------------------------------------------------------------------

    def _spawn(self) -> None:
        assert self._loop is not None
        self._spawned += 1
        # An empty context: a runner must not keep its first submitter's variables alive.
        task = contextvars.Context().run(
            self._loop.create_task, self._serve(), name=f"{self._name}-runner-{self._spawned}"
        )
        self._runners.add(task)
        task.add_done_callback(self._runners.discard)  # also if cancelled before it started

    async def _serve(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        ready = self._ready
        try:
            while ready:
                ks = ready.popleft()
                ks.serving = _SERVED
                jobs = ks.jobs
                served = 0
                while jobs and served < self._batch:
                    served += 1
                    run = self._start(ks, jobs.popleft(), me)
                    if run is None:
                        continue  # skipped, or failed to start: nothing to wait for
                    try:
                        await run.waiter
                    except asyncio.CancelledError:
                        # Cancelled from outside (asyncio.run cancelling leftovers):
                        # stop, and take the running job down too.
                        if run.waiter.done():
                            self._release(ks)
                        else:
                            ks.serving = _ORPHANED  # released when the job ends
                            run.task.cancel()
                        raise
                self._release(ks)
        finally:
            # Leave the set now, not in the done callback that runs later: a
            # submit in between must know that this runner takes no more keys.
            self._runners.discard(me)

    def _release(self, ks: _KeyState) -> None:
        # A runner lets go of a key: back in line if it has work, else freed.
        ks.serving = _QUEUED
        if ks.jobs:
            self._ready.append(ks)
        elif self._keys.get(ks.key) is ks:
            del self._keys[ks.key]

    def _start(self, ks: _KeyState, job: _Job, runner: asyncio.Task[Any]) -> _Run | None:
        fn, args, kwargs, fut, ctx = job
        self._pending -= 1
        if fut is not None and fut.cancelled():
            self._cancelled += 1
            return None
        loop = self._loop
        assert loop is not None
        try:
            task = ctx.run(_start_job, loop, fn, args, kwargs)
        except Exception as exc:  # the call raised, or returned no awaitable: the job failed
            self._completed += 1
            self._failed += 1
            self._fail(ks.key, fut, exc)
            return None
        self._running += 1
        run = _Run(ks, fut, task, loop.create_future(), runner)
        self._runs[task] = run
        task.add_done_callback(self._finish)
        if fut is not None:
            fut.add_done_callback(run.future_done)
        return run

    def _finish(self, task: asyncio.Future[Any]) -> None:
        run = self._runs.pop(task)
        ks, fut = run.ks, run.fut
        self._running -= 1
        if ks.serving == _ORPHANED:
            self._release(ks)
        elif not ks.jobs and self._keys.get(ks.key) is ks:
            # Freed now rather than when the runner wakes: metrics() is exact
            # by the time the job's awaiter resumes.
            del self._keys[ks.key]
        if fut is not None:
            fut.remove_done_callback(run.future_done)
        if task.cancelled():
            self._cancelled += 1
            if fut is not None:
                fut.cancel()
        else:
            self._completed += 1
            exc = task.exception()
            if exc is not None:
                self._failed += 1
                self._fail(ks.key, fut, exc)
            elif fut is not None and not fut.done():
                fut.set_result(task.result())
        if not run.waiter.done():
            run.waiter.set_result(None)

    def _fail(self, key: Any, fut: asyncio.Future[Any] | None, exc: BaseException) -> None:
        if fut is not None:
            if not fut.done():
                if isinstance(exc, StopIteration):  # asyncio futures refuse it
                    exc = RuntimeError(f"job raised {exc!r}")
                fut.set_exception(exc)
            return
        try:
            self._on_error(key, exc)
        except BaseException as handler_exc:
            report_failure(
                f"on_error handler {self._on_error!r} raised for key {key!r}", handler_exc
            )

    # -- cancellation and shutdown -------------------------------------------------

    def cancel_key(self, key: K) -> int:
        """Cancel ``key``'s queued jobs (not the running one). Returns how many.

        Their futures are cancelled; fire-and-forget jobs are dropped. Both
        count in ``metrics().cancelled``.
        """
        if self._loop is not None:
            self._bind()  # on the loop's thread: it changes the queues
        try:
            ks = self._keys.get(key)
        except TypeError as exc:
            raise TypeError(f"key must be hashable, got {type(key).__name__}") from exc
        if ks is None:
            return 0
        n = self._drop([ks])
        if ks.serving == _QUEUED:
            self._ready.remove(ks)  # O(ready keys); cancel_key is rare
        return n

    def _drop(self, states: list[_KeyState]) -> int:
        futures: list[asyncio.Future[Any]] = []
        n = 0
        for ks in states:
            n += len(ks.jobs)
            futures.extend(job[3] for job in ks.jobs if job[3] is not None)
            ks.jobs.clear()
            if ks.serving == _QUEUED:
                del self._keys[ks.key]  # the caller takes it off the ready queue
        self._pending -= n
        self._cancelled += n
        for fut in futures:
            fut.cancel()
        return n

    async def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting jobs (later submits raise RuntimeError).

        ``cancel_futures=True`` cancels every queued job that has not started
        (futures cancelled, fire-and-forget jobs dropped); otherwise everything
        accepted runs. ``wait=True`` returns once all of it is done. Calling it
        again is harmless. Awaited from inside a job, it does not wait for that
        job's own runner (it would wait for itself).
        """
        self._bind()
        self._closed = True
        if cancel_futures and self._keys:
            self._drop(list(self._keys.values()))
            self._ready.clear()
        if not wait:
            return
        # Queued keys whose runners were cancelled from outside get new ones.
        for _ in range(min(len(self._ready), self._concurrency - len(self._runners))):
            self._spawn()
        me = asyncio.current_task()
        own = self._runs[me].runner if me in self._runs else None
        while True:
            others = [t for t in self._runners if t is not own and not t.done()]
            if not others:
                return
            await asyncio.wait(others)

    async def aclose(self) -> None:
        """``await shutdown(wait=True)``: run everything accepted, then return."""
        await self.shutdown(wait=True)

    async def __aenter__(self) -> AsyncKeyedExecutor[K]:
        self._bind()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown(wait=True)

    # -- introspection ------------------------------------------------------------

    def pending(self, key: K) -> int:
        """Jobs queued for ``key`` and not started."""
        ks = self._keys.get(key)
        return 0 if ks is None else len(ks.jobs)

    def stats(self) -> Stats:
        """``Stats(concurrency, pending)``: pending = queued + running."""
        return Stats(self._concurrency, self._running + self._pending)

    def metrics(self) -> Metrics:
        """A snapshot of the counters (see :class:`keyedexec.Metrics`).

        ``workers`` counts runner tasks alive; ``cancelled`` also counts jobs
        whose task was cancelled while running. Exact when called on the loop.
        """
        return Metrics(
            len(self._runners),
            self._running,
            self._pending,
            len(self._keys),
            self._submitted,
            self._completed,
            self._failed,
            self._cancelled,
        )

    @property
    def concurrency(self) -> int:
        """The most jobs that run at once."""
        return self._concurrency

    @property
    def closed(self) -> bool:
        """True once shutdown began."""
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<{type(self).__name__} {state} concurrency={self._concurrency} "
            f"running={self._running} pending={self._pending} keys={len(self._keys)}>"
        )


def _copy_outcome(cf: concurrent.futures.Future[Any], fut: asyncio.Future[Any]) -> None:
    # asyncio future -> concurrent future, as asyncio.run_coroutine_threadsafe does.
    if fut.cancelled():
        cf.cancel()
    if not cf.set_running_or_notify_cancel():
        return
    exc = fut.exception()
    if exc is None:
        cf.set_result(fut.result())
    else:
        cf.set_exception(exc)


def _cancel_soon(
    loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], cf: concurrent.futures.Future[Any]
) -> None:
    # The concurrent future was cancelled, in whatever thread: cancel the job on its loop.
    if cf.cancelled():
        try:
            loop.call_soon_threadsafe(fut.cancel)
        except RuntimeError:
            pass  # the loop is closed: nothing left to cancel
