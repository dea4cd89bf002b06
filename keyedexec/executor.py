"""KeyedExecutor: a fixed pool of workers; tasks of one key run one at a time, in order.

The Python face of the scheduler (``keyedexec._core``, or ``keyedexec._pure``).
The submit family comes straight from the scheduler: each call is a single C
call on the native core; this module adds the Python conventions around it
(``map``, ``shutdown``, ``with``, named statistics).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import itertools
import os
import sys
import threading
import time
import weakref
from collections import deque
from typing import (Any, Callable, Generic, Iterable, Iterator, NamedTuple, ParamSpec, Sequence,
                    TypeVar)

from . import _impl, _loopbridge
from ._future import KeyedFuture
from ._report import log_task_error
from ._timings import HotKey, Timings, check_n, hot_keys, timings_from
from ._typevars import K
from .context import Context

__all__ = ["KeyView", "KeyedExecutor", "Metrics", "Stats", "default_workers"]

#: The default ``sample_timings``: 1 task in 32 is timed (see KeyedExecutor).
DEFAULT_SAMPLE_TIMINGS = 32

R = TypeVar("R")
P = ParamSpec("P")

ErrorHandler = Callable[[Any, BaseException], object]


class Stats(NamedTuple):
    """``KeyedExecutor.stats()``: the Go seed's ``(workerCount, pendingTasks)``."""

    workers: int
    """The pool size (``workers`` given to the constructor)."""
    pending: int
    """Tasks accepted and not finished: queued plus running."""


class Metrics(NamedTuple):
    """A consistent snapshot of the scheduler's counters."""

    workers: int
    """Worker threads alive now (started lazily, up to the pool size)."""
    running: int
    """Tasks executing now."""
    pending: int
    """Tasks queued and not started."""
    active_keys: int
    """Keys with queued or running tasks (idle keys are freed)."""
    submitted: int
    """Tasks accepted since creation."""
    completed: int
    """Tasks that ran to the end, returning or raising."""
    failed: int
    """Of ``completed``, those that raised."""
    cancelled: int
    """Tasks that never ran: cancelled, skipped for a cancelled context, or
    dropped by a broken pool (an initializer raised)."""


def default_workers() -> int:
    """The default pool size: ``min(32, cpus + 4)``, like ThreadPoolExecutor.

    I/O-friendly: most keyed work (per-user calls, per-account writes) waits
    on I/O with the GIL released.
    """
    count = getattr(os, "process_cpu_count", os.cpu_count)() or 1
    return min(32, count + 4)


# The native core holds workers and batch as C ints and queue_size as a uint32:
# the facades refuse anything larger up front, the same on both implementations.
_C_INT_MAX = 2**31 - 1
_UINT32_MAX = 2**32 - 1


def _check_count(name: str, value: object, minimum: int = 1, maximum: int = _C_INT_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}")
    return value


def _check_timeout(name: str, value: object) -> float | None:
    """Seconds as a float, or None for no limit.

    ``math.inf``, and anything too long for the platform's waits
    (``threading.TIMEOUT_MAX``, about 292 years on Linux), also mean no limit
    rather than an OverflowError from deep inside a wait.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, got {type(value).__name__}")
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value}")
    if value >= threading.TIMEOUT_MAX:
        return None
    return float(value)


def _check_interval(name: str, value: object) -> float:
    """A finite number of seconds >= 0 (a linger, a report interval: not a limit)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not 0 <= value < threading.TIMEOUT_MAX:  # also rejects NaN and inf
        raise ValueError(f"{name} must be >= 0 and finite (below threading.TIMEOUT_MAX), "
                         f"got {value}")
    return float(value)


def _check_threshold(name: str, value: object) -> float | None:
    """Seconds > 0, or None (off; so is ``math.inf``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")  # nan too
    return _check_timeout(name, value)


def _check_name(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"name must be a str, got {type(value).__name__}")
    return value


class KeyedExecutor(Generic[K]):
    """Run tasks concurrently; tasks that share a key run one at a time, in order.

    ``workers`` threads (started lazily) serve all keys: any idle worker takes
    the next key that has work, so a slow key never holds up other keys. A key
    runs at most ``batch`` tasks in a row before yielding to the keys waiting
    behind it. Memory is proportional to the keys that have work.

    Exceptions: a future (``submit`` & co.) carries its task's exception; the
    fire-and-forget ``execute`` hands it to ``on_error(key, exc)`` (default:
    logged on the ``"keyedexec"`` logger with key and traceback).

    ``shutdown(wait=True)`` runs everything accepted; ``cancel_futures=True``
    cancels what has not started. At interpreter exit queued tasks are drained,
    as ThreadPoolExecutor does.

    contextvars: like ThreadPoolExecutor, a task runs in its worker thread's
    context. ``copy_context=True`` runs each task in a copy of the submitting
    thread's context instead, as ``asyncio.to_thread`` does (about 0.2 µs more
    per task).

    ThreadPoolExecutor's arguments are accepted as it takes them:
    ``max_workers`` (another name for ``workers``), ``thread_name_prefix``
    (workers named ``f"{prefix}_{n}"``, n from 0; else ``f"{name}-worker-{n}"``,
    n from 1), ``initializer(*initargs)``, called by each worker thread once
    before its first task. If an initializer raises, it is logged and the pool
    is broken, as ThreadPoolExecutor's: queued tasks are dropped (their futures
    fail with ``concurrent.futures.thread.BrokenThreadPool``), later submits
    raise it, and the workers exit.

    Operating it: :meth:`hot_keys` names the keys that back up;
    :meth:`timings` gives wait (submit -> start) and run (start -> end) time
    histograms. ``sample_timings=N`` times one task in N (default 32; 1:
    every task; 0: none): timing a task reads the monotonic clock three
    times, which would slow a stream of no-op tasks by about 30 % if every
    task paid it. The timed tasks are chosen at submit with random gaps, so
    that no periodic pattern of submits is in step with them; the first task
    is always timed. Every task also gets a coarse submit stamp (a few ms of
    resolution, about 5 ns) for ``hot_keys``, whatever ``sample_timings``.
    ``slow_task_threshold=seconds`` logs each task that runs longer than
    that, once, with its key, on the ``"keyedexec"`` logger (WARNING), from a
    watchdog thread that checks the workers 4 times per threshold (at most
    every 0.25 s): the log comes at most that late.
    """

    #: The scheduler implementation (native core or pure Python): see ``keyedexec.NATIVE``.
    _Scheduler: Any = _impl.Scheduler

    def __init__(
        self,
        workers: int | None = None,
        thread_name_prefix: str = "",
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        *,
        max_workers: int | None = None,
        on_error: ErrorHandler | None = None,
        batch: int = 64,
        name: str = "keyedexec",
        copy_context: bool = False,
        sample_timings: int = DEFAULT_SAMPLE_TIMINGS,
        slow_task_threshold: float | None = None,
    ) -> None:
        if max_workers is not None:
            if workers is not None:
                raise TypeError("pass workers or max_workers (the same thing), not both")
            workers = _check_count("max_workers", max_workers)
        workers = default_workers() if workers is None else _check_count("workers", workers)
        _check_count("batch", batch)
        _check_count("sample_timings", sample_timings, minimum=0, maximum=_UINT32_MAX)
        slow_task_threshold = _check_threshold("slow_task_threshold", slow_task_threshold)
        if on_error is not None and not callable(on_error):
            raise TypeError(f"on_error must be callable, got {type(on_error).__name__}")
        _check_name(name)
        if not isinstance(thread_name_prefix, str):
            raise TypeError(
                f"thread_name_prefix must be a str, got {type(thread_name_prefix).__name__}"
            )
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, got {type(initializer).__name__}")
        try:
            initargs = tuple(initargs)
        except TypeError:
            raise TypeError(
                f"initargs must be an iterable, got {type(initargs).__name__}"
            ) from None
        self._workers = workers
        sched = self._Scheduler(
            workers, batch=batch, name=name, on_error=on_error or log_task_error,
            thread_name_prefix=thread_name_prefix, initializer=initializer, initargs=initargs,
            sample_timings=sample_timings, slow_task_threshold=slow_task_threshold,
        )
        self._sched = sched
        self._copy_context = bool(copy_context)
        if not copy_context:
            # The hot paths, bound straight to the scheduler: no Python frame in between.
            fast = sched._fast_methods()
            self.execute = fast[0]  # type: ignore[method-assign]
            self.submit = fast[1]  # type: ignore[method-assign]
            self.execute_with_error = fast[2]  # type: ignore[method-assign]
            self.execute_with_context = sched.execute_with_context  # type: ignore[method-assign]
            self.execute_with_context_error = sched.execute_with_context_error  # type: ignore[method-assign]
            self.submit_with_context = sched.submit_with_context  # type: ignore[method-assign]
        # Dropped without shutdown: stop accepting and let the workers drain and exit.
        weakref.finalize(self, sched.close)

    # The methods below are replaced per instance by the scheduler's own (see
    # __init__); these definitions carry the documentation and the types.

    def execute(self, key: K, fn: Callable[P, object], /, *args: P.args, **kwargs: P.kwargs) -> None:
        """Run ``fn(*args, **kwargs)`` after the tasks already queued for ``key``.

        Fire and forget: an exception goes to ``on_error(key, exc)``.
        Raises TypeError (unhashable key, fn not callable) or RuntimeError
        (after shutdown) without queueing anything.
        """
        self._sched.execute(key, *self._wrap(fn), *args, **kwargs)

    def submit(
        self, key: K, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> KeyedFuture[R]:
        """Like :meth:`execute`, returning a ``concurrent.futures.Future`` of the result."""
        fut: KeyedFuture[R] = self._sched.submit(key, *self._wrap(fn), *args, **kwargs)
        return fut

    def execute_with_error(
        self, key: K, fn: Callable[P, object], /, *args: P.args, **kwargs: P.kwargs
    ) -> KeyedFuture[Any]:
        """Go's ``ExecuteWithError``: the future's *result* is the exception ``fn``
        raised, or None. ``.result()`` never raises it (it may raise CancelledError).
        """
        fut: KeyedFuture[Any] = self._sched.execute_with_error(
            key, *self._wrap(fn), *args, **kwargs
        )
        return fut

    def execute_with_context(self, key: K, ctx: Context, fn: Callable[[Context], object]) -> None:
        """Run ``fn(ctx)`` on ``key``'s queue, fire and forget.

        If ``ctx`` is cancelled by the time the task's turn comes, it is not run
        (counted in ``metrics().cancelled``).
        """
        self._sched.execute_with_context(key, ctx, self._wrap_ctx(fn))

    def execute_with_context_error(
        self, key: K, ctx: Context, fn: Callable[[Context], object]
    ) -> KeyedFuture[Any]:
        """Go's ``ExecuteWithContextError``: run ``fn(ctx)``; the future's result is
        the exception raised, or ``ctx.err()`` if the task was skipped, or None.
        """
        fut: KeyedFuture[Any] = self._sched.execute_with_context_error(
            key, ctx, self._wrap_ctx(fn)
        )
        return fut

    def submit_with_context(
        self, key: K, ctx: Context, fn: Callable[[Context], R]
    ) -> KeyedFuture[R]:
        """Run ``fn(ctx)``; the future holds its result. If the task was skipped
        because ``ctx`` was cancelled, the future raises ``ctx.err()``.
        """
        fut: KeyedFuture[R] = self._sched.submit_with_context(key, ctx, self._wrap_ctx(fn))
        return fut

    def _wrap(self, fn: Any) -> tuple[Any, ...]:
        # (fn,) or (ctx.run, fn): the leading arguments of a scheduler call.
        if self._copy_context and callable(fn):
            return (contextvars.copy_context().run, fn)
        return (fn,)

    def _wrap_ctx(self, fn: Any) -> Any:
        if self._copy_context and callable(fn):
            return functools.partial(contextvars.copy_context().run, fn)
        return fn

    # -- asyncio and executor views ---------------------------------------------------

    def submit_async(
        self, key: K, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> asyncio.Future[R]:
        """Submit now (the order is the call order) and return an awaitable of the result.

        Must be called with an event loop running in this thread. Cancelling the
        asyncio future cancels the task if it has not started. Completions reach
        the loop in batches: one wake-up of the loop for however many tasks
        finished since the last one (see ``keyedexec._loopbridge``).
        """
        asyncio.get_running_loop()  # RuntimeError before anything is submitted
        return _loopbridge.awaitable(self.submit(key, fn, *args, **kwargs))

    def for_key(self, key: K) -> KeyView[K]:
        """A ``concurrent.futures.Executor`` that runs everything on ``key``.

        ``loop.run_in_executor(ex.for_key(k), fn)`` serializes blocking calls per
        key. Shutting the view down closes the view only, never the executor.
        """
        hash(key)  # an unhashable key fails here, not at the first submit
        return KeyView(self, key)

    def wait_key(self, key: K, timeout: float | None = None) -> bool:
        """Wait until every task queued for ``key`` at the call has finished.

        Returns False if ``timeout`` seconds passed first. Works by queueing a
        no-op behind them (it shows in ``metrics()`` as one task, cancelled if
        the wait times out, so polling leaves nothing behind) unless the key
        is idle, in which case it returns True at once. If ``cancel_key``
        drops that no-op, it waits again for what still runs. Raises
        RuntimeError when called from a task of ``key`` itself (it would wait
        for itself forever).
        """
        timeout = _check_timeout("timeout", timeout)
        self._sched.check_can_wait("waiting for a key")
        if self._sched.serving(key):
            raise RuntimeError(f"wait_key({key!r}) from a task of that key would deadlock")
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if end is None else max(0.0, end - time.monotonic())
            if not self._sched.key_active(key):
                return True  # nothing queued or running: nothing to wait for
            try:
                barrier = self._sched.submit(key, _noop)
            except RuntimeError:
                # Shut down: the workers drain every key, so wait for all of them.
                # From a task, join() waits for neither its own worker nor those
                # in join() too: then look at the key itself until it is done.
                if not self._sched.join(remaining):
                    return False
                while self._sched.key_active(key):
                    if end is not None and time.monotonic() >= end:
                        return False
                    time.sleep(0.005)
                return True
            try:
                barrier.result(remaining)
                return True
            except concurrent.futures.TimeoutError:
                self._sched.cancel_task(key, barrier)
                return False
            except concurrent.futures.CancelledError:
                # cancel_key or shutdown(cancel_futures=True) dropped the barrier:
                # the task running before it may still run. Look again.
                if end is not None and time.monotonic() >= end:
                    return not self._sched.key_active(key)

    # -- Python conventions ---------------------------------------------------------------

    def map(
        self,
        fn: Callable[..., R],
        *iterables: Iterable[Any],
        key: Callable[..., K] | None = None,
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[R]:
        """``fn`` over the iterables, results in input order (like ``Executor.map``).

        ``key(*args)`` gives each call's key: calls with equal keys run one at a
        time, in input order. Without ``key`` every call is independent. All
        calls are submitted at once, or with ``buffersize`` (as in Python
        3.14) only that many ahead of the results taken, the inputs read as
        needed. The first exception is raised when its result is reached;
        ``timeout`` bounds the whole iteration (``concurrent.futures.TimeoutError``).
        When the iteration ends early (an exception, or closing or dropping the
        iterator after its first ``next()``) the calls that have not started
        are cancelled, including the one waited for; an iterator closed before
        it ever ran cancels nothing, as in the stdlib. ``chunksize`` is
        accepted and ignored, as by ThreadPoolExecutor.
        """
        return map_calls(self, fn, iterables, key, timeout, buffersize, object)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks (later submits raise RuntimeError).

        ``cancel_futures=True`` cancels every queued task that has not started:
        its future reports cancellation; a fire-and-forget task is dropped and
        counted in ``metrics().cancelled``. Otherwise everything accepted runs.
        ``wait=True`` returns once all of it is done and the workers have
        exited. Calling it again is harmless. Called from inside a task, it does
        not wait for that task's own worker.
        """
        self._sched.shutdown(wait, cancel_futures=cancel_futures)

    def __enter__(self) -> KeyedExecutor[K]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown(wait=True)

    # -- per key ------------------------------------------------------------------------

    def cancel_key(self, key: K) -> int:
        """Cancel ``key``'s queued tasks (not the running one). Returns how many."""
        n: int = self._sched.cancel_queued(key)
        return n

    def pending(self, key: K) -> int:
        """Tasks queued for ``key`` and not started."""
        n: int = self._sched.key_pending(key)
        return n

    # -- introspection ------------------------------------------------------------------

    def stats(self) -> Stats:
        """Go's ``Stats()``: ``Stats(workers, pending)`` (pending = queued + running)."""
        m = self._sched.metrics()
        return Stats(self._workers, m[1] + m[2])

    def metrics(self) -> Metrics:
        """A consistent snapshot: see :class:`Metrics`."""
        return Metrics(*self._sched.metrics())

    def timings(self) -> Timings:
        """Wait (submit -> start) and run (start -> end) time histograms of the
        timed tasks that ran (see ``sample_timings``), since creation."""
        return timings_from(self._sched.timings())

    def hot_keys(self, n: int = 10) -> list[HotKey]:
        """The ``n`` keys with the most queued tasks, most first: each with its
        queued count, whether it runs now, and how long its oldest queued task
        has waited. Keys that only run (nothing queued) come last.

        Cheap enough to call every few seconds with a million active keys
        (about 20 ms here): the key table is scanned in chunks, the workers
        held up for a fraction of a millisecond at a time. Not one snapshot:
        keys come and go during the scan.
        """
        n = check_n(n)
        entries, _longest_hold = self._sched.hot_keys(min(n, sys.maxsize))
        return hot_keys(entries, n)

    @property
    def name(self) -> str:
        """The ``name`` given to the constructor (worker threads, logs, exporters)."""
        name: str = self._sched.name
        return name

    @property
    def workers(self) -> int:
        """The pool size."""
        return self._workers

    @property
    def closed(self) -> bool:
        """True once shutdown began (or at interpreter exit)."""
        closed: bool = self._sched.closed
        return closed

    def __repr__(self) -> str:
        m = self.metrics()
        state = "closed" if self.closed else "open"
        return (
            f"<{type(self).__name__} {state} workers={m.workers}/{self._workers} "
            f"running={m.running} pending={m.pending} keys={m.active_keys}>"
        )


def _noop() -> None:
    pass


class KeyView(concurrent.futures.Executor, Generic[K]):
    """A ``concurrent.futures.Executor`` bound to one key of a KeyedExecutor.

    Everything submitted through it runs on that key, in order. ``shutdown()``
    closes the view (later submits raise RuntimeError) and, with ``wait=True``,
    waits for the tasks submitted through it; the executor stays open.
    """

    def __init__(self, executor: KeyedExecutor[K], key: K) -> None:
        self._executor = executor
        self._key = key
        # Reentrant: submit allocates under it, so the GC may run a finalizer
        # there, and that finalizer may submit through this very view.
        self._lock = threading.RLock()
        self._closed = False
        # Unfinished futures in submission order (shutdown cancels the last first).
        self._futures: weakref.WeakValueDictionary[int, KeyedFuture[Any]] = \
            weakref.WeakValueDictionary()
        self._submitted = itertools.count()

    @property
    def key(self) -> K:
        return self._key

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> KeyedFuture[R]:
        with self._lock:
            if self._closed:
                raise RuntimeError(
                    "cannot schedule new futures after shutdown (this view was shut down)"
                )
            fut = self._executor.submit(self._key, fn, *args, **kwargs)
            self._futures[next(self._submitted)] = fut
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            futures = list(self._futures.values())
        if cancel_futures:
            _cancel_in_reverse(futures)
        # From a task of this key, waiting would wait for that very task.
        if wait and not self._executor._sched.serving(self._key):
            concurrent.futures.wait(futures)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<KeyView {state} key={self._key!r} of {self._executor!r}>"


def _results(
    fs: deque[KeyedFuture[R]],
    end: float | None,
    submit_next: Callable[[], KeyedFuture[R] | None] | None,
) -> Iterator[R]:
    # A separate generator so that map() submits eagerly, like Executor.map.
    # Futures are popped as their results are yielded: no reference is kept.
    try:
        while fs:
            if submit_next is not None:  # buffersize: one more call per result taken
                ahead = submit_next()
                if ahead is None:
                    submit_next = None
                else:
                    fs.append(ahead)
                del ahead
            yield _result_or_cancel(fs.popleft(), None if end is None else end - time.monotonic())
    finally:
        _cancel_in_reverse(fs)


def _cancel_in_reverse(fs: Sequence[KeyedFuture[Any]]) -> None:
    # Last first, as the stdlib does: calls with one key start in input order, so a
    # worker racing this loop can never start a call after an earlier one was cancelled.
    for f in reversed(fs):
        f.cancel()


def _result_or_cancel(fut: KeyedFuture[R], timeout: float | None) -> R:
    """The result; if the wait ends otherwise (timeout, Ctrl-C), the call is not
    wanted any more: cancel it, as Executor.map does."""
    try:
        return fut.result(timeout)
    except BaseException:
        fut.cancel()
        raise
    finally:
        del fut  # the traceback keeps this frame: not the future (and its result)


def map_calls(
    executor: Any,
    fn: Callable[..., R],
    iterables: tuple[Iterable[Any], ...],
    key: Callable[..., Any] | None,
    timeout: float | None,
    buffersize: int | None,
    independent: Callable[[], Any],
) -> Iterator[R]:
    """``Executor.map`` for a keyed executor (its ``submit(key, fn, *args)``):
    checks the arguments, submits eagerly (or ``buffersize`` ahead of the results
    taken) and returns the results' iterator. Without ``key`` each call gets a
    fresh key from ``independent()``."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if key is not None and not callable(key):
        raise TypeError(f"key must be callable or None, got {type(key).__name__}")
    timeout = _check_timeout("timeout", timeout)
    if buffersize is not None:
        _check_count("buffersize", buffersize)
    key_of: Callable[..., Any] = key if key is not None else _Independent(independent)
    end = None if timeout is None else time.monotonic() + timeout
    submit: Callable[..., KeyedFuture[R]] = executor.submit
    calls = zip(*iterables)
    fs: deque[KeyedFuture[R]] = deque()
    try:
        for args in calls if buffersize is None else itertools.islice(calls, buffersize):
            fs.append(submit(key_of(*args), fn, *args))
    except BaseException:
        _cancel_in_reverse(fs)
        raise
    if buffersize is None:
        return _results(fs, end, None)
    # A weak reference, as in the stdlib: the iterator does not keep the executor alive.
    return _results(fs, end, functools.partial(_submit_next, weakref.ref(executor), calls, fn,
                                               key_of))


class _Independent:
    """map()'s key function without ``key``: a fresh key per call, whatever the args."""

    __slots__ = ("new",)

    def __init__(self, new: Callable[[], Any]) -> None:
        self.new = new

    def __call__(self, *args: Any) -> Any:
        return self.new()


def _submit_next(
    executor_ref: weakref.ref[Any],
    calls: Iterator[tuple[Any, ...]],
    fn: Callable[..., R],
    key_of: Callable[..., Any],
) -> KeyedFuture[R] | None:
    """map(buffersize=): submit the next call; None at the end of the input, or
    once the executor is gone."""
    executor = executor_ref()
    if executor is None:
        return None
    args = next(calls, None)
    if args is None:
        return None
    future: KeyedFuture[R] = executor.submit(key_of(*args), fn, *args)
    return future
