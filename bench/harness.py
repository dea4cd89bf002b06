"""The benchmark's machinery: sizes, the six competitors, key sets, the results registry.

Every figure the suite reports is recorded here (``record``) and turned into
the summary table, ``bench/results/latest.json`` and the chart by
``conftest.py`` at the end of the run. Ratios are always against figures
measured in the same run: the machines are shared and noisy.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import os
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from keyedexec import KeyedExecutor, TaskPool, _pure

try:
    from keyedexec import _core
except ImportError:  # the suite still runs (pure Python only) without a build
    _core = None  # type: ignore[assignment]

Task = Callable[[], object]
Round = Callable[[], None]  # the timed part of one benchmark round

# -- sizes --------------------------------------------------------------------------------

FULL = os.environ.get("KEYEDEXEC_BENCH", "").strip().lower() == "full"
MODE = "full" if FULL else "quick"


@dataclass(frozen=True)
class Sizes:
    tasks: int
    """Tasks per throughput round: keyedexec native and the floor."""
    pure_tasks: int
    """Tasks per throughput round: keyedexec pure Python (several times slower)."""
    base_tasks: int
    """Tasks per round for the ThreadPoolExecutor-based competitors (~70k tasks/s at best)."""
    rounds: int
    """Timed rounds per benchmark; every figure is the median over them."""
    slow_rounds: int
    """Rounds for the slow competitors (pure Python, ThreadPoolExecutor-based)."""
    io_workers: tuple[int, ...]
    io_per_worker: int
    """Sleeping tasks per worker per round: a round lasts about this many ms."""
    latency_samples: int
    """Submit -> start samples per round, one task at a time."""
    hot_tasks: int
    """Fairness: tasks queued on the hot key ahead of the cold one."""
    memory_tasks: int
    """Memory: tasks queued at once, each on its own key."""
    pool_keys: int
    """TaskPool: active keys, one queued job each."""


SIZES = (
    Sizes(
        tasks=1_000_000,
        pure_tasks=1_000_000,
        base_tasks=200_000,
        rounds=5,
        slow_rounds=3,
        io_workers=(1, 2, 4, 8, 16, 32, 64),
        io_per_worker=500,
        latency_samples=20_000,
        hot_tasks=100_000,
        memory_tasks=1_000_000,
        pool_keys=100_000,
    )
    if FULL
    else Sizes(
        tasks=200_000,
        pure_tasks=50_000,
        base_tasks=25_000,
        rounds=5,
        slow_rounds=3,
        io_workers=(1, 4, 16, 64),
        io_per_worker=150,
        latency_samples=2_000,
        hot_tasks=20_000,
        memory_tasks=200_000,
        pool_keys=100_000,
    )
)

WORKERS = 4  # the pool size of the throughput, latency and memory scenarios
BATCH = 64  # KeyedExecutor's default: the fairness bound
TIMEOUT = 60.0  # seconds any single wait inside a benchmark may take before it fails


def noop() -> None:
    pass


# -- key sets -------------------------------------------------------------------------------

_key_cache: dict[tuple[str, int], list[Any]] = {}


def keys_for(dist: str, n: int) -> list[Any]:
    """``n`` keys, one per task: ``uniform`` (1,000 keys round robin), ``one``
    (a single key), ``distinct`` (every task its own key) or ``zipf`` (10,000
    keys, Zipf s = 1.1, seeded). Built once and reused by every competitor."""
    cached = _key_cache.get((dist, n))
    if cached is not None:
        return cached
    if dist == "uniform":
        keys: list[Any] = [i % 1000 for i in range(n)]
    elif dist == "one":
        keys = [0] * n
    elif dist == "distinct":
        keys = list(range(n))
    elif dist == "zipf":
        ranks = range(1, 10_001)
        cum, total = [], 0.0
        for r in ranks:
            total += r**-1.1
            cum.append(total)
        keys = random.Random(1234).choices(range(10_000), cum_weights=cum, k=n)
    else:
        raise ValueError(dist)
    _key_cache[(dist, n)] = keys
    return keys


# -- competitors ----------------------------------------------------------------------------
#
# A competitor opens a pool (its workers started and idle, so thread start-up
# is never timed), runs a list of tasks fire-and-forget (execute_all) or with
# futures (submit_all), and closes the pool, waiting for every task. The timed
# loops bind methods to locals and call the competitor's own API directly: no
# wrapper frame that a user would not write.


class Competitor:
    name = ""
    label = ""
    tpe_based = False  # ThreadPoolExecutor underneath: measured on fewer tasks
    has_submit = True  # can return a future per task

    def __str__(self) -> str:
        return self.name

    def tasks(self) -> int:
        """Tasks per throughput round for this competitor (rates are comparable)."""
        return SIZES.base_tasks if self.tpe_based else SIZES.tasks

    def rounds(self) -> int:
        return SIZES.slow_rounds if self.tpe_based else SIZES.rounds

    def open(self, workers: int) -> Any:
        """A new pool whose ``workers`` threads are all started (and idle again)."""
        pool = self.new(workers)
        # Tasks that meet at a barrier: each holds a thread until all threads exist.
        barrier = threading.Barrier(workers + 1, timeout=TIMEOUT)
        self.execute_all(pool, [("warm", i) for i in range(workers)], barrier.wait)
        barrier.wait()
        return pool

    def new(self, workers: int) -> Any:
        raise NotImplementedError

    # The defaults fit pools with a keyed API: pool.execute(key, fn), pool.submit(key, fn).
    def execute_all(self, pool: Any, keys: list[Any], fn: Task) -> None:
        execute = pool.execute
        for k in keys:
            execute(k, fn)

    def submit_all(self, pool: Any, keys: list[Any], fn: Task) -> list[Any]:
        submit = pool.submit
        return [submit(k, fn) for k in keys]

    def execute_fn(self, pool: Any) -> Callable[[Any, Task], object]:
        """One fire-and-forget call ``(key, fn)``, for the latency samples."""
        return pool.execute  # type: ignore[no-any-return]

    def close(self, pool: Any) -> None:
        raise NotImplementedError

    def execute_round(self, workers: int, keys: list[Any], fn: Task) -> Round:
        """Prepare one timed round (untimed); returns the timed part: run every
        task fire-and-forget and return once all of them finished."""
        pool = self.open(workers)

        def run() -> None:
            try:
                self.execute_all(pool, keys, fn)
            finally:
                self.close(pool)

        return run

    def submit_round(self, workers: int, keys: list[Any], fn: Task) -> Round:
        """Like execute_round, with a future per task, then waiting for all of them."""
        pool = self.open(workers)

        def run() -> None:
            try:
                for f in self.submit_all(pool, keys, fn):
                    f.result()
            finally:
                self.close(pool)

        return run

    def block(self, pool: Any, workers: int, release: threading.Event) -> None:
        """Occupy all ``workers`` with tasks (on distinct keys) that wait for
        ``release``; returns once every one of them is running."""
        started = threading.Semaphore(0)

        def blocker() -> None:
            started.release()
            release.wait(TIMEOUT)

        self.execute_all(pool, [("blocker", i) for i in range(workers)], blocker)
        for _ in range(workers):
            if not started.acquire(timeout=TIMEOUT):
                raise RuntimeError(f"{self.name}: the blockers did not start")


class Keyed(Competitor):
    """keyedexec's KeyedExecutor on the native core or on the pure-Python scheduler."""

    def __init__(self, name: str, label: str, scheduler: Any, tasks: int, rounds: int) -> None:
        self.name, self.label, self._tasks, self._rounds = name, label, tasks, rounds
        self.cls = type(f"{name.title()}KeyedExecutor", (KeyedExecutor,), {"_Scheduler": scheduler})

    def tasks(self) -> int:
        return self._tasks

    def rounds(self) -> int:
        return self._rounds

    def new(self, workers: int) -> Any:
        return self.cls(workers, batch=BATCH)

    def close(self, pool: Any) -> None:
        pool.shutdown(wait=True)


class Tpe(Competitor):
    """concurrent.futures.ThreadPoolExecutor.submit: no ordering at all."""

    name, label, tpe_based = "tpe", "ThreadPoolExecutor", True

    def new(self, workers: int) -> Any:
        return concurrent.futures.ThreadPoolExecutor(workers)

    def execute_all(self, pool: Any, keys: list[Any], fn: Task) -> None:
        submit = pool.submit
        for _k in keys:
            submit(fn)

    def submit_all(self, pool: Any, keys: list[Any], fn: Task) -> list[Any]:
        submit = pool.submit
        return [submit(fn) for _k in keys]

    def execute_fn(self, pool: Any) -> Callable[[Any, Task], object]:
        submit = pool.submit
        return lambda _k, fn: submit(fn)

    def close(self, pool: Any) -> None:
        pool.shutdown(wait=True)


def _locked(lock: Any, fn: Task) -> object:
    with lock:
        return fn()


class LockPool:
    """The pattern users write: a lock per key around work on a ThreadPoolExecutor.

    It serializes a key's tasks but does not order them (lock acquisition is
    not FIFO), a task waiting for its key's lock holds a worker, and the locks
    are never freed.
    """

    def __init__(self, workers: int) -> None:
        self.tpe = concurrent.futures.ThreadPoolExecutor(workers)
        self.locks: collections.defaultdict[Any, Any] = collections.defaultdict(threading.Lock)


class PerKeyLock(Competitor):
    name, label, tpe_based = "lock", "per-key lock + TPE", True

    def new(self, workers: int) -> Any:
        return LockPool(workers)

    def execute_all(self, pool: Any, keys: list[Any], fn: Task) -> None:
        submit, locks = pool.tpe.submit, pool.locks
        for k in keys:
            submit(_locked, locks[k], fn)

    def submit_all(self, pool: Any, keys: list[Any], fn: Task) -> list[Any]:
        submit, locks = pool.tpe.submit, pool.locks
        return [submit(_locked, locks[k], fn) for k in keys]

    def execute_fn(self, pool: Any) -> Callable[[Any, Task], object]:
        submit, locks = pool.tpe.submit, pool.locks
        return lambda k, fn: submit(_locked, locks[k], fn)

    def close(self, pool: Any) -> None:
        pool.tpe.shutdown(wait=True)


class ChainPool:
    """A naive per-key deque chained onto a ThreadPoolExecutor.

    A key with no runner gets a drain function submitted to the pool, which
    pops and runs the key's tasks until its deque is empty. One lock guards
    the dict of deques.
    """

    def __init__(self, workers: int) -> None:
        self.tpe = concurrent.futures.ThreadPoolExecutor(workers)
        self.lock = threading.Lock()
        self.queues: dict[Any, collections.deque[Any]] = {}

    def execute(self, key: Any, fn: Task) -> None:
        self._push(key, (fn, None))

    def submit(self, key: Any, fn: Task) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._push(key, (fn, fut))
        return fut

    def _push(self, key: Any, item: tuple[Any, Any]) -> None:
        with self.lock:
            q = self.queues.get(key)
            if q is not None:
                q.append(item)
                return
            q = self.queues[key] = collections.deque((item,))
        self.tpe.submit(self._drain, key, q)

    def _drain(self, key: Any, q: collections.deque[Any]) -> None:
        while True:
            with self.lock:
                if not q:
                    del self.queues[key]
                    return
                fn, fut = q.popleft()
            if fut is None:
                fn()  # the benchmark's fire-and-forget tasks never raise
            elif fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as exc:
                    fut.set_exception(exc)


class DequeChain(Competitor):
    name, label, tpe_based = "chain", "per-key deque + TPE", True

    def new(self, workers: int) -> Any:
        return ChainPool(workers)

    def close(self, pool: Any) -> None:
        pool.tpe.shutdown(wait=True)


class Floor(Competitor):
    """The floor: a plain loop that pops (key, fn) from a deque and calls fn().

    One thread, no executor: nothing can run tasks faster than calling them
    with the GIL. The deque is filled before the clock starts; the timed part
    is the loop alone. (For the memory scenario the deque is the queue.)
    """

    name, label, has_submit = "floor", "floor (deque loop)", False

    def open(self, workers: int) -> Any:
        return collections.deque()  # no threads to start

    def execute_all(self, pool: Any, keys: list[Any], fn: Task) -> None:
        append = pool.append
        for k in keys:
            append((k, fn))

    def close(self, pool: Any) -> None:
        popleft = pool.popleft
        while pool:
            _k, fn = popleft()
            fn()

    def execute_round(self, workers: int, keys: list[Any], fn: Task) -> Round:
        pool = self.open(workers)
        self.execute_all(pool, keys, fn)
        return lambda: self.close(pool)

    def block(self, pool: Any, workers: int, release: threading.Event) -> None:
        pass  # no workers: queued tasks wait for close() anyway


NATIVE_C = (
    Keyed("native", "keyedexec native", _core.Scheduler, SIZES.tasks, SIZES.rounds)
    if _core is not None
    else None
)
PURE = Keyed("pure", "keyedexec pure Python", _pure.Scheduler, SIZES.pure_tasks, SIZES.slow_rounds)
TPE, LOCK, CHAIN, FLOOR = Tpe(), PerKeyLock(), DequeChain(), Floor()

#: Every competitor, in table order. The native one is absent without a build.
COMPETITORS: list[Competitor] = [c for c in (NATIVE_C, PURE, TPE, LOCK, CHAIN, FLOOR) if c]
#: Those that run tasks on worker threads (all but the floor).
EXECUTORS = [c for c in COMPETITORS if c is not FLOOR]
#: keyedexec's TaskPool on each available scheduler.
POOLS: dict[str, Any] = {"pure": type("PureTaskPool", (TaskPool,), {"_Scheduler": _pure.Scheduler})}
if _core is not None:
    native_pool = type("NativeTaskPool", (TaskPool,), {"_Scheduler": _core.Scheduler})
    POOLS = {"native": native_pool, **POOLS}
LABELS = {c.name: c.label for c in COMPETITORS}
# bench/test_processes.py's competitors (their own pools, not Competitor objects).
LABELS.update(process="keyedexec processes", ppe="ProcessPoolExecutor",
              capacity="2 processes, no executor")
# bench/test_ray.py's.
LABELS.update({"ray": "keyedexec Ray, 2 actors", "ray-1": "keyedexec Ray, 1 actor",
               "ray-naive": "Ray: actor call per task",
               "ray-capacity": "2 Ray actors, no executor"})


# -- results --------------------------------------------------------------------------------


@dataclass
class Measurement:
    scenario: str
    competitor: str
    value: float
    unit: str
    """tasks/s, us, B, MB, tasks, x: how the figure reads."""
    baseline: tuple[str, str] | None = None
    """(scenario, competitor) this figure's ratio column divides by."""
    extra: dict[str, Any] = field(default_factory=dict)


RESULTS: dict[tuple[str, str], Measurement] = {}


def record(
    scenario: str,
    competitor: str,
    value: float,
    unit: str,
    *,
    baseline: tuple[str, str] | None = None,
    benchmark: Any = None,
    extra: dict[str, Any] | None = None,
) -> Measurement:
    """Register one figure for the summary (and in the benchmark's extra_info)."""
    extra = extra or {}
    m = Measurement(scenario, competitor, value, unit, baseline, extra)
    RESULTS[(scenario, competitor)] = m
    if benchmark is not None:
        benchmark.extra_info.update({"value": value, "unit": unit, **extra})
    return m


def median_seconds(benchmark: Any) -> float | None:
    """The median round time pytest-benchmark measured (None under --benchmark-disable)."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else float(stats.stats.median)


def record_rate(
    benchmark: Any, scenario: str, competitor: str, tasks: int, *, baseline: tuple[str, str] | None
) -> None:
    """Record ``tasks`` / median round time as the scenario's tasks/s figure."""
    seconds = median_seconds(benchmark)
    if seconds is None:
        return
    record(
        scenario,
        competitor,
        tasks / seconds,
        "tasks/s",
        baseline=baseline,
        benchmark=benchmark,
        extra={"tasks": tasks, "tasks_per_s": tasks / seconds, "median_s": seconds},
    )


def interleaved(benchmark: Any, runs: dict[str, Callable[[], object]], rounds: int,
                setup: Callable[[], object] | None = None) -> dict[str, float]:
    """Median seconds of each of ``runs``, timed in interleaved rounds.

    Every round runs each competitor once, starting from a different one each
    round. Used where the figure depends on how much of the machine's second
    core the run gets: on a shared VM that swings within seconds, and
    back-to-back blocks of rounds would hand one competitor a calm spell and
    the next a busy one. pytest-benchmark times whole rounds.
    """
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    turn = [0]

    def one_round() -> None:
        start = turn[0] % len(names)
        turn[0] += 1
        for name in names[start:] + names[:start]:
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)

    benchmark.pedantic(one_round, rounds=rounds)
    return {name: statistics.median(ts) for name, ts in times.items()}


def rss_bytes() -> int | None:
    """Resident set size from /proc/self/statm (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile (0 < q <= 1) of an ascending list, by nearest rank."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]

