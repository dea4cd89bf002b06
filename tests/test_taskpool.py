"""TaskPool: the Go ``taskpool`` behaviours, with keyedexec's semantics.

The first part mirrors what the Go project tests (serial per key, parallel
across keys, cancellation by Stop, Len, concurrent submitters, the README's
notification example). The rest pins what keyedexec fixes or adds: bounded
threads that retire when idle, keys freed when drained, try_submit and submit
timeouts at the cap, QueueFull instead of a self-submit deadlock, a bounded
stop(), Ctrl-C out of a blocked submit, logged job errors, input validation.
"""

from __future__ import annotations

import logging
import math
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from typing import Any

import pytest
from conftest import STRESS, wait_until
from test_process import _child_env

from keyedexec import Cancelled, Context, QueueFull


def _noop(ctx: Context) -> None:
    pass


def _blocker(pool: Any, key: object) -> tuple[threading.Event, threading.Event]:
    """Occupy ``key`` with a job that runs until released (or the pool is stopped).

    Returns (started, release). The job ends when ``release`` is set or the
    pool's context is cancelled, so stop() never waits on it for long.
    """
    started, release = threading.Event(), threading.Event()

    def job(ctx: Context) -> None:
        started.set()
        while not release.is_set() and not ctx.wait(0.01):
            pass

    pool.submit(key, job)
    assert started.wait(10)
    return started, release


# -- what the Go project tests ---------------------------------------------------


@pytest.mark.timeout(20)
def test_submit_runs_job_with_pool_context(impl: Any) -> None:
    """A submitted job runs and receives the pool's (live) context."""
    seen: list[Context] = []
    done = threading.Event()

    def job(ctx: Context) -> None:
        seen.append(ctx)
        done.set()

    with impl.TaskPool() as pool:
        pool.submit("k", job)
        assert done.wait(10)
        assert seen[0] is pool.context
        assert seen[0].err() is None


@pytest.mark.timeout(20)
def test_serial_execution_within_a_key(impl: Any) -> None:
    """Jobs of one key run one at a time in submission order: job i sees counter == i."""
    n = 100
    counter = 0
    mismatches: list[tuple[int, int]] = []
    done = threading.Event()

    def make(i: int) -> Any:
        def job(ctx: Context) -> None:
            nonlocal counter
            if counter != i:
                mismatches.append((i, counter))
            time.sleep(0)  # give other workers a chance to interleave if they could
            counter += 1
            if i == n - 1:
                done.set()

        return job

    with impl.TaskPool(max_workers=8) as pool:
        for i in range(n):
            pool.submit("k", make(i))
        assert done.wait(10)
    assert mismatches == []
    assert counter == n


@pytest.mark.timeout(20)
def test_parallel_execution_across_keys(impl: Any) -> None:
    """N keys' jobs run at the same time: they all meet at one barrier."""
    n = 6
    barrier = threading.Barrier(n, timeout=10)
    met: list[str] = []

    def make(key: str) -> Any:
        def job(ctx: Context) -> None:
            barrier.wait()  # BrokenBarrierError (logged) if the keys ran one after another
            met.append(key)

        return job

    with impl.TaskPool(max_workers=n) as pool:
        for i in range(n):
            pool.submit(f"key-{i}", make(f"key-{i}"))
        assert wait_until(lambda: len(met) == n, 15)
    assert sorted(met) == sorted(f"key-{i}" for i in range(n))


@pytest.mark.timeout(30)
def test_many_keys_many_jobs_each_key_serial(impl: Any) -> None:
    """Many keys x many jobs: never two jobs of one key at once, each key in order."""
    keys, per_key = 20, int(50 * STRESS)
    lock = threading.Lock()
    in_flight: dict[int, int] = defaultdict(int)
    worst: dict[int, int] = defaultdict(int)
    order: dict[int, list[int]] = defaultdict(list)

    def make(key: int, i: int) -> Any:
        def job(ctx: Context) -> None:
            with lock:
                in_flight[key] += 1
                worst[key] = max(worst[key], in_flight[key])
            time.sleep(0)  # widen the window a second concurrent job would need
            order[key].append(i)
            with lock:
                in_flight[key] -= 1

        return job

    with impl.TaskPool(max_workers=8) as pool:
        for i in range(per_key):  # interleave keys so several are ready at once
            for key in range(keys):
                pool.submit(key, make(key, i))
        assert wait_until(lambda: pool.metrics().completed == keys * per_key, 20)
    assert max(worst.values()) == 1
    assert all(order[key] == list(range(per_key)) for key in range(keys))


@pytest.mark.timeout(20)
def test_stop_cancels_running_jobs(impl: Any, thread_guard: None) -> None:
    """stop() cancels the context a running job waits on, and returns once it finished."""
    started = threading.Event()
    outcome: list[object] = []

    def job(ctx: Context) -> None:
        started.set()
        outcome.append(ctx.wait(30))  # True: woken by cancellation, not the timeout
        outcome.append(ctx.err())

    pool = impl.TaskPool()
    pool.start()
    pool.submit("k", job)
    assert started.wait(10)
    assert pool.stop() is True
    assert outcome[0] is True
    assert isinstance(outcome[1], Cancelled)
    assert pool.context is not None and pool.context.cancelled
    assert pool.metrics().running == 0


@pytest.mark.timeout(20)
def test_nothing_runs_after_stop(impl: Any, thread_guard: None) -> None:
    """Jobs queued behind a running one are discarded by stop(), counted, never run."""
    ran: list[int] = []
    pool = impl.TaskPool()
    pool.start()
    _blocker(pool, "k")
    for i in range(5):
        pool.submit("k", lambda ctx, i=i: ran.append(i))
    assert pool.stop() is True
    assert ran == []
    m = pool.metrics()
    assert m.discarded == 5
    assert (m.pending, m.running, m.completed) == (0, 0, 1)
    with pytest.raises(RuntimeError):
        pool.submit("k", _noop)
    with pytest.raises(RuntimeError):
        pool.try_submit("k", _noop)
    assert pool.metrics().submitted == 6  # the refused ones were not queued
    time.sleep(0.05)  # a late straggler would have run by now
    assert ran == []


@pytest.mark.timeout(20)
def test_no_queued_job_starts_while_stop_runs(impl: Any) -> None:
    """A queued job whose turn comes while stop() is under way is skipped, not run.

    White-box: the scheduler's close() is hooked to let the running job finish
    right then, which opens the window deterministically.
    """
    release, ran = threading.Event(), threading.Event()

    class Hooked(impl.Scheduler):  # type: ignore[name-defined,misc]
        def close(self) -> None:
            super().close()
            release.set()  # the running job ends inside stop()...
            ran.wait(0.5)  # ...and a worker may take the next job now

    pool = type("HookedPool", (impl.TaskPool,), {"_Scheduler": Hooked})()
    pool.start()
    started = threading.Event()
    pool.submit("k", lambda ctx: (started.set(), release.wait(10)))
    pool.submit("k", lambda ctx: ran.set())
    assert started.wait(10)
    assert pool.stop(10) is True
    assert not ran.is_set()
    assert pool.metrics().discarded == 1


@pytest.mark.timeout(20)
def test_len_counts_keys_with_work(impl: Any) -> None:
    """len(pool) is 0, then 1 while a key has (blocked) work, then 0 once it drained."""
    pool = impl.TaskPool()
    assert len(pool) == 0  # before start
    with pool:
        assert len(pool) == 0
        _, release = _blocker(pool, "k")
        pool.submit("k", _noop)
        assert len(pool) == 1
        assert pool.len() == len(pool)
        release.set()
        assert wait_until(lambda: len(pool) == 0, 10)
        assert pool.len() == 0


@pytest.mark.timeout(30)
def test_concurrent_submitters(impl: Any) -> None:
    """200 threads submitting at once: every job runs exactly once, in each submitter's order."""
    threads_n, per_key = 200, 3
    shared = [f"shared-{i}" for i in range(4)]
    record: dict[str, list[tuple[int, int]]] = defaultdict(list)
    errors: list[BaseException] = []
    go = threading.Barrier(threads_n, timeout=20)

    def make(key: str, who: int, seq: int) -> Any:
        def job(ctx: Context) -> None:
            record[key].append((who, seq))

        return job

    def submitter(pool: Any, who: int) -> None:
        try:
            go.wait()
            for seq in range(per_key):
                pool.submit(f"own-{who}", make(f"own-{who}", who, seq))
                key = shared[(who + seq) % len(shared)]
                pool.submit(key, make(key, who, seq))
        except BaseException as exc:  # reported below: a thread must not raise
            errors.append(exc)

    total = threads_n * per_key * 2
    with impl.TaskPool(queue_size=50) as pool:
        threads = [threading.Thread(target=submitter, args=(pool, w)) for w in range(threads_n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(25)
        assert errors == []
        assert wait_until(lambda: pool.metrics().completed == total, 20)
        assert pool.metrics().submitted == total

    all_jobs = [(key, job) for key, jobs in record.items() for job in jobs]
    assert len(all_jobs) == len(set(all_jobs)) == total  # exactly once
    for who in range(threads_n):
        assert record[f"own-{who}"] == [(who, s) for s in range(per_key)]
    for key in shared:
        by_submitter: dict[int, list[int]] = defaultdict(list)
        for who, seq in record[key]:
            by_submitter[who].append(seq)
        assert all(seqs == sorted(seqs) for seqs in by_submitter.values())


@pytest.mark.timeout(20)
def test_submit_blocks_at_cap_until_space_frees(impl: Any) -> None:
    """With a full key, submit waits; it returns once the running job frees a slot."""
    order: list[int] = []
    returned = threading.Event()
    with impl.TaskPool(queue_size=2) as pool:
        _, release = _blocker(pool, "k")
        pool.submit("k", lambda ctx: order.append(1))
        pool.submit("k", lambda ctx: order.append(2))

        def fourth() -> None:
            pool.submit("k", lambda ctx: order.append(3))
            returned.set()

        t = threading.Thread(target=fourth)
        t.start()
        try:
            # Not a timing assertion: it must still be waiting, however long we look.
            assert not returned.wait(0.2)
            assert pool.metrics().pending == 2
        finally:
            release.set()
            t.join(10)
        assert returned.is_set()
        assert wait_until(lambda: order == [1, 2, 3], 10)


@pytest.mark.timeout(20)
def test_empty_string_key(impl: Any) -> None:
    """The empty string is an ordinary key."""
    done = threading.Event()
    with impl.TaskPool() as pool:
        pool.submit("", lambda ctx: done.set())
        assert done.wait(10)


@pytest.mark.timeout(20)
def test_strict_order_on_one_key(impl: Any) -> None:
    """20 jobs on one key run exactly in submission order."""
    order: list[int] = []
    with impl.TaskPool(max_workers=4) as pool:
        for i in range(20):
            pool.submit("k", lambda ctx, i=i: order.append(i))
        assert wait_until(lambda: len(order) == 20, 10)
    assert order == list(range(20))


@pytest.mark.timeout(20)
def test_readme_notification_example(impl: Any) -> None:
    """The README example: events for several users, each user's notifications in order."""
    users = ["user-123", "user-456", "user-789", "user-000"]
    events = [(users[i % len(users)], i) for i in range(200)]
    sent: dict[str, list[int]] = defaultdict(list)

    def send_notification(ctx: Context, event: tuple[str, int]) -> None:
        if ctx.err() is None:
            sent[event[0]].append(event[1])

    with impl.TaskPool() as pool:
        for event in events:
            pool.submit(event[0], lambda ctx, event=event: send_notification(ctx, event))
        assert wait_until(lambda: pool.metrics().completed == len(events), 10)
    for user in users:
        assert sent[user] == [seq for u, seq in events if u == user]


# -- beyond the Go project -------------------------------------------------------


@pytest.mark.timeout(20)
def test_try_submit_never_waits(impl: Any) -> None:
    """try_submit: True with room; False at the cap, with nothing queued."""
    with impl.TaskPool(queue_size=1) as pool:
        _, release = _blocker(pool, "k")
        assert pool.try_submit("k", _noop) is True
        before = pool.metrics()
        assert pool.try_submit("k", _noop) is False
        after = pool.metrics()
        assert (after.submitted, after.pending) == (before.submitted, before.pending)
        assert pool.try_submit("other", _noop) is True  # only "k" is full
        release.set()


@pytest.mark.timeout(20)
def test_submit_timeout(impl: Any) -> None:
    """submit(timeout=...) at the cap raises QueueFull and queues nothing; bad timeouts are refused."""
    with impl.TaskPool(queue_size=1) as pool:
        _, release = _blocker(pool, "k")
        pool.submit("k", _noop)
        submitted = pool.metrics().submitted
        with pytest.raises(QueueFull):
            pool.submit("k", _noop, timeout=0.05)
        with pytest.raises(QueueFull):
            pool.submit("k", _noop, timeout=0)
        with pytest.raises(ValueError):
            pool.submit("k", _noop, timeout=-1)
        with pytest.raises(TypeError):
            pool.submit("k", _noop, timeout="x")  # type: ignore[arg-type]
        assert pool.metrics().submitted == submitted
        pool.submit("other", _noop, timeout=0)  # room: no wait needed
        release.set()


@pytest.mark.timeout(20)
def test_self_submit(impl: Any) -> None:
    """A job submitting to its own key: queued with room; QueueFull at once when full (no deadlock)."""
    outcome: list[object] = []
    ran = threading.Event()
    go = threading.Event()

    def with_room(ctx: Context) -> None:
        pool.submit("a", lambda ctx: ran.set())

    def at_cap(ctx: Context) -> None:
        go.wait(10)  # until the test has filled this key's queue
        for timeout in (None, 5.0):
            try:
                pool.submit("b", _noop, timeout=timeout)
                outcome.append("queued")
            except QueueFull:
                outcome.append("full")

    with impl.TaskPool(queue_size=2) as pool:
        pool.submit("a", with_room)
        assert ran.wait(10)

        pool.submit("b", at_cap)
        assert wait_until(lambda: pool.metrics().running == 1, 10)
        pool.submit("b", _noop)
        pool.submit("b", _noop)
        go.set()
        assert wait_until(lambda: len(outcome) == 2, 10)
    assert outcome == ["full", "full"]


@pytest.mark.timeout(20)
def test_self_try_submit_at_cap_returns_false(impl: Any) -> None:
    """try_submit never waits, so a job trying its own full key simply gets False."""
    outcome: list[object] = []
    go = threading.Event()

    def job(ctx: Context) -> None:
        go.wait(10)
        try:
            outcome.append(pool.try_submit("k", _noop))
        except QueueFull as exc:
            outcome.append(exc)

    with impl.TaskPool(queue_size=1) as pool:
        pool.submit("k", job)
        assert wait_until(lambda: pool.metrics().running == 1, 10)
        pool.submit("k", _noop)
        go.set()
        assert wait_until(lambda: len(outcome) == 1, 10)
    assert outcome == [False]


@pytest.mark.timeout(20)
def test_stop_timeout_with_job_ignoring_context(impl: Any, thread_guard: None) -> None:
    """stop(timeout) returns False instead of hanging on a job that ignores ctx; stop() again is fine."""
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def stubborn(ctx: Context) -> None:
        started.set()
        release.wait(10)  # ignores ctx on purpose
        finished.set()

    pool = impl.TaskPool()
    pool.start()
    pool.submit("k", stubborn)
    assert started.wait(10)
    t0 = time.monotonic()
    assert pool.stop(timeout=0.2) is False
    assert time.monotonic() - t0 < 5  # a hang guard, not a speed claim
    assert not finished.is_set()
    assert pool.stop(timeout=0) is False  # still running: a second stop is harmless
    release.set()
    assert finished.wait(10)
    assert pool.stop() is True
    assert pool.stop() is True
    assert pool.metrics().workers == 0


_CTRL_C_CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading, traceback
    # Whatever the parent's disposition (a background job ignores SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import keyedexec
    from keyedexec import TaskPool

    assert keyedexec.NATIVE == (os.environ.get("KEYEDEXEC_PURE_PYTHON") != "1"), keyedexec.NATIVE
    pool = TaskPool(queue_size=1, max_workers=2)
    pool.start()
    started = threading.Event()

    def blocker(ctx):
        started.set()
        ctx.wait()

    pool.submit("k", blocker)
    assert started.wait(10)
    pool.submit("k", lambda ctx: None)  # "k" is now full
    try:
        print("blocked", flush=True)
        pool.submit("k", lambda ctx: None)
    except KeyboardInterrupt as exc:
        # Raised inside submit's wait, not in print() before it.
        assert "submit" in [f.name for f in traceback.extract_tb(exc.__traceback__)]
        print("KeyboardInterrupt", flush=True)
    else:
        print("submit returned", flush=True)
        sys.exit(1)
    # The interrupted submit left the pool consistent and usable.
    m = pool.metrics()
    assert (m.submitted, m.pending, m.running) == (2, 1, 1), m
    other_ran = threading.Event()
    assert pool.try_submit("other", lambda ctx: other_ran.set())
    assert other_ran.wait(10)  # else stop() may discard it before a worker takes it
    assert pool.stop(timeout=5)
    assert pool.metrics().discarded == 1, pool.metrics()
    print("consistent", flush=True)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.timeout(60)
def test_ctrl_c_interrupts_blocked_submit(impl: Any) -> None:
    """SIGINT reaches a main thread blocked in submit(): KeyboardInterrupt, pool still consistent."""
    env = _child_env(impl)
    proc = subprocess.Popen(
        [sys.executable, "-c", _CTRL_C_CHILD],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded by the test timeout
        assert line == "blocked\n", (line, proc.stderr.read() if proc.stderr else "")
        time.sleep(0.3)  # let it get from print() into the wait
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, (out, err)
    assert out.split() == ["KeyboardInterrupt", "consistent"], (out, err)


@pytest.mark.timeout(30)
def test_threads_bounded_and_reaped(impl: Any) -> None:
    """50 busy keys share at most max_workers threads; idle threads exit after idle_timeout."""
    name = f"tp-reap-{impl.name}"
    prefix = f"{name}-worker-"
    gate = threading.Event()
    samples: list[tuple[int, int, int]] = []
    lock = threading.Lock()

    def pool_threads() -> int:
        return sum(1 for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive())

    def job(ctx: Context) -> None:
        # Held until every key is queued: the workers then never go idle mid-burst,
        # so no retiring thread can overlap a fresh one in the count.
        gate.wait(10)
        time.sleep(0.002)
        m = pool.metrics()
        with lock:
            samples.append((m.workers, m.running, pool_threads()))

    pool = impl.TaskPool(max_workers=3, idle_timeout=0.1, name=name)
    with pool:
        for key in range(50):
            pool.submit(key, job)
            m = pool.metrics()
            samples.append((m.workers, m.running, pool_threads()))
        gate.set()
        assert wait_until(lambda: pool.metrics().completed == 50, 20)
        assert max(s[0] for s in samples) == 3  # the bound was reached...
        assert all(w <= 3 and r <= 3 and t <= 3 for w, r, t in samples), samples  # ...never passed
        # Idle past idle_timeout: every pool thread retires while the pool stays open.
        assert wait_until(lambda: pool.metrics().workers == 0 and pool_threads() == 0, 10)
        # A retired pool is still usable: a new job brings a thread back.
        done = threading.Event()
        pool.submit("again", lambda ctx: done.set())
        assert done.wait(10)
    assert pool_threads() == 0


@pytest.mark.timeout(20)
def test_job_exception_is_logged_and_key_continues(
    impl: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A job's exception goes to logger "keyedexec" with its key; the key's next job still runs."""
    caplog.set_level(logging.ERROR, logger="keyedexec")
    done = threading.Event()

    def boom(ctx: Context) -> None:
        raise ValueError("boom")

    with impl.TaskPool() as pool:
        pool.submit("acct-7", boom)
        pool.submit("acct-7", lambda ctx: done.set())
        assert done.wait(10)
        assert pool.metrics().failed == 1
    records = [r for r in caplog.records if r.name == "keyedexec"]
    assert len(records) == 1
    assert "'acct-7'" in records[0].getMessage()
    assert records[0].exc_info is not None and records[0].exc_info[0] is ValueError


@pytest.mark.timeout(20)
def test_a_job_that_is_not_callable_is_refused_by_its_name(impl: Any) -> None:
    """The refusal names the parameter (``job``), before the pool is even started."""
    pool = impl.TaskPool()
    for submit in (pool.submit, pool.try_submit):
        with pytest.raises(TypeError, match=r"^job must be callable, got NoneType$"):
            submit("k", None)
    pool.start()
    try:
        for submit in (pool.submit, pool.try_submit):
            with pytest.raises(TypeError, match=r"^job must be callable, got str$"):
                submit("k", "not callable")
        assert pool.metrics().submitted == 0
    finally:
        pool.stop(timeout=10)


@pytest.mark.timeout(20)
def test_bad_input(impl: Any) -> None:
    """Bad arguments raise and queue nothing; start() is idempotent; lifecycle errors."""
    with pytest.raises(ValueError):
        impl.TaskPool(queue_size=0)
    with pytest.raises(ValueError):
        impl.TaskPool(max_workers=0)
    with pytest.raises(TypeError):
        impl.TaskPool(queue_size=True)
    with pytest.raises(TypeError):
        impl.TaskPool(idle_timeout=None)

    pool = impl.TaskPool()
    assert pool.context is None
    with pytest.raises(RuntimeError):
        pool.submit("k", _noop)
    with pytest.raises(RuntimeError):
        pool.try_submit("k", _noop)
    pool.start()
    ctx = pool.context
    pool.start()  # idempotent: same pool, same context
    assert pool.context is ctx
    try:
        with pytest.raises(TypeError):
            pool.submit(["unhashable"], _noop)
        with pytest.raises(TypeError):
            pool.try_submit({}, _noop)
        with pytest.raises(TypeError):
            pool.submit("k", "not callable")
        with pytest.raises(TypeError):
            pool.try_submit("k", None)
        m = pool.metrics()
        assert (m.submitted, m.pending, m.active_keys) == (0, 0, 0)
        assert len(pool) == 0
    finally:
        assert pool.stop() is True
    with pytest.raises(RuntimeError):
        pool.start()


@pytest.mark.timeout(20)
def test_with_statement_starts_and_stops(impl: Any, thread_guard: None) -> None:
    """``with TaskPool() as pool`` starts the pool and stops it on exit."""
    done = threading.Event()
    with impl.TaskPool() as pool:
        assert pool.context is not None and not pool.context.cancelled
        pool.submit("k", lambda ctx: done.set())
        assert done.wait(10)
    assert pool.context.cancelled
    with pytest.raises(RuntimeError):
        pool.submit("k", _noop)
    assert "stopped" in repr(pool)


@pytest.mark.timeout(20)
def test_stop_before_start(impl: Any) -> None:
    """stop() on a pool never started returns True; the pool cannot start afterwards."""
    pool = impl.TaskPool()
    assert pool.stop() is True
    with pytest.raises(RuntimeError):
        pool.start()
    with pytest.raises(RuntimeError):
        pool.submit("k", _noop)


@pytest.mark.timeout(30)
def test_drained_keys_are_reclaimed(impl: Any) -> None:
    """10,000 distinct keys, one job each: every key is freed once drained (Go keeps them all)."""
    n = 10_000
    with impl.TaskPool() as pool:
        for key in range(n):
            pool.submit(key, _noop)
        assert wait_until(lambda: pool.metrics().completed == n, 20)
        assert wait_until(lambda: len(pool) == 0, 10)
        if impl.name == "native":
            # The C memory for keys and the key table shrinks back to an empty pool's.
            empty = impl.Scheduler(1)
            assert pool._sched._native_bytes() == empty._native_bytes()
            empty.close()


# -- stop(), timeouts and sizes at their limits --------------------------------------


@pytest.mark.timeout(20)
def test_stop_with_zero_timeout_is_true_when_no_job_runs(impl: Any) -> None:
    """stop(timeout=0) answers "is a job still running?": idle worker threads do not count."""
    for _ in range(5):
        pool = impl.TaskPool(max_workers=4)
        pool.start()
        done = threading.Event()
        pool.submit("k", lambda ctx: done.set())
        assert done.wait(10)
        assert wait_until(lambda: pool.metrics().running == 0, 10)
        assert pool.metrics().workers >= 1  # an idle thread is still there
        assert pool.stop(timeout=0) is True
        assert pool.stop() is True  # joins the threads


@pytest.mark.timeout(20)
@pytest.mark.parametrize("forever", [math.inf, 1e10, threading.TIMEOUT_MAX])
def test_infinite_or_huge_timeouts_mean_no_limit(impl: Any, forever: float) -> None:
    """submit(timeout=inf) waits for room on a full key; stop(timeout=inf) waits for the jobs."""
    pool = impl.TaskPool(queue_size=1)
    pool.start()
    _, release = _blocker(pool, "k")
    pool.submit("k", _noop)  # "k" is now full
    outcome: list[object] = []

    def submitter() -> None:
        try:
            pool.submit("k", _noop, timeout=forever)
            outcome.append("queued")
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=submitter)
    t.start()
    time.sleep(0.05)  # let it reach the wait (a hang guard covers the rest)
    release.set()
    t.join(10)
    assert outcome == ["queued"]
    assert wait_until(lambda: pool.metrics().completed == 3, 10)
    assert pool.stop(timeout=forever) is True
    assert pool.metrics().workers == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("forever", [math.inf, 1e10, threading.TIMEOUT_MAX])
def test_infinite_idle_timeout_keeps_threads(impl: Any, forever: float) -> None:
    """idle_timeout=inf (or too large to wait for): idle threads never retire and are reused."""
    threads: list[threading.Thread] = []  # the objects, so that equal idents can't merge
    with impl.TaskPool(max_workers=3, idle_timeout=forever) as pool:
        for key in range(20):  # one after another, on distinct keys
            done = threading.Event()
            pool.submit(key, lambda ctx: (threads.append(threading.current_thread()), done.set()))
            assert done.wait(10)
        assert len(threads) == 20
        assert len({id(t) for t in threads}) <= 3
        assert pool.metrics().workers >= 1
        assert all(t.is_alive() for t in threads)
    assert pool.metrics().workers == 0


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"queue_size": 2**32}, ValueError, "queue_size"),
        ({"queue_size": 2**64}, ValueError, "queue_size"),
        ({"max_workers": 2**31}, ValueError, "max_workers"),
        ({"max_workers": 2**64}, ValueError, "max_workers"),
        ({"name": 5}, TypeError, "name"),
        ({"name": None}, TypeError, "name"),
        ({"idle_timeout": -math.inf}, ValueError, "idle_timeout"),
    ],
)
def test_bad_constructor_arguments_fail_at_construction(
    impl: Any, kwargs: dict[str, Any], error: type[Exception], argument: str
) -> None:
    """Every constructor argument is checked up front (not at start()), the same on both
    implementations: sizes past what the native core holds are a ValueError, not OverflowError."""
    with pytest.raises(error, match=argument):
        impl.TaskPool(**kwargs)


@pytest.mark.timeout(20)
def test_largest_sizes_are_accepted(impl: Any) -> None:
    """The upper bounds are the core's own: queue_size 2**32 - 1, max_workers 2**31 - 1."""
    with impl.TaskPool(queue_size=2**32 - 1, max_workers=2**31 - 1) as pool:
        done = threading.Event()
        pool.submit("k", lambda ctx: done.set())
        assert done.wait(10)


@pytest.mark.timeout(20)
def test_stop_rejects_bad_timeouts_before_stopping(impl: Any) -> None:
    """A bad stop() timeout raises and leaves the pool running."""
    with impl.TaskPool() as pool:
        for bad, error in ((-math.inf, ValueError), (math.nan, ValueError), ("1", TypeError)):
            with pytest.raises(error, match="timeout"):
                pool.stop(timeout=bad)
        done = threading.Event()
        pool.submit("k", lambda ctx: done.set())
        assert done.wait(10)


# -- interpreter exit ----------------------------------------------------------------

_EXIT_CHILD = textwrap.dedent(
    """
    import os, threading
    import keyedexec
    from keyedexec import TaskPool

    assert keyedexec.NATIVE == (os.environ.get("KEYEDEXEC_PURE_PYTHON") != "1"), keyedexec.NATIVE
    started = threading.Event()
    ran, outcomes = [], []

    def waits_for_cancel(ctx):
        started.set()
        outcomes.append("cancelled" if ctx.wait(60) else "timed out")

    pool = TaskPool(queue_size=10, max_workers=2)
    pool.start()
    pool.submit("k", waits_for_cancel)
    pool.submit("k", lambda ctx: ran.append(ctx))  # queued behind it: skipped at exit
    assert started.wait(10)

    dropped = TaskPool(max_workers=1)  # dropped without stop(): its job must end too
    dropped.start()
    dropped_started = threading.Event()
    dropped.submit("d", lambda ctx: (dropped_started.set(), waits_for_cancel(ctx)))
    assert dropped_started.wait(10)  # else exit may cancel it before it starts
    del dropped

    def report():
        print(*outcomes, sep="\\n")
        print("queued job ran" if ran else "queued job skipped", flush=True)

    import atexit
    atexit.register(report)  # atexit runs after threading joined the workers
    print("exiting", flush=True)
    """
)


@pytest.mark.timeout(60)
def test_interpreter_exit_cancels_the_pool_context(impl: Any) -> None:
    """Exit without stop(): the pool's context is cancelled, so a job waiting on it ends and
    the jobs queued behind it are skipped; the process exits promptly."""
    env = _child_env(impl)
    proc = subprocess.run(
        [sys.executable, "-c", _EXIT_CHILD],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,  # the bug: the child hangs at exit forever
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "exiting", proc.stdout
    assert lines[1:] == ["cancelled", "cancelled", "queued job skipped"], proc.stdout
