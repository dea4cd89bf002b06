"""ProcessKeyedExecutor: per-key order across child processes, on every core.

Under the GIL, CPU-bound keyed work runs on one core whatever the thread pool.
This executor routes keys to child processes (``keyedexec._router``: a busy key
stays on its child, an idle key goes to its rendezvous-hash child, tasks travel
in numbered batches) and each child runs a local :class:`~keyedexec.KeyedExecutor`
with ``workers_per_process`` threads. This module is the transport: a duplex
pipe per child, a writer thread per child, and one receiver thread that reads
every child's outcomes and watches each child's sentinel to notice its death.

Not imported by ``import keyedexec``.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import os
import pickle
import queue
import signal
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, NamedTuple

from ._report import log_task_error, report_failure
from ._router import (
    DEFAULT_SAMPLE_TIMINGS,
    Batch,
    RoutedExecutor,
    Router,
    ShardHost,
    _decode_exception,
    encode_exception,
)
from ._typevars import K
from .executor import (
    _UINT32_MAX,
    _check_count,
    _check_interval,
    _check_threshold,
    _check_timeout,
)

__all__ = ["BrokenProcessPool", "ProcessKeyedExecutor", "ProcessMetrics"]

_PICKLE = pickle.HIGHEST_PROTOCOL
# Messages: parent -> child ("batch", epoch, seq, batch) and ("stop",);
# child -> parent ("results", outcomes) and ("init_failed", encoded exception).
_BATCH, _STOP, _RESULTS, _INIT_FAILED = range(4)
_STOP_MESSAGE = pickle.dumps((_STOP,), _PICKLE)
# How long a closing executor waits for a child told to stop before killing it.
_STOP_GRACE = 10.0


class ProcessMetrics(NamedTuple):
    """``ProcessKeyedExecutor.metrics()``: a snapshot of the counters."""

    children: int
    """Child processes alive now."""
    pending: int
    """Tasks accepted and not finished: queued here or in a child, or running."""
    in_flight: int
    """Of ``pending``, tasks sent to a child and not acknowledged yet."""
    active_keys: int
    """Keys with unfinished tasks."""
    submitted: int
    """Tasks accepted since creation."""
    completed: int
    """Tasks that ran to the end, returning or raising (or failed to pickle)."""
    failed: int
    """Of ``completed``, those that raised."""
    cancelled: int
    """Tasks that never ran: cancelled before they started."""
    lost: int
    """Tasks failed with ShardLost (their child died before reporting them)."""
    retried: int
    """Tasks sent again after their child died (``on_loss="retry"``)."""
    restarts: int
    """Children replaced after dying."""
    recycled: int
    """Children replaced after ``max_tasks_per_child`` tasks."""


def _default_processes() -> int:
    return getattr(os, "process_cpu_count", os.cpu_count)() or 1


class ProcessKeyedExecutor(RoutedExecutor[K]):
    """Run tasks in child processes; tasks that share a key run one at a time, in order.

    ``processes`` children (default: the CPU count), each running a local
    KeyedExecutor with ``workers_per_process`` threads (default 1: CPU-bound
    work). A key with unfinished tasks stays on its child; an idle key goes to
    the child that rendezvous hashing of ``hash(key)`` picks, so a key keeps its
    child (and whatever its tasks cached there) while the child lives. Keys must
    be hashable and stay in this process (they need not pickle); ``fn``, its
    arguments and its result travel by pickle (module-level functions, as for
    ProcessPoolExecutor).

    Tasks travel in batches per child: a batch leaves once it holds
    ``batch_size`` tasks, or ``linger`` seconds after its first task.

    A child that dies (a crash, ``os._exit``, the OOM killer) is replaced at
    once and the executor goes on. What happens to the tasks it had been sent
    and had not reported (``on_loss``):

    * ``"fail"`` (default): at most once. Their futures raise
      :class:`keyedexec.ShardLost`; they may or may not have run.
    * ``"retry"``: at least once. They are sent again, in their order and before
      anything newer, to the replacement, up to ``max_retries`` times each
      (then ShardLost). Tasks must be idempotent.

    The stdlib's contract where it applies: ``mp_context`` (a context or a start
    method name; default ``"spawn"``, which is safe in a process with threads
    (this one has some), on every platform), ``initializer(*initargs)`` run once
    in each child before its first task (if it raises, the executor is broken
    as a stdlib pool is: unfinished tasks fail with BrokenProcessPool, later
    submits raise it), ``max_tasks_per_child`` (a child is replaced after that
    many tasks, once every task sent to it is back: no key's order is broken).

    ``max_pending`` bounds the unfinished tasks: ``submit`` blocks until one
    finishes (Ctrl-C works there). Done-callbacks and ``on_error`` run in the
    executor's receiver thread: keep them short.

    Operating it: :meth:`hot_keys`, :meth:`timings` (``sample_timings=N``
    times one task in N; default 1, every task: two clock reads per task are
    nothing next to its trip through a pipe) and ``keyedexec.contrib``'s
    exporters, as for KeyedExecutor. ``slow_task_threshold=seconds`` logs a
    task that runs longer, once, with its key, from its child: on the child's
    ``"keyedexec"`` logger (WARNING; unconfigured, that is the child's stderr,
    which it shares with this process), as ``f"{name}-shard"``.
    """

    def __init__(
        self,
        processes: int | None = None,
        workers_per_process: int = 1,
        *,
        mp_context: multiprocessing.context.BaseContext | str | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        max_tasks_per_child: int | None = None,
        on_loss: str = "fail",
        max_retries: int = 3,
        max_pending: int | None = None,
        batch_size: int = 256,
        linger: float = 0.0005,
        on_error: Callable[[Any, BaseException], object] | None = None,
        name: str = "keyedexec",
        sample_timings: int = DEFAULT_SAMPLE_TIMINGS,
        slow_task_threshold: float | None = None,
    ) -> None:
        processes = _default_processes() if processes is None else _check_count(
            "processes", processes)
        _check_count("workers_per_process", workers_per_process)
        ctx = _context(mp_context)
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, got {type(initializer).__name__}")
        try:
            initargs = tuple(initargs)
        except TypeError:
            raise TypeError(
                f"initargs must be an iterable, got {type(initargs).__name__}") from None
        if ctx.get_start_method() != "fork":
            try:
                pickle.dumps((initializer, initargs), _PICKLE)
            except Exception as exc:
                raise TypeError(
                    f"initializer and initargs must be picklable for mp_context "
                    f"{ctx.get_start_method()!r}: {exc}") from exc
        if max_tasks_per_child is not None:
            _check_count("max_tasks_per_child", max_tasks_per_child)
        if not isinstance(on_loss, str):
            raise TypeError(f"on_loss must be a str, got {type(on_loss).__name__}")
        if on_loss not in ("fail", "retry"):
            raise ValueError(f"on_loss must be 'fail' or 'retry', got {on_loss!r}")
        _check_count("max_retries", max_retries, minimum=0)
        if max_pending is not None:
            _check_count("max_pending", max_pending)
        _check_count("batch_size", batch_size)
        linger_s = _check_interval("linger", linger)
        if on_error is not None and not callable(on_error):
            raise TypeError(f"on_error must be callable, got {type(on_error).__name__}")
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        _check_count("sample_timings", sample_timings, minimum=0, maximum=_UINT32_MAX)
        slow_task_threshold = _check_threshold("slow_task_threshold", slow_task_threshold)
        self._name = name
        self._workers = processes * workers_per_process
        self._processes = processes
        router = Router(
            processes,
            batch_size=batch_size,
            linger=linger_s,
            on_loss=on_loss,
            max_retries=max_retries,
            max_tasks_per_shard=max_tasks_per_child,
            max_pending=max_pending,
            on_error=on_error or log_task_error,
            broken_error=BrokenProcessPool,
            sample_timings=sample_timings,
            label_keys=slow_task_threshold is not None,
        )
        self._transport = _PipeTransport(router, ctx, workers_per_process, initializer,
                                         initargs, name, slow_task_threshold)
        try:
            router.start(self._transport)
        except BaseException:
            router.close()
            self._transport.finish()
            self._transport.join(_STOP_GRACE)
            raise
        self._attach(router)

    def metrics(self) -> ProcessMetrics:
        """A snapshot: see :class:`ProcessMetrics`."""
        return ProcessMetrics(self._transport.alive(), *self._router.metric_fields())

    @property
    def processes(self) -> int:
        """The number of child processes."""
        return self._processes

    def pids(self) -> list[int]:
        """The process ids of the children alive now, by shard."""
        return self._transport.pids()

    def __repr__(self) -> str:
        m = self.metrics()
        state = "closed" if self.closed else "open"
        return (f"<{type(self).__name__} {state} children={m.children}/{self._processes} "
                f"pending={m.pending} keys={m.active_keys}>")


def _context(value: object) -> multiprocessing.context.BaseContext:
    if value is None:
        return multiprocessing.get_context("spawn")
    if isinstance(value, str):
        try:
            return multiprocessing.get_context(value)
        except ValueError:
            raise ValueError(
                f"mp_context must be a start method of this platform "
                f"({', '.join(multiprocessing.get_all_start_methods())}), got {value!r}"
            ) from None
    if isinstance(value, multiprocessing.context.BaseContext):
        return value
    raise TypeError(
        f"mp_context must be a multiprocessing context, a start method name or None, "
        f"got {type(value).__name__}")


# -- the parent's end ---------------------------------------------------------------------


class _Child:
    __slots__ = ("shard", "epoch", "process", "conn", "outbox", "writer", "stopping")

    def __init__(self, shard: int, epoch: int, process: Any, conn: Any) -> None:
        self.shard, self.epoch, self.process, self.conn = shard, epoch, process, conn
        self.outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.writer = threading.Thread(target=_write_loop, args=(conn, self.outbox),
                                       name=f"keyedexec-writer-{shard}", daemon=True)
        self.stopping: float | None = None  # when it was told to stop


def _write_loop(conn: Any, outbox: queue.SimpleQueue[bytes | None]) -> None:
    """One per child: a child slow to read holds up its own batches only."""
    while True:
        data = outbox.get()
        if data is None:
            return
        try:
            conn.send_bytes(data)
        except (OSError, ValueError):
            return  # the child is gone: the receiver reports it
        if data is _STOP_MESSAGE:
            return


class _PipeTransport:
    """The router's transport to child processes (see the module docstring)."""

    def __init__(self, router: Router, ctx: multiprocessing.context.BaseContext, workers: int,
                 initializer: Callable[..., object] | None, initargs: tuple[Any, ...],
                 name: str, slow_task_threshold: float | None) -> None:
        self._router = router
        self._slow_task_threshold = slow_task_threshold
        self._ctx = ctx
        self._workers = workers
        self._initializer = initializer
        self._initargs = initargs
        self._name = name
        self._lock = threading.Lock()
        self._current: dict[int, _Child] = {}  # shard -> its child now
        self._children: list[_Child] = []  # every child not yet reaped
        self._finishing = False
        self._wake_r, self._wake_w = multiprocessing.connection.Pipe(duplex=False)
        self._receiver = threading.Thread(target=self._receive_loop,
                                          name="keyedexec-receiver", daemon=True)
        self._receiver_started = False
        self._done = threading.Event()

    def start(self, shard: int, epoch: int) -> None:
        parent_conn, child_conn = self._ctx.Pipe()
        process = self._ctx.Process(  # type: ignore[attr-defined]
            target=_child_main,
            args=(child_conn, epoch, self._workers, self._initializer, self._initargs,
                  self._name, self._slow_task_threshold),
            name=f"{self._name}-process-{shard}",
        )
        try:
            process.start()
        except BaseException:
            parent_conn.close()
            raise
        finally:
            child_conn.close()  # the child's copy only: EOF here once it exits
        child = _Child(shard, epoch, process, parent_conn)
        child.writer.start()
        with self._lock:
            self._current[shard] = child
            self._children.append(child)
            if self._finishing:  # started in a race with the end: it ends too
                self._tell_stop(child)
            if not self._receiver_started:
                self._receiver_started = True
                self._receiver.start()
        self._poke()

    def send(self, shard: int, epoch: int, seq: int, batch: Batch) -> None:
        child = self._current.get(shard)
        if child is None or child.epoch != epoch:
            return  # an earlier life of the shard: its tasks were already handled
        try:
            data = pickle.dumps((_BATCH, epoch, seq, batch), _PICKLE)
        except Exception as exc:
            # Keys were checked at submit; if one fails now, the sequence has a
            # hole the child would wait on forever: treat it as the child's loss.
            report_failure("keyedexec: a batch could not be pickled; replacing its child", exc)
            self._kill(child)
            return
        child.outbox.put(data)

    def stop(self, shard: int, epoch: int) -> None:
        with self._lock:
            for child in self._children:
                if child.shard == shard and child.epoch == epoch:
                    self._tell_stop(child)

    def _tell_stop(self, child: _Child) -> None:
        if child.stopping is None:
            child.stopping = time.monotonic()
            child.outbox.put(_STOP_MESSAGE)

    def finish(self) -> None:
        with self._lock:
            self._finishing = True
            for child in self._children:
                self._tell_stop(child)
            started = self._receiver_started
        if started:
            self._poke()
        else:  # nothing ever started: nobody else closes these
            self._wake_r.close()
            self._wake_w.close()
            self._done.set()

    def join(self, timeout: float | None) -> bool:
        if threading.current_thread() is self._receiver:
            return True  # called from a done-callback: the receiver ends by itself
        return self._done.wait(timeout)

    def alive(self) -> int:
        with self._lock:
            return sum(1 for c in self._children if c.process.is_alive())

    def pids(self) -> list[int]:
        with self._lock:
            return [c.process.pid for _, c in sorted(self._current.items())
                    if c.process.is_alive()]

    def _poke(self) -> None:
        try:
            self._wake_w.send_bytes(b"!")
        except (OSError, ValueError):
            pass

    def _kill(self, child: _Child) -> None:
        try:
            child.process.kill()
        except (OSError, ValueError, AttributeError):
            pass

    # -- the receiver thread ------------------------------------------------------------

    def _receive_loop(self) -> None:
        try:
            while True:
                with self._lock:
                    children = list(self._children)
                    finishing = self._finishing
                if finishing and not children:
                    return
                waitables: dict[Any, tuple[str, _Child | None]] = {self._wake_r: ("wake", None)}
                for c in children:
                    waitables[c.conn] = ("conn", c)
                    waitables[c.process.sentinel] = ("exit", c)
                timeout = None
                if finishing:  # a child told to stop and still running is killed in time
                    now = time.monotonic()
                    for c in children:
                        if c.stopping is not None:
                            left = c.stopping + _STOP_GRACE - now
                            if left <= 0:
                                self._kill(c)
                            timeout = max(0.0, left) if timeout is None else min(timeout, left)
                ready = multiprocessing.connection.wait(list(waitables), timeout)
                exited = []
                for obj in ready:
                    kind, child = waitables[obj]
                    if kind == "wake":
                        while self._wake_r.poll():
                            self._wake_r.recv_bytes()
                    elif kind == "conn":
                        assert child is not None
                        if not self._read(child) and child not in exited:
                            exited.append(child)
                    elif child not in exited:
                        assert child is not None
                        exited.append(child)
                for child in exited:
                    self._bury(child)
        except BaseException as exc:  # a bug here would leave every future hanging
            report_failure("keyedexec: the process executor's receiver failed", exc)
            self._router.broken(f"internal error in the receiver: {exc!r}")
            raise
        finally:
            with self._lock:
                children, self._children = self._children, []
                self._current.clear()
            for c in children:
                self._kill(c)
                c.process.join(_STOP_GRACE)
                self._release(c)
            self._wake_r.close()
            self._wake_w.close()
            self._done.set()

    def _read(self, child: _Child) -> bool:
        """Handle one message from ``child``; False at end of file."""
        try:
            data = child.conn.recv_bytes()
        except (EOFError, OSError):
            return False
        message = pickle.loads(data)
        if message[0] == _RESULTS:
            self._router.results(child.shard, child.epoch, message[1])
        elif message[0] == _INIT_FAILED:
            exc = _decode_exception(message[1])
            report_failure("keyedexec: a child process's initializer raised", exc)
            self._router.broken(f"a child process's initializer raised {exc!r}")
        return True

    def _bury(self, child: _Child) -> None:
        """The child exited (or closed its pipe): read what it sent last, reap it,
        and report the loss (the router ignores it for a child it stopped)."""
        try:
            while child.conn.poll() and self._read(child):
                pass
        except (EOFError, OSError):
            pass
        child.process.join(_STOP_GRACE)
        if child.process.exitcode is None:  # closed its pipe and lives on: end it
            self._kill(child)
            child.process.join(_STOP_GRACE)
        code, pid = child.process.exitcode, child.process.pid
        with self._lock:
            if child in self._children:
                self._children.remove(child)
            if self._current.get(child.shard) is child:
                del self._current[child.shard]
        self._release(child)
        if code is not None and code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        self._router.lost(child.shard, child.epoch,
                          f"child process {pid} (shard {child.shard}) {how}")

    def _release(self, child: _Child) -> None:
        child.outbox.put(None)
        try:
            child.conn.close()
        except OSError:
            pass
        try:
            child.process.close()
        except ValueError:
            pass  # still running: only possible if the kill failed


# -- the child's end ----------------------------------------------------------------------


def _child_main(conn: Any, epoch: int, workers: int,
                initializer: Callable[..., object] | None, initargs: tuple[Any, ...],
                name: str, slow_task_threshold: float | None) -> None:
    # Ctrl-C in a terminal reaches the whole process group: the parent decides
    # (it shuts the children down, or dies and they follow).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException as exc:
            conn.send_bytes(pickle.dumps((_INIT_FAILED, encode_exception(exc)), _PICKLE))
            raise SystemExit(1) from None
    host = ShardHost(workers, epoch, name=name, slow_task_threshold=slow_task_threshold)
    reporter = threading.Thread(target=_report_loop, args=(host, conn),
                                name="keyedexec-reporter", daemon=True)
    reporter.start()
    parent = multiprocessing.parent_process()
    watch: list[Any] = [conn] if parent is None else [conn, parent.sentinel]
    ppid = os.getppid()
    while True:
        ready = multiprocessing.connection.wait(watch, timeout=1.0)
        # The parent is gone (its sentinel, a new parent, or EOF below):
        # nobody can receive an outcome any more, so stop at once.
        if (parent is not None and parent.sentinel in ready) or os.getppid() != ppid:
            os._exit(0)
        if not ready:
            continue
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            os._exit(0)
        message = pickle.loads(data)
        if message[0] != _BATCH:
            break  # stop: finish what was admitted, report it, exit
        host.deliver(message[1], message[2], message[3])
    host.close()
    reporter.join()


def _report_loop(host: ShardHost, conn: Any) -> None:
    send = conn.send_bytes
    while True:
        items = host.take_results()
        if items:
            try:
                send(pickle.dumps((_RESULTS, items), _PICKLE))
            except (OSError, ValueError):
                os._exit(0)  # the parent is gone
        elif host.finished:
            return
