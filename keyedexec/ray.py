"""RayKeyedExecutor: per-key order on Ray actors, on one machine or a cluster.

The same router as ``keyedexec.process`` (``keyedexec._router``: a busy key
stays on its actor, an idle key goes to its rendezvous-hash actor, tasks travel
in batches numbered per (actor, epoch)); this module is the Ray transport.

Each shard is one threaded Ray actor hosting a :class:`~keyedexec._router.ShardHost`
(a local KeyedExecutor). The caller sends batches with ``deliver`` calls (at most
``max_calls_in_flight`` unanswered per actor) and keeps one long-poll
``take_results`` call outstanding per actor; one receiver thread waits on those
with ``ray.wait``, hands outcomes to the router and reports an actor whose call
raised ``RayActorError`` as lost. Order never rests on Ray's: a threaded actor
runs calls in any order, and the host admits batches by sequence number.
Actors are created with ``max_restarts=0, max_task_retries=0``: a dead actor is
replaced here, with a new epoch, never retried by Ray.

Not imported by ``import keyedexec``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import ray
import ray.cloudpickle
import ray.exceptions

from ._report import log_task_error, report_failure
from ._router import DEFAULT_SAMPLE_TIMINGS, Batch, RoutedExecutor, Router, ShardHost
from ._typevars import K
from .executor import (_UINT32_MAX, _check_count, _check_interval, _check_name, _check_threshold,
                       _check_timeout)

__all__ = ["BrokenActorPool", "RayKeyedExecutor", "RayMetrics"]

# How long an actor's take_results call waits for an outcome, and how often the
# receiver looks for new actors and overdue stops.
_POLL = 1.0
_TICK = 0.05
# How long a closing executor waits for an actor told to stop before killing it.
_STOP_GRACE = 10.0
# Options this module sets itself: order and retries are its business, not Ray's.
_RESERVED = frozenset({"max_restarts", "max_task_retries", "max_concurrency",
                       "concurrency_groups", "lifetime"})


class BrokenActorPool(RuntimeError):
    """An actor could not be created (its constructor failed on the cluster, e.g.
    keyedexec is not importable there): the executor takes no more tasks."""


class RayMetrics(NamedTuple):
    """``RayKeyedExecutor.metrics()``: a snapshot of the counters."""

    actors: int
    """Actors taking new keys (``resize``'s ``n``)."""
    pending: int
    """Tasks accepted and not finished: queued here or in an actor, or running."""
    in_flight: int
    """Of ``pending``, tasks sent to an actor and not acknowledged yet."""
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
    """Tasks failed with ShardLost (their actor died before reporting them)."""
    retried: int
    """Tasks sent again after their actor died (``on_loss="retry"``)."""
    restarts: int
    """Actors replaced after dying."""
    recycled: int
    """Actors replaced after ``max_tasks_per_actor`` tasks."""


# -- the actor ---------------------------------------------------------------------------


class _ShardActor:
    """One shard at one epoch: a ShardHost behind Ray calls (run on several threads)."""

    def __init__(self, epoch: int, workers: int, name: str = "keyedexec",
                 slow_task_threshold: float | None = None,
                 report_interval: float = 0.0) -> None:
        self._host = ShardHost(workers, epoch, name=name,
                               slow_task_threshold=slow_task_threshold)
        self._interval = report_interval
        self._lock = threading.Lock()  # the host admits batches from one thread at a time
        self._next_report = 0.0

    def deliver(self, epoch: int, seq: int, batch: Batch) -> None:
        with self._lock:
            self._host.deliver(epoch, seq, batch)

    def take_results(self, timeout: float) -> tuple[list[Any], bool, int]:
        """The outcomes so far, whether they are the last (read before taking),
        and this actor's monotonic clock (ns) as they leave: their stamps' offset."""
        early = self._next_report - time.monotonic()
        if early > 0:
            self._host.wait_idle(early)  # a rate limit: outcomes gather meanwhile
        finished = self._host.finished
        items = self._host.take_results(timeout)
        now = time.monotonic_ns()
        self._next_report = now / 1e9 + self._interval
        return items, finished, now

    def close(self) -> None:
        self._host.close()

    def info(self) -> tuple[int, int]:
        """(pid, batches that arrived out of sequence)."""
        return os.getpid(), self._host.out_of_order


_actor_class: Any = None


def _remote_class() -> Any:
    global _actor_class
    if _actor_class is None:
        _actor_class = ray.remote(_ShardActor)
    return _actor_class


def _encode(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    # cloudpickle, as Ray itself does: functions of the driver's __main__ travel too.
    data: bytes = _cloudpickle_dumps((fn, args, kwargs))
    return data


# Untyped in Ray's stubs.
_cloudpickle_dumps: Any = ray.cloudpickle.dumps
_cluster_resources: Any = ray.cluster_resources


# -- the caller's end ----------------------------------------------------------------------


class _Actor:
    __slots__ = ("shard", "epoch", "handle", "poll", "delivering", "stopping")

    def __init__(self, shard: int, epoch: int, handle: Any) -> None:
        self.shard, self.epoch, self.handle = shard, epoch, handle
        self.poll: Any = None  # the outstanding take_results call
        self.delivering: list[Any] = []  # deliver calls possibly unanswered
        self.stopping: float | None = None  # when it was told to stop


class _RayTransport:
    """The router's transport to Ray actors (see the module docstring)."""

    def __init__(self, router: Router, workers: int, options: dict[str, Any],
                 max_calls: int, name: str, slow_task_threshold: float | None,
                 report_interval: float) -> None:
        self._router = router
        self._workers = workers
        self._shard_args = (name, slow_task_threshold, report_interval)
        self._options = options
        self._max_calls = max_calls
        self._lock = threading.Lock()
        self._current: dict[int, _Actor] = {}  # shard -> its actor now
        self._actors: list[_Actor] = []  # every actor not yet gone
        self._finishing = False
        self._receiver = threading.Thread(target=self._receive_loop,
                                          name="keyedexec-ray-receiver", daemon=True)
        self._receiver_started = False
        self._done = threading.Event()

    def start(self, shard: int, epoch: int) -> None:
        handle = _remote_class().options(**self._options).remote(
            epoch, self._workers, *self._shard_args)
        actor = _Actor(shard, epoch, handle)
        actor.poll = handle.take_results.remote(_POLL)
        with self._lock:
            self._current[shard] = actor
            self._actors.append(actor)
            if self._finishing:  # started in a race with the end: it ends too
                self._tell_stop(actor)
            if not self._receiver_started:
                self._receiver_started = True
                self._receiver.start()

    def send(self, shard: int, epoch: int, seq: int, batch: Batch) -> None:
        actor = self._current.get(shard)
        if actor is None or actor.epoch != epoch:
            return  # an earlier life of the shard: its tasks were already handled
        ref = actor.handle.deliver.remote(epoch, seq, batch)
        with self._lock:
            actor.delivering.append(ref)
            excess = len(actor.delivering) - self._max_calls
            calls = list(actor.delivering) if excess > 0 else []
        if calls:
            # Calls in flight per actor are bounded: the sender waits for the
            # oldest to be answered (a dead actor answers at once, with an error).
            ready, _ = ray.wait(calls, num_returns=excess, fetch_local=False)
            answered = set(ready)
            with self._lock:
                actor.delivering = [r for r in actor.delivering if r not in answered]

    def stop(self, shard: int, epoch: int) -> None:
        with self._lock:
            for actor in self._actors:
                if actor.shard == shard and actor.epoch == epoch:
                    self._tell_stop(actor)

    def _tell_stop(self, actor: _Actor) -> None:
        if actor.stopping is None:
            actor.stopping = time.monotonic()
            actor.handle.close.remote()

    def finish(self) -> None:
        with self._lock:
            self._finishing = True
            for actor in self._actors:
                self._tell_stop(actor)
            if not self._receiver_started:
                self._done.set()

    def join(self, timeout: float | None) -> bool:
        if threading.current_thread() is self._receiver:
            return True  # called from a done-callback: the receiver ends by itself
        return self._done.wait(timeout)

    def handles(self) -> dict[int, Any]:
        with self._lock:
            return {shard: a.handle for shard, a in sorted(self._current.items())}

    def alive(self) -> int:
        with self._lock:
            return len(self._actors)

    # -- the receiver thread ------------------------------------------------------------

    def _receive_loop(self) -> None:
        try:
            while True:
                with self._lock:
                    actors = list(self._actors)
                    finishing = self._finishing
                if finishing and not actors:
                    return
                now = time.monotonic()
                for a in actors:  # told to stop long ago and still there: end it
                    if a.stopping is not None and now - a.stopping > _STOP_GRACE:
                        self._remove(a)
                polls = {a.poll: a for a in actors if a.poll is not None}
                ready, rest = ray.wait(list(polls), num_returns=1, timeout=_TICK)
                if ready and rest:
                    more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                    ready += more
                for ref in ready:
                    self._answer(polls[ref], ref)
        except BaseException as exc:  # a bug here would leave every future hanging
            report_failure("keyedexec: the Ray executor's receiver failed", exc)
            self._router.broken(f"internal error in the receiver: {exc!r}")
            raise
        finally:
            with self._lock:
                actors, self._actors = self._actors, []
                self._current.clear()
            for a in actors:
                _kill(a.handle)
            self._done.set()

    def _answer(self, actor: _Actor, ref: Any) -> None:
        try:
            items, finished, clock = ray.get(ref)
        except ray.exceptions.RayError as exc:
            self._bury(actor, exc)
            return
        if items:
            self._router.results(actor.shard, actor.epoch, items, clock)
        if finished:  # stopped, and everything it ran is reported
            self._remove(actor)
        else:
            actor.poll = actor.handle.take_results.remote(_POLL)

    def _remove(self, actor: _Actor) -> None:
        with self._lock:
            if actor in self._actors:
                self._actors.remove(actor)
            if self._current.get(actor.shard) is actor:
                del self._current[actor.shard]
        actor.poll = None
        _kill(actor.handle)

    def _bury(self, actor: _Actor, exc: BaseException) -> None:
        """A call to ``actor`` failed: it is dead (or unreachable, then it is killed).
        The router ignores the loss of an actor it had stopped."""
        self._remove(actor)
        if isinstance(exc, ray.exceptions.RayActorError) and exc.actor_init_failed:
            report_failure("keyedexec: a Ray actor could not be created", exc)
            self._router.broken(f"a Ray actor could not be created: {_first_line(exc)}")
            return
        self._router.lost(actor.shard, actor.epoch,
                          f"Ray actor of shard {actor.shard} died ({_first_line(exc)})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _kill(handle: Any) -> None:
    try:
        ray.kill(handle, no_restart=True)
    except Exception:
        pass  # already gone, or Ray is shut down: nothing left to end


# -- the facade ---------------------------------------------------------------------------


class RayKeyedExecutor(RoutedExecutor[K]):
    """Run tasks on Ray actors; tasks that share a key run one at a time, in order.

    ``actors`` Ray actors (default: the cluster's CPU count), each running a
    local KeyedExecutor with ``workers_per_actor`` threads (default 1: CPU-bound
    work). A key with unfinished tasks stays on its actor; an idle key goes to
    the actor that rendezvous hashing of ``hash(key)`` picks, so a key keeps its
    actor (and whatever its tasks cached there) while the actor lives.
    ``resize(n)`` changes the number of actors while work flows. Keys must be
    hashable; they stay in this process (an actor orders a key's tasks by a
    number). ``fn``, its arguments and its result travel by
    (cloud)pickle, as Ray's own tasks do. Order holds per submitting process.

    Tasks travel in batches per actor: a batch leaves once it holds
    ``batch_size`` tasks, or ``linger`` seconds after its first task; at most
    ``max_calls_in_flight`` batches per actor are unanswered (then the sender
    waits). Outcomes come back the same way: an actor whose tasks all have
    outcomes reports them at once; a busy one at most every ``report_interval``
    seconds, since each report is a Ray call that costs the actor and the
    caller about as much CPU as a short task (0 reports every outcome at once).

    An actor that dies (``ray.kill``, a crash, its node lost) is replaced at once
    with a new actor. What happens to the tasks it had been sent and had not
    reported (``on_loss``):

    * ``"fail"`` (default): at most once. Their futures raise
      :class:`keyedexec.ShardLost`; they may or may not have run.
    * ``"retry"``: at least once. They are sent again, in their order and before
      anything newer, to the replacement, up to ``max_retries`` times each
      (then ShardLost). Tasks must be idempotent.

    Ray itself never retries anything: actors are created with
    ``max_restarts=0`` and ``max_task_retries=0``. ``actor_options`` go to
    ``.options()`` of each actor (``num_cpus``, ``resources``, ``runtime_env``...).

    Connecting: if Ray is already initialised in this process, the executor uses
    that connection and leaves it alone at shutdown. Otherwise it calls
    ``ray.init(address=address)`` (``None``: a new local cluster, or the one
    ``RAY_ADDRESS`` names) and ``ray.shutdown()`` in ``shutdown(wait=True)``.

    ``max_pending`` bounds the unfinished tasks: ``submit`` blocks until one
    finishes (Ctrl-C works there), or raises :class:`keyedexec.QueueFull` once
    ``submit_timeout`` seconds have passed. Done-callbacks and ``on_error`` run
    in the executor's receiver thread: keep them short.

    Operating it: :meth:`hot_keys`, :meth:`timings` (``sample_timings=N``
    times one task in N; default 1, every task) and ``keyedexec.contrib``'s
    exporters, under ``name``, as for KeyedExecutor. ``slow_task_threshold=
    seconds`` logs a task that runs longer, once, with its key, from its
    actor: on the actor's ``"keyedexec"`` logger (WARNING), as
    ``f"{name}-shard"``; it lands in the actor's log files and, with Ray's
    ``log_to_driver`` (its default), on the driver's stderr.
    """

    def __init__(
        self,
        actors: int | None = None,
        workers_per_actor: int = 1,
        *,
        address: str | None = None,
        actor_options: Mapping[str, Any] | None = None,
        max_tasks_per_actor: int | None = None,
        on_loss: str = "fail",
        max_retries: int = 3,
        max_pending: int | None = None,
        submit_timeout: float | None = None,
        max_calls_in_flight: int = 8,
        batch_size: int = 256,
        linger: float = 0.0005,
        report_interval: float = 0.02,
        on_error: Callable[[Any, BaseException], object] | None = None,
        name: str = "keyedexec",
        sample_timings: int = DEFAULT_SAMPLE_TIMINGS,
        slow_task_threshold: float | None = None,
    ) -> None:
        if actors is not None:
            _check_count("actors", actors)
        _check_count("workers_per_actor", workers_per_actor)
        if address is not None and not isinstance(address, str):
            raise TypeError(f"address must be a str or None, got {type(address).__name__}")
        if actor_options is None:
            actor_options = {}
        if not isinstance(actor_options, Mapping):
            raise TypeError(
                f"actor_options must be a mapping, got {type(actor_options).__name__}")
        reserved = sorted(_RESERVED & set(actor_options))
        if reserved:
            raise ValueError(f"actor_options may not set {', '.join(reserved)}: "
                             "the executor sets them (order and retries are its own)")
        if max_tasks_per_actor is not None:
            _check_count("max_tasks_per_actor", max_tasks_per_actor)
        if not isinstance(on_loss, str):
            raise TypeError(f"on_loss must be a str, got {type(on_loss).__name__}")
        if on_loss not in ("fail", "retry"):
            raise ValueError(f"on_loss must be 'fail' or 'retry', got {on_loss!r}")
        _check_count("max_retries", max_retries, minimum=0)
        if max_pending is not None:
            _check_count("max_pending", max_pending)
        submit_timeout = _check_timeout("submit_timeout", submit_timeout)
        _check_count("max_calls_in_flight", max_calls_in_flight)
        _check_count("batch_size", batch_size)
        linger_s = _check_interval("linger", linger)
        report_interval_s = _check_interval("report_interval", report_interval)
        if on_error is not None and not callable(on_error):
            raise TypeError(f"on_error must be callable, got {type(on_error).__name__}")
        self._name = _check_name(name)
        _check_count("sample_timings", sample_timings, minimum=0, maximum=_UINT32_MAX)
        slow_task_threshold = _check_threshold("slow_task_threshold", slow_task_threshold)

        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=address)
        elif address is not None:
            raise ValueError("address given, but Ray is already initialised in this "
                             "process: leave address out to use that connection")
        try:
            if actors is None:
                actors = max(1, int(_cluster_resources().get("CPU", 1)))
            options = {
                "num_cpus": 0,  # placement only by what the caller asks (actor_options)
                **actor_options,
                "max_restarts": 0,
                "max_task_retries": 0,
                # deliver calls, the long poll, close, info
                "max_concurrency": max_calls_in_flight + 3,
            }
            self._workers_per_actor = workers_per_actor
            self._workers = actors * workers_per_actor
            router = Router(
                actors,
                batch_size=batch_size,
                linger=linger_s,
                on_loss=on_loss,
                max_retries=max_retries,
                max_tasks_per_shard=max_tasks_per_actor,
                max_pending=max_pending,
                on_error=on_error or log_task_error,
                broken_error=BrokenActorPool,
                submit_timeout=submit_timeout,
                sample_timings=sample_timings,
                encode=_encode,
                label_keys=slow_task_threshold is not None,
            )
            self._transport = _RayTransport(router, workers_per_actor, options,
                                            max_calls_in_flight, name, slow_task_threshold,
                                            report_interval_s)
            try:
                router.start(self._transport)
            except BaseException:
                router.close()
                self._transport.finish()
                self._transport.join(_STOP_GRACE)
                raise
        except BaseException:
            if self._owns_ray:
                ray.shutdown()
            raise
        self._attach(router)

    def resize(self, actors: int) -> None:
        """Run on ``actors`` actors from now on, while work flows. New actors start
        at once; a removed actor takes no new key and leaves once the keys busy on
        it are idle (their order is never broken). Only idle keys move: about
        1/n of them, to the actor rendezvous hashing picks."""
        _check_count("actors", actors)
        self._router.resize(actors)
        self._workers = actors * self._workers_per_actor

    @property
    def actors(self) -> int:
        """The number of actors taking new keys."""
        return self._router.shards

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks (later submits raise RuntimeError).

        ``cancel_futures=True`` cancels every task that has not started (in the
        actors too); otherwise everything accepted runs. ``wait=True`` returns
        once all of it is done and the actors are killed; then, if this executor
        called ``ray.init``, it calls ``ray.shutdown``. Calling it again is harmless.
        """
        super().shutdown(wait, cancel_futures=cancel_futures)
        if wait and self._owns_ray:
            self._owns_ray = False
            ray.shutdown()

    def metrics(self) -> RayMetrics:
        """A snapshot: see :class:`RayMetrics`."""
        return RayMetrics(self._router.shards, *self._router.metric_fields())

    def actor_handles(self) -> dict[int, Any]:
        """The live actors by shard (Ray actor handles): for ``ray.kill`` in a
        test, or to ask an actor's state. Not for submitting work."""
        return self._transport.handles()

    def __repr__(self) -> str:
        m = self.metrics()
        state = "closed" if self.closed else "open"
        return (f"<{type(self).__name__} {state} actors={m.actors} "
                f"pending={m.pending} keys={m.active_keys}>")
