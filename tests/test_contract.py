"""The README's guarantees on the paths an adversarial review broke (issue 13, part A).

Each test reproduces one finding: key __eq__ and finalizers that use the executor,
executors shut down from their own tasks, worker threads that cannot start,
wait_key's barrier, keys mutated while they run, fork with a task running, and
signal handlers that raise inside a submit. Hangs and crashes run in a child
interpreter, bounded by a timeout.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import sys
import threading
import time
from typing import Any

import pytest

from conftest import wait_until
from test_process import _fork, _ok, _reap, _run


# -- keys whose __eq__ uses the executor -------------------------------------------------


@pytest.mark.timeout(120)
def test_eq_that_submits_from_many_threads_on_small_stacks(impl: Any) -> None:
    """Keys whose __eq__ calls ex.execute, from 3 producer threads with 256 KiB
    stacks (musl's default range): the native core used to recurse once per
    deferred submit until it crashed; the pure one raised RecursionError in a
    worker and then hung in shutdown. Every task must run."""
    proc = _run(impl, """
        import threading, faulthandler
        from keyedexec import KeyedExecutor
        faulthandler.dump_traceback_later(60, exit=True)
        threading.stack_size(256 * 1024)
        ex = KeyedExecutor(2)
        ran = []
        count = threading.Lock()

        class Key:
            def __init__(self, v):
                self.v = v
            def __hash__(self):
                return 1  # every key collides: each lookup compares
            def __eq__(self, other):
                ex.execute(("inner", self.v % 8), ran.append, 1)
                return isinstance(other, Key) and self.v == other.v

        def produce(base):
            for i in range(3000):  # up to 600 live keys of one hash: many compares per submit
                ex.execute(Key(base + i % 200), ran.append, 1)

        threads = [threading.Thread(target=produce, args=(n * 100000,)) for n in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ex.shutdown()
        m = ex.metrics()
        say(m.submitted == len(ran) == m.completed, m.failed)
    """, timeout=100)
    assert _ok(proc) == ["True 0"]


@pytest.mark.timeout(120)
def test_submits_made_inside_eq_keep_their_order(impl: Any) -> None:
    """Inside a key's __eq__, execute((n, "A")) then execute((n, "B")) on one
    key, while two threads poll pending(): A always runs before B (the native
    core's shared deferred queue let another thread's drain push B first)."""
    proc = _run(impl, """
        import itertools, threading
        from keyedexec import KeyedExecutor
        ex = KeyedExecutor(4)
        calls = itertools.count()
        seen = {}
        bad = []

        def record(n, tag):
            seen.setdefault(n, []).append(tag)

        class Key:
            def __init__(self, n):
                self.n = n
            def __hash__(self):
                return 3
            def __eq__(self, other):
                if isinstance(other, Key):
                    m = next(calls)  # one pair per call, whichever thread compares
                    ex.execute(("pair", m % 64), record, m, "A")
                    ex.execute(("pair", m % 64), record, m, "B")
                return self is other

        stop = threading.Event()
        def poll():
            while not stop.is_set():
                ex.pending("zzz")
        pollers = [threading.Thread(target=poll) for _ in range(2)]
        for t in pollers:
            t.start()
        gate = threading.Event()
        ex.execute(Key(-1), gate.wait, 30)   # keeps a colliding key in the table
        for n in range(20000):
            ex.execute(Key(n), abs, 1)
        gate.set()
        stop.set()
        for t in pollers:
            t.join()
        ex.shutdown()
        bad = [m for m, tags in seen.items() if tags != ["A", "B"]]
        say(len(bad), len(seen) > 0, ex.metrics().failed)
    """, timeout=100)
    assert _ok(proc) == ["0 True 0"]


@pytest.mark.timeout(60)
def test_submit_inside_eq_whose_own_key_fails_is_not_lost(impl: Any) -> None:
    """A submit made from inside another key's __eq__, whose own key's __eq__
    raises: the error reaches someone, nothing is left PENDING, and shutdown
    returns with every worker accounted for (it used to hang)."""
    proc = _run(impl, """
        import threading, faulthandler
        from keyedexec import KeyedExecutor
        faulthandler.dump_traceback_later(20, exit=True)
        inner = []

        class K:
            def __init__(s, v, hook=None, bad=False):
                s.v, s.hook, s.bad = v, hook, bad
            def __hash__(s):
                return 7
            def __eq__(s, o):
                if getattr(o, "hook", None):
                    h, o.hook = o.hook, None
                    h()
                if s.bad or getattr(o, "bad", False):
                    raise ValueError("bad key")
                return s.v == o.v

        ex = KeyedExecutor(2)
        g = threading.Event()
        first = ex.submit(K(1), g.wait, 5)

        def hook():
            try:
                inner.append(ex.submit(K(3, bad=True), int))
            except ValueError:
                inner.append("refused")

        outer = ex.submit(K(2, hook=hook), print)
        g.set()
        ex.shutdown()
        m = ex.metrics()
        done = all(f.done() for f in [first, outer] + [f for f in inner if f != "refused"])
        say(done, m.submitted == m.completed + m.cancelled, m.workers)
    """)
    assert _ok(proc)[-1] == "True True 0"


@pytest.mark.timeout(120)
def test_finalizers_that_submit_under_gc_pressure(impl: Any) -> None:
    """Cyclic garbage whose __del__ submits, collected every few allocations,
    made by producer threads and by the tasks themselves: no hang (the pure
    scheduler's recursive drain hit RecursionError and lost a worker), and
    every accepted task runs."""
    proc = _run(impl, """
        import gc, threading, faulthandler
        from keyedexec import KeyedExecutor
        faulthandler.dump_traceback_later(80, exit=True)
        ex = KeyedExecutor(3)
        ran = []
        accepted = []

        class Garbage:
            def __init__(self, n):
                self.me, self.n = self, n
            def __del__(self):
                try:
                    ex.execute(self.n % 5, ran.append, 1)
                except RuntimeError:  # collected once shut down: refused, as it should be
                    return
                accepted.append(1)

        def task(i):  # workers make garbage too
            Garbage(i)
            Garbage(i + 1)
            ran.append(1)

        def produce(base):
            for i in range(3000):
                Garbage(base + i)
                ex.execute((base + i) % 7, task, i)
                accepted.append(1)

        gc.set_threshold(10, 1, 1)
        threads = [threading.Thread(target=produce, args=(n * 10000,)) for n in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        gc.set_threshold(700, 10, 10)
        gc.collect()
        ex.shutdown()
        say(len(accepted) == len(ran), ex.metrics().failed)
    """, timeout=110)
    assert _ok(proc) == ["True 0"]


# -- shutdown from the executor's own tasks ---------------------------------------------


@pytest.mark.timeout(30)
def test_two_tasks_that_each_shut_down_both_return(h: Any) -> None:
    """Each task waits in shutdown(wait=True) for the workers other than its own;
    two such tasks used to wait for each other forever."""
    ex = h.executor(2)
    both = threading.Barrier(2, timeout=10)

    def stopper() -> str:
        both.wait()
        ex.shutdown(wait=True)
        return "returned"

    fs = [ex.submit(k, stopper) for k in ("a", "b")]
    assert [f.result(10) for f in fs] == ["returned", "returned"]
    ex.shutdown(wait=True)
    assert ex.metrics().workers == 0


@pytest.mark.timeout(30)
def test_task_shutdown_still_waits_for_other_running_tasks(h: Any) -> None:
    """The exemption covers tasks waiting in shutdown only: a task's
    shutdown(wait=True) still waits for another key's running task."""
    ex = h.executor(2)
    gate, blocker = h.block(ex, "slow")
    returned = threading.Event()

    def stopper() -> None:
        ex.shutdown(wait=True)
        returned.set()

    f = ex.submit("stopper", stopper)
    assert not returned.wait(0.3)
    gate.set()
    f.result(10)
    assert blocker.result(10) == "blocker"


# -- worker threads that cannot start ------------------------------------------------------


def _failing_start(self: threading.Thread) -> None:
    raise RuntimeError("can't start new thread")


@pytest.mark.timeout(30)
def test_failed_worker_start_queues_nothing(impl: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """No worker can start and none runs: submit raises and nothing stays
    queued (the task used to stay queued, its key stuck with no worker)."""
    ex = impl.KeyedExecutor(2)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(threading.Thread, "start", _failing_start)
            with pytest.raises(RuntimeError, match="can't start new thread"):
                ex.submit("k", lambda: "ran")
            m = ex.metrics()
            assert (m.workers, m.pending, m.active_keys, m.submitted) == (0, 0, 0, 0), m
            assert ex.pending("k") == 0
        assert ex.submit("k", lambda: "ran").result(10) == "ran"
    finally:
        ex.shutdown(wait=True)


@pytest.mark.timeout(30)
def test_failed_extra_worker_start_lets_running_workers_serve(
    h: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker already runs: a second one that cannot start is logged, the
    submit succeeds and the task runs once the running worker is free."""
    ex = h.executor(2)
    gate, blocker = h.block(ex, "busy")
    with monkeypatch.context() as patch:
        patch.setattr(threading.Thread, "start", _failing_start)
        f = ex.submit("other", lambda: "ran")
    assert "could not start another worker" in caplog.text
    gate.set()
    assert f.result(10) == "ran"
    assert blocker.result(10) == "blocker"


# -- wait_key's barrier -------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_polling_wait_key_leaves_nothing_queued(h: Any) -> None:
    """Each timed-out wait_key used to leave its cancelled barrier queued:
    100 k polls meant 100,000 queued no-ops and about 150 MB."""
    ex = h.executor(2)
    gate, _ = h.block(ex, "k")
    ex.execute("k", abs, -1)
    for _ in range(300):
        assert ex.wait_key("k", timeout=0) is False
    assert ex.pending("k") == 1
    m = ex.metrics()
    assert m.pending == 1 and m.submitted == m.completed + m.cancelled + m.running + m.pending
    gate.set()
    assert ex.wait_key("k", timeout=10) is True


@pytest.mark.timeout(30)
def test_wait_key_is_not_fooled_by_cancel_key(h: Any) -> None:
    """cancel_key drops wait_key's barrier while the key's task still runs:
    wait_key must go on waiting for that task, not return True."""
    ex = h.executor(2)
    gate, blocker = h.block(ex, "k")
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(ex.wait_key("k", timeout=10)))
    waiter.start()
    assert wait_until(lambda: ex.pending("k") == 1)  # the barrier is queued
    assert ex.cancel_key("k") == 1
    time.sleep(0.2)
    assert result == [] and not blocker.done()
    gate.set()
    waiter.join(10)
    assert result == [True] and blocker.done()


# -- keys mutated while they run ----------------------------------------------------------------


class _MutableKey:
    def __init__(self, v: int) -> None:
        self.v = v

    def __hash__(self) -> int:
        return hash(self.v)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _MutableKey) and other.v == self.v


@pytest.mark.timeout(30)
def test_key_mutated_while_its_task_runs(h: Any) -> None:
    """The pure scheduler's worker died (KeyError) freeing a key whose hash had
    changed; the executor must stay usable and shut down cleanly."""
    ex = h.executor(1)
    key = _MutableKey(1)

    def mutate() -> str:
        key.v = 2
        return "mutated"

    assert ex.submit(key, mutate).result(10) == "mutated"
    assert wait_until(lambda: ex.metrics().active_keys == 0)
    assert ex.submit("after", lambda: "ran").result(10) == "ran"
    assert ex.metrics().workers == 1


# -- fork with a task running -----------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.timeout(60)
def test_fork_cancels_the_futures_of_running_tasks_in_the_child(h: Any) -> None:
    """A task running at fork time never finishes in the child: its future
    there must end done (cancelled), not stay RUNNING forever."""
    ex = h.executor(2)
    gate, running = h.block(ex, "k")
    queued = ex.submit("k", abs, -1)
    pid = _fork()
    if pid == 0:  # the child: leave only through os._exit
        code = 1
        try:
            ok = running.cancelled() and queued.cancelled()
            cf.wait([running, queued], timeout=5)
            code = 0 if ok else 2
        finally:
            os._exit(code)
    assert _reap(pid, 30) == 0
    gate.set()
    assert running.result(10) == "blocker"
    assert queued.result(10) == 1


# -- signal handlers that raise inside submit ------------------------------------------------


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")
@pytest.mark.timeout(60)
def test_signal_raising_inside_submit_keeps_the_state_true(impl: Any) -> None:
    """SIGALRM every 0.2 ms raises from its handler on the main thread, which
    submits in a loop: a submit that raised queued nothing, every accepted
    task ran once, and the counters add up (pending used to end negative).
    (A worker that takes the task in the instant between its queueing and the
    raise runs it: the worker is kept busy here so that none can.)"""
    proc = _run(impl, """
        import signal
        from keyedexec import KeyedExecutor

        class Tick(Exception):
            pass

        armed = [False]

        def handler(signum, frame):
            if armed[0]:  # once per submit, and never outside one
                armed[0] = False
                raise Tick

        import threading
        ran, inside, ticks = [], set(), 0
        ex = KeyedExecutor(1)
        # The worker starts before the ticks (threading.Thread.start is not
        # signal-safe) and stays busy during them: no task starts before its
        # submit has returned or raised.
        started, gate = threading.Event(), threading.Event()
        ex.execute("gate", lambda: (started.set(), gate.wait(60)))
        started.wait(10)
        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
        for i in range(30000):
            armed[0] = True
            try:
                ex.execute(i % 8, ran.append, i)
                armed[0] = False
            except Tick as exc:
                ticks += 1
                frames, tb = [], exc.__traceback__.tb_next
                while tb is not None and tb.tb_frame.f_code is not handler.__code__:
                    frames.append(tb.tb_frame.f_code.co_name)
                    tb = tb.tb_next
                if len(frames) >= 2:  # raised in the scheduler, below execute itself
                    inside.add(i)
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        gate.set()
        ex.shutdown()
        m = ex.metrics()
        say(inside.isdisjoint(ran), len(set(ran)) == len(ran) == m.submitted - 1 == m.completed - 1,
            m.pending, ticks > 0)
    """, timeout=50)
    assert _ok(proc) == ["True True 0 True"]


# -- the native core's unlocked key comparison --------------------------------------------------


class _Slow:
    """A key of hash 7 whose __eq__ can be held open (``hold``) on its first call
    (a dict, and the core, call the stored key's __eq__ first)."""

    def __init__(self, v: int, hold: threading.Event | None = None,
                 comparing: threading.Event | None = None) -> None:
        self.v, self.hold, self.comparing = v, hold, comparing

    def __hash__(self) -> int:
        return 7

    def __eq__(self, other: object) -> bool:
        if self.hold is not None and self.comparing is not None:
            hold, self.hold = self.hold, None
            self.comparing.set()
            assert hold.wait(10)
        return isinstance(other, _Slow) and other.v == self.v


@pytest.mark.native_only
@pytest.mark.timeout(30)
def test_key_inserted_while_another_compares_unlocked(h: Any) -> None:
    """The native core compares non-plain keys with its lock released. While B
    is being compared with A, an equal key C is queued: B's answer ("no match")
    is stale, and B must be queued behind C on the same key, not get a second
    state (two tasks of one key would run at once)."""
    ex = h.executor(2)  # both busy (A, C) when B is queued: no worker start re-runs B's lookup
    hold, comparing = threading.Event(), threading.Event()
    gate_a, _ = h.block(ex, _Slow(1, hold, comparing))  # A: its __eq__ is held open
    order: list[str] = []
    gate_c = h.gate()

    def c_task() -> None:
        order.append("c start")
        gate_c.wait(10)
        order.append("c end")

    submitted = threading.Thread(
        target=lambda: ex.submit(_Slow(2), order.append, "b"))
    submitted.start()
    assert comparing.wait(10)  # A == B runs, with the core's lock released
    fc = ex.submit(_Slow(2), c_task)
    assert wait_until(lambda: order == ["c start"])
    hold.set()
    submitted.join(10)
    assert ex.metrics().active_keys == 2  # A, and C with B queued behind it
    assert ex.pending(_Slow(2)) == 1
    gate_c.set()
    fc.result(10)
    assert wait_until(lambda: order == ["c start", "c end", "b"])
    gate_a.set()


# -- found by the second break round --------------------------------------------------------------


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.timeout(30)
def test_worker_thread_that_fails_before_starting_gives_its_slot_back(
    impl: Any, monkeypatch: pytest.MonkeyPatch, error: type[BaseException]
) -> None:
    """Creating or naming the worker's Thread raised (a signal handler may, too):
    the reserved worker slot must be given back, or later tasks never run."""
    ex = impl.KeyedExecutor(1)
    original = threading.Thread.__init__
    once = [1]

    def failing_init(self: threading.Thread, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if once:
            once.pop()
            raise error("can't start new thread")

    try:
        with monkeypatch.context() as patch:
            patch.setattr(threading.Thread, "__init__", failing_init)
            with pytest.raises(error):
                ex.submit("a", int)
        m = ex.metrics()
        assert (m.workers, m.pending, m.submitted) == (0, 0, 0), m
        assert ex.submit("b", lambda: "ran").result(10) == "ran"
    finally:
        ex.shutdown(wait=True)
    assert ex.metrics().workers == 0


@pytest.mark.timeout(30)
def test_worker_thread_started_before_start_raised_is_counted_once(
    impl: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thread.start() raised (Ctrl-C) after the thread had started: it runs and
    accounts for itself; the pool never exceeds its size, and ends at zero."""
    ex = impl.KeyedExecutor(1)
    original = threading.Thread.start
    once = [1]

    def interrupted_start(self: threading.Thread) -> None:
        original(self)
        if once:
            once.pop()
            raise KeyboardInterrupt

    try:
        with monkeypatch.context() as patch:
            patch.setattr(threading.Thread, "start", interrupted_start)
            with pytest.raises(KeyboardInterrupt):
                ex.submit("a", int)
        running: list[int] = []
        most = [0]
        lock = threading.Lock()

        def task() -> None:
            with lock:
                running.append(1)
                most[0] = max(most[0], len(running))
            time.sleep(0.02)
            with lock:
                running.pop()

        cf.wait([ex.submit(k, task) for k in range(4)], timeout=10)
        assert most[0] == 1
        assert ex.metrics().workers == 1
    finally:
        ex.shutdown(wait=True)
    assert ex.metrics().workers == 0


class _CountingKey:
    calls = 0

    def __init__(self, name: str) -> None:
        self.name = name

    def __hash__(self) -> int:
        return 7

    def __eq__(self, other: object) -> bool:
        type(self).calls += 1
        time.sleep(0.01)
        return isinstance(other, _CountingKey) and other.name == self.name


@pytest.mark.timeout(30)
def test_lookup_is_not_starved_by_other_keys_coming_and_going(h: Any) -> None:
    """Keys of other hashes entering and leaving the table while a key's Python
    __eq__ runs unlocked must not make the lookup start over (the core once
    retried on any change in the hash's stripe: 496 comparisons in 10 s)."""
    ex = h.executor(2)
    gate, _ = h.block(ex, _CountingKey("a"))
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            ex.execute(7 + 64 * (1 + i % 50), int)  # same low bits as hash 7
            i += 1
            time.sleep(0.0002)

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        _CountingKey.calls = 0
        f = ex.submit(_CountingKey("a"), lambda: "queued")
        assert _CountingKey.calls == 1
    finally:
        stop.set()
        churner.join(10)
    gate.set()
    assert f.result(10) == "queued"


@pytest.mark.timeout(60)
def test_str_and_bytes_keys_under_python_b(impl: Any) -> None:
    """hash("abc") == hash(b"abc"); under python -b comparing them warns, which
    runs Python code (warnings.showwarning): that must not happen under the
    native core's lock (a showwarning that reads the executor deadlocked)."""
    import subprocess

    from test_process import _child_env, _script

    cmd = _script(impl, """
        import threading, warnings
        from keyedexec import KeyedExecutor
        ex = KeyedExecutor(2)
        seen = []
        warnings.showwarning = lambda *a, **k: seen.append(ex.metrics().pending)
        ev = threading.Event()
        ex.submit("abc", ev.wait, 10)
        ex.submit(b"abc", int).result(10)
        ev.set()
        ex.shutdown()
        say(len(seen) > 0)
    """)
    proc = subprocess.run([cmd[0], "-b", *cmd[1:]], env=_child_env(impl), capture_output=True,
                          text=True, timeout=50)
    assert _ok(proc) == ["True"]


@pytest.mark.timeout(30)
def test_wait_key_from_a_keys_eq(h: Any) -> None:
    """wait_key from a key's __eq__: the native core runs it unlocked, so it
    works; the pure scheduler runs it under its lock, so it raises
    RuntimeError (it used to hang every worker)."""
    ex = h.executor(2)
    outcome: list[str] = []

    class Key:
        def __init__(self, v: str) -> None:
            self.v = v

        def __hash__(self) -> int:
            return 1

        def __eq__(self, other: object) -> bool:
            if "probe" in (self.v, getattr(other, "v", None)) and not outcome:
                try:
                    outcome.append(f"waited {ex.wait_key('other', timeout=5)}")
                except RuntimeError as exc:
                    outcome.append(f"refused {exc}")
            return isinstance(other, Key) and self.v == other.v

    ex.submit("other", time.sleep, 0.05)
    gate, _ = h.block(ex, Key("x"))
    assert ex.submit(Key("probe"), lambda: "ran").result(10) == "ran"
    expected = "waited True" if h.impl.name == "native" else "refused keyedexec: waiting"
    assert outcome and outcome[0].startswith(expected), outcome
    gate.set()


@pytest.mark.timeout(30)
def test_wait_key_after_shutdown_from_a_task_is_not_fooled(h: Any) -> None:
    """Shut down, then wait_key from a task with the only worker busy running
    it: "b" stays queued, so wait_key must time out (it returned True)."""
    ex = h.executor(1)
    queued = threading.Event()

    def task() -> tuple[bool, int]:
        queued.wait(10)
        ex.shutdown(wait=False)
        return ex.wait_key("b", timeout=0.3), ex.pending("b")

    f = ex.submit("a", task)
    ex.submit("b", time.sleep, 0.01)
    queued.set()
    assert f.result(10) == (False, 1)


def _settled(m: Any) -> bool:
    """No worker left, and every accepted task accounted for."""
    return m.workers == 0 and m.submitted == m.completed + m.cancelled + m.pending


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.timeout(60)
def test_fork_from_inside_a_task(h: Any) -> None:
    """A task forks. In the child only that worker thread exists and it lives
    on: its own future is not cancelled (the task finishes there too), the
    worker count ends at 0 (it went to -1), the other running task's future is
    cancelled, and the counters add up."""
    ex = h.executor(2)
    gate, other = h.block(ex, "other")
    holder: dict[str, Any] = {}
    submitted = threading.Event()

    def check_in_child() -> None:  # a thread of the child; leaves only through os._exit
        code = 1
        try:
            f = holder["f"]
            ok = f.result(10) == "child" and not f.cancelled() and other.cancelled()
            # The survivor's bookkeeping follows its future's result: let it settle.
            ok = ok and wait_until(lambda: _settled(ex.metrics()), 5)
            code = 0 if ok else 2
        finally:
            os._exit(code)

    def task() -> str:
        submitted.wait(10)
        pid = _fork()
        if pid == 0:
            threading.Thread(target=check_in_child).start()
            return "child"
        holder["pid"] = pid
        return "parent"

    holder["f"] = ex.submit("k", task)
    submitted.set()
    assert holder["f"].result(10) == "parent"
    assert _reap(holder["pid"], 30) == 0
    gate.set()
    assert other.result(10) == "blocker"


@pytest.mark.timeout(30)
def test_pool_with_zero_idle_timeout_accepts_jobs(impl: Any) -> None:
    """idle_timeout=0: a worker started for a job used to retire before the job
    was queued, forever (the pure pool livelocked, starting thousands of threads)."""
    pool = impl.TaskPool(idle_timeout=0, max_workers=2)
    pool.start()
    ran: list[int] = []
    for i in range(20):
        pool.submit(i % 3, lambda ctx, i=i: ran.append(i))
    assert wait_until(lambda: len(ran) == 20)
    assert pool.stop(timeout=10)
    assert pool.metrics().workers == 0
