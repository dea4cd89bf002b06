"""The pure-Python scheduler: the reference model of ``keyedexec._core``.

Same names, same behaviour, same counters as the native core (read its module
docstring for the design); used where the extension is unavailable, under
``KEYEDEXEC_PURE_PYTHON=1``, as the model in the property tests and as a
benchmark baseline. A dict maps each key with work to its deque of tasks; a
deque of ready keys feeds the workers. One lock guards both.

Where the native core never runs Python code under its lock, this one cannot
help it: a key's ``__eq__`` runs there, and a ``__del__`` or weakref callback may
run on a thread that is inside the critical section (the GC runs at an
allocation; without the GIL at almost any bytecode). If such code submits, it
cannot take the lock, and must not change the state half-way through another
operation: its task is deferred (``_deferred``, one queue per thread) and
queued, in call order, by that thread's one drain loop as soon as it releases
the lock; so is a close. Reads work; cancelling or waiting from there raises
RuntimeError. A signal handler's exception can also arrive anywhere in a
critical section: each submit's state change is undone if it did not complete
(``_commit``, ``_withdraw``).
"""

from __future__ import annotations

import heapq
import threading
from collections import deque
from time import monotonic, monotonic_ns
from typing import Any, Callable

from . import _watchdog
from ._future import KeyedFuture
from ._lifecycle import cancel_orphans, register
from ._report import report_failure
from ._timings import Recorder
from .context import Context
from .errors import BrokenThreadPool, QueueFull

__all__ = ["Scheduler"]

# Task kinds (bit flags), as in the native core.
K_FUTURE = 1
K_ERRVAL = 2
K_CTX = 4
K_TIMED = 8  # a sampled task: its wait and run times go into the histograms

OPEN, CLOSED_SHUTDOWN, CLOSED_EXIT, CLOSED_FORK, CLOSED_BROKEN = range(5)
T_OK, T_RAISED, T_SKIPPED = 1, 2, 3
_STARTING, _STARTED, _ABANDONED = range(3)  # a worker thread's start (_spawn's token)

# The stdlib's texts, word for word: code in the wild matches on them.
_CLOSED_MESSAGES = {
    CLOSED_SHUTDOWN: "cannot schedule new futures after shutdown",
    CLOSED_EXIT: "cannot schedule new futures after interpreter shutdown",
    CLOSED_FORK: (
        "this executor was inherited across os.fork() and cannot run "
        "tasks in the child; create a new one"
    ),
    CLOSED_BROKEN: "A thread initializer failed, the thread pool is not usable anymore",
}


def _closed_error(reason: int) -> RuntimeError:
    """What a submit raises once the scheduler is closed for ``reason``."""
    if reason == CLOSED_BROKEN:
        return BrokenThreadPool(_CLOSED_MESSAGES[reason])
    return RuntimeError(_CLOSED_MESSAGES[reason])


def _broken() -> BrokenThreadPool:
    """The exception of each task dropped by a broken pool (as ThreadPoolExecutor's)."""
    return BrokenThreadPool(_CLOSED_MESSAGES[CLOSED_BROKEN])


_ALL = object()
_get_ident = threading.get_ident

# (fn, args or the context, kwargs or None, future or None, kind, submit time in ns or 0)
Task = tuple[Any, Any, "dict[str, Any] | None", "KeyedFuture[Any] | None", int, int]


class _WorkerSlot:
    """A worker as the slow-task watchdog sees it (the native core's WorkerSlot)."""

    __slots__ = ("ks", "seq", "seen_seq", "seen_at", "reported")

    def __init__(self) -> None:
        self.ks: _KeyState | None = None  # the key whose task it runs
        self.seq = self.seen_seq = self.seen_at = 0
        self.reported = False


class _KeyState:
    __slots__ = ("key", "tasks", "ready", "runner", "current")

    def __init__(self, key: Any) -> None:
        self.key = key
        self.tasks: deque[Task] = deque()
        self.ready = False
        self.runner = 0  # ident of the worker serving it, or 0
        self.current: KeyedFuture[Any] | None = None  # the running task's future: see fork


def _cancel_dropped(
    dropped: list[Task], error: Callable[[], BaseException] | None = None
) -> int:
    """Cancel the futures of tasks taken out of their queues, or fail them
    with the exception ``error`` makes; returns how many."""
    first_error = None  # one failure (a Ctrl-C) must not leave the rest pending
    for task in dropped:
        if task[3] is not None:
            try:
                if error is None:
                    task[3]._cancel_queued()
                else:
                    task[3]._fail_queued(error(), bool(task[4] & K_ERRVAL))
            except BaseException as exc:
                if first_error is None:
                    first_error = exc
    if first_error is not None:
        raise first_error
    return len(dropped)


def _check_ctx(ctx: Any) -> None:
    if not isinstance(ctx, Context):
        raise TypeError(f"ctx must be a keyedexec Context, got {type(ctx).__name__}")


class Scheduler:
    """The keyed scheduler. Facades: ``KeyedExecutor`` and ``TaskPool``."""

    def __init__(
        self,
        workers: int,
        *,
        queue_size: int = 0,
        idle_timeout: float | None = None,
        batch: int = 64,
        name: str = "keyedexec",
        on_error: Callable[[Any, BaseException], object] | None = None,
        thread_name_prefix: str = "",
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        sample_timings: int = 32,
        slow_task_threshold: float | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        self._max_workers = workers
        self._queue_size = queue_size
        self._idle_timeout = idle_timeout
        self._batch = batch
        self.name = name
        self._on_error = on_error
        self._thread_name_prefix = thread_name_prefix
        self._initializer = initializer
        self._initargs = initargs
        # Reentrant only so that _is_owned() can tell a finalizer running inside
        # the critical section (module docstring); nothing else re-enters.
        self._lock = threading.RLock()
        self._work = threading.Condition(self._lock)  # idle workers
        self._space = threading.Condition(self._lock)  # submitters on a full key
        # Deferred submits (key, task) and closes (reason) by thread, and the
        # threads draining theirs: module docstring.
        self._deferred: dict[int, deque[tuple[Any, Task] | int]] = {}
        self._draining: set[int] = set()
        self._keys: dict[Any, _KeyState] = {}
        self._ready: deque[_KeyState] = deque()
        self._nthreads = self._idle = self._wakeups = self._blocked = 0
        self._closing = OPEN
        self._running = self._pending = 0
        self._submitted = self._completed = self._failed = self._cancelled = 0
        self._threads: list[threading.Thread] = []
        self._threads_lock = threading.Lock()
        self._exited = threading.Condition()  # its own (reentrant) lock: see _spawn
        self._spawned = 0
        self._joining = 0  # worker threads whose task waits in join(); under _exited
        self._timing = Recorder(sample_timings)  # under _lock
        self._slots: list[_WorkerSlot] = []  # the running workers, under _lock
        register(self)
        if slow_task_threshold is not None:
            _watchdog.start(self, slow_task_threshold)

    # -- submission ---------------------------------------------------------------

    def _push(
        self,
        key: Any,
        fn: Any,
        args: Any,
        kwargs: dict[str, Any] | None,
        fut: KeyedFuture[Any] | None,
        kind: int,
        block: bool,
        timeout: float | None,
        late: bool = False,
    ) -> bool:
        """Queue a task; False if the key is full and ``block`` is off or timed out.

        ``late``: a deferred task (module docstring), accepted already: it
        ignores queue_size, and once the scheduler has closed it still runs
        while workers drain, or is cancelled after a fork. A worker the task
        needs is started before the task is queued (as in the native core).
        """
        if not late:
            if not callable(fn):
                raise TypeError(f"fn must be callable, got {type(fn).__name__}")
            try:
                hash(key)
            except TypeError as exc:
                raise TypeError(f"key must be hashable, got {type(key).__name__}") from exc
        # What the critical section needs is allocated before it: fewer
        # allocations under the lock, fewer collections (and finalizers) there.
        task: Task = (fn, args, kwargs, fut, kind, 0)  # stamped when accepted (_commit)
        if self._lock._is_owned():  # type: ignore[attr-defined]
            # A finalizer, on a thread inside the critical section: defer.
            if self._closing:
                raise _closed_error(self._closing)
            self._defer((key, task))
            return True
        deadline = None if timeout is None else monotonic() + timeout
        receipt: list[Any] = []  # (the key's state, the task as queued) once committed
        try:
            return self._enqueue(key, task, block, deadline, late, receipt)
        except BaseException:
            # A signal handler may raise anywhere, also once the task is
            # queued: a submit that raises must have queued nothing.
            if receipt:
                self._withdraw(receipt[0], receipt[1])
            raise

    def _enqueue(
        self,
        key: Any,
        task: Task,
        block: bool,
        deadline: float | None,
        late: bool,
        receipt: list[Any],
    ) -> bool:
        """_push once the arguments are checked (see there)."""
        fut = task[3]
        fresh = _KeyState(key)
        spawned = False
        while True:
            refused = 0
            spawn = False
            try:
                with self._lock:
                    while True:
                        if self._closing and not (late and self._closing < CLOSED_FORK):
                            refused = self._closing
                            if late:  # accepted, then the scheduler was forked away (or broke)
                                self._submitted += 1
                                self._cancelled += 1
                            break
                        ks = self._keys.get(key)
                        if ks is not None and self._queue_size and not late and (
                                len(ks.tasks) >= self._queue_size):
                            remaining = None if deadline is None else deadline - monotonic()
                            if not block or (remaining is not None and remaining <= 0):
                                return False
                            if ks.runner == _get_ident():
                                refused = -1
                                break
                            self._blocked += 1
                            try:
                                self._space.wait(remaining)
                            finally:
                                self._blocked -= 1
                            continue
                        idle_key = ks is None or not (ks.ready or ks.runner)
                        if (idle_key and self._idle <= self._wakeups
                                and self._nthreads < self._max_workers
                                and (not spawned or self._nthreads == 0)):
                            spawn = self._reserve_worker()
                            break
                        self._commit(key, ks, fresh, task, receipt)
                        break
            finally:
                self._after_unlock()
            if not spawn:
                break
            try:
                self._spawn()
            except RuntimeError as exc:  # "can't start new thread"
                if self._nthreads == 0:
                    raise  # nobody could run the task: refuse it
                report_failure("keyedexec could not start another worker thread; "
                               "the running ones will serve the task", exc)
            spawned = True
        if refused and late:
            if fut is not None:
                fut._cancel_queued()
            return True
        if refused > 0:
            raise _closed_error(refused)
        if refused < 0:
            raise QueueFull(
                f"key {key!r} is full ({self._queue_size} queued) and this "
                "job runs on that key: waiting would deadlock"
            )
        return True

    # The two state changes of a submit. A signal handler (Ctrl-C) can raise
    # at almost any bytecode of the main thread, inside the locked section
    # too: each change is undone if it did not complete, so that a submit that
    # raised queued nothing and the counters stay true.

    def _reserve_worker(self) -> bool:
        nthreads = self._nthreads
        try:
            self._nthreads = nthreads + 1
        except BaseException:
            self._nthreads = nthreads
            raise
        return True

    def _commit(
        self, key: Any, ks: _KeyState | None, fresh: _KeyState, task: Task, receipt: list[Any]
    ) -> None:
        saved = self._pending, self._submitted, self._wakeups
        new = ks is None
        target = fresh if ks is None else ks
        try:
            if new:
                self._keys[key] = fresh
            idle_key = not (target.ready or target.runner)
            if idle_key:  # an empty ready key is harmless: a worker frees it
                target.ready = True
                self._ready.append(target)
            # The submit time (for hot_keys too): now, after any wait for space.
            kind = task[4] | K_TIMED if self._timing.take() else task[4]
            task = (task[0], task[1], task[2], task[3], kind, monotonic_ns())
            self._pending += 1
            self._submitted += 1
            receipt.extend((target, task))
            target.tasks.append(task)  # the commit point
            if idle_key and self._idle > self._wakeups:
                self._wakeups += 1
                self._work.notify()
        except BaseException:
            if target.tasks and target.tasks[-1] is task:
                target.tasks.pop()
            if new and not target.ready and self._keys.get(key) is fresh:
                del self._keys[key]
            self._pending, self._submitted, self._wakeups = saved
            raise

    def _withdraw(self, ks: _KeyState, task: Task) -> None:
        """Take back a task that _commit queued, unless a worker took it."""
        try:
            with self._lock:
                for i, queued in enumerate(ks.tasks):
                    if queued is task:
                        del ks.tasks[i]  # an emptied key stays ready; a worker frees it
                        self._pending -= 1
                        self._submitted -= 1
                        break
        finally:
            self._after_unlock()

    def _defer(self, item: tuple[Any, Task] | int) -> None:
        """From a finalizer inside the critical section (module docstring): the
        item waits for this thread to release the lock."""
        self._deferred.setdefault(_get_ident(), deque()).append(item)

    def _after_unlock(self) -> None:
        """After each release of the lock: queue what finalizers deferred."""
        if self._deferred and not self._lock._is_owned():  # type: ignore[attr-defined]
            self._drain_deferred()

    def _drain_deferred(self) -> None:
        """Queue, in order, what was deferred on this thread. One loop per
        thread (a drain's own pushes may defer more: the loop takes them too),
        and a deferred submit that fails reports through its future."""
        me = _get_ident()
        queue = self._deferred.get(me)
        if queue is None or me in self._draining:
            return
        self._draining.add(me)
        try:
            while queue:
                item = queue.popleft()
                if isinstance(item, int):
                    self._close(item)
                    continue
                key, task = item
                fn, args, kwargs, fut, kind, _stamp = task
                try:
                    self._push(key, fn, args, kwargs, fut, kind, False, None, late=True)
                except BaseException as exc:  # e.g. its key's __eq__ raised
                    self._fail(key, fut, kind, exc)
        finally:
            self._draining.discard(me)
            if not queue:
                self._deferred.pop(me, None)

    def _fail(self, key: Any, fut: KeyedFuture[Any] | None, kind: int, exc: BaseException) -> None:
        """An accepted task that could not be queued: its outcome is ``exc``."""
        if fut is None:
            self._report(key, exc)
        elif fut.set_running_or_notify_cancel():
            if kind & K_ERRVAL:
                fut._set_outcome(exc, None)
            else:
                fut._set_outcome(None, exc)

    def _refuse_reentry(self, what: str) -> None:
        if self._lock._is_owned():  # type: ignore[attr-defined]
            raise RuntimeError(f"keyedexec: {what} from a finalizer or a key's __eq__ run "
                               "while this thread holds the scheduler's lock")

    def _spawn(self) -> None:
        """Start the worker thread reserved (nthreads += 1) under the lock; a
        failed start gives the reservation back unless the thread already runs
        (the token decides, as in the native core)."""
        token = [_STARTING]
        t = None
        try:
            t = threading.Thread(target=self._worker_main, args=(token,))
            # Nothing is allocated under _threads_lock: an allocation may run the
            # GC, and a finalizer that submits may need to spawn a worker too.
            with self._threads_lock:
                self._spawned += 1
                n = self._spawned
                self._threads.append(t)
            # ThreadPoolExecutor's names with a prefix; 0-based, as there.
            prefix = self._thread_name_prefix
            t.name = f"{prefix}_{n - 1}" if prefix else f"{self.name}-worker-{n}"
            t.start()
        except BaseException:
            with self._threads_lock:
                abandoned = token[0] == _STARTING
                if abandoned:
                    token[0] = _ABANDONED
                    if t is not None and t in self._threads:
                        self._threads.remove(t)
            if abandoned:
                try:
                    with self._lock:
                        self._nthreads -= 1
                finally:
                    self._after_unlock()
                self._notify_exited()
            raise

    def _claim_start(self, token: list[int]) -> bool:
        """A new worker's first step: False if its spawn failed and gave its
        reservation back (see _spawn), when it must exit at once."""
        with self._threads_lock:
            if token[0] == _ABANDONED:
                return False
            token[0] = _STARTED
            return True

    def _notify_exited(self) -> None:
        """A worker exits (or failed to start): forget the threads that have
        exited, so the list stays as long as the pool, and wake join()."""
        exited = [t for t in self._threads[:] if t.ident is not None and not t.is_alive()]
        with self._threads_lock:  # no allocation in here: see _spawn
            for i in range(len(exited)):
                if exited[i] in self._threads:  # another exiting worker may have been first
                    self._threads.remove(exited[i])
        with self._exited:
            self._exited.notify_all()

    def execute(self, key: Any, fn: Any, /, *args: Any, **kwargs: Any) -> None:
        """Run ``fn(*args, **kwargs)`` on ``key``'s queue; errors go to on_error."""
        self._push(key, fn, args, kwargs or None, None, 0, False, None)

    def submit(self, key: Any, fn: Any, /, *args: Any, **kwargs: Any) -> KeyedFuture[Any]:
        """Run ``fn(*args, **kwargs)`` on ``key``'s queue; return its future."""
        fut: KeyedFuture[Any] = KeyedFuture()
        self._push(key, fn, args, kwargs or None, fut, K_FUTURE, False, None)
        return fut

    def execute_with_error(
        self, key: Any, fn: Any, /, *args: Any, **kwargs: Any
    ) -> KeyedFuture[Any]:
        """Like submit, but the future's result is the exception raised, or None."""
        fut: KeyedFuture[Any] = KeyedFuture()
        self._push(key, fn, args, kwargs or None, fut, K_FUTURE | K_ERRVAL, False, None)
        return fut

    def _fast_methods(self) -> tuple[Callable[..., None], Callable[..., Any], Callable[..., Any]]:
        """(execute, submit, execute_with_error): the native core's are faster
        variants of the same methods; here they are the methods themselves."""
        return (self.execute, self.submit, self.execute_with_error)

    def execute_with_context(self, key: Any, ctx: Context, fn: Any) -> None:
        """Run ``fn(ctx)``; skipped if ctx is cancelled when its turn comes."""
        _check_ctx(ctx)
        self._push(key, fn, ctx, None, None, K_CTX, False, None)

    def submit_with_context(self, key: Any, ctx: Context, fn: Any) -> KeyedFuture[Any]:
        """Run ``fn(ctx)``; the future raises ``ctx.err()`` if it was skipped."""
        _check_ctx(ctx)
        fut: KeyedFuture[Any] = KeyedFuture()
        self._push(key, fn, ctx, None, fut, K_FUTURE | K_CTX, False, None)
        return fut

    def execute_with_context_error(self, key: Any, ctx: Context, fn: Any) -> KeyedFuture[Any]:
        """Run ``fn(ctx)``; the future's result is the error (or ``ctx.err()``), or None."""
        _check_ctx(ctx)
        fut: KeyedFuture[Any] = KeyedFuture()
        self._push(key, fn, ctx, None, fut, K_FUTURE | K_ERRVAL | K_CTX, False, None)
        return fut

    def put(
        self, key: Any, fn: Any, ctx: Context, block: bool = True, timeout: float | None = None
    ) -> bool:
        """TaskPool's submit: ``fn(ctx)``, waiting while the key is full."""
        _check_ctx(ctx)
        return self._push(key, fn, ctx, None, None, K_CTX, block, timeout)

    # -- the worker -------------------------------------------------------------------

    def _worker_main(self, token: list[int]) -> None:
        if not self._claim_start(token):
            return
        if self._initializer is not None:
            self._initialize_worker()  # if it fails, the loop below only exits
        me = _get_ident()
        lock = self._lock
        ks: _KeyState | None = None
        dead: _KeyState | None = None
        served = status = 0
        fresh = True
        slot = _WorkerSlot()
        stamp = started = ended = -1  # a timed task's submit, start and end (ns)
        lock.acquire()
        self._slots.append(slot)
        try:
            while True:
                if status:
                    slot.ks = None
                    if stamp >= 0 and status != T_SKIPPED:
                        self._timing.record(stamp, started, ended)
                    ks.current = None  # type: ignore[union-attr]
                    self._running -= 1
                    if status == T_SKIPPED:
                        self._cancelled += 1
                    else:
                        self._completed += 1
                        if status == T_RAISED:
                            self._failed += 1
                    status = 0
                if ks is not None:
                    if ks.tasks and served < self._batch:
                        task = ks.tasks.popleft()
                        fresh = False
                        ks.current = task[3]
                        slot.ks = ks
                        slot.seq += 1
                        stamp = task[5] if task[4] & K_TIMED else -1
                        self._pending -= 1
                        self._running += 1
                        served += 1
                        if self._blocked:
                            self._space.notify_all()
                        lock.release()
                        if self._deferred:
                            self._after_unlock()
                        dead = None  # released outside the lock: __del__ may submit
                        if stamp >= 0:
                            started = monotonic_ns()
                        status = self._run(ks.key, task)
                        if stamp >= 0:
                            ended = monotonic_ns()
                        del task
                        lock.acquire()
                        continue
                    if dead is not None:
                        # Release the previous dead key first, outside the lock.
                        lock.release()
                        dead = None
                        self._after_unlock()
                        lock.acquire()
                        continue
                    ks.runner = 0
                    if ks.tasks:
                        ks.ready = True
                        self._ready.append(ks)
                    else:
                        self._forget(ks)
                        dead = ks
                    ks = None
                if self._ready:
                    ks = self._ready.popleft()
                    ks.ready = False
                    ks.runner = me
                    served = 0
                    continue
                if self._closing:
                    break
                if dead is not None:
                    lock.release()
                    dead = None
                    self._after_unlock()
                    lock.acquire()
                    continue
                self._idle += 1
                # One that has run nothing yet does not retire (as in the core).
                woke = self._work.wait(None if fresh else self._idle_timeout)
                self._idle -= 1
                if self._wakeups:
                    self._wakeups -= 1
                if not woke and not self._ready and not self._closing:
                    break  # idle for idle_timeout seconds: give the thread back
            self._nthreads -= 1
            if slot in self._slots:  # (not after a fork)
                self._slots.remove(slot)
        finally:
            lock.release()
            self._after_unlock()
        del dead
        self._notify_exited()

    def _forget(self, ks: _KeyState) -> None:
        """Remove a key's state from the table (lock held), even if the key
        object was mutated while it ran and no longer hashes as it did. If a
        key's __eq__ raises here (another key of the same hash is compared),
        the empty state stays: the key's next submit reuses it."""
        try:
            if self._keys.get(ks.key) is ks:
                del self._keys[ks.key]
            else:  # rebuilt without it: deleting needs the key's old hash
                self._keys = {k: state for k, state in self._keys.items() if state is not ks}
        except Exception:  # noqa: S110 - the worker must go on
            pass

    def _initialize_worker(self) -> None:
        """Call the initializer in a new worker. If it raises (logged), the pool is
        broken, as ThreadPoolExecutor's: submits raise BrokenThreadPool, and the
        queued tasks are dropped, their futures failed with it. The workers then
        free the emptied keys and exit, this one included."""
        try:
            self._initializer(*self._initargs)  # type: ignore[misc]
            return
        except BaseException as exc:
            report_failure(f"a worker initializer of {self.name!r} raised: the pool is broken", exc)
        try:
            with self._lock:
                if self._closing != CLOSED_FORK:
                    self._closing = CLOSED_BROKEN
                self._work.notify_all()
                self._space.notify_all()
        finally:
            self._after_unlock()
        try:
            self.cancel_queued(error=_broken)
        except BaseException as exc:  # not expected: the futures are done regardless
            report_failure(f"keyedexec could not fail the tasks of {self.name!r}", exc)

    def _run(self, key: Any, task: Task) -> int:
        fn, args, kwargs, fut, kind, _stamp = task
        try:
            if fut is not None and not fut.set_running_or_notify_cancel():
                return T_SKIPPED
        except BaseException as exc:  # not expected: report it, go on
            report_failure(f"keyedexec could not start a task for key {key!r}", exc)
            return T_SKIPPED
        try:
            if kind & K_CTX:
                # Inside the task's try: a context whose err() raises fails the task.
                err = args.err()
                if err is not None:
                    if fut is not None:
                        if kind & K_ERRVAL:
                            fut._set_outcome(err, None)
                        else:
                            fut._set_outcome(None, err)
                    return T_SKIPPED
                result = fn(args)
            elif kwargs is not None:
                result = fn(*args, **kwargs)
            else:
                result = fn(*args)
        except BaseException as exc:
            if fut is None:
                self._report(key, exc)
            elif kind & K_ERRVAL:
                fut._set_outcome(exc, None)
            else:
                fut._set_outcome(None, exc)
            # exc's traceback keeps this frame: drop the task's objects from it,
            # or exc -> frame -> fut -> exc holds them until the cyclic gc runs.
            del task, fn, args, kwargs, fut
            return T_RAISED
        if fut is not None:
            fut._set_outcome(None if kind & K_ERRVAL else result, None)
        return T_OK

    def _report(self, key: Any, exc: BaseException) -> None:
        if self._on_error is not None:
            try:
                self._on_error(key, exc)
            except BaseException as handler_exc:
                report_failure(
                    f"on_error handler {self._on_error!r} raised for key {key!r}", handler_exc
                )

    # -- shutdown and introspection ---------------------------------------------------

    def _close(self, reason: int) -> None:
        if self._lock._is_owned():  # type: ignore[attr-defined]
            self._defer(reason)  # a finalizer inside the critical section
            return
        spawn = False
        try:
            with self._lock:
                if not self._closing:
                    self._closing = reason
                if self._pending and self._nthreads == 0 and reason != CLOSED_FORK:
                    self._nthreads += 1
                    spawn = True
                self._work.notify_all()
                self._space.notify_all()
        finally:
            self._after_unlock()
        if spawn:
            self._spawn()

    def close(self) -> None:
        """Stop accepting tasks; workers drain what is queued, then exit."""
        self._close(CLOSED_SHUTDOWN)

    def _close_for_exit(self) -> None:
        self._close(CLOSED_EXIT)

    def cancel_queued(
        self, key: Any = _ALL, error: Callable[[], BaseException] | None = None
    ) -> int:
        """Drop queued tasks (all, or one key's) that have not started.

        Their futures are cancelled (and waiters notified), or, given ``error``,
        fail with the exception it makes. Returns how many.
        """
        self._refuse_reentry("cancelling queued tasks")
        dropped: list[Task] = []
        try:
            with self._lock:
                if key is _ALL:
                    states = list(self._keys.values())
                else:
                    ks = self._keys.get(key)
                    states = [] if ks is None else [ks]
                for ks in states:
                    dropped.extend(ks.tasks)
                    ks.tasks.clear()  # an emptied key stays ready; a worker frees it
                self._pending -= len(dropped)
                self._cancelled += len(dropped)
                if dropped and self._blocked:
                    self._space.notify_all()  # submitters waiting on a full key
        finally:
            self._after_unlock()
        return _cancel_dropped(dropped, error)

    def cancel_task(self, key: Any, fut: KeyedFuture[Any]) -> bool:
        """Drop ``key``'s queued task whose future is ``fut``, if it has not
        started, and cancel that future. Returns whether it was dropped."""
        self._refuse_reentry("cancelling a queued task")
        dropped: list[Task] = []
        try:
            with self._lock:
                ks = self._keys.get(key)
                for task in () if ks is None else ks.tasks:
                    if task[3] is fut:
                        ks.tasks.remove(task)  # type: ignore[union-attr]
                        dropped.append(task)
                        self._pending -= 1
                        self._cancelled += 1
                        break
        finally:
            self._after_unlock()
        return _cancel_dropped(dropped) == 1

    def check_can_wait(self, what: str) -> None:
        """RuntimeError if waiting here would deadlock (see _refuse_reentry)."""
        self._refuse_reentry(what)

    def _live_workers(self) -> int:
        self._refuse_reentry("waiting for the workers")
        return self._nthreads  # one attribute read: atomic

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the workers have exited (after close). True if they did.

        Called from a task, it waits neither for its own worker nor for workers
        whose task waits in join() too (as the native core).
        """
        deadline = None if timeout is None else monotonic() + timeout
        me = threading.current_thread()
        with self._exited:
            worker = me in self._threads
            if worker:
                self._joining += 1
                self._exited.notify_all()  # the others may stop waiting for us
            try:
                while self._live_workers() > (self._joining if worker else 0):
                    remaining = None if deadline is None else deadline - monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._exited.wait(remaining)
            finally:
                if worker:
                    self._joining -= 1
            threads = list(self._threads)
        if worker:
            return True  # the threads still alive are ours or wait in join() too
        for t in threads:
            if t.ident is not None:
                t.join(None if deadline is None else max(0.0, deadline - monotonic()))
        return all(not t.is_alive() for t in threads)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._close(CLOSED_SHUTDOWN)
        if cancel_futures:
            self.cancel_queued()
        if wait:
            self.join()

    def metrics(self) -> tuple[int, int, int, int, int, int, int, int]:
        """(workers, running, pending, active_keys, submitted, completed, failed, cancelled)"""
        try:
            with self._lock:  # the tuple is built after unlocking (see _push)
                nthreads, running, pending = self._nthreads, self._running, self._pending
                nkeys, submitted, completed = len(self._keys), self._submitted, self._completed
                failed, cancelled = self._failed, self._cancelled
        finally:
            self._after_unlock()
        return (nthreads, running, pending, nkeys, submitted, completed, failed, cancelled)

    def timings(self) -> tuple[int, tuple[int, ...], int, tuple[int, ...], int]:
        """(sample_every, wait bucket counts, wait sum ns, run bucket counts, run sum ns)"""
        try:
            with self._lock:
                return self._timing.raw()
        finally:
            self._after_unlock()

    def hot_keys(self, n: int) -> tuple[list[tuple[Any, int, bool, int | None]], int]:
        """The ``n`` keys with the most queued tasks (ties: running first), and
        how long the lock was held (ns): see the native core. The reference
        model scans every key in one hold of the lock."""
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        try:
            with self._lock:
                t0 = monotonic_ns()
                best = heapq.nlargest(
                    n,
                    (ks for ks in self._keys.values() if ks.tasks or ks.runner),
                    key=lambda ks: 2 * len(ks.tasks) + (ks.runner != 0),
                )
                entries = [
                    (ks.key, len(ks.tasks), ks.runner != 0,
                     ks.tasks[0][5] if ks.tasks and ks.tasks[0][5] else None)
                    for ks in best
                ]
                held = monotonic_ns() - t0
        finally:
            self._after_unlock()
        now = monotonic_ns()
        return [(k, q, r, None if s is None else max(0, now - s)) for k, q, r, s in entries], held

    def _slow_tasks(self, threshold_ns: int) -> list[tuple[Any, int]]:
        """(the watchdog) [(key, ns it has run at least)]: see the native core."""
        now = monotonic_ns()
        out = []
        try:
            with self._lock:
                for slot in self._slots:
                    if slot.ks is None:
                        continue
                    if slot.seq != slot.seen_seq:
                        slot.seen_seq, slot.seen_at, slot.reported = slot.seq, now, False
                    elif not slot.reported and now - slot.seen_at >= threshold_ns:
                        slot.reported = True
                        out.append((slot.ks.key, now - slot.seen_at))
        finally:
            self._after_unlock()
        return out

    def _watch_done(self) -> bool:
        """(the watchdog) True once closed and every worker has exited."""
        return self._closing != OPEN and self._nthreads == 0

    def key_pending(self, key: Any) -> int:
        """Queued (not running) tasks of ``key``."""
        try:
            with self._lock:
                ks = self._keys.get(key)
                return 0 if ks is None else len(ks.tasks)
        finally:
            self._after_unlock()

    def key_active(self, key: Any) -> bool:
        """True if ``key`` has queued or running tasks."""
        try:
            with self._lock:
                ks = self._keys.get(key)
                return ks is not None and bool(ks.tasks or ks.ready or ks.runner)
        finally:
            self._after_unlock()

    def serving(self, key: Any) -> bool:
        """True if the calling thread is a worker running a task of ``key``."""
        try:
            with self._lock:
                ks = self._keys.get(key)
                return ks is not None and ks.runner == _get_ident()
        finally:
            self._after_unlock()

    @property
    def closed(self) -> bool:
        return self._closing != OPEN

    @property
    def max_workers(self) -> int:
        return self._max_workers

    # -- fork ---------------------------------------------------------------------------

    def _before_fork(self) -> None:
        self._lock.acquire()

    def _after_fork_parent(self) -> None:
        self._lock.release()
        self._after_unlock()

    def _after_fork_child(self) -> None:
        me = threading.current_thread()
        survivor = me in self._threads  # a task forked: its worker lives on here
        self._lock = threading.RLock()
        self._work = threading.Condition(self._lock)
        self._space = threading.Condition(self._lock)
        self._threads_lock = threading.Lock()
        self._exited = threading.Condition()  # its own (reentrant) lock: see _spawn
        self._closing = CLOSED_FORK
        self._idle = self._wakeups = self._blocked = self._joining = 0
        self._nthreads = 1 if survivor else 0
        self._threads = [me] if survivor else []
        self._deferred, self._draining = {}, set()
        self._slots = []  # the parent's workers: not running here
        self.cancel_queued()
        # The tasks the parent's other workers were running never end here:
        # counted as cancelled, their futures cancelled (the native core's
        # _cancel_orphans). Their keys stay busy: the executor is closed.
        orphaned = [ks for ks in self._keys.values() if ks.runner not in (0, _get_ident())]
        self._running -= len(orphaned)
        self._cancelled += len(orphaned)
        cancel_orphans(ks.current for ks in orphaned)

