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

A job is not a task of its own: its runner drives the job's coroutine itself,
each step in the job's own context (a copy of the submitter's, as
``asyncio.create_task`` makes), so a job costs a context, plus a future for
``submit`` (the native core queues it in a C ring, with its context out of the
cycle collector's sight until it runs; here, a tuple in a deque). A job that
finishes without suspending never leaves the runner's loop; one that suspends
is awaited through :class:`_Drive`, which forwards each step,
``ctx.run(coro.send, ...)``. What this means inside a job:

* ``asyncio.current_task()`` is the runner serving the job (shared, one job at
  a time). ``asyncio.timeout`` and ``asyncio.TaskGroup`` work as in any task:
  they cancel the current task and take the cancellation back.
* Cancelling the job's future cancels that job only: the job sees
  CancelledError where it awaits (as when a task is cancelled), the runner
  goes on with the next job.
* Cancelling the runner itself (``asyncio.current_task().cancel()`` in a job,
  or ``asyncio.run`` cancelling the tasks left at its end) cancels the job it
  runs and then stops that runner; the keys it would have served wait for the
  next submit or for ``shutdown``, which start runners again (if the executor
  is dropped first, their futures are cancelled).
* A runner yields to the loop after ``batch`` jobs in a row that did not
  suspend, so that jobs which never await do not starve the loop.

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
import types
import weakref
from collections import deque
from time import monotonic_ns
from typing import (
    Any,
    AsyncGenerator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Generic,
    ParamSpec,
    TypeVar,
)

from . import _impl, _watchdog
from ._report import log_task_error, logger, report_failure
from ._timings import HotKey, Recorder, Timings, check_n, hot_keys, timings_from
from ._typevars import K
from .executor import (
    _UINT32_MAX,
    DEFAULT_SAMPLE_TIMINGS,
    ErrorHandler,
    Metrics,
    Stats,
    _check_count,
    _check_threshold,
)

__all__ = ["AsyncKeyedExecutor"]

R = TypeVar("R")
P = ParamSpec("P")

# A job queued by _PyCore: (coro_fn, args, kwargs, future or None, the
# submitter's context, submit time in ns, timed). The native core keeps the
# same fields in a C struct (AioJob, src/_aio.pxi).
_Job = tuple[
    Callable[..., Awaitable[Any]],
    tuple[Any, ...],
    "dict[str, Any]",
    "asyncio.Future[Any] | None",
    contextvars.Context,
    int,
    bool,
]

# _KeyState.serving
_QUEUED, _SERVED = 0, 1

_CLOSED = "cannot schedule new tasks after shutdown"
_ENDED = "the event loop of this AsyncKeyedExecutor has ended"

_CancelledError = asyncio.CancelledError
_get_running_loop = asyncio.get_running_loop
_copy_context = contextvars.copy_context
_CoroutineType = types.CoroutineType


class _KeyState:
    __slots__ = ("jobs", "key", "serving")

    def __init__(self, key: Any) -> None:
        self.key = key
        self.jobs: deque[_Job] = deque()
        # _QUEUED: in the ready queue; _SERVED: held by a runner.
        self.serving = _QUEUED

    @property
    def queued(self) -> int:
        return len(self.jobs)

    @property
    def oldest(self) -> int:
        """The oldest queued job's submit stamp (ns), or 0 if none is queued."""
        try:
            return self.jobs[0][5]
        except IndexError:  # hot_keys from another thread: emptied meanwhile
            return 0

    def drop(self) -> list[asyncio.Future[Any]]:
        """Take every queued job off; returns their futures (execute's have none)."""
        futures = [job[3] for job in self.jobs if job[3] is not None]
        self.jobs.clear()
        return futures


class _Runner(asyncio.Task):  # type: ignore[type-arg]
    """A runner task. It counts in ``state.stops`` the cancel requests made to
    it and not taken back (``uncancel``, as ``asyncio.timeout`` does): after a
    job, any left mean "stop" (``Task.cancelling()`` would do, but is new in
    3.11)."""

    def __init__(self, coro: Coroutine[Any, Any, None], *, loop: Any, name: str, state: Any
                 ) -> None:
        super().__init__(coro, loop=loop, name=name)
        self.state = state

    def cancel(self, msg: Any = None) -> bool:
        if not self.done():
            self.state.stops += 1
        return super().cancel(msg)

    def uncancel(self) -> int:
        if self.state.stops:
            self.state.stops -= 1
        return super().uncancel()


class _Drive:
    """Awaits a suspended job for its runner, stepping its coroutine in the
    job's context; cancels the job alone (:meth:`cancel_job`), as
    ``Task.cancel`` would cancel a task of its own."""

    __slots__ = ("coro", "ctx", "done", "first", "must_cancel", "waiting")

    def __init__(self, coro: Coroutine[Any, Any, Any], ctx: contextvars.Context, first: Any) -> None:
        self.coro = coro
        self.ctx = ctx
        self.first = first
        self.waiting: Any = None  # what the job awaits now
        self.must_cancel = False
        self.done = False

    def __await__(self) -> Generator[Any, None, Any]:
        coro, ctx = self.coro, self.ctx
        send, throw = coro.send, coro.throw
        step = self.first
        self.first = None
        try:
            while True:
                self.waiting = step
                thrown: BaseException | None = None
                try:
                    yield step
                except GeneratorExit:
                    ctx.run(coro.close)
                    raise
                except BaseException as exc:  # thrown into the runner: the job's now
                    thrown = exc
                self.waiting = None
                if self.must_cancel:
                    self.must_cancel = False
                    if not isinstance(thrown, _CancelledError):
                        thrown = _CancelledError()
                try:
                    step = ctx.run(send, None) if thrown is None else ctx.run(throw, thrown)
                except StopIteration as stop:
                    return stop.value
                finally:
                    thrown = None  # no cycle through the traceback
        finally:
            self.done = True

    def cancel_job(self) -> None:
        """Cancel the job: its awaited future, else CancelledError at its next step."""
        if self.done:
            return
        waiting = self.waiting
        cancel = getattr(waiting, "cancel", None)
        if waiting is not None and cancel is not None and cancel():
            return
        self.must_cancel = True

    def future_done(self, fut: asyncio.Future[Any]) -> None:
        # The caller cancelled the job's future while the job runs: cancel the job.
        if fut.cancelled():
            self.cancel_job()


def _not_callable(fn: object) -> str:
    msg = f"coro_fn must be callable, got {type(fn).__name__}"
    if asyncio.iscoroutine(fn):
        msg += " (pass the coroutine function and its arguments, not a coroutine)"
    return msg


# The job a task belongs to, inherited by the tasks the job starts: shutdown()
# awaited anywhere inside a job must not wait for that job. Its value is a bare
# object() made for the job (its runner's ``state.job``), never the job itself:
# the job holds its context, and a context holding the job would be a reference
# cycle, leaving every finished job to the cycle collector.
_current_job: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "keyedexec_aio_job", default=None
)


def _start(
    job: object, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Coroutine[Any, Any, Any], Any]:
    """In the job's context: call ``coro_fn`` and take the coroutine's first
    step. Returns (coroutine, what it awaits); StopIteration: done already."""
    _current_job.set(job)
    try:
        aw = fn(*args, **kwargs) if kwargs else fn(*args)
    except StopIteration as exc:  # not a coroutine's return: a failure of the call
        raise RuntimeError(f"coro_fn raised {exc!r}") from None
    if type(aw) is not _CoroutineType:
        aw = _as_coroutine(aw)
    return aw, aw.send(None)


def _as_coroutine(aw: object) -> Coroutine[Any, Any, Any]:
    if asyncio.iscoroutine(aw):
        return aw
    if not inspect.isawaitable(aw):
        raise TypeError(f"coro_fn must return an awaitable, got {type(aw).__name__}")
    return _await(aw)  # a coroutine of its own, even when jobs return one shared future


async def _await(aw: Awaitable[Any]) -> Any:
    return await aw


class _State:
    """A runner's place in the work: the key it serves and the job it runs."""

    __slots__ = ("drive", "job", "ks", "seq", "served", "stamp", "started", "stops", "unyielded")

    def __init__(self) -> None:
        self.seq = 0  # jobs started (the slow-job check)
        self.stamp = 0  # the running job's submit stamp (ns), if it is timed
        self.started = 0  # its start (ns) if it is timed, else 0
        self.ks: _KeyState | None = None
        self.served = 0  # jobs of ks run in this turn (batch)
        self.unyielded = 0  # jobs run since the runner last let the loop run
        self.job: object | None = None  # the running job's mark (_current_job)
        self.drive: _Drive | None = None  # its driver, while it is suspended
        self.stops = 0  # cancel requests to the runner not taken back (see _Runner)


# What _PyCore.run returns besides a suspended job (or None: no key is ready).
YIELD, STOP = "yield", "stop"


class _PyCore:
    """The scheduler's hot paths: queueing a job, and running the jobs that do
    not suspend. The native core (``keyedexec._core.AsyncCore``) is its twin;
    the facade keeps everything else (suspended jobs, cancellation, shutdown).
    ``owner`` is a weak reference to the facade (no reference cycle)."""

    def __init__(
        self, owner: Callable[[], Any], concurrency: int, batch: int,
        sample_timings: int = DEFAULT_SAMPLE_TIMINGS,
    ) -> None:
        self.owner = owner
        self.timing = Recorder(sample_timings)
        self.concurrency = concurrency
        self.batch = batch
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        self.keys: dict[Any, _KeyState] = {}
        self.ready: deque[_KeyState] = deque()
        self.runners: set[Any] = set()
        self.running = self.pending = 0
        self.submitted = self.completed = self.failed = self.cancelled = 0

    @staticmethod
    def new_state() -> _State:
        return _State()

    def timings(self) -> tuple[int, tuple[int, ...], int, tuple[int, ...], int]:
        return self.timing.raw()

    def record(self, stamp: int, started: int, ended: int) -> None:
        """A timed job that suspended has ended (returned or raised)."""
        self.timing.record(stamp, started, ended)

    now_ns = staticmethod(monotonic_ns)  # the clock of the jobs' stamps

    def submit(self, key: Any, fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any
               ) -> asyncio.Future[Any]:
        try:
            loop = _get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or loop is not self.loop:
            loop = self.owner()._bind()
        fut = loop.create_future()
        self.push(key, fn, args, kwargs, fut, _copy_context())
        return fut

    def execute(self, key: Any, fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any
                ) -> None:
        try:
            loop = _get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or loop is not self.loop:
            self.owner()._bind()
        self.push(key, fn, args, kwargs, None, _copy_context())

    def push(
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
            ks = self.keys.get(key)
        except TypeError as exc:
            raise TypeError(f"key must be hashable, got {type(key).__name__}") from exc
        if self.closed:
            raise RuntimeError(_CLOSED)
        timed = self.timing.take()
        job = (fn, args, kwargs, fut, ctx, monotonic_ns(), timed)
        if ks is None:
            ks = _KeyState(key)
            self.keys[key] = ks
            self.ready.append(ks)
            ks.jobs.append(job)
            self.pending += 1
            self.submitted += 1
            if len(self.runners) < self.concurrency:
                self.owner()._spawn()
            return
        ks.jobs.append(job)
        self.pending += 1
        self.submitted += 1

    def release(self, ks: _KeyState) -> None:
        """A runner lets go of a key: back in line if it has work, else freed."""
        ks.serving = _QUEUED
        if ks.jobs:
            self.ready.append(ks)
        elif self.keys.get(ks.key) is ks:
            del self.keys[ks.key]

    def run(self, st: _State) -> Any:
        """Run ready jobs until one suspends: returns (coroutine, its context,
        what it awaits, its future). Or YIELD (``batch`` jobs ran without the
        loop running: the runner should let it run), STOP (the runner was
        cancelled: its key is released), None (no key is ready)."""
        ready = self.ready
        batch = self.batch
        while True:
            ks = st.ks
            if ks is None:
                if not ready:
                    return None
                ks = st.ks = ready.popleft()
                ks.serving = _SERVED
                st.served = 0
            jobs = ks.jobs
            if st.stops or not jobs or st.served >= batch:
                st.ks = None
                self.release(ks)
                if st.stops:
                    return STOP
                continue
            if st.unyielded >= batch:
                st.unyielded = 0
                return YIELD
            st.served += 1
            fn, args, kwargs, fut, ctx, stamp, timed = jobs.popleft()
            self.pending -= 1
            if fut is not None and fut.done():  # cancelled before its turn
                self.cancelled += 1
                continue
            self.running += 1
            st.job = mark = object()
            st.seq += 1
            if timed:
                st.stamp = stamp
                st.started = monotonic_ns()
            else:
                st.started = 0
            try:
                coro, step = ctx.run(_start, mark, fn, args, kwargs)
            except StopIteration as stop:  # done without suspending: the fast path
                st.unyielded += 1
                self.running -= 1
                st.job = None
                self.completed += 1
                if timed:
                    self.timing.record(stamp, st.started, monotonic_ns())
                if fut is not None and not fut.done():
                    fut.set_result(stop.value)
                continue
            except BaseException as exc:
                st.unyielded += 1
                self.running -= 1
                st.job = None
                if timed and not isinstance(exc, _CancelledError):
                    self.timing.record(stamp, st.started, monotonic_ns())
                self.owner()._failed_or_cancelled(ks.key, fut, exc)
                del exc
                continue
            st.unyielded = 0
            return coro, ctx, step, fut


def _reraise(exc: BaseException) -> None:
    raise exc


async def _sleep0() -> None:
    await asyncio.sleep(0)


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
    runs; cancelling it while the job runs cancels the job (it sees
    CancelledError where it awaits). As with any future, a task cancelled while
    it awaits ``submit``'s future cancels the job too (``asyncio.shield``
    prevents it). Jobs run in a copy of the submitter's contextvars. Jobs do
    not get a task each: ``asyncio.current_task()`` inside a job is the runner
    task serving it (see the module docstring for what that means).

    Every accepted job ends with its future done. The call ``coro_fn(...)`` is
    part of the job: what it raises ends the job as if its task had raised it
    (CancelledError cancels the job; KeyboardInterrupt and SystemExit fail it
    and also propagate out of the loop, as asyncio does for tasks); the key's
    later jobs still run.

    :meth:`timings`, :meth:`hot_keys`, ``sample_timings`` and
    ``slow_task_threshold``: as for :class:`~keyedexec.KeyedExecutor`. A job's
    run time includes the time it awaits. Slow jobs are looked for from a loop
    callback, scheduled only while runners exist: a job that blocks the loop
    cannot be seen while it does (asyncio's debug mode reports those).

    Shut it down with ``async with``, :meth:`aclose` or :meth:`shutdown`. If
    the loop ends first (``asyncio.run`` or ``asyncio.Runner`` cleaning up),
    running jobs are cancelled with it, queued ones are cancelled without
    running, and later submits raise RuntimeError.
    """

    #: The scheduler's hot paths (native core or pure Python): see ``keyedexec.NATIVE``.
    _Core: Any = None  # set below the class

    def __init__(
        self,
        concurrency: int = 100,
        *,
        on_error: ErrorHandler | None = None,
        batch: int = 64,
        name: str = "keyedexec-aio",
        sample_timings: int = DEFAULT_SAMPLE_TIMINGS,
        slow_task_threshold: float | None = None,
    ) -> None:
        self._concurrency = _check_count("concurrency", concurrency)
        self._batch = _check_count("batch", batch)
        _check_count("sample_timings", sample_timings, minimum=0, maximum=_UINT32_MAX)
        self._slow_threshold = _check_threshold("slow_task_threshold", slow_task_threshold)
        self._slow_check: asyncio.TimerHandle | None = None
        # Per runner: (jobs started when last looked at, first seen then (ns), logged)
        self._slow_seen: weakref.WeakKeyDictionary[Any, tuple[int, int, bool]] = (
            weakref.WeakKeyDictionary()
        )
        if on_error is not None and not callable(on_error):
            raise TypeError(f"on_error must be callable, got {type(on_error).__name__}")
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        self._on_error: ErrorHandler = on_error or log_task_error
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        core = self._core = self._Core(
            weakref.ref(self), self._concurrency, self._batch, sample_timings
        )
        self._keys: dict[Any, _KeyState] = core.keys
        self._ready: deque[_KeyState] = core.ready
        self._runners: set[_Runner] = core.runners
        self._spawned = 0
        # Runners whose job awaits shutdown(wait=True), by the future that releases
        # each: all are set together once every runner has finished or waits so.
        self._in_shutdown: dict[asyncio.Future[None], _Runner] = {}
        # submit_threadsafe's futures not yet done: cancelled if the loop ends first.
        self._from_threads: set[concurrent.futures.Future[Any]] = set()
        self._threads_lock = threading.Lock()
        self._loop_ended = False
        self._watch: AsyncGenerator[None, None] | None = None
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
        fut: asyncio.Future[R] = self._core.submit(key, coro_fn, *args, **kwargs)
        return fut

    def execute(
        self, key: K, coro_fn: Callable[P, Awaitable[object]], /, *args: P.args, **kwargs: P.kwargs
    ) -> None:
        """Like :meth:`submit`, fire and forget: an exception goes to ``on_error(key, exc)``."""
        self._core.execute(key, coro_fn, *args, **kwargs)

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
        if self._core.closed:
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
            self._core.push(key, fn, args, kwargs, fut, ctx)
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
        self._loop = self._core.loop = loop
        watch = self._watch = _until_loop_ends(weakref.ref(self))
        try:
            watch.asend(None).send(None)  # runs it to its yield, no task needed
        except StopIteration:
            pass

    # -- runners ------------------------------------------------------------------

    def _spawn(self) -> None:
        assert self._loop is not None
        self._spawned += 1
        # An empty context: a runner must not keep its first submitter's variables alive.
        task = contextvars.Context().run(
            _Runner, self._serve(), loop=self._loop,
            name=f"{self._name}-runner-{self._spawned}", state=self._core.new_state(),
        )
        self._runners.add(task)
        task.add_done_callback(self._runner_gone)  # also if cancelled before it started
        if self._slow_threshold is not None and self._slow_check is None:
            self._slow_check = self._loop.call_later(
                _watchdog.period_for(self._slow_threshold), self._check_slow
            )

    def _check_slow(self) -> None:
        # On the loop, while runners exist: log each job running over the
        # threshold, once (the threaded watchdog's rule: no clock read per job).
        self._slow_check = None
        threshold = self._slow_threshold
        assert threshold is not None and self._loop is not None
        now = monotonic_ns()
        for runner in list(self._runners):
            st = runner.state
            job, ks = st.job, st.ks
            if job is None or ks is None:
                continue
            seq, seen_at, logged = self._slow_seen.get(runner, (-1, now, False))
            if st.seq != seq:
                self._slow_seen[runner] = (st.seq, now, False)
            elif not logged and now - seen_at >= threshold * 1e9:
                self._slow_seen[runner] = (seq, seen_at, True)
                logger.warning(
                    "%s: a job of key %s has been running for more than %.3f s "
                    "(slow_task_threshold=%g s)",
                    self._name, _watchdog.short_repr(ks.key), (now - seen_at) / 1e9, threshold,
                )
        if self._runners and not self._loop.is_closed():
            self._slow_check = self._loop.call_later(
                _watchdog.period_for(threshold), self._check_slow
            )

    async def _serve(self) -> None:
        me = asyncio.current_task()
        assert isinstance(me, _Runner)
        st = me.state
        run = self._core.run
        try:
            while True:
                suspended = run(st)  # the jobs that do not suspend run in there
                if suspended is None:
                    return  # no key is ready
                if suspended is YIELD:
                    try:
                        await _sleep0()  # jobs that never await must not starve the loop
                    except _CancelledError:
                        st.stops = max(st.stops, 1)
                    continue
                if suspended is STOP:
                    raise _CancelledError  # cancelled from outside
                await self._run_suspended(st, *suspended)
        finally:
            # Leave the set now, not in the done callback that runs later: a
            # submit in between must know that this runner takes no more keys.
            self._runner_gone(me)

    async def _run_suspended(
        self,
        st: Any,
        coro: Coroutine[Any, Any, Any],
        ctx: contextvars.Context,
        step: Any,
        fut: asyncio.Future[Any] | None,
    ) -> None:
        """The rest of a job that suspended at its first step."""
        core = self._core
        ks: _KeyState = st.ks
        stamp, started = st.stamp, st.started  # started: 0 unless the job is timed
        drive = st.drive = _Drive(coro, ctx, step)
        if fut is not None:
            fut.add_done_callback(drive.future_done)
        try:
            result = await drive
        except GeneratorExit:
            raise  # the runner is closed with its loop
        except BaseException as exc:
            if started and not isinstance(exc, _CancelledError):
                core.record(stamp, started, core.now_ns())
            self._failed_or_cancelled(ks.key, fut, exc)
        else:
            if started:
                core.record(stamp, started, core.now_ns())
            core.completed += 1
            if fut is not None and not fut.done():
                fut.set_result(result)
        finally:
            core.running -= 1
            st.job = st.drive = None
            if fut is not None:
                fut.remove_done_callback(drive.future_done)
            if not ks.queued and not st.stops and self._keys.get(ks.key) is ks:
                # Freed now rather than when the runner goes on: metrics() is
                # exact by the time the job's awaiter resumes.
                del self._keys[ks.key]

    def _failed_or_cancelled(
        self, key: Any, fut: asyncio.Future[Any] | None, exc: BaseException
    ) -> None:
        if isinstance(exc, _CancelledError):
            self._cancel(fut)
            return
        self._fail(key, fut, exc)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            assert self._loop is not None
            self._loop.call_soon(_reraise, exc)  # out of the loop, as from a task

    def _runner_gone(self, runner: Any) -> None:
        self._runners.discard(runner)
        if self._in_shutdown:
            self._release_shutdown_waiters()

    def _cancel(self, fut: asyncio.Future[Any] | None) -> None:
        # A job ended cancelled: counted, and its future cancelled.
        self._core.cancelled += 1
        if fut is not None:
            fut.cancel()

    def _fail(self, key: Any, fut: asyncio.Future[Any] | None, exc: BaseException) -> None:
        # A job ended by an exception: counted, and to its future or on_error.
        self._core.completed += 1
        self._core.failed += 1
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
            n += ks.queued
            futures.extend(ks.drop())
            if ks.serving == _QUEUED:
                del self._keys[ks.key]  # the caller takes it off the ready queue
        self._core.pending -= n
        self._core.cancelled += n
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
            self._core.closed = True
            return
        self._bind()
        self._core.closed = True
        if cancel_futures and self._keys:
            self._drop(list(self._keys.values()))
            self._ready.clear()
        if not wait:
            return
        # Queued keys whose runners were cancelled from outside get new ones.
        for _ in range(min(len(self._ready), self._concurrency - len(self._runners))):
            self._spawn()
        job = _current_job.get()
        runner = None
        if job is not None:
            runner = next((r for r in self._runners if r.state.job is job), None)
        if runner is None:
            while True:  # not inside one of our running jobs: wait for everything
                runners = [t for t in self._runners if not t.done()]
                if not runners:
                    return
                await asyncio.wait(runners)
        assert self._loop is not None
        released = self._loop.create_future()
        self._in_shutdown[released] = runner
        try:
            self._release_shutdown_waiters()  # this job may be the last one they wait for
            await released
        finally:
            self._in_shutdown.pop(released, None)

    def _release_shutdown_waiters(self) -> None:
        # Release the jobs awaiting shutdown, all at once, when every runner has
        # finished or waits for one of them: nothing else can make progress.
        parked = set(self._in_shutdown.values())
        if all(t in parked or t.done() for t in self._runners):
            for released in self._in_shutdown:
                if not released.done():
                    released.set_result(None)
            self._in_shutdown.clear()

    def _end_with_loop(self) -> None:
        # The loop is ending (asyncio.run cleaning up): nothing will run any more.
        # Leave no future pending, least of all one a thread may block on.
        self._forsake_threads()  # first: a thread that sees it closed says why
        self._core.closed = True
        if self._keys:
            self._drop(list(self._keys.values()))
            self._ready.clear()
        for runner in list(self._runners):
            if runner.state.drive is not None:
                runner.state.drive.cancel_job()  # started after asyncio.run cancelled the tasks it knew
        if self._slow_check is not None:
            self._slow_check.cancel()
            self._slow_check = None

    def _forsake_threads(self) -> None:
        # Cancel submit_threadsafe's pending futures; refuse any more.
        with self._threads_lock:
            self._loop_ended = True
            from_threads = list(self._from_threads)
        for cf in from_threads:
            cf.cancel()

    def __del__(self) -> None:
        # Dropped with jobs queued that no runner will run (its runners were
        # cancelled, and no submit or shutdown started another since): cancel
        # them, as the loop's end would, so that no one awaits them forever.
        core = getattr(self, "_core", None)
        if core is None or not core.pending:
            return
        futures: list[asyncio.Future[Any]] = []
        for ks in list(self._keys.values()):
            futures.extend(ks.drop())
        self._keys.clear()
        self._ready.clear()
        loop = self._loop
        if not futures or loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for fut in futures:  # the cycle collector may run this in any thread
            if loop is running:
                fut.cancel()
            else:
                try:
                    loop.call_soon_threadsafe(fut.cancel)
                except RuntimeError:  # closed meanwhile: nothing runs its awaiters any more
                    return

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
        return 0 if ks is None else ks.queued

    def stats(self) -> Stats:
        """``Stats(concurrency, pending)``: pending = queued + running."""
        return Stats(self._concurrency, self._core.running + self._core.pending)

    def metrics(self) -> Metrics:
        """A snapshot of the counters (see :class:`keyedexec.Metrics`).

        ``workers`` counts runner tasks alive; ``cancelled`` also counts jobs
        whose task was cancelled while running. Exact when called on the loop.
        """
        return Metrics(
            len(self._runners),
            self._core.running,
            self._core.pending,
            len(self._keys),
            self._core.submitted,
            self._core.completed,
            self._core.failed,
            self._core.cancelled,
        )

    def timings(self) -> Timings:
        """Wait (submit -> start) and run (start -> end, awaits included) time
        histograms of the timed jobs that ran: see ``sample_timings``."""
        return timings_from(self._core.timings())

    def hot_keys(self, n: int = 10) -> list[HotKey]:
        """The ``n`` keys with the most queued jobs (see ``KeyedExecutor.hot_keys``).
        Exact when called on the loop; from another thread (a metrics scrape)
        each key's figures are read while the loop may change them."""
        n = check_n(n)
        now = self._core.now_ns()
        entries = []
        for ks in list(self._keys.values()):
            queued, stamp = ks.queued, ks.oldest
            running = ks.serving == _SERVED
            if queued or running:
                entries.append((ks.key, queued, running, max(0, now - stamp) if stamp else None))
        return hot_keys(entries, n)

    @property
    def name(self) -> str:
        """The ``name`` given to the constructor (runner tasks, logs, exporters)."""
        return self._name

    @property
    def concurrency(self) -> int:
        """The most jobs that run at once."""
        return self._concurrency

    @property
    def closed(self) -> bool:
        """True once shutdown began."""
        return bool(self._core.closed)

    def __repr__(self) -> str:
        state = "closed" if self._core.closed else "open"
        return (
            f"<{type(self).__name__} {state} concurrency={self._concurrency} "
            f"running={self._core.running} pending={self._core.pending} keys={len(self._keys)}>"
        )


if _impl.NATIVE:
    from ._core import AsyncCore as _NativeCore  # it takes what it shares with us from here

    AsyncKeyedExecutor._Core = _NativeCore
    # submit and execute in C: one call from the caller to the queue, no frame of
    # ours. Method descriptors, so a saved ``ex.submit`` keeps ``ex`` alive; with
    # another core (the pure twin) they call its submit/execute.
    for _name, _method in zip(("submit", "execute"),
                              _NativeCore.executor_methods(AsyncKeyedExecutor)):
        setattr(AsyncKeyedExecutor, _name, _method)
    del _name, _method
else:
    AsyncKeyedExecutor._Core = _PyCore


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
