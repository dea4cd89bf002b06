"""TaskPool: one bounded serial queue per active key, with backpressure.

The Python form of the Go ``taskpool`` (see the README), on the same scheduler
as KeyedExecutor. What it fixes in the Go original:

* Threads are shared, not one per key: a key with work is served by one pool
  thread at a time; threads start on demand up to ``max_workers`` and retire
  after ``idle_timeout`` seconds without work. Idle keys are freed.
* A job that submits to its *own* full key gets QueueFull at once instead of
  deadlocking.
* ``stop()`` counts the queued jobs it discards (``metrics().discarded``) and
  its ``timeout`` bounds the wait for jobs that ignore their context.
* Interpreter exit without ``stop()`` does not hang on jobs that wait on
  their context: exit cancels it (see ``_cancel_at_exit``).
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import Any, Callable, Generic, NamedTuple, Protocol

from . import _impl
from . import _lifecycle  # noqa: F401  (registers its exit hook before ours: see below)
from ._report import log_task_error
from ._timings import HotKey, Recorder, Timings, check_n, hot_keys, timings_from
from ._typevars import K
from .context import Context, background
from .errors import QueueFull
from .executor import (
    _UINT32_MAX,
    DEFAULT_SAMPLE_TIMINGS,
    _check_count,
    _check_name,
    _check_threshold,
    _check_timeout,
    default_workers,
)

__all__ = ["PoolMetrics", "TaskPool", "DEFAULT_IDLE_TIMEOUT"]


class Job(Protocol):
    """What a TaskPool runs: any callable invoked as ``job(ctx)``.

    A protocol, not ``Callable[[Context], object]``: mypy cannot infer a lambda
    with extra defaulted parameters against a Callable type, and the loop idiom
    ``lambda ctx, e=event: send(ctx, e)`` must type-check.
    """

    def __call__(self, ctx: Context, /) -> object: ...


# Every pool's context descends from this one, and interpreter exit cancels it,
# as stop() would: a job waiting on its context returns and the queued jobs are
# skipped, even in a pool dropped without stop(). The hook must run before
# _lifecycle's, which waits for the workers: threading runs these hooks in
# reverse order of registration, and _lifecycle (imported above) registered first.
_exit_root, _cancel_at_exit = background().with_cancel()
threading._register_atexit(_cancel_at_exit)  # type: ignore[attr-defined]

def _check_job(job: object) -> None:
    # The scheduler's own check would call it ``fn``: name the parameter the caller passed.
    if not callable(job):
        raise TypeError(f"job must be callable, got {type(job).__name__}")


#: Seconds a pool thread waits for work before it exits.
DEFAULT_IDLE_TIMEOUT = 10.0


class PoolMetrics(NamedTuple):
    """``TaskPool.metrics()``: KeyedExecutor's fields plus ``discarded``."""

    workers: int
    running: int
    pending: int
    active_keys: int
    submitted: int
    completed: int
    failed: int
    cancelled: int
    discarded: int
    """Queued jobs that never ran because the pool was stopped."""


class TaskPool(Generic[K]):
    """Per-key serial job queues: ``job(ctx)`` runs after the key's earlier jobs.

    ``queue_size`` bounds the jobs a key may hold queued (not counting the one
    running); ``submit`` waits while the key is full. ``max_workers`` bounds
    the threads (default ``min(32, cpus + 4)``); an idle thread exits after
    ``idle_timeout`` seconds (``math.inf``: never). Every job receives the
    pool's context, which ``stop()`` cancels, and so does interpreter exit.

    ``sample_timings``, ``slow_task_threshold``, :meth:`timings` and
    :meth:`hot_keys`: as for :class:`~keyedexec.KeyedExecutor`.
    """

    _Scheduler: Any = _impl.Scheduler

    def __init__(
        self,
        queue_size: int = 100,
        max_workers: int | None = None,
        *,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        name: str = "keyedexec-pool",
        sample_timings: int = DEFAULT_SAMPLE_TIMINGS,
        slow_task_threshold: float | None = None,
    ) -> None:
        self._queue_size = _check_count("queue_size", queue_size, maximum=_UINT32_MAX)
        self._max_workers = (
            default_workers() if max_workers is None else _check_count("max_workers", max_workers)
        )
        if idle_timeout is None:
            raise TypeError("idle_timeout must be a number of seconds (math.inf: never), got None")
        # None from here on: threads never retire (inf, or too long to wait for).
        self._idle_timeout = _check_timeout("idle_timeout", idle_timeout)
        self._name = _check_name(name)
        self._sample_timings = _check_count(
            "sample_timings", sample_timings, minimum=0, maximum=_UINT32_MAX
        )
        self._slow_task_threshold = _check_threshold("slow_task_threshold", slow_task_threshold)
        self._lock = threading.Lock()
        self._sched: Any = None
        self._ctx: Context | None = None
        self._cancel: Callable[[], None] | None = None
        self._stopped = False

    def start(self) -> None:
        """Start the pool (idempotent). A stopped pool cannot be restarted."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("TaskPool was stopped; create a new one")
            if self._sched is None:
                self._ctx, self._cancel = _exit_root.with_cancel()
                self._sched = self._Scheduler(
                    self._max_workers,
                    queue_size=self._queue_size,
                    idle_timeout=self._idle_timeout,
                    name=self._name,
                    on_error=log_task_error,
                    sample_timings=self._sample_timings,
                    slow_task_threshold=self._slow_task_threshold,
                )
                # Dropped without stop(): let the threads drain and exit.
                weakref.finalize(self, self._sched.close)

    def _scheduler(self) -> Any:
        sched = self._sched
        if sched is None:
            raise RuntimeError("TaskPool.start() must be called before submit()")
        return sched

    def submit(self, key: K, job: Job, timeout: float | None = None) -> None:
        """Queue ``job(ctx)`` on ``key``, waiting while the key holds ``queue_size`` jobs.

        ``timeout`` (seconds; None or ``math.inf``: no limit) bounds the wait:
        QueueFull when it passes. A job that submits to its own key while that
        key is full gets QueueFull at once (waiting would deadlock). The wait
        releases the GIL and Ctrl-C interrupts it. Raises RuntimeError before
        ``start()`` and after ``stop()``.
        """
        _check_job(job)
        timeout = _check_timeout("timeout", timeout)
        sched = self._scheduler()
        if not sched.put(key, job, self._ctx, True, timeout):
            raise QueueFull(f"key {key!r} is full ({self._queue_size} queued)")

    def try_submit(self, key: K, job: Job) -> bool:
        """Queue ``job(ctx)`` if ``key`` has room; never waits. False if full."""
        _check_job(job)
        accepted: bool = self._scheduler().put(key, job, self._ctx, False)
        return accepted

    def stop(self, timeout: float | None = None) -> bool:
        """Stop the pool:

        1. stop accepting jobs (submit raises RuntimeError);
        2. cancel the context every job sees;
        3. discard queued jobs that have not started (counted in ``discarded``);
        4. wait for running jobs, at most ``timeout`` seconds (None or
           ``math.inf``: no limit).

        Returns True if no job is still running (idle threads may still be
        exiting). Idempotent.
        """
        timeout = _check_timeout("timeout", timeout)
        with self._lock:
            self._stopped = True
            sched, cancel = self._sched, self._cancel
        if sched is None:
            return True
        assert cancel is not None
        # Cancel first: a queued job whose turn comes while stop() runs is then
        # skipped, never started with a live context.
        cancel()
        sched.close()
        sched.cancel_queued()
        if sched.join(timeout):
            return True
        # Timed out waiting for the threads; idle ones may just not have exited yet.
        _, running, pending, *_ = sched.metrics()
        idle: bool = running == 0 and pending == 0
        return idle

    def __enter__(self) -> TaskPool[K]:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __len__(self) -> int:
        """Keys with queued or running jobs."""
        sched = self._sched
        return 0 if sched is None else int(sched.metrics()[3])

    def len(self) -> int:
        """Keys with queued or running jobs (the Go API's ``Len``)."""
        return len(self)

    def metrics(self) -> PoolMetrics:
        """A snapshot of the pool's counters (see ``KeyedExecutor.metrics``)."""
        sched = self._sched
        m = (0,) * 8 if sched is None else sched.metrics()
        w, running, pending, keys, submitted, completed, failed, cancelled = m
        # Jobs are only ever skipped because stop() cancelled the pool's context.
        return PoolMetrics(
            w, running, pending, keys, submitted, completed, failed, cancelled, cancelled
        )

    def timings(self) -> Timings:
        """Wait and run time histograms of the timed jobs (see ``KeyedExecutor.timings``)."""
        sched = self._sched
        raw = Recorder(self._sample_timings).raw() if sched is None else sched.timings()
        return timings_from(raw)

    def hot_keys(self, n: int = 10) -> list[HotKey]:
        """The ``n`` keys with the most queued jobs (see ``KeyedExecutor.hot_keys``)."""
        n = check_n(n)
        sched = self._sched
        return [] if sched is None else hot_keys(sched.hot_keys(min(n, sys.maxsize))[0], n)

    @property
    def name(self) -> str:
        """The ``name`` given to the constructor (threads, logs, exporters)."""
        return self._name

    @property
    def context(self) -> Context | None:
        """The context every job receives (None before ``start()``)."""
        return self._ctx

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else ("started" if self._sched else "new")
        return f"<TaskPool {state} keys={len(self)} queue_size={self._queue_size}>"
