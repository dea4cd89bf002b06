"""Concurrency stress: many submitting threads at once, with readers and cancellers.

These run on every interpreter; on a free-threaded build (3.13t, ``make
test-ft``) the submitters, readers and workers truly run in parallel, which is
where a missing lock or a non-atomic claim in the scheduler would show.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import threading
from collections import Counter, defaultdict
from typing import Any

import pytest

from conftest import STRESS, wait_until

THREADS = 8
PER_THREAD = max(50, int(400 * STRESS))

FREE_THREADED_BUILD = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


def _run_threads(targets: list[Any]) -> None:
    """Start every target behind one barrier (maximum overlap), join them, re-raise the first error."""
    barrier = threading.Barrier(len(targets))
    errors: list[BaseException] = []

    def wrap(fn: Any) -> None:
        try:
            barrier.wait()
            fn()
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@pytest.mark.timeout(60)
def test_parallel_submitters_exactly_once_in_order(impl: Any) -> None:
    """8 threads submit to shared keys, own keys and cancellable keys while another
    thread reads metrics() and another calls cancel_key(): every task runs exactly
    once or is cancelled, each submitter's tasks run in its order on every key, no
    two tasks of a key overlap, and the counters add up."""
    shared = [f"shared-{i}" for i in range(4)]
    doomed = ["doomed-0", "doomed-1"]  # the canceller's targets
    log: dict[str, list[tuple[int, int]]] = defaultdict(list)
    busy: dict[str, threading.Lock] = {k: threading.Lock() for k in shared + doomed}
    busy.update({f"own-{t}": threading.Lock() for t in range(THREADS)})
    overlaps: list[str] = []
    futures: list[tuple[str, int, int, Any]] = []
    futures_lock = threading.Lock()
    submitting = threading.Event()
    cancelled_by_key = 0

    def task(key: str, thread: int, seq: int) -> int:
        # A second task of the same key running now would find the lock taken.
        if not busy[key].acquire(blocking=False):
            overlaps.append(key)
            return seq
        try:
            log[key].append((thread, seq))
        finally:
            busy[key].release()
        return seq

    with impl.KeyedExecutor(4) as ex:

        def submitter(thread: int) -> None:
            mine = []
            for seq in range(PER_THREAD):
                own = f"own-{thread}"
                ex.execute(own, task, own, thread, seq)
                key = shared[(thread + seq) % len(shared)]
                mine.append((key, thread, seq, ex.submit(key, task, key, thread, seq)))
                key = doomed[seq % len(doomed)]
                mine.append((key, thread, seq, ex.submit(key, task, key, thread, seq)))
            with futures_lock:
                futures.extend(mine)

        def reader() -> None:
            last = ex.metrics()
            while submitting.is_set() or last.pending or last.running:
                m = ex.metrics()
                assert min(m) >= 0, m
                assert m.running <= m.workers <= 4, m
                assert m.completed + m.cancelled + m.running + m.pending == m.submitted, m
                assert m.failed == 0, m
                # One snapshot under the scheduler's lock: counters never go back.
                assert m.submitted >= last.submitted and m.completed >= last.completed, (last, m)
                assert m.cancelled >= last.cancelled, (last, m)
                last = m

        def canceller() -> None:
            nonlocal cancelled_by_key
            while submitting.is_set():
                for key in doomed:
                    cancelled_by_key += ex.cancel_key(key)
                    ex.pending(key)

        submitting.set()

        def submitters_then_clear() -> None:
            try:
                _run_threads([lambda t=t: submitter(t) for t in range(THREADS)])
            finally:
                submitting.clear()

        _run_threads([submitters_then_clear, reader, canceller])

    assert not overlaps
    m = ex.metrics()
    total = THREADS * PER_THREAD * 3
    assert (m.submitted, m.pending, m.running, m.active_keys, m.failed) == (total, 0, 0, 0, 0)
    assert m.completed + m.cancelled == total
    assert m.cancelled == cancelled_by_key

    # Exactly once: every executed task appears once; a cancelled one never.
    seen = Counter((k, t, s) for k, entries in log.items() for t, s in entries)
    assert max(seen.values()) == 1
    for key, thread, seq, fut in futures:
        if key.startswith("shared"):
            assert fut.result(0) == seq
        assert fut.cancelled() == ((key, thread, seq) not in seen), (key, thread, seq)
    assert sum(seen.values()) == m.completed

    # Per-key order: each submitter's tasks ran in its submission order.
    for key, entries in log.items():
        by_thread: dict[int, list[int]] = defaultdict(list)
        for thread, seq in entries:
            by_thread[thread].append(seq)
        for thread, seqs in by_thread.items():
            assert seqs == sorted(seqs), (key, thread)
        if key.startswith("own"):
            assert [s for _, s in entries] == list(range(PER_THREAD))


@pytest.mark.timeout(60)
def test_cancel_races_the_worker_claim(impl: Any) -> None:
    """Threads call Future.cancel() while the workers start the same tasks: each
    task either ran (cancel() returned False) or was cancelled (cancel() returned
    True and it never ran), never both, never neither."""
    n = max(200, int(2000 * STRESS))
    ran = [0] * n

    def task(i: int) -> None:
        ran[i] += 1  # one writer per index: tasks of a key never overlap

    with impl.KeyedExecutor(4) as ex:
        futures = [ex.submit(i % 8, task, i) for i in range(n)]
        outcomes: list[bool | None] = [None] * n

        def cancel_every(start: int) -> None:
            for i in range(start, n, 4):
                outcomes[i] = futures[i].cancel()

        _run_threads([lambda s=s: cancel_every(s) for s in range(4)])

    for i, fut in enumerate(futures):
        assert fut.done()
        assert ran[i] == (0 if outcomes[i] else 1), (i, outcomes[i], ran[i])
        assert fut.cancelled() == outcomes[i]
    m = ex.metrics()
    assert m.completed == sum(ran) and m.completed + m.cancelled == n


@pytest.mark.timeout(60)
def test_many_waiters_on_shared_futures(impl: Any) -> None:
    """Several threads block in result() on the same futures while the workers
    complete them: every waiter wakes with the right value (no lost wake-up)."""
    n = max(100, int(500 * STRESS))
    with impl.KeyedExecutor(4) as ex:
        futures = [ex.submit(i % 4, pow, i, 2) for i in range(n)]

        def waiter() -> None:
            for i in reversed(range(n)):
                assert futures[i].result(timeout=30) == i * i

        _run_threads([waiter] * 6)


@pytest.mark.timeout(60)
def test_done_callbacks_race_completion(impl: Any) -> None:
    """Threads add done-callbacks while the workers complete the same futures:
    every callback runs exactly once, whether added before or after completion."""
    n = max(200, int(1000 * STRESS))
    calls = Counter[tuple[int, int]]()
    calls_lock = threading.Lock()

    def note(i: int, adder: int) -> Any:
        def callback(fut: Any) -> None:
            assert fut.result() == i
            with calls_lock:
                calls[(i, adder)] += 1

        return callback

    with impl.KeyedExecutor(4) as ex:
        futures = [ex.submit(i % 16, int, i) for i in range(n)]

        def adder(a: int) -> None:
            for i, fut in enumerate(futures):
                fut.add_done_callback(note(i, a))

        _run_threads([lambda a=a: adder(a) for a in range(4)])
    assert calls == Counter({(i, a): 1 for i in range(n) for a in range(4)})


@pytest.mark.timeout(60)
def test_taskpool_backpressure_from_many_threads(impl: Any) -> None:
    """8 threads push into small per-key queues (submit blocks while a key is full):
    every job runs exactly once and each submitter's jobs keep their order per key."""
    per_thread = max(50, int(300 * STRESS))
    keys = ["a", "b", "c"]
    log: dict[str, list[tuple[int, int]]] = defaultdict(list)

    def job(key: str, thread: int, seq: int) -> Any:
        return lambda ctx: log[key].append((thread, seq))

    with impl.TaskPool(queue_size=4, max_workers=3) as pool:

        def submitter(thread: int) -> None:
            for seq in range(per_thread):
                key = keys[(thread + seq) % len(keys)]
                pool.submit(key, job(key, thread, seq), timeout=30)

        _run_threads([lambda t=t: submitter(t) for t in range(THREADS)])
        # stop() discards what is still queued: let the pool drain first.
        assert wait_until(lambda: pool.metrics().completed == THREADS * per_thread, 30)
        assert pool.stop(timeout=30)
        m = pool.metrics()
    assert (m.submitted, m.completed, m.discarded, m.failed) == (THREADS * per_thread,) * 2 + (0, 0)
    seen = Counter((k, t, s) for k, entries in log.items() for t, s in entries)
    assert len(seen) == THREADS * per_thread and max(seen.values()) == 1
    for key, entries in log.items():
        for thread in range(THREADS):
            seqs = [s for t, s in entries if t == thread]
            assert seqs == sorted(seqs), (key, thread)


@pytest.mark.timeout(60)
def test_keys_queued_together_on_idle_workers_all_get_one(h: Any) -> None:
    """An idle worker polls for work a moment before it sleeps, and submitters wake
    nobody while it does; the keys queued meanwhile must still each get a worker
    (the poller takes one and wakes a sleeper, which wakes the next ...): the
    tasks meet at a barrier that only all four together can pass."""
    ex = h.executor(4)
    warm = threading.Barrier(4, timeout=h.wait)
    for f in [ex.submit(("warm", i), warm.wait) for i in range(4)]:
        f.result(h.wait)
    for round_ in range(30):   # each round starts with the workers idle again
        meet = threading.Barrier(4, timeout=h.wait)
        # A no-op first: its worker is polling, or about to, as the others arrive.
        ex.execute(("lead", round_), int)
        futures = [ex.submit((round_, i), meet.wait) for i in range(4)]
        for f in futures:
            f.result(h.wait)   # BrokenBarrierError if a key waited behind another
        assert wait_until(lambda: ex.metrics().running == 0, h.wait)


@pytest.mark.timeout(60)
@pytest.mark.skipif(not FREE_THREADED_BUILD, reason="needs a free-threaded (3.13t) build")
def test_import_keeps_the_gil_disabled() -> None:
    """Importing keyedexec and its compiled core does not switch the GIL back on
    (the extension declares itself free-threading compatible)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHON_GIL"}
    code = (
        "import sys, keyedexec, keyedexec._core\n"
        "assert keyedexec.NATIVE\n"
        "assert not sys._is_gil_enabled(), 'the GIL was re-enabled'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 0, proc.stderr
