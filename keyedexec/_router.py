"""The keyed router: per-key order for executors whose workers live in other processes.

One design for every such backend (child processes in ``keyedexec.process``,
Ray actors in ``keyedexec.ray``); only the :class:`Transport` differs.

Caller side (:class:`Router`, :class:`RoutedExecutor`):

* **Routing.** A key with unfinished tasks stays on its shard; an idle key goes
  to the shard that rendezvous (highest-random-weight) hashing of ``hash(key)``
  picks among the shards that accept work. So a key keeps its shard (and the
  state a task left there) while the shard lives.
* **Batching.** Tasks are grouped per shard; a batch leaves when it holds
  ``batch_size`` tasks (sent by the submitting thread) or when its first task
  has waited ``linger`` seconds (sent by the flusher thread), like a Kafka
  producer. Each batch is numbered per (shard, epoch), from 0.
* **Acknowledgement.** A sent task is *unacknowledged* until its outcome comes
  back. When a shard is lost, its unacknowledged tasks fail with
  :class:`~keyedexec.ShardLost` (``on_loss="fail"``, at most once) or are sent
  again, first and in their order, to its replacement (``"retry"``, at least
  once); the replacement gets the next epoch.
* **Resizing.** ``resize(n)`` starts shards up to ``n``; a shard above ``n``
  takes no new key and stops once no key is on it (its busy keys finish there),
  so only idle keys move, to the shard rendezvous hashing picks among the rest.

Shard side (:class:`ShardHost`): admits batches strictly in sequence order
(holding early ones), runs each task on a local :class:`KeyedExecutor` under
its key, and hands outcomes back in batches (:meth:`ShardHost.take_results`).

Wire format (pickled by the transport): a batch is ``(tasks, controls)``, tasks
``(tid, key id, payload, label)`` with payload ``pickle.dumps((fn, args, kwargs))``;
controls ``(kind, key id, request)`` run before the batch's tasks. Outcomes are
``(tid, status, value, started, ended)``: the shard's monotonic clock (ns) when
the task started and ended (0 for a task that did not run). Keys stay in the
caller's process: a shard orders a key's tasks by its *key id*, a number the
router gives a key while it has unfinished tasks (so keys need not pickle, nor
equal their unpickled copies).

Observability (:meth:`Router.timings`, :meth:`Router.hot_keys`): the router
stamps each task at submit (``time.monotonic_ns``); the shard stamps its start
and end. A transport whose shards share the caller's clock (child processes
on this machine: CLOCK_MONOTONIC is system-wide) passes no ``shard_clock`` to
:meth:`Router.results` and the stamps compare as they are; one whose shards may
be on another host (Ray) passes the shard's clock reading when it packed the
outcomes, and the router maps the shard's stamps onto its own clock with the
offset ``(its clock at receipt) - shard_clock``: run times stay exact, wait
times include the outcomes' trip back (at most a few ms).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import heapq
import itertools
import pickle
import threading
import time
import traceback
import weakref
from collections import deque
from typing import Any, Callable, Generic, Iterable, Iterator, ParamSpec, Protocol, TypeVar

from . import _lifecycle, _loopbridge
from ._future import KeyedFuture
from ._report import log_task_error, report_failure
from ._timings import HotKey, Recorder, Timings, check_n, hot_keys, timings_from
from ._typevars import K
from .errors import QueueFull, ShardLost
from .executor import KeyedExecutor, Stats, _check_count, _check_timeout, map_calls

__all__ = ["DEFAULT_SAMPLE_TIMINGS", "RemoteError", "RoutedExecutor", "Router", "ShardHost",
           "Transport"]

R = TypeVar("R")
P = ParamSpec("P")
Batch = tuple[list[tuple[int, Any, bytes, str | None]], list[tuple[int, Any, int]]]
Outcome = tuple[int, int, Any, int, int]

_PICKLE = pickle.HIGHEST_PROTOCOL
#: The routed executors' default ``sample_timings``: every task (KeyedExecutor
#: times 1 in 32). Two clock reads are nothing next to a task's trip to a shard.
DEFAULT_SAMPLE_TIMINGS = 1
# Outcome statuses.
OK, OK_PICKLED, RAISED, CANCELLED, CANCEL_DONE = range(5)
# Control kinds.
CANCEL_KEY, CANCEL_ALL = range(2)
# Values of these types travel inside the batch's own pickle: they always load.
_PLAIN = frozenset({type(None), bool, int, float, str, bytes})


class RemoteError(RuntimeError):
    """A task raised an exception that could not travel back (it failed to pickle
    or to unpickle). The message names its type and repr; ``__cause__`` carries
    the remote traceback."""


class RemoteTraceback(Exception):
    """The traceback text of an exception raised in another process (its ``__cause__``)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


# -- outcomes: encoding on the shard, decoding on the caller --------------------------------


def encode_exception(exc: BaseException) -> tuple[bytes, str]:
    """``exc`` pickled, and its traceback as text. Never raises: whatever the
    exception's own methods raise (a BaseException too) is the task's problem,
    and its future must still get an outcome."""
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException:
        text = f"{name} (its traceback could not be formatted)\n"
    try:
        data = pickle.dumps(exc, _PICKLE)
        pickle.loads(data)  # some pickle but do not load (a required __init__ argument)
    except BaseException:
        try:
            shown = repr(exc)
        except BaseException:
            shown = "(its repr() raised)"
        data = pickle.dumps(RemoteError(f"{name}: {shown} (it could not be pickled)"), _PICKLE)
    return data, text


def _decode_exception(value: tuple[bytes, str]) -> BaseException:
    data, text = value
    try:
        exc: BaseException = pickle.loads(data)
    except BaseException as load_error:  # whatever it raises is the task's problem
        exc = RemoteError(f"a task raised an exception that could not be unpickled here: "
                          f"{load_error!r}")
    exc.__cause__ = RemoteTraceback(text)
    return exc


def encode_task(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    return pickle.dumps((fn, args, kwargs), _PICKLE)


# -- the shard side -------------------------------------------------------------------------


class Sequencer:
    """Admits numbered batches strictly in order: an early one is held until the
    batches before it have arrived."""

    def __init__(self) -> None:
        self.next = 0
        self.held: dict[int, Any] = {}
        self.out_of_order = 0
        """Batches that arrived before their turn (held)."""

    def admit(self, seq: int, batch: Any) -> list[Any]:
        """The batches that may run now, in order (none if ``seq`` is early)."""
        if seq != self.next:
            if seq > self.next:
                self.held[seq] = batch
                self.out_of_order += 1
            return []  # a duplicate of an admitted batch is dropped
        ready = [batch]
        self.next += 1
        while self.next in self.held:
            ready.append(self.held.pop(self.next))
            self.next += 1
        return ready


class _LabelledKeyId(int):
    """A key id that equals and hashes as its number (so the shard orders by it)
    and reprs as the caller's key: the slow-task log names the real key."""

    label: str

    def __new__(cls, key_id: int, label: str) -> _LabelledKeyId:
        self = super().__new__(cls, key_id)
        self.label = label
        return self

    def __repr__(self) -> str:
        return self.label


def key_label(key: Any, limit: int = 200) -> str:
    """``repr(key)``, shortened, for a shard's logs; never raises."""
    try:
        text = repr(key)
    except Exception as exc:
        text = f"<{type(key).__name__}: repr() raised {type(exc).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ShardHost:
    """One shard's end of the router: one epoch of a child process or actor.

    ``deliver`` is called with each batch as it arrives (from one thread);
    ``take_results`` returns the outcomes gathered since its last call (from
    one other thread); ``close`` lets the local executor finish its tasks.
    ``slow_task_threshold`` is the local executor's: a slow task is logged
    here, on this process's ``"keyedexec"`` logger, as ``f"{name}-shard"``.
    """

    def __init__(self, workers: int, epoch: int, *, name: str = "keyedexec",
                 slow_task_threshold: float | None = None) -> None:
        self.epoch = epoch
        self.finished = False
        # The router times tasks from the stamps of _run: the local executor need not.
        self._local: KeyedExecutor[Any] = KeyedExecutor(
            workers, name=f"{name}-shard", on_error=_shard_bug, sample_timings=0,
            slow_task_threshold=slow_task_threshold,
        )
        self._execute = self._local.execute
        self._sequencer = Sequencer()
        # key -> tids admitted and not yet started, in order: cancel_key must
        # tell which tasks the local executor dropped (the last ones).
        self._queued: dict[Any, deque[int]] = {}
        self._lock = threading.Lock()
        self._outbox: deque[Outcome] = deque()
        self._ready = threading.Event()
        self._unreported = 0  # tasks admitted whose outcome is not posted yet
        self._idle = threading.Event()  # set while _unreported is 0
        self._idle.set()

    @property
    def out_of_order(self) -> int:
        return self._sequencer.out_of_order

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` until every admitted task has its outcome
        posted; whether they all have."""
        return self._idle.wait(timeout)

    def deliver(self, epoch: int, seq: int, batch: Batch) -> None:
        if epoch != self.epoch:
            return  # sent to an earlier life of this shard: already failed or re-sent
        for tasks, controls in self._sequencer.admit(seq, batch):
            # Controls first: they concern tasks sent before this batch only.
            for kind, key, request in controls:
                self._cancel(kind, key, request)
            self._admit(tasks)

    def _admit(self, tasks: list[tuple[int, Any, bytes, str | None]]) -> None:
        with self._lock:
            self._unreported += len(tasks)
            if tasks:
                self._idle.clear()
            queued = self._queued
            for tid, key, _payload, _label in tasks:
                q = queued.get(key)
                if q is None:
                    q = queued[key] = deque()
                q.append(tid)
        execute, run = self._execute, self._run
        for tid, key, payload, label in tasks:
            # The local executor's key: the key id, shown as the caller's key in logs.
            local = key if label is None else _LabelledKeyId(key, label)
            execute(local, run, tid, key, payload)

    def _run(self, tid: int, key: int, payload: bytes) -> None:
        started = time.monotonic_ns()
        with self._lock:
            q = self._queued[key]
            q.popleft()
            if not q:
                del self._queued[key]
        item: Outcome
        try:
            try:
                fn, args, kwargs = pickle.loads(payload)
            except Exception as exc:
                raise pickle.UnpicklingError(
                    f"the task could not be unpickled in its shard: {exc!r}"
                ) from exc
            value = fn(*args, **kwargs)
        except BaseException as exc:
            status, encoded = RAISED, encode_exception(exc)
        else:
            status, encoded = _encode_value(value)
        self._post((tid, status, encoded, started, time.monotonic_ns()))

    def _post(self, *items: Outcome) -> None:
        self._outbox.extend(items)
        with self._lock:
            self._unreported -= sum(item[1] != CANCEL_DONE for item in items)
            if not self._unreported:
                self._idle.set()
        if not self._ready.is_set():
            self._ready.set()

    def _cancel(self, kind: int, key: Any, request: int) -> None:
        with self._lock:
            keys = [key] if kind == CANCEL_KEY else list(self._queued)
        cancelled: list[int] = []
        for k in keys:
            n = self._local.cancel_key(k)
            if n:
                # The dropped tasks are the last n admitted: the ones before them
                # have started (a worker may not have popped its own tid yet).
                with self._lock:
                    q = self._queued[k]
                    cancelled.extend(reversed([q.pop() for _ in range(n)]))
                    if not q:
                        del self._queued[k]
        self._post(*[(tid, CANCELLED, None, 0, 0) for tid in cancelled],
                   (request, CANCEL_DONE, len(cancelled), 0, 0))

    def take_results(self, timeout: float | None = None) -> list[Outcome]:
        """The outcomes since the last call; waits up to ``timeout`` for one
        (not at all once closed)."""
        if not self._outbox and not self.finished:
            self._ready.wait(timeout)
        self._ready.clear()
        out = self._outbox
        return [out.popleft() for _ in range(len(out))]

    def close(self) -> None:
        """Run every admitted task to its end, then let take_results return []."""
        self._local.shutdown(wait=True)
        self.finished = True
        self._ready.set()


def _encode_value(value: Any) -> tuple[int, Any]:
    if type(value) in _PLAIN:
        return OK, value
    try:
        return OK_PICKLED, pickle.dumps(value, _PICKLE)
    except BaseException as exc:  # SystemExit from a __reduce__ too: the task's problem
        try:
            why = f"{type(exc).__name__}: {exc}"
        except BaseException:
            why = type(exc).__name__
        err = pickle.PicklingError(
            f"the task's result ({type(value).__name__}) could not be pickled: {why}")
        return RAISED, encode_exception(err)


def _shard_bug(key: Any, exc: BaseException) -> None:
    report_failure(f"keyedexec shard: internal error on key {key!r}", exc)


# -- the caller side ------------------------------------------------------------------------


class Transport(Protocol):
    """How batches reach shards. Calls back the router with ``results``,
    ``lost`` (a shard died) and ``broken`` (a shard cannot start)."""

    def start(self, shard: int, epoch: int) -> None:
        """Start the worker for ``shard`` at ``epoch``; it may accept batches at once."""

    def send(self, shard: int, epoch: int, seq: int, batch: Batch) -> None:
        """Deliver a batch, without blocking for long. Batches may arrive out of
        order (they are numbered); one for an epoch no longer current is dropped."""

    def stop(self, shard: int, epoch: int) -> None:
        """Let that worker finish what it holds and exit (no loss is reported)."""

    def finish(self) -> None:
        """Every shard is stopped: release the resources once the workers are gone."""

    def join(self, timeout: float | None) -> bool:
        """Wait until ``finish`` has completed."""


# Shard states: starting (no sends yet), ready, draining (recycled once its
# unacknowledged tasks are back: no new tasks), stopped.
_STARTING, _READY, _DRAINING, _STOPPED = range(4)

_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finalizer: a well-spread 64-bit score."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


class _Task:
    __slots__ = ("tid", "key", "entry", "payload", "future", "forget", "sends", "stamp",
                 "timed")

    def __init__(self, tid: int, key: Any, entry: list[Any], payload: bytes,
                 future: KeyedFuture[Any], forget: bool, stamp: int, timed: bool) -> None:
        self.tid, self.key, self.entry, self.payload = tid, key, entry, payload
        self.future, self.forget, self.sends = future, forget, 0
        self.stamp, self.timed = stamp, timed  # submit time (monotonic ns); sampled


class _Reply:
    """A cancel_key waiting for its shard's answer."""

    __slots__ = ("event", "count", "lost")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.count = 0
        self.lost = False


class _Shard:
    __slots__ = ("index", "salt", "epoch", "state", "pending", "controls", "unacked",
                 "seq", "sent", "since", "replies", "retired")

    def __init__(self, index: int) -> None:
        self.index = index
        self.salt = _mix(index + 1)
        self.epoch = 0
        self.state = _STARTING
        self.pending: deque[_Task] = deque()
        self.controls: list[tuple[int, Any, int]] = []
        self.unacked: dict[int, _Task] = {}  # in send order
        self.seq = 0
        self.sent = 0  # tasks sent to this epoch (max_tasks_per_shard)
        self.since = 0.0  # when the oldest pending task was queued
        self.replies: dict[int, _Reply] = {}
        self.retired = False  # resize() removed it: no new keys, stops once idle


def _claim(future: KeyedFuture[Any]) -> bool:
    """PENDING -> RUNNING before a task is sent; False if it must not run: its
    caller cancelled it, or completed it (set_result, meant for executors only:
    the stdlib's worker dies of that; here the task counts as cancelled)."""
    try:
        return future.set_running_or_notify_cancel()
    except RuntimeError:  # "Future in unexpected state": already finished
        return False


_Send = tuple[int, int, int, Batch]
_in_callback = threading.local()  # set while this thread completes futures


class Router:
    """Routing, batching, sequencing and acknowledgement (see the module docstring).

    Futures and ``on_error`` are completed outside the lock, in the thread that
    reports the outcome (the transport's). ``lost`` notices come from the
    transport; stale ones (an earlier epoch) are ignored.
    """

    def __init__(
        self,
        shards: int,
        *,
        batch_size: int,
        linger: float,
        on_loss: str,
        max_retries: int,
        max_tasks_per_shard: int | None,
        max_pending: int | None,
        on_error: Callable[[Any, BaseException], object],
        broken_error: Callable[[str], BaseException],
        submit_timeout: float | None = None,
        sample_timings: int = DEFAULT_SAMPLE_TIMINGS,
        encode: Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], bytes] = (
            encode_task),
        label_keys: bool = False,
    ) -> None:
        self._transport: Transport | None = None
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)  # the flusher's
        self._room = threading.Condition(self._lock)  # max_pending; finished
        self._shards = [_Shard(i) for i in range(shards)]
        # key -> [shard, its unfinished tasks in submission order, key id, label or None]
        self._keys: dict[Any, list[Any]] = {}
        self._key_waiters = 0
        self._tids = itertools.count()
        self._requests = itertools.count()
        self._batch_size = batch_size
        # Send each key's repr with its tasks (for the shards' slow-task log): a repr
        # per submit, so only when asked for.
        self._label_keys = label_keys
        self._linger = linger
        self._retry = on_loss == "retry"
        self._max_retries = max_retries
        self._max_per_shard = max_tasks_per_shard
        self._max_pending = max_pending
        self._submit_timeout = submit_timeout
        self._encode = encode
        self._on_error = on_error
        self._broken_error = broken_error
        self._closed: str | None = None  # why submits are refused
        self._broken: str | None = None
        self._finished = False
        self._unfinished = 0
        self._in_flight = 0
        self.counts = dict.fromkeys(
            ("submitted", "completed", "failed", "cancelled", "lost", "retried",
             "restarts", "recycled"), 0)
        self._timing = Recorder(sample_timings)
        self._flusher = threading.Thread(target=self._flush_loop, name="keyedexec-flusher",
                                         daemon=True)

    def start(self, transport: Transport) -> None:
        """Start every shard (raising what the first failing start raises) and the flusher."""
        self._transport = transport
        for shard in self._shards:
            transport.start(shard.index, 0)
            shard.state = _READY
        self._flusher.start()
        _lifecycle.register(self)

    # -- submit ---------------------------------------------------------------------------

    def submit(self, key: Any, fn: Callable[..., Any], args: tuple[Any, ...],
               kwargs: dict[str, Any], forget: bool = False) -> KeyedFuture[Any]:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        try:
            hash(key)
        except TypeError as exc:
            raise TypeError(f"key must be hashable: {exc}") from None
        future: KeyedFuture[Any] = KeyedFuture()
        try:
            payload = self._encode(fn, args, kwargs)
        except Exception as exc:
            # Fails this task alone, on its own future, like an exception it raised.
            err = pickle.PicklingError(f"the task for key {key!r} could not be pickled: {exc}")
            err.__cause__ = exc
            with self._lock:
                self._check_open()
                self.counts["submitted"] += 1
                self.counts["completed"] += 1
                self.counts["failed"] += 1
            future.set_running_or_notify_cancel()
            self._finish_task(key, future, forget, None, err)
            return future
        send = None
        label = key_label(key) if self._label_keys else None  # user code: not under the lock
        with self._lock:
            self._check_open()
            if self._max_pending is not None and self._unfinished >= self._max_pending:
                self._wait_for_room()
            tid = next(self._tids)
            entry = self._keys.get(key)
            if entry is None:
                # The key itself never travels: a copy unpickled in the shard may
                # not equal the next one (identity equality, nan). The shard
                # orders by this number, unique while the key has unfinished tasks.
                entry = self._keys[key] = [self._pick(hash(key)), deque(), tid, label]
            task = _Task(tid, key, entry, payload, future, forget,
                         time.monotonic_ns(), self._timing.take())
            entry[1].append(task)
            shard: _Shard = entry[0]
            shard.pending.append(task)
            self._unfinished += 1
            self.counts["submitted"] += 1
            if len(shard.pending) >= self._batch_size:
                send = self._take(shard)
            elif len(shard.pending) == 1:
                shard.since = time.monotonic()
                self._wake.notify()
        if send is not None:
            self._send([send])
        return future

    def _check_open(self) -> None:
        if self._closed is not None:
            if self._broken is not None:
                raise self._broken_error(self._broken)
            raise RuntimeError(self._closed)

    def _wait_for_room(self) -> None:
        # A done-callback runs in the thread that must make room: never wait there.
        if getattr(_in_callback, "active", False):
            return
        end = None if self._submit_timeout is None else time.monotonic() + self._submit_timeout
        while self._unfinished >= self._max_pending and self._closed is None:  # type: ignore[operator]
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                raise QueueFull(f"{self._unfinished} tasks unfinished (max_pending="
                                f"{self._max_pending}) after {self._submit_timeout} s")
            self._room.wait(left)
        self._check_open()

    def _pick(self, h: int) -> _Shard:
        """Rendezvous hashing: the accepting shard with the highest score for ``h``."""
        h &= _MASK
        best, best_score = None, -1
        for shard in self._shards:
            if shard.state == _READY and not shard.retired:
                score = _mix(h ^ shard.salt)
                if score > best_score:
                    best, best_score = shard, score
        if best is None:  # none accepting right now: its shard, whatever its state
            best = max((s for s in self._shards if not s.retired),
                       key=lambda s: _mix(h ^ s.salt))
        return best

    # -- batches --------------------------------------------------------------------------

    def _take(self, shard: _Shard) -> _Send | None:
        """(under the lock) The shard's next batch, its tasks now unacknowledged."""
        tasks: list[tuple[int, Any, bytes, str | None]] = []
        if shard.state == _READY:
            limit = self._batch_size
            if self._max_per_shard is not None:
                limit = min(limit, self._max_per_shard - shard.sent)
            pending, unacked = shard.pending, shard.unacked
            while pending and len(tasks) < limit:
                task = pending.popleft()
                if not task.sends and not _claim(task.future):
                    self._release(task, "cancelled")  # its caller cancelled it
                    continue
                task.sends += 1
                unacked[task.tid] = task
                tasks.append((task.tid, task.entry[2], task.payload, task.entry[3]))
            shard.sent += len(tasks)
            self._in_flight += len(tasks)
            if self._max_per_shard is not None and shard.sent >= self._max_per_shard:
                shard.state = _DRAINING
            if pending:
                shard.since = time.monotonic()
        elif shard.state != _DRAINING:
            return None
        controls, shard.controls = shard.controls, []
        if not tasks and not controls:
            return None
        seq = shard.seq
        shard.seq += 1
        return (shard.index, shard.epoch, seq, (tasks, controls))

    def _send(self, batches: Iterable[_Send]) -> None:
        assert self._transport is not None
        for index, epoch, seq, batch in batches:
            self._transport.send(index, epoch, seq, batch)

    def _flush_loop(self) -> None:
        while True:
            batches = []
            with self._lock:
                now = time.monotonic()
                timeout = None
                for shard in self._shards:
                    if shard.controls or (shard.pending and shard.state == _READY):
                        # Closed: nothing more will join the batch, send it now.
                        due = shard.since + (self._linger if self._closed is None else 0.0)
                        if shard.controls or due <= now:
                            send = self._take(shard)
                            if send is not None:
                                batches.append(send)
                        else:
                            timeout = due - now if timeout is None else min(timeout, due - now)
                if not batches:
                    if self._finished:
                        return
                    self._wake.wait(timeout)
                    continue
            self._send(batches)

    # -- outcomes -------------------------------------------------------------------------

    def results(self, index: int, epoch: int, items: list[Outcome],
                shard_clock: int | None = None) -> None:
        """Outcomes from shard ``index`` at ``epoch``, in the order they happened.
        ``shard_clock``: the shard's monotonic clock (ns) when it sent them, if
        it is not this process's (see the module docstring)."""
        done = []
        replies = []
        offset = 0 if shard_clock is None else time.monotonic_ns() - shard_clock
        with self._lock:
            shard = self._shards[index]
            if epoch != shard.epoch:
                return
            unacked = shard.unacked
            record = self._timing.record
            for tid, status, value, started, ended in items:
                if status == CANCEL_DONE:
                    reply = shard.replies.pop(tid, None)
                    if reply is not None:
                        reply.count = value
                        replies.append(reply)
                    continue
                task = unacked.pop(tid, None)
                if task is not None:
                    done.append((task, status, value))
                    if task.timed and started:
                        record(task.stamp, started + offset, ended + offset)
            self._in_flight -= len(done)
        _in_callback.active = True
        try:
            for task, status, value in done:
                self._complete(task, status, value)
        finally:
            _in_callback.active = False
        with self._lock:
            for task, status, _value in done:
                self._release(task, _COUNTER[status])
            actions = self._after_outcomes(shard)
        for reply in replies:  # cancel_key returns with its key's state up to date
            reply.event.set()
        self._run_actions(actions)

    def _complete(self, task: _Task, status: int, value: Any) -> None:
        if status == CANCELLED:
            _lifecycle.cancel_orphans([task.future], on_worker=True)
            return
        result: Any = None
        exc: BaseException | None = None
        if status == OK:
            result = value
        elif status == OK_PICKLED:
            try:
                result = pickle.loads(value)
            except BaseException as load_error:  # SystemExit too: this task's, not ours
                exc = pickle.UnpicklingError(
                    f"the task's result could not be unpickled here: {load_error!r}")
        else:
            exc = _decode_exception(value)
        self._finish_task(task.key, task.future, task.forget, result, exc)

    def _finish_task(self, key: Any, future: KeyedFuture[Any], forget: bool, result: Any,
                     exc: BaseException | None) -> None:
        if forget and exc is not None:
            try:
                self._on_error(key, exc)
            except BaseException as handler_error:
                report_failure("keyedexec: on_error raised", handler_error)
            exc = None  # the future of a fire-and-forget task is never read
        future._set_outcome(result, exc)

    def _release(self, task: _Task, counter: str | None) -> None:
        """(under the lock) ``task`` is finished: free its key, count it."""
        tasks = task.entry[1]
        if tasks[0] is task:  # the usual case: a key's tasks end in order
            tasks.popleft()
        else:
            tasks.remove(task)
        if not tasks:
            del self._keys[task.key]
        self._unfinished -= 1
        if counter is not None:
            self.counts[counter] += 1
            if counter == "failed":
                self.counts["completed"] += 1
        if self._max_pending is not None or self._key_waiters or not self._unfinished:
            self._room.notify_all()

    def _after_outcomes(self, shard: _Shard) -> list[Callable[[], None]]:
        """(under the lock) Recycle a drained shard; finish a closed, idle router."""
        actions = self._retire_if_idle(shard)
        if shard.state == _DRAINING and not shard.unacked:
            assert self._transport is not None
            actions.append(functools.partial(self._transport.stop, shard.index, shard.epoch))
            self._new_epoch(shard)
            self.counts["recycled"] += 1
            actions.append(functools.partial(self._start_shard, shard.index, shard.epoch))
        actions.extend(self._maybe_finish())
        return actions

    def _retire_if_idle(self, shard: _Shard) -> list[Callable[[], None]]:
        """(under the lock) Stop a shard that resize() removed, once no key is on it
        (every task of a key on it is pending or unacknowledged there)."""
        if (not shard.retired or shard.state not in (_READY, _DRAINING) or shard.pending
                or shard.unacked or shard.controls):
            return []
        assert self._transport is not None
        stop = functools.partial(self._transport.stop, shard.index, shard.epoch)
        self._new_epoch(shard)
        shard.state = _STOPPED
        return [stop]

    def resize(self, n: int) -> None:
        """Shards ``0 .. n-1`` take work (new ones start now); those above retire:
        no new key goes to them, their busy keys finish there, then they stop."""
        starts = []
        actions: list[Callable[[], None]] = []
        with self._lock:
            self._check_open()
            while len(self._shards) < n:
                self._shards.append(_Shard(len(self._shards)))
                starts.append((len(self._shards) - 1, 0))
            for shard in self._shards:
                if shard.index < n:
                    shard.retired = False
                    if shard.state == _STOPPED:  # retired earlier: a new life
                        self._new_epoch(shard)
                        starts.append((shard.index, shard.epoch))
                else:
                    shard.retired = True
                    actions.extend(self._retire_if_idle(shard))
        self._run_actions(actions)
        for index, epoch in starts:
            self._start_shard(index, epoch)

    @property
    def shards(self) -> int:
        """Shards taking new keys (``resize``'s ``n``)."""
        with self._lock:
            return sum(1 for s in self._shards if not s.retired)

    def _new_epoch(self, shard: _Shard) -> None:
        shard.epoch += 1
        shard.seq = shard.sent = 0
        shard.state = _STARTING
        shard.controls = []
        for reply in shard.replies.values():  # the old epoch answers no more
            reply.lost = True
            reply.event.set()
        shard.replies = {}

    def _run_actions(self, actions: list[Callable[[], None]]) -> None:
        for action in actions:
            action()

    def _start_shard(self, index: int, epoch: int) -> None:
        assert self._transport is not None
        with self._lock:
            if self._shards[index].epoch != epoch or self._finished:
                return
        try:
            self._transport.start(index, epoch)
        except Exception as exc:
            self.broken(f"shard {index} could not be started again: {exc!r}")
            return
        with self._lock:
            shard = self._shards[index]
            if shard.epoch != epoch or shard.state != _STARTING:
                return
            shard.state = _READY
            batches = []
            while True:
                send = self._take(shard)
                if send is None:
                    break
                batches.append(send)
                if shard.state != _READY:
                    break
            actions = self._retire_if_idle(shard)
        self._send(batches)
        self._run_actions(actions)

    def lost(self, index: int, epoch: int, reason: str) -> None:
        """Shard ``index`` at ``epoch`` died: its unacknowledged tasks fail or are re-sent."""
        with self._lock:
            shard = self._shards[index]
            if epoch != shard.epoch or shard.state == _STOPPED:
                return
            tasks = sorted(shard.unacked.values(), key=lambda t: t.tid)
            shard.unacked.clear()
            self._in_flight -= len(tasks)
            failed = tasks
            if self._retry:
                again = [t for t in tasks if t.sends <= self._max_retries]
                failed = [t for t in tasks if t.sends > self._max_retries]
                shard.pending.extendleft(reversed(again))
                self.counts["retried"] += len(again)
            self._new_epoch(shard)
            epoch = shard.epoch
            if shard.retired and not shard.pending:  # removed by resize: no replacement
                shard.state = _STOPPED
            else:
                self.counts["restarts"] += 1
        message = (f"{reason}: the task was sent and not acknowledged; it may or may not "
                   "have run")
        _in_callback.active = True
        try:
            for task in failed:
                self._finish_task(task.key, task.future, task.forget, None, ShardLost(message))
        finally:
            _in_callback.active = False
        with self._lock:
            for task in failed:
                self._release(task, "lost")
            actions = self._maybe_finish()
            restart = not self._finished and shard.state == _STARTING
        if restart:
            self._start_shard(index, epoch)
        self._run_actions(actions)

    def broken(self, reason: str) -> None:
        """A shard cannot run anything (its initializer raised, it cannot start):
        fail every unfinished task and refuse new ones, as a broken stdlib pool does."""
        with self._lock:
            if self._finished:
                return
            self._closed = self._broken = f"the executor is broken: {reason}"
            tasks: list[_Task] = []
            for shard in self._shards:
                tasks.extend(shard.unacked.values())
                tasks.extend(shard.pending)
                shard.unacked.clear()
                shard.pending.clear()
                self._new_epoch(shard)
            self._in_flight = 0
        _in_callback.active = True
        try:
            for task in tasks:
                err = self._broken_error(f"the executor is broken: {reason}")
                if task.sends or _claim(task.future):
                    self._finish_task(task.key, task.future, task.forget, None, err)
        finally:
            _in_callback.active = False
        with self._lock:
            for task in tasks:
                self._release(task, "failed")
            actions = self._maybe_finish(force=True)
        self._run_actions(actions)

    def _maybe_finish(self, force: bool = False) -> list[Callable[[], None]]:
        """(under the lock) Closed and nothing unfinished: stop every shard."""
        if self._finished or self._closed is None or (self._unfinished and not force):
            return []
        self._finished = True
        for shard in self._shards:
            shard.state = _STOPPED
        self._wake.notify_all()
        self._room.notify_all()
        assert self._transport is not None
        return [self._transport.finish]

    # -- cancel, close, wait --------------------------------------------------------------

    def cancel_key(self, key: Any) -> int:
        """Cancel ``key``'s tasks that have not started, here and in its shard."""
        total = 0
        while True:
            reply = None
            send = None
            with self._lock:
                entry = self._keys.get(key)
                if entry is None:
                    return total
                shard: _Shard = entry[0]
                mine = [t for t in shard.pending if t.entry is entry]
                if mine:
                    shard.pending = deque(t for t in shard.pending if t.entry is not entry)
                if shard.state in (_READY, _DRAINING) and any(
                        t.entry is entry for t in shard.unacked.values()):
                    request = next(self._requests)
                    reply = shard.replies[request] = _Reply()
                    shard.controls.append((CANCEL_KEY, entry[2], request))
                    send = self._take(shard)
            try:
                total += self._cancel_tasks(mine)
            finally:  # its batch number is taken: the shard waits for it
                if send is not None:
                    self._send([send])
            if reply is None:
                return total
            reply.event.wait()
            total += reply.count
            if not reply.lost:
                return total

    def _cancel_tasks(self, tasks: list[_Task]) -> int:
        """Cancel and release ``tasks``. A done-callback's BaseException (which
        ``cancel()`` raises in the caller's thread, as in the stdlib) is raised
        again once every one of them is cancelled and released."""
        first: BaseException | None = None
        for task in tasks:
            try:
                if task.sends:  # re-queued after a loss: already RUNNING
                    _lifecycle.cancel_orphans([task.future])
                else:
                    task.future._cancel_queued()
            except BaseException as exc:
                first = first or exc
        with self._lock:
            for task in tasks:
                self._release(task, "cancelled")
            actions = []
            for shard in self._shards:
                actions.extend(self._retire_if_idle(shard))
            actions.extend(self._maybe_finish())
        self._run_actions(actions)
        if first is not None:
            raise first
        return len(tasks)

    def close(self, reason: str = "cannot schedule new futures after shutdown",
              cancel: bool = False) -> None:
        """Refuse new tasks; with ``cancel``, cancel every task not started."""
        with self._lock:
            if self._closed is None:
                self._closed = reason
            self._room.notify_all()
            self._wake.notify()
            tasks: list[_Task] = []
            batches = []
            if cancel and not self._finished:
                for shard in self._shards:
                    tasks.extend(shard.pending)
                    shard.pending.clear()
                    if shard.unacked and shard.state in (_READY, _DRAINING):
                        shard.controls.append((CANCEL_ALL, None, next(self._requests)))
                        send = self._take(shard)
                        if send is not None:
                            batches.append(send)
            actions = self._maybe_finish()
        self._send(batches)
        try:
            self._cancel_tasks(tasks)
        finally:
            self._run_actions(actions)

    def wait_finished(self, timeout: float | None = None) -> bool:
        with self._lock:
            return self._room.wait_for(lambda: self._finished, timeout)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until closed and drained, every shard gone and the threads ended.

        From a done-callback (or ``on_error``) it returns False at once: the
        thread that runs them is the one that finishes the tasks."""
        if getattr(_in_callback, "active", False):
            return False
        end = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if end is None else max(0.0, end - time.monotonic())

        if not self.wait_finished(left()):
            return False
        assert self._transport is not None
        if not self._transport.join(left()):
            return False
        if self._flusher.is_alive() and self._flusher is not threading.current_thread():
            self._flusher.join(left())
        return not self._flusher.is_alive()

    def wait_key(self, key: Any, timeout: float | None) -> bool:
        """Wait until the tasks of ``key`` submitted before the call have finished
        (their futures are done); False if ``timeout`` passed first."""
        if getattr(_in_callback, "active", False):
            raise RuntimeError("wait_key from a done-callback or on_error would deadlock "
                               "(they run in the thread that completes the tasks)")
        with self._lock:
            entry = self._keys.get(key)
            if entry is None:
                return True
            last = entry[1][-1].tid
            self._key_waiters += 1
            try:
                return self._room.wait_for(
                    lambda: self._keys.get(key) is not entry or entry[1][0].tid > last, timeout)
            finally:
                self._key_waiters -= 1

    # -- introspection --------------------------------------------------------------------

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {**self.counts, "pending": self._unfinished, "in_flight": self._in_flight,
                    "active_keys": len(self._keys)}

    def metric_fields(self) -> tuple[int, ...]:
        """The fields that ProcessMetrics and RayMetrics share, in their order
        (after each one's own first field)."""
        s = self.snapshot()
        return tuple(s[name] for name in (
            "pending", "in_flight", "active_keys", "submitted", "completed", "failed",
            "cancelled", "lost", "retried", "restarts", "recycled"))

    def timings(self) -> Timings:
        with self._lock:
            return timings_from(self._timing.raw())

    def hot_keys(self, n: int) -> list[HotKey]:
        """The ``n`` keys with the most tasks waiting (see RoutedExecutor.hot_keys).

        One pass over the keys, _HOT_CHUNK keys per hold of the lock, keeping
        the best ``n`` (a heap): submits and outcomes wait at most one chunk."""
        with self._lock:
            keys = list(self._keys)
        best: list[tuple[int, bool, int, Any]] = []
        for start in range(0, len(keys), _HOT_CHUNK):
            found = []
            with self._lock:
                get = self._keys.get
                now = time.monotonic_ns()
                for key in keys[start:start + _HOT_CHUNK]:
                    entry = get(key)
                    if entry is None:
                        continue  # finished meanwhile
                    tasks = entry[1]
                    # A key's first task, once sent, runs in its shard (or is next to).
                    running = tasks[0].tid in entry[0].unacked
                    queued = len(tasks) - running
                    oldest = now - tasks[running].stamp if queued else -1
                    found.append((queued, running, oldest, key))
            best = heapq.nlargest(n, best + found, key=_hot_rank)
        return hot_keys([(key, queued, running, None if oldest < 0 else oldest)
                         for queued, running, oldest, key in best], n)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def key_shard(self, key: Any) -> int | None:
        """The shard a busy key is on (None if idle)."""
        with self._lock:
            entry = self._keys.get(key)
            return None if entry is None else int(entry[0].index)

    # -- process lifecycle (keyedexec._lifecycle) -------------------------------------

    def _close_for_exit(self) -> None:
        self.close("cannot schedule new futures after interpreter shutdown")

    def _before_fork(self) -> None:
        pass

    def _after_fork_parent(self) -> None:
        pass

    def _after_fork_child(self) -> None:
        # The shards and threads belong to the parent: this copy is closed and
        # inert, and its unfinished futures are cancelled (every future ends).
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._room = threading.Condition(self._lock)
        self._closed = "cannot schedule new futures in a forked child (the executor " \
                       "belongs to the parent process)"
        self._finished = True
        self._transport = _Inert()
        orphans = [task.future for entry in self._keys.values() for task in entry[1]]
        self._keys = {}
        for shard in self._shards:
            shard.pending.clear()
            shard.unacked.clear()
        self.counts["cancelled"] += len(orphans)
        self._unfinished = self._in_flight = 0
        _lifecycle.cancel_orphans(orphans, on_worker=True)


# Keys hot_keys reads per hold of the router's lock (about 1 ms).
_HOT_CHUNK = 2048


def _hot_rank(item: tuple[int, bool, int, Any]) -> tuple[int, bool, int]:
    return item[0], item[1], item[2]


_COUNTER = {OK: "completed", OK_PICKLED: "completed", RAISED: "failed", CANCELLED: "cancelled"}


class _Inert:
    def start(self, shard: int, epoch: int) -> None: ...
    def send(self, shard: int, epoch: int, seq: int, batch: Batch) -> None: ...
    def stop(self, shard: int, epoch: int) -> None: ...
    def finish(self) -> None: ...

    def join(self, timeout: float | None) -> bool:
        return True


# -- the facade --------------------------------------------------------------------------


class RoutedExecutor(Generic[K]):
    """The executor API on a :class:`Router`: what every routed backend shares.

    Subclasses build the router and its transport, then call ``_attach``.
    """

    _router: Router
    _workers: int
    _name: str

    def _attach(self, router: Router) -> None:
        self._router = router
        # Dropped without shutdown: stop accepting, drain, and let the shards go.
        weakref.finalize(self, router.close)

    def submit(self, key: K, fn: Callable[P, R], /, *args: P.args,
               **kwargs: P.kwargs) -> KeyedFuture[R]:
        """Run ``fn(*args, **kwargs)`` after the tasks already submitted for ``key``;
        returns a ``concurrent.futures.Future`` of its result.

        ``fn``, its arguments and its result travel by pickle: one that cannot be
        pickled fails this task's future alone (``pickle.PicklingError``). Raises
        TypeError (unhashable key, fn not callable) or
        RuntimeError (after shutdown) without queueing anything.
        """
        return self._router.submit(key, fn, args, kwargs)

    def execute(self, key: K, fn: Callable[P, object], /, *args: P.args,
                **kwargs: P.kwargs) -> None:
        """Like :meth:`submit`, fire and forget: an exception (a lost shard's
        ShardLost included) goes to ``on_error(key, exc)``."""
        self._router.submit(key, fn, args, kwargs, forget=True)

    def submit_async(self, key: K, fn: Callable[P, R], /, *args: P.args,
                     **kwargs: P.kwargs) -> asyncio.Future[R]:
        """Submit now (the order is the call order) and return an awaitable of the
        result. Must be called with an event loop running in this thread.
        Cancelling the asyncio future cancels the task if it was not sent yet.
        Completions reach the loop in batches (see ``keyedexec._loopbridge``)."""
        asyncio.get_running_loop()  # RuntimeError before anything is submitted
        return _loopbridge.awaitable(self.submit(key, fn, *args, **kwargs))

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

        ``key(*args)`` gives each call's key (calls with equal keys run in input
        order, one at a time); without it every call is independent. ``timeout``
        bounds the whole iteration; ``buffersize`` submits only that many ahead.
        Ending early cancels the calls not yet sent. ``chunksize`` is accepted and
        ignored: calls travel in batches anyway.
        """
        _check_count("chunksize", chunksize)
        return map_calls(self, fn, iterables, key, timeout, buffersize, _independent)

    def cancel_key(self, key: K) -> int:
        """Cancel ``key``'s tasks that have not started, waiting for its shard's
        answer. Returns how many. Tasks already running (or finishing) are not
        affected; their futures report their outcome."""
        return self._router.cancel_key(key)

    def wait_key(self, key: K, timeout: float | None = None) -> bool:
        """Wait until every task submitted for ``key`` before the call has
        finished; False if ``timeout`` seconds passed first."""
        return self._router.wait_key(key, _check_timeout("timeout", timeout))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks (later submits raise RuntimeError).

        ``cancel_futures=True`` cancels every task that has not started (in the
        shards too); otherwise everything accepted runs. ``wait=True`` returns
        once all of it is done and the shards and threads are gone (from a
        done-callback or ``on_error`` it does not wait: they run in the thread
        that finishes the tasks). Calling it again is harmless.
        """
        self._router.close(cancel=cancel_futures)
        if wait:
            self._router.join()

    def __enter__(self: _E) -> _E:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown(wait=True)

    def stats(self) -> Stats:
        """``Stats(workers, pending)``: workers in all shards, unfinished tasks."""
        return Stats(self._workers, self._router.snapshot()["pending"])

    def timings(self) -> Timings:
        """Wait (submit -> start) and run (start -> end) time histograms of the
        timed tasks that ran (one in ``sample_timings``), since creation.

        Each task is stamped here at submit and in its shard at start and at
        end; a task's times are recorded when its outcome comes back. Run
        times are exact; wait times include the trip of the task to its shard
        and its wait there. On Ray, where an actor's clock may not be this
        machine's, they also include the outcome's trip back (at most a few
        ms: see ``keyedexec._router``). A task sent again after its shard was
        lost waits from its first submit. Tasks that never ran, or whose
        shard was lost, are not timed."""
        return self._router.timings()

    def hot_keys(self, n: int = 10) -> list[HotKey]:
        """The ``n`` keys with the most queued tasks, most first: each with its
        queued count, whether it runs now, and how long its oldest queued task
        has waited (see ``KeyedExecutor.hot_keys``).

        Read from this process's own records, without asking the shards: a
        key *runs* when its first unfinished task has been sent to its shard
        and its outcome is not back yet (it runs there, or has just ended);
        its other unfinished tasks are *queued*, here or in the shard. The
        waits count from submit. One pass over the keys with unfinished tasks
        (about 1 us each), holding submits up for about a millisecond at a
        time. Not one snapshot: keys come and go during the pass.
        """
        return self._router.hot_keys(check_n(n))

    @property
    def name(self) -> str:
        """The ``name`` given to the constructor (processes, logs, exporters)."""
        return self._name

    @property
    def closed(self) -> bool:
        """True once shutdown began (or at interpreter exit)."""
        return self._router.closed


_E = TypeVar("_E", bound=RoutedExecutor[Any])


class _Independent:
    """A key for a call that has none: spread by hash, equal to nothing else, picklable."""

    __slots__ = ("n",)
    _counter = itertools.count()

    def __init__(self) -> None:
        self.n = next(self._counter)

    def __hash__(self) -> int:
        return hash(self.n)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Independent) and other.n == self.n

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore_independent, (self.n,))


def _restore_independent(n: int) -> _Independent:
    key = _Independent.__new__(_Independent)
    key.n = n
    return key


def _independent() -> _Independent:
    return _Independent()
