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

The end of the loop is seen through an async generator that the executor keeps
suspended on it: ``loop.shutdown_asyncgens()``, which ``asyncio.run`` and
``asyncio.Runner`` call before closing the loop, closes it, and the executor
then cancels whatever is left, so no future (least of all one a thread waits
on) stays pending.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
import threading
import weakref
from collections import deque
from typing import Any, AsyncGenerator, Awaitable, Callable, Generic, ParamSpec, TypeVar

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
_ENDED = "the event loop of this AsyncKeyedExecutor has ended"


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
        waiter: asyncio.Future[None],
        runner: asyncio.Task[Any],
    ) -> None:
        self.ks = ks
        self.fut = fut
        self.task: asyncio.Task[Any]
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


# The job a task belongs to, inherited by the tasks the job starts: shutdown()
# awaited anywhere inside a job must not wait for that job.
_current_job: contextvars.ContextVar[_Run | None] = contextvars.ContextVar(
    "keyedexec_aio_job", default=None
)


def _start_job(
    run: _Run,
    loop: asyncio.AbstractEventLoop,
    fn: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> asyncio.Task[Any]:
    _current_job.set(run)  # in the job's own copy of the submitter's context
    aw = fn(*args, **kwargs)
    if not asyncio.iscoroutine(aw):
        if not inspect.isawaitable(aw):
            raise TypeError(f"coro_fn must return an awaitable, got {type(aw).__name__}")
        aw = _await(aw)  # a task of its own, even when jobs return one shared future
    return loop.create_task(aw)


async def _await(aw: Awaitable[Any]) -> Any:
    return await aw


def _reraise(exc: BaseException) -> None:
    raise exc


async def _until_loop_ends(
    executor: weakref.ref[AsyncKeyedExecutor[Any]],
) -> AsyncGenerator[None, None]:
    # Suspended for the loop's whole life; loop.shutdown_asyncgens() (asyncio.run's
    # and asyncio.Runner's cleanup) closes it, the one signal that the loop ends.
    # A weak reference: the executor it belongs to holds it, and must not be
    # kept alive by it until the cycle collector runs.
    try:
        yield
    finally:
        ex = executor()
        if ex is not None:
            ex._end_with_loop()


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

    Every accepted job ends with its future done. The call ``coro_fn(...)`` is
    part of the job: what it raises ends the job as if its task had raised it
    (CancelledError cancels the job; KeyboardInterrupt and SystemExit fail it
    and also propagate out of the loop, as asyncio does for tasks); the key's
    later jobs still run.

    Shut it down with ``async with``, :meth:`aclose` or :meth:`shutdown`. If
    the loop ends first (``asyncio.run`` or ``asyncio.Runner`` cleaning up),
    running jobs are cancelled with it, queued ones are cancelled without
    running, and later submits raise RuntimeError.
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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._keys: dict[Any, _KeyState] = {}
        self._ready: deque[_KeyState] = deque()
        self._runners: set[asyncio.Task[Any]] = set()
        self._spawned = 0
        # Started jobs by task: keeps each task referenced until it ends (the loop
        # holds tasks weakly).
        self._runs: dict[asyncio.Future[Any], _Run] = {}
        # Jobs awaiting shutdown(wait=True), by the future that releases each:
        # all are set together once every runner has finished or waits for one.
        self._in_shutdown: dict[asyncio.Future[None], _Run] = {}
        # submit_threadsafe's futures not yet done: cancelled if the loop ends first.
        self._from_threads: set[concurrent.futures.Future[Any]] = set()
        self._threads_lock = threading.Lock()
        self._loop_ended = False
        self._watch: AsyncGenerator[None, None] | None = None
        self._closed = False
        self._running = self._pending = 0
        self._submitted = self._completed = self._failed = self._cancelled = 0
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # bound on first use
        self._adopt(loop)

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
        (queued or running), as with :meth:`submit`. If the loop ends before
        the job does, the future is cancelled, so a thread blocked on its
        result wakes up; once the loop has ended this raises RuntimeError.
        """
        if not callable(coro_fn):
            raise TypeError(_not_callable(coro_fn))
        try:
            hash(key)
        except TypeError as exc:
            raise TypeError(f"key must be hashable, got {type(key).__name__}") from exc
        if self._closed:
            raise RuntimeError(_ENDED if self._loop_ended else _CLOSED)
        loop = self._loop
        if loop is None:
            raise RuntimeError(
                "this AsyncKeyedExecutor has no event loop yet: create it in a coroutine, "
                "or use it in the loop (submit or 'async with') first"
            )
        cf: concurrent.futures.Future[R] = concurrent.futures.Future()
        with self._threads_lock:  # against _end_with_loop: each future is refused or cancelled
            if self._loop_ended:
                raise RuntimeError(_ENDED)
            self._from_threads.add(cf)
        cf.add_done_callback(self._forget_thread_future)
        ctx = contextvars.copy_context()
        try:
            loop.call_soon_threadsafe(
                self._submit_from_thread, key, coro_fn, args, kwargs, cf, ctx
            )
        except RuntimeError:  # the loop is closed
            self._forsake_threads()
            raise RuntimeError(_ENDED) from None
        return cf

    def _forget_thread_future(self, cf: concurrent.futures.Future[Any]) -> None:
        with self._threads_lock:
            self._from_threads.discard(cf)

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
            self._adopt(running)
        elif self._loop is not running:
            if self._loop.is_closed():  # closed without shutdown_asyncgens()
                self._forsake_threads()
                raise RuntimeError(_ENDED)
            raise RuntimeError("this AsyncKeyedExecutor belongs to another event loop")
        return running

    def _adopt(self, loop: asyncio.AbstractEventLoop) -> None:
        # Called on the loop: its async generator hooks see the watch start.
        self._loop = loop
        watch = self._watch = _until_loop_ends(weakref.ref(self))
        try:
            watch.asend(None).send(None)  # runs it to its yield, no task needed
        except StopIteration:
            pass

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
        task.add_done_callback(self._runner_gone)  # also if cancelled before it started

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
            self._runner_gone(me)

    def _runner_gone(self, runner: asyncio.Task[Any]) -> None:
        self._runners.discard(runner)
        if self._in_shutdown:
            self._release_shutdown_waiters()

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
        run = _Run(ks, fut, loop.create_future(), runner)
        try:
            task = run.task = ctx.run(_start_job, run, loop, fn, args, kwargs)
        except BaseException as exc:
            # The call raised, or returned no awaitable: the job ends as its task would.
            if isinstance(exc, asyncio.CancelledError):
                self._cancel(fut)
            else:
                self._fail(ks.key, fut, exc)
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    loop.call_soon(_reraise, exc)  # out of the loop, as from a task
            return None
        self._running += 1
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
            self._cancel(fut)
        else:
            exc = task.exception()
            if exc is not None:
                self._fail(ks.key, fut, exc)
            else:
                self._completed += 1
                if fut is not None and not fut.done():
                    fut.set_result(task.result())
        if not run.waiter.done():
            run.waiter.set_result(None)

    def _cancel(self, fut: asyncio.Future[Any] | None) -> None:
        # A job ended cancelled: counted, and its future cancelled.
        self._cancelled += 1
        if fut is not None:
            fut.cancel()

    def _fail(self, key: Any, fut: asyncio.Future[Any] | None, exc: BaseException) -> None:
        # A job ended by an exception: counted, and to its future or on_error.
        self._completed += 1
        self._failed += 1
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
        again is harmless. If the executor's loop was closed without
        ``loop.shutdown_asyncgens()``, awaiting it on another loop cancels the
        futures of :meth:`submit_threadsafe` left pending and returns.

        Awaited inside a job (in its task or a task it started), ``wait=True``
        cannot wait for that job, nor for other jobs that await shutdown too
        (each would wait for the other): it returns once every other job has
        finished, or awaits shutdown itself, or cannot start before one of
        those ends (queued behind it on its key, or for want of a free slot).
        Those run when the jobs in shutdown return; awaited outside any job,
        shutdown waits for them as well.
        """
        if self._loop is not None and self._loop.is_closed():
            self._forsake_threads()  # nothing will ever run: only threads can be told
            self._closed = True
            return
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
        run = _current_job.get()
        if run is None or run.waiter.done() or run.runner not in self._runners:
            while True:  # not inside one of our jobs: wait for everything
                runners = [t for t in self._runners if not t.done()]
                if not runners:
                    return
                await asyncio.wait(runners)
        assert self._loop is not None
        released = self._loop.create_future()
        self._in_shutdown[released] = run
        try:
            self._release_shutdown_waiters()  # this job may be the last one they wait for
            await released
        finally:
            self._in_shutdown.pop(released, None)

    def _release_shutdown_waiters(self) -> None:
        # Release the jobs awaiting shutdown, all at once, when every runner has
        # finished or waits for one of them: nothing else can make progress.
        parked = {run.runner for run in self._in_shutdown.values()}
        if all(t in parked or t.done() for t in self._runners):
            for released in self._in_shutdown:
                if not released.done():
                    released.set_result(None)
            self._in_shutdown.clear()

    def _end_with_loop(self) -> None:
        # The loop is ending (asyncio.run cleaning up): nothing will run any more.
        # Leave no future pending, least of all one a thread may block on.
        self._forsake_threads()  # first: a thread that sees it closed says why
        self._closed = True
        if self._keys:
            self._drop(list(self._keys.values()))
            self._ready.clear()
        for run in list(self._runs.values()):
            run.task.cancel()  # started after asyncio.run cancelled the tasks it knew

    def _forsake_threads(self) -> None:
        # Cancel submit_threadsafe's pending futures; refuse any more.
        with self._threads_lock:
            self._loop_ended = True
            from_threads = list(self._from_threads)
        for cf in from_threads:
            cf.cancel()

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
