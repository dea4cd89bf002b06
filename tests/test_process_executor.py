"""ProcessKeyedExecutor (keyedexec.process) and its router (keyedexec._router).

Tasks run in child processes, on both ``spawn`` and ``fork`` where the platform
has them. Task functions live in ``_process_tasks`` so that a spawned child
imports that module only. Gates between processes are files: a task blocks its
key until the test creates the file. Executors that a test owns are opened with
``fresh()``, which checks afterwards that no child process (zombie included) is
left behind.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import math
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
from hypothesis import HealthCheck, given, settings

import _process_tasks as tasks
import _routed_checks as routed
from conftest import wait_until
from keyedexec import KeyedExecutor, ShardLost
from keyedexec._router import CANCEL_KEY, RemoteError, RemoteTraceback, Sequencer, ShardHost
from keyedexec.process import BrokenProcessPool, ProcessKeyedExecutor

METHODS = [m for m in ("spawn", "fork") if m in multiprocessing.get_all_start_methods()]

pytestmark = [
    pytest.mark.timeout(120),
    # fork from a process with threads (this one) warns on 3.12+: the test asks for it.
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]


def _children() -> set[int]:
    """This process's descendants, but multiprocessing's resource tracker: a
    singleton that spawn starts once and keeps until the interpreter exits."""
    pids = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if "multiprocessing.resource_tracker" in " ".join(p.cmdline()):
                continue
        except psutil.Error:
            pass
        pids.add(p.pid)
    return pids


@contextlib.contextmanager
def fresh(*args: Any, **kw: Any) -> Iterator[ProcessKeyedExecutor[Any]]:
    """An executor of the test's own; afterwards, no process of it is left (nor a zombie)."""
    before = _children()
    ex: ProcessKeyedExecutor[Any] = ProcessKeyedExecutor(*args, **kw)
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
    assert wait_until(lambda: _children() <= before, 10), _children() - before


@pytest.fixture(scope="module", params=METHODS)
def method(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def ex(method: str) -> Iterator[ProcessKeyedExecutor[Any]]:
    """Shared by the tests that leave it as they found it: 2 children, 2 workers each."""
    with fresh(2, 2, mp_context=method) as shared:
        yield shared


def _settled(ex: Any, **expected: int) -> bool:
    """A future ends before the router counts its task (as in KeyedExecutor, whose
    tests wait for metrics the same way): wait until the counts read ``expected``."""
    return wait_until(lambda: all(getattr(ex.metrics(), k) == v for k, v in expected.items()))



# -- order, exactly once, outcomes -------------------------------------------------------


def test_order_and_exactly_once_under_load(ex: ProcessKeyedExecutor[Any]) -> None:
    fs = [(k, i, ex.submit(k, tasks.record, k, i, 0.0002)) for i in range(40) for k in range(12)]
    results = [f.result(30) for _k, _i, f in fs]
    assert [(r[0], r[1]) for r in results] == [(k, i) for k, i, _f in fs]  # each ran, once
    routed.check_order(results)
    assert {r[2] for r in results} == set(ex.pids())  # both children took keys
    assert _settled(ex, children=2, pending=0, in_flight=0, active_keys=0)


def test_busy_key_stays_on_its_child_idle_key_returns_to_it(ex: ProcessKeyedExecutor[Any]) -> None:
    pids = {ex.submit(("k", n), tasks.pid).result(10) for n in range(3) for _ in range(3)}
    # Each key's rendezvous choice is stable: 3 keys, at most 3 pids, and the same again.
    again = {ex.submit(("k", n), tasks.pid).result(10) for n in range(3)}
    assert again <= pids


@pytest.mark.parametrize("make_key", [tasks.ByIdentity, lambda: float("nan")],
                         ids=["by-identity", "nan"])
def test_order_holds_for_keys_unequal_to_their_pickled_copy(
        method: str, tmp_path: Path, make_key: Any) -> None:
    """The parent's key is one key; its copies unpickled in the child are not
    equal to each other (identity equality, nan): the child must not run a
    later task of the key beside the one still running."""
    key, log = make_key(), tmp_path / "log"
    with fresh(1, 2, mp_context=method) as ex2:
        gate, first = routed.blocker(ex2, key, tmp_path, 30)  # running in the child
        second = ex2.submit(key, tasks.append, str(log), "k", 2)  # another batch
        assert not wait_until(log.exists, 0.3), "ran beside the task before it"
        gate.touch()
        assert (first.result(30), second.result(30)) == ("opened", 2)


def test_exceptions_keep_their_type(ex: ProcessKeyedExecutor[Any]) -> None:
    with pytest.raises(ValueError, match="^7$") as info:
        ex.submit("e", tasks.raise_value_error, 7).result(10)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "raise_value_error" in str(info.value.__cause__)
    with pytest.raises(tasks.Custom):
        ex.submit("e", tasks.raise_custom, 1).result(10)
    # Pickles but cannot be rebuilt, or cannot be pickled at all: a RemoteError
    # that names it, with the remote traceback.
    for fn, name in ((tasks.raise_needs_two, "NeedsTwo"), (tasks.raise_unpicklable, "RuntimeError")):
        with pytest.raises(RemoteError, match=name) as info2:
            ex.submit("e", fn).result(10)
        assert isinstance(info2.value.__cause__, RemoteTraceback)


def test_user_completing_a_future_still_in_the_parent(method: str) -> None:
    """set_result by user code on a task not sent yet (meant for executors only):
    that outcome stands, the task never runs and counts as cancelled, and the
    key and the executor go on (the sender used to die of it)."""
    with fresh(1, 1, mp_context=method, linger=0.5) as ex2:
        f = ex2.submit("k", tasks.identity, 1)
        f.set_result("mine")
        assert ex2.submit("k", tasks.identity, 2).result(30) == 2
        assert f.result(0) == "mine"
        assert _settled(ex2, pending=0, cancelled=1, completed=1)
        assert ex2.wait_key("k", 30)


def test_results_and_errors_whose_pickling_raises_base_exceptions(
        ex: ProcessKeyedExecutor[Any]) -> None:
    """A result whose __reduce__ raises SystemExit, an exception whose pickling,
    repr() and str() raise KeyboardInterrupt: each fails its own future, and
    the shard goes on (an outcome used to be lost: the future hung)."""
    with pytest.raises(pickle.PicklingError, match="SystemExit"):
        ex.submit("h", tasks.return_exit_on_pickle).result(30)
    with pytest.raises(RemoteError, match="HostileError"):
        ex.submit("h", tasks.raise_hostile).result(30)
    assert ex.submit("h", tasks.identity, 3).result(30) == 3


def test_unpicklable_task_fails_alone(ex: ProcessKeyedExecutor[Any]) -> None:
    before = ex.submit("p", tasks.identity, 0)
    bad_fn = ex.submit("p", lambda: 1)  # a lambda does not pickle
    bad_arg = ex.submit("p", tasks.identity, threading.Lock())
    bad_result = ex.submit("p", tasks.return_lock)
    after = ex.submit("p", tasks.identity, 4)
    assert before.result(10) == 0 and after.result(10) == 4
    for f in (bad_fn, bad_arg):
        with pytest.raises(pickle.PicklingError, match="task for key 'p' could not be pickled"):
            f.result(10)
    with pytest.raises(pickle.PicklingError, match="result .*lock.* could not be pickled"):
        bad_result.result(10)


def test_bad_keys_are_refused_at_submit(ex: ProcessKeyedExecutor[Any]) -> None:
    before = ex.metrics().submitted
    with pytest.raises(TypeError, match="key must be hashable"):
        ex.submit([1], tasks.identity, 1)
    with pytest.raises(TypeError, match="fn must be callable"):
        ex.submit("k", 3)  # type: ignore[arg-type]
    assert ex.metrics().submitted == before


def test_keys_stay_in_the_parent(ex: ProcessKeyedExecutor[Any]) -> None:
    lock = threading.Lock()  # does not pickle: it need not, it never travels
    assert [ex.submit(lock, tasks.identity, i).result(30) for i in range(3)] == [0, 1, 2]


def test_result_whose_unpickling_raises_a_base_exception_fails_alone(
        ex: ProcessKeyedExecutor[Any]) -> None:
    bad = ex.submit("u", tasks.return_exits_when_unpickled)
    with pytest.raises(pickle.UnpicklingError, match="SystemExit"):
        bad.result(30)
    assert ex.submit("u", tasks.identity, 1).result(30) == 1  # not broken
    assert _settled(ex, pending=0)


def test_done_callback_raising_base_exception_on_a_cancelled_task(
        method: str, tmp_path: Path) -> None:
    """sys.exit() (or Ctrl-C) in a done-callback of a cancelled task: every
    other future still ends, the executor goes on."""
    def exits(_f: cf.Future[Any]) -> None:
        raise SystemExit("from a callback")

    with fresh(1, 1, mp_context=method) as ex2:
        gate, blocker = routed.blocker(ex2, "c", tmp_path, 30)
        in_child = [ex2.submit("c", tasks.identity, i) for i in range(3)]
        time.sleep(0.1)  # sent: the child cancels them
        in_child[0].add_done_callback(exits)
        assert ex2.cancel_key("c") == 3
        assert all(f.cancelled() for f in in_child)
        gate.touch()
        assert blocker.result(30) == "opened"
        assert ex2.submit("c", tasks.identity, "after").result(30) == "after"
    with fresh(1, 1, mp_context=method, linger=60, batch_size=1000) as ex2:
        in_parent = [ex2.submit("p", tasks.identity, i) for i in range(3)]
        in_parent[0].add_done_callback(exits)
        with pytest.raises(SystemExit):  # raised in the caller's thread, as by cancel()
            ex2.cancel_key("p")
        assert all(f.cancelled() for f in in_parent)
        assert ex2.metrics().pending == 0 and ex2.metrics().cancelled == 3


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"processes": 0}, ValueError, "processes"),
        ({"processes": "2"}, TypeError, "processes"),
        ({"workers_per_process": 0}, ValueError, "workers_per_process"),
        ({"max_pending": 0}, ValueError, "max_pending"),
        ({"max_tasks_per_child": 0}, ValueError, "max_tasks_per_child"),
        ({"on_loss": "ignore"}, ValueError, "on_loss"),
        ({"on_loss": 1}, TypeError, "on_loss"),
        ({"mp_context": "teleport"}, ValueError, "mp_context"),
        ({"mp_context": 3}, TypeError, "mp_context"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"linger": -1}, ValueError, "linger"),
        ({"linger": math.inf}, ValueError, "linger must be >= 0 and finite"),
        ({"linger": None}, TypeError, "linger must be a number of seconds, got NoneType"),
        ({"initializer": 3}, TypeError, "initializer"),
        ({"initargs": 3}, TypeError, "initargs"),
        ({"initializer": lambda: None, "mp_context": "spawn"}, TypeError, "initializer"),
        ({"on_error": 3}, TypeError, "on_error"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    before = _children()
    with pytest.raises(error, match=match):
        ProcessKeyedExecutor(**kwargs)
    assert _children() == before  # refused before any child started


def test_execute_reports_to_on_error(method: str) -> None:
    errors: list[tuple[Any, BaseException]] = []
    with fresh(1, mp_context=method, on_error=lambda k, e: errors.append((k, e))) as ex2:
        ex2.execute("a", tasks.raise_value_error, "x")
        ex2.execute("a", tasks.identity, 1)
        assert ex2.wait_key("a", 10)
    assert [(k, type(e), str(e)) for k, e in errors] == [("a", ValueError, "x")]


def test_map_and_submit_async(ex: ProcessKeyedExecutor[Any]) -> None:
    assert list(ex.map(tasks.identity, range(50), key=lambda i: i % 3)) == list(range(50))
    assert list(ex.map(tasks.identity, range(20))) == list(range(20))
    with pytest.raises(ValueError):
        list(ex.map(tasks.raise_value_error, [1, 2]))

    async def main() -> list[Any]:
        return list(await asyncio.gather(*(ex.submit_async("a", tasks.identity, i)
                                           for i in range(10))))

    assert asyncio.run(main()) == list(range(10))


def test_submit_async_cancelled_by_cancel_key_and_failing(ex: ProcessKeyedExecutor[Any],
                                                          tmp_path: Path) -> None:
    """The awaitable of a task that cancel_key cancels raises asyncio's
    CancelledError; one whose task raises, the task's exception."""
    async def main() -> None:
        gate, blocker = routed.blocker(ex, "q", tmp_path, 30)
        queued = ex.submit_async("q", tasks.identity, 1)
        failing = ex.submit_async("r", tasks.raise_value_error, 2)
        assert await asyncio.to_thread(ex.cancel_key, "q") == 1
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(queued, 30)
        with pytest.raises(ValueError):
            await asyncio.wait_for(failing, 30)
        gate.touch()
        assert await asyncio.wait_for(asyncio.wrap_future(blocker), 30) == "opened"

    asyncio.run(main())


# -- cancel, wait, shutdown ------------------------------------------------------------------


def test_cancel_key_in_the_child(ex: ProcessKeyedExecutor[Any], tmp_path: Path) -> None:
    gate, blocker = routed.blocker(ex, "c", tmp_path, 30)
    queued = [ex.submit("c", tasks.identity, i) for i in range(5)]
    time.sleep(0.05)  # sent: they wait in the child's queue
    assert ex.cancel_key("c") == 5
    assert all(f.cancelled() for f in queued)  # at once: cancel_key waited for the child
    later = ex.submit("c", tasks.identity, "after")
    assert ex.cancel_key("idle") == 0
    gate.touch()
    assert (blocker.result(10), later.result(10)) == ("opened", "after")
    assert ex.metrics().cancelled >= 5


def test_cancel_key_before_sending(method: str) -> None:
    with fresh(1, mp_context=method, linger=60, batch_size=1000) as ex2:
        fs = [ex2.submit("k", tasks.identity, i) for i in range(3)]
        other = ex2.submit("o", tasks.identity, "o")
        assert ex2.cancel_key("k") == 3
        assert all(f.cancelled() for f in fs)
        ex2.shutdown(wait=True)
        assert other.result(0) == "o"  # shutdown sends what is left


def test_wait_key(ex: ProcessKeyedExecutor[Any], tmp_path: Path) -> None:
    gate, blocker = routed.blocker(ex, "w", tmp_path, 30)
    after = ex.submit("w", tasks.identity, 1)
    assert ex.wait_key("w", timeout=0.05) is False
    gate.touch()
    assert ex.wait_key("w", timeout=10) is True
    assert blocker.done() and after.done()
    assert ex.wait_key("never-used", timeout=0) is True
    with pytest.raises(ValueError, match="timeout"):
        ex.wait_key("w", timeout=-1)


def test_shutdown_wait_runs_everything(method: str) -> None:
    with fresh(2, mp_context=method) as ex2:
        fs = [ex2.submit(k, tasks.record, k, i) for i in range(20) for k in range(4)]
        ex2.shutdown(wait=True)
        assert all(f.done() and not f.cancelled() for f in fs)
        routed.check_order([f.result() for f in fs])
        assert ex2.metrics().children == 0 and ex2.closed
        with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
            ex2.submit("k", tasks.identity, 1)
        ex2.shutdown()  # again: harmless


def test_shutdown_wait_from_a_done_callback(method: str) -> None:
    """Callbacks run in the thread that completes the tasks: waiting there for
    the others would wait forever. It returns; the others still finish."""
    returned = threading.Event()
    with fresh(2, mp_context=method) as ex2:

        def shut(_f: cf.Future[Any]) -> None:
            ex2.shutdown(wait=True)
            returned.set()

        first = ex2.submit("a", tasks.identity, 0)
        others = [ex2.submit(k, tasks.record, k, 0, 0.2) for k in range(4)]
        first.add_done_callback(shut)
        assert returned.wait(30)
        assert [f.result(30)[0] for f in others] == list(range(4))
        assert ex2.closed


def test_shutdown_cancel_futures(method: str, tmp_path: Path) -> None:
    with fresh(1, 1, mp_context=method) as ex2:
        gate, blocker = routed.blocker(ex2, "b", tmp_path, 30)
        queued = [ex2.submit(k, tasks.identity, k) for k in range(10)]
        time.sleep(0.05)  # most are in the child's queue by now
        ex2.shutdown(wait=False, cancel_futures=True)
        assert wait_until(lambda: all(f.cancelled() for f in queued), 10)
        gate.touch()
        ex2.shutdown(wait=True)
        assert blocker.result(0) == "opened"


# -- children that die, recycle, initializer --------------------------------------------


def test_child_killed_mid_stream(method: str) -> None:
    with fresh(2, 1, mp_context=method) as ex2:
        fs = [ex2.submit(k, tasks.record, k, i, 0.002) for i in range(40) for k in range(8)]
        assert wait_until(lambda: ex2.metrics().completed >= 40, 30)
        victim = ex2.pids()[0]
        os.kill(victim, signal.SIGKILL)
        ok, lost = [], 0
        for f in fs:
            try:
                ok.append(f.result(30))
            except ShardLost as exc:
                assert "may or may not have run" in str(exc) and "SIGKILL" in str(exc)
                lost += 1
        assert ok and lost
        routed.check_order(ok)
        # Replaced, and later submits succeed everywhere.
        assert wait_until(lambda: len(ex2.pids()) == 2, 30)
        assert victim not in ex2.pids()
        assert [ex2.submit(k, tasks.identity, k).result(30) for k in range(8)] == list(range(8))
        assert _settled(ex2, lost=lost, restarts=1, pending=0, completed=len(ok) + 8)


def test_task_calling_os_exit(method: str) -> None:
    with fresh(1, 2, mp_context=method) as ex2:
        before = ex2.submit("a", tasks.identity, 1).result(30)
        dead = ex2.submit("d", tasks.die)
        with pytest.raises(ShardLost, match="exited with code 1"):
            dead.result(30)
        assert before == 1
        assert ex2.submit("d", tasks.identity, 2).result(30) == 2
        assert ex2.metrics().restarts == 1


def test_retry_runs_every_task_at_least_once_in_order(method: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    keys, n = 6, 30
    with fresh(2, 1, mp_context=method, on_loss="retry") as ex2:
        fs = [ex2.submit(k, tasks.append, str(log), k, i, 0.002) for i in range(n)
              for k in range(keys)]
        assert wait_until(lambda: ex2.metrics().completed >= 30, 30)
        os.kill(ex2.pids()[0], signal.SIGKILL)
        assert [f.result(30) for f in fs] == [i for i in range(n) for _k in range(keys)]
        m = ex2.metrics()
        assert m.retried > 0 and m.lost == 0 and m.restarts == 1
    runs: dict[int, list[int]] = {}
    for line in log.read_text().splitlines():
        k, i = map(int, line.split())
        runs.setdefault(k, []).append(i)
    for k in range(keys):
        assert sorted(set(runs[k])) == list(range(n)), k  # every task, at least once
        # In order: each run is the next task, or a re-run from an earlier one.
        assert runs[k][0] == 0
        assert all(b <= a + 1 for a, b in zip(runs[k], runs[k][1:])), runs[k]


def test_max_tasks_per_child_recycles_without_breaking_order(method: str) -> None:
    with fresh(2, 2, mp_context=method, max_tasks_per_child=15) as ex2:
        fs = [ex2.submit(k, tasks.record, k, i) for i in range(15) for k in range(6)]
        results = [f.result(60) for f in fs]
        routed.check_order(results)
        assert len({r[2] for r in results}) > 2  # children were replaced
        m = ex2.metrics()
        assert m.recycled >= 2 and m.lost == 0 and m.restarts == 0


def test_initializer(method: str) -> None:
    with fresh(2, mp_context=method, initializer=tasks.init, initargs=("ready",)) as ex2:
        assert {ex2.submit(k, tasks.get_initialized).result(30) for k in range(6)} == {"ready"}


def test_failing_initializer_breaks_the_executor(method: str) -> None:
    """Like a stdlib pool: unfinished tasks fail, later submits raise (the first
    submit may already raise, if the child failed before it)."""
    with fresh(1, mp_context=method, initializer=tasks.init_fails) as ex2:
        with contextlib.suppress(BrokenProcessPool):
            fut = ex2.submit("k", tasks.identity, 1)
            with pytest.raises(BrokenProcessPool, match="initializer"):
                fut.result(30)
        with pytest.raises(BrokenProcessPool, match="initializer raised ValueError"):
            ex2.submit("k", tasks.identity, 2)
        assert _settled(ex2, pending=0)


def test_max_pending_blocks_submit(method: str, tmp_path: Path) -> None:
    with fresh(1, 1, mp_context=method, max_pending=2) as ex2:
        gate, blocker = routed.blocker(ex2, "m", tmp_path, 30)
        ex2.submit("m", tasks.identity, 1)
        third: list[cf.Future[Any]] = []
        t = threading.Thread(target=lambda: third.append(ex2.submit("m", tasks.identity, 3)))
        t.start()
        time.sleep(0.1)
        assert not third  # blocked: 2 unfinished
        gate.touch()
        t.join(30)
        assert third[0].result(30) == 3 and blocker.result(0) == "opened"


# -- shard side, unit ---------------------------------------------------------------------


def test_sequencer_holds_early_batches() -> None:
    s = Sequencer()
    assert s.admit(1, "b1") == [] and s.admit(2, "b2") == []
    assert s.admit(0, "b0") == ["b0", "b1", "b2"]
    assert s.admit(1, "dup") == [] and s.out_of_order == 2
    assert s.admit(3, "b3") == ["b3"]


def test_shard_host_admits_out_of_order_batches_in_sequence() -> None:
    host = ShardHost(2, epoch=0)
    payload = pickle.dumps((tasks.identity, ("x",), {}))
    host.deliver(0, 1, ([(2, 7, payload, None)], []))
    host.deliver(5, 0, ([(99, 7, payload, None)], []))  # another epoch: dropped
    host.deliver(0, 0, ([(0, 7, payload, None), (1, 8, payload, "'j'")], []))
    host.close()
    got = []
    while True:
        items = host.take_results(1)
        if not items:
            break
        got.extend(items)
    assert sorted(item[0] for item in got) == [0, 1, 2]
    assert host.out_of_order == 1


def test_shard_host_is_idle_once_every_admitted_task_has_an_outcome(tmp_path: Path) -> None:
    """wait_idle (a Ray actor's cue to answer a result poll at once) waits while
    an admitted task has no outcome, and counts cancelled tasks as reported."""
    host = ShardHost(1, epoch=0)
    assert host.wait_idle(0)  # nothing admitted
    started, gate = tmp_path / "started", tmp_path / "gate"
    hold = pickle.dumps((tasks.touch_then_wait, (str(started), str(gate)), {}))
    quick = pickle.dumps((tasks.identity, ("x",), {}))
    host.deliver(0, 0, ([(0, 1, hold, None), (1, 2, quick, None)], []))
    assert wait_until(started.exists, 30)
    assert not host.wait_idle(0.05)  # running, and queued behind it
    host.deliver(0, 1, ([], [(CANCEL_KEY, 2, 9)]))  # the queued one: cancelled
    assert wait_until(lambda: any(item[0] == 9 for item in host.take_results(0.1)), 30)
    assert not host.wait_idle(0.05)  # the first still runs
    gate.touch()
    assert host.wait_idle(30)
    host.deliver(0, 2, ([(2, 3, quick, None)], []))
    assert host.wait_idle(30)
    host.close()


# -- process lifecycle: exit, parent death, Ctrl-C ---------------------------------------

_HERE = str(Path(__file__).resolve().parent)


def _run_child(body: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [_HERE, str(Path(_HERE).parent), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-X", "dev", "-c", textwrap.dedent(body), *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_interpreter_exit_drains_queued_work(tmp_path: Path) -> None:
    log = tmp_path / "log"
    proc = _run_child("""
        import sys
        import _process_tasks as tasks
        from keyedexec.process import ProcessKeyedExecutor
        ex = ProcessKeyedExecutor(2)
        for i in range(30):
            for k in range(4):
                ex.execute(k, tasks.append, sys.argv[1], k, i, 0.001)
        print("main returns", flush=True)
    """, str(log))
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    runs: dict[int, list[int]] = {}
    for line in log.read_text().splitlines():
        k, i = map(int, line.split())
        runs.setdefault(k, []).append(i)
    assert runs == {k: list(range(30)) for k in range(4)}


def test_children_exit_when_the_parent_dies() -> None:
    proc = _run_child("""
        import os, signal
        import _process_tasks as tasks
        from keyedexec.process import ProcessKeyedExecutor
        ex = ProcessKeyedExecutor(2)
        fs = [ex.submit(k, tasks.spin, 50) for k in range(20)]
        fs[0].result(30)
        print(*ex.pids(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert proc.returncode == -signal.SIGKILL
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    assert wait_until(lambda: all(gone(p) for p in pids), 15), pids


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork")
def test_fork_of_the_parent_ends_the_inherited_futures(tmp_path: Path) -> None:
    """In a child of os.fork() the inherited executor is closed and its
    unfinished futures are cancelled there (as the threaded executor's): a
    thread of the child waiting on one would wait forever."""
    with fresh(1, 1, mp_context="spawn") as ex2:
        gate, blocker = routed.blocker(ex2, "b", tmp_path, 30)  # running in the child process
        queued = [ex2.submit("b", tasks.identity, i) for i in range(3)]
        pid = os.fork()
        if pid == 0:  # the forked copy: report through the exit status only
            ok = all(f.cancelled() for f in [blocker, *queued])
            try:
                ex2.submit("x", tasks.identity, 1)
                ok = False
            except RuntimeError as exc:
                ok = ok and "forked child" in str(exc)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        gate.touch()  # the parent's are unaffected
        assert [f.result(30) for f in [blocker, *queued]] == ["opened", 0, 1, 2]


def test_ctrl_c_while_waiting_on_a_future(tmp_path: Path) -> None:
    proc = _run_child("""
        import os, signal, sys, threading
        import _process_tasks as tasks
        from keyedexec.process import ProcessKeyedExecutor
        signal.signal(signal.SIGINT, signal.default_int_handler)
        gate = sys.argv[1]
        with ProcessKeyedExecutor(1) as ex:
            fut = ex.submit("k", tasks.wait_for_file, gate)
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
            try:
                fut.result(30)
            except KeyboardInterrupt:
                print("KeyboardInterrupt", flush=True)
            open(gate, "w").close()
            print(fut.result(30), flush=True)
    """, str(tmp_path / "gate"))
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    assert proc.stdout.splitlines() == ["KeyboardInterrupt", "opened"]


# -- model: the same programs on the threaded executor -----------------------------------

OPS = routed.programs(max_size=20)



@pytest.fixture(scope="module")
def model_pair() -> Iterator[tuple[Any, Any]]:
    with fresh(1, 1, mp_context=METHODS[-1]) as proc_ex, KeyedExecutor(1) as thread_ex:
        yield proc_ex, thread_ex


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(program=OPS)
def test_model_against_the_threaded_executor(
    model_pair: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory,
    program: list[tuple[Any, ...]],
) -> None:
    """Random submits, cancel_key and wait_key(timeout=0) behind a gate that holds
    the only worker: both executors return the same, end every future the same
    way, and run each key's tasks in order."""
    routed.run_model(model_pair, tmp_path_factory.mktemp("model"), program, 30)
