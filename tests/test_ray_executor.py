"""RayKeyedExecutor (keyedexec.ray) on one local Ray cluster for the whole session.

The cluster is small (2 CPUs, a 100 MB object store, no dashboard) and is torn
down at the end of the session; every process it started is then killed by pid
if it is still there. Task functions live in ``_process_tasks`` (on the Ray
workers' PYTHONPATH). Gates between processes are files, as in
test_process_executor.py. Executors a test owns are opened with ``fresh()``,
which checks afterwards that their actors' processes are gone.

Skipped where the ``ray`` extra is not installed (no wheel for the free-threaded
build); ``make test`` installs it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import math
import os
import pickle
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
from hypothesis import HealthCheck, given, settings

ray = pytest.importorskip(
    "ray", reason="the ray extra is not installed (ray has no wheel for this Python)")

import _process_tasks as tasks  # noqa: E402
import _routed_checks as routed  # noqa: E402
from conftest import wait_until  # noqa: E402
from keyedexec import KeyedExecutor, QueueFull, ShardLost  # noqa: E402
from keyedexec._router import RemoteError, RemoteTraceback  # noqa: E402
from keyedexec.ray import RayKeyedExecutor  # noqa: E402

pytestmark = [pytest.mark.timeout(120)]

_HERE = str(Path(__file__).resolve().parent)
_ROOT = str(Path(_HERE).parent)
WAIT = 60  # seconds: Ray workers start slowly on a loaded machine


def _descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _kill_all(pids: set[int]) -> None:
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            p.kill()
            procs.append(p)
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


@pytest.fixture(scope="session")
def cluster() -> Iterator[str]:
    """One local Ray cluster; yields its address. Whatever it started is gone after."""
    if ray.is_initialized():
        pytest.fail("Ray was initialised before the cluster fixture")
    before = _descendants()
    old = os.environ.get("PYTHONPATH")
    # The workers import the task functions (and keyedexec) from here.
    os.environ["PYTHONPATH"] = os.pathsep.join([_HERE, _ROOT] + ([old] if old else []))
    try:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
                 log_to_driver=False)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    started = set()
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        started = _descendants() - before
        ray.shutdown()
        # ray.shutdown() can leave an agent (or a worker) behind: end them by pid.
        if not wait_until(lambda: not (_descendants() - before), 15):
            _kill_all(_descendants() - before)
        _kill_all({p for p in started if psutil.pid_exists(p)})


def _actor_pids(ex: RayKeyedExecutor[Any]) -> set[int]:
    pids = set()
    for handle in ex.actor_handles().values():
        with contextlib.suppress(ray.exceptions.RayError):
            pids.add(ray.get(handle.info.remote(), timeout=WAIT)[0])
    return pids


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@contextlib.contextmanager
def fresh(*args: Any, **kw: Any) -> Iterator[RayKeyedExecutor[Any]]:
    """An executor of the test's own; afterwards its actors' processes are gone."""
    ex: RayKeyedExecutor[Any] = RayKeyedExecutor(*args, **kw)
    pids: set[int] = set()
    try:
        yield ex
        pids = _actor_pids(ex)
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
    assert ray.is_initialized()  # the executor did not init Ray: it leaves it alone
    assert wait_until(lambda: all(_gone(p) for p in pids), 30), pids


@pytest.fixture(scope="module")
def ex(cluster: str) -> Iterator[RayKeyedExecutor[Any]]:
    """Shared by the tests that leave it as they found it: 2 actors, 2 workers each."""
    with fresh(2, 2) as shared:
        yield shared




# -- operating it: hot keys, timings, exporters --------------------------------------------


def test_hot_keys_timings_and_exporters(cluster: str, tmp_path: Path) -> None:
    """After a known workload (3 tasks that return, 1 that raises, then "busy"
    held with 2 tasks behind it): hot_keys, timings, a real prometheus_client
    registry and an OpenTelemetry in-memory reader agree with it."""
    prometheus_client = pytest.importorskip("prometheus_client")
    pytest.importorskip("opentelemetry.sdk.metrics")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from test_contrib import one, otel_points, scrape

    from keyedexec.contrib.otel import instrument
    from keyedexec.contrib.prometheus import KeyedExecutorCollector

    with fresh(1, 1, name="rayex", on_error=lambda key, exc: None) as rex:
        with pytest.raises(ValueError):
            rex.hot_keys(0)
        assert [rex.submit(i, tasks.identity, i).result(WAIT) for i in range(3)] == [0, 1, 2]
        rex.execute("bad", tasks.raise_value_error, 1)
        assert wait_until(lambda: rex.metrics().completed == 4, WAIT)
        gate, held = routed.blocker(rex, "busy", tmp_path, WAIT)
        for i in range(2):
            rex.execute("busy", tasks.identity, i)
        assert wait_until(lambda: rex.metrics().in_flight == 3, WAIT)
        [hot] = rex.hot_keys()
        assert (hot.key, hot.queued, hot.running) == ("busy", 2, True)
        t = rex.timings()
        assert (t.sample_every, t.wait.count, t.run.count) == (1, 4, 4)

        registry = prometheus_client.CollectorRegistry()
        KeyedExecutorCollector(rex, registry=registry)
        s = scrape(registry)
        ex_ = {"executor": "rayex"}
        assert one(s["keyedexec_tasks_submitted_total"], **ex_) == 7
        assert one(s["keyedexec_tasks_failed_total"], **ex_) == 1
        assert one(s["keyedexec_tasks_lost_total"], **ex_) == 0
        assert one(s["keyedexec_shards"], **ex_) == 1
        assert one(s["keyedexec_tasks_running"], **ex_) == 3
        assert one(s["keyedexec_task_run_seconds_count"], **ex_) == 4
        assert s["keyedexec_hot_key_queued_tasks"] == {
            (("executor", "rayex"), ("key", "busy")): 2}

        reader = InMemoryMetricReader()
        instrument(rex, MeterProvider(metric_readers=[reader]).get_meter("t"), hot_keys=1)
        p = otel_points(reader)
        attrs = {"keyedexec.executor": "rayex"}
        assert one(p["keyedexec.tasks.completed"], **attrs) == 4
        assert one(p["keyedexec.task.wait.count"], **attrs) == 4
        assert one(p["keyedexec.hot_key.queued"], **{"keyedexec.key": "busy"}, **attrs) == 2
        gate.touch()
        assert held.result(WAIT) == "opened"
        assert wait_until(lambda: rex.timings().run.count == 7, WAIT)


# -- order, outcomes ----------------------------------------------------------------------


def test_order_and_exactly_once_under_load(ex: RayKeyedExecutor[Any]) -> None:
    fs = [(k, i, ex.submit(k, tasks.record, k, i, 0.0002)) for i in range(30) for k in range(12)]
    results = [f.result(WAIT) for _k, _i, f in fs]
    assert [(r[0], r[1]) for r in results] == [(k, i) for k, i, _f in fs]  # each ran, once
    routed.check_order(results)
    assert len({r[2] for r in results}) == 2  # both actors took keys
    m = ex.metrics()
    assert (m.actors, m.pending, m.in_flight, m.active_keys) == (2, 0, 0, 0)


def test_order_under_out_of_order_delivery(cluster: str) -> None:
    """Batches reach the actors out of sequence (every other one is held back a
    little): the actors hold the early ones, and each key still runs in order."""
    with fresh(2, 2, batch_size=3) as ex2:
        transport = ex2._transport
        send = transport.send
        timers: list[threading.Timer] = []

        def reordering_send(shard: int, epoch: int, seq: int, batch: Any) -> None:
            if seq % 2 == 0:
                t = threading.Timer(0.02, send, (shard, epoch, seq, batch))
                timers.append(t)
                t.start()
            else:
                send(shard, epoch, seq, batch)

        transport.send = reordering_send  # type: ignore[method-assign]
        fs = [ex2.submit(k, tasks.record, k, i) for i in range(20) for k in range(8)]
        results = [f.result(WAIT) for f in fs]
        for t in timers:
            t.join(WAIT)
        routed.check_order(results)
        out_of_order = sum(ray.get(h.info.remote(), timeout=WAIT)[1]
                           for h in ex2.actor_handles().values())
        assert out_of_order > 0


def test_busy_key_stays_idle_key_returns(ex: RayKeyedExecutor[Any]) -> None:
    first = {n: ex.submit(("k", n), tasks.pid).result(WAIT) for n in range(6)}
    again = {n: ex.submit(("k", n), tasks.pid).result(WAIT) for n in range(6)}
    assert first == again  # rendezvous hashing: the same actor each time


def test_exceptions_keep_their_type(ex: RayKeyedExecutor[Any]) -> None:
    with pytest.raises(ValueError, match="^7$") as info:
        ex.submit("e", tasks.raise_value_error, 7).result(WAIT)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "raise_value_error" in str(info.value.__cause__)
    with pytest.raises(tasks.Custom):
        ex.submit("e", tasks.raise_custom, 1).result(WAIT)
    for fn, name in ((tasks.raise_needs_two, "NeedsTwo"),
                     (tasks.raise_unpicklable, "RuntimeError")):
        with pytest.raises(RemoteError, match=name):
            ex.submit("e", fn).result(WAIT)


def test_unpicklable_input_fails_alone(ex: RayKeyedExecutor[Any]) -> None:
    before = ex.submit("p", tasks.identity, 0)
    bad_arg = ex.submit("p", tasks.identity, threading.Lock())
    bad_result = ex.submit("p", tasks.return_lock)
    closure = ex.submit("p", lambda x: x + 1, 2)  # cloudpickle, as Ray's own tasks
    after = ex.submit("p", tasks.identity, 4)
    assert (before.result(WAIT), closure.result(WAIT), after.result(WAIT)) == (0, 3, 4)
    with pytest.raises(pickle.PicklingError, match="task for key 'p' could not be pickled"):
        bad_arg.result(WAIT)
    with pytest.raises(pickle.PicklingError, match="result .*lock.* could not be pickled"):
        bad_result.result(WAIT)


def test_bad_keys_are_refused_at_submit(ex: RayKeyedExecutor[Any]) -> None:
    before = ex.metrics().submitted
    with pytest.raises(TypeError, match="key must be hashable"):
        ex.submit([1], tasks.identity, 1)
    with pytest.raises(TypeError, match="fn must be callable"):
        ex.submit("k", 3)  # type: ignore[arg-type]
    assert ex.metrics().submitted == before
    lock = threading.Lock()  # keys stay in the caller: this one need not pickle
    assert [ex.submit(lock, tasks.identity, i).result(60) for i in range(3)] == [0, 1, 2]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"actors": 0}, ValueError, "actors"),
        ({"actors": "2"}, TypeError, "actors"),
        ({"workers_per_actor": 0}, ValueError, "workers_per_actor"),
        ({"max_pending": 0}, ValueError, "max_pending"),
        ({"max_calls_in_flight": 0}, ValueError, "max_calls_in_flight"),
        ({"on_loss": "ignore"}, ValueError, "on_loss"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"linger": -1}, ValueError, "linger"),
        ({"linger": math.inf}, ValueError, "linger must be >= 0 and finite"),
        ({"linger": None}, TypeError, "linger must be a number of seconds, got NoneType"),
        ({"report_interval": -1}, ValueError, "report_interval"),
        ({"report_interval": math.inf}, ValueError, "report_interval must be >= 0 and finite"),
        ({"report_interval": "0.1"}, TypeError,
         "report_interval must be a number of seconds, got str"),
        ({"submit_timeout": -1}, ValueError, "submit_timeout"),
        ({"actor_options": {"max_restarts": 3}}, ValueError, "max_restarts"),
        ({"actor_options": 3}, TypeError, "actor_options"),
        ({"address": "auto"}, ValueError, "already initialised"),
        ({"on_error": 3}, TypeError, "on_error"),
        ({"name": 3}, TypeError, "name"),
        ({"sample_timings": -1}, ValueError, "sample_timings"),
        ({"sample_timings": "1"}, TypeError, "sample_timings"),
        ({"slow_task_threshold": 0}, ValueError, "slow_task_threshold"),
    ],
)
def test_bad_arguments(cluster: str, kwargs: dict[str, Any], error: type[Exception],
                       match: str) -> None:
    with pytest.raises(error, match=match):
        RayKeyedExecutor(**kwargs)
    assert ray.is_initialized()


def test_execute_map_submit_async(ex: RayKeyedExecutor[Any], cluster: str) -> None:
    assert list(ex.map(tasks.identity, range(50), key=lambda i: i % 3)) == list(range(50))
    assert list(ex.map(tasks.identity, range(20))) == list(range(20))

    async def main() -> list[Any]:
        return list(await asyncio.gather(*(ex.submit_async("a", tasks.identity, i)
                                           for i in range(10))))

    assert asyncio.run(main()) == list(range(10))
    errors: list[tuple[Any, BaseException]] = []
    with fresh(1, on_error=lambda k, e: errors.append((k, e))) as ex2:
        ex2.execute("a", tasks.raise_value_error, "x")
        ex2.execute("a", tasks.identity, 1)
        assert ex2.wait_key("a", WAIT)
    assert [(k, type(e), str(e)) for k, e in errors] == [("a", ValueError, "x")]


# -- cancel, wait, backpressure, shutdown ----------------------------------------------------


def test_cancel_key_in_the_actor_and_wait_key(ex: RayKeyedExecutor[Any], tmp_path: Path) -> None:
    gate, blocker = routed.blocker(ex, "c", tmp_path, WAIT)
    queued = [ex.submit("c", tasks.identity, i) for i in range(5)]
    assert wait_until(lambda: ex.metrics().in_flight >= 6, WAIT)  # sent: queued in the actor
    assert ex.wait_key("c", timeout=0.05) is False
    assert ex.cancel_key("c") == 5
    assert all(f.cancelled() for f in queued)  # at once: cancel_key waited for the actor
    later = ex.submit("c", tasks.identity, "after")
    assert ex.cancel_key("idle") == 0
    gate.touch()
    assert ex.wait_key("c", timeout=WAIT) is True
    assert (blocker.result(0), later.result(0)) == ("opened", "after")


def test_backpressure(cluster: str, tmp_path: Path) -> None:
    with fresh(1, 1, max_pending=2, submit_timeout=0.2) as ex2:
        gate, blocker = routed.blocker(ex2, "m", tmp_path, WAIT)
        ex2.submit("m", tasks.identity, 1)
        with pytest.raises(QueueFull, match="max_pending=2"):
            ex2.submit("m", tasks.identity, 2)
        assert ex2.metrics().submitted == 2
        gate.touch()
        assert blocker.result(WAIT) == "opened"
    with fresh(1, 1, max_pending=2) as ex3:  # no timeout: submit blocks until there is room
        gate, blocker = routed.blocker(ex3, "n", tmp_path, WAIT)
        ex3.submit("n", tasks.identity, 1)
        third: list[cf.Future[Any]] = []
        t = threading.Thread(target=lambda: third.append(ex3.submit("n", tasks.identity, 3)))
        t.start()
        t.join(0.2)
        assert not third  # blocked: 2 unfinished
        gate.touch()
        t.join(WAIT)
        assert third[0].result(WAIT) == 3


def test_shutdown_wait_runs_everything(cluster: str) -> None:
    with fresh(2) as ex2:
        fs = [ex2.submit(k, tasks.record, k, i) for i in range(20) for k in range(4)]
        pids = _actor_pids(ex2)
        ex2.shutdown(wait=True)
        assert all(f.done() and not f.cancelled() for f in fs)
        routed.check_order([f.result() for f in fs])
        assert ex2._transport.alive() == 0 and ex2.closed
        assert wait_until(lambda: all(_gone(p) for p in pids), 30)  # actors killed
        with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
            ex2.submit("k", tasks.identity, 1)
        ex2.shutdown()  # again: harmless


def test_shutdown_cancel_futures(cluster: str, tmp_path: Path) -> None:
    with fresh(1, 1) as ex2:
        gate, blocker = routed.blocker(ex2, "b", tmp_path, WAIT)
        queued = [ex2.submit(k, tasks.identity, k) for k in range(10)]
        ex2.shutdown(wait=False, cancel_futures=True)
        assert wait_until(lambda: all(f.cancelled() for f in queued), WAIT)
        gate.touch()
        ex2.shutdown(wait=True)
        assert blocker.result(0) == "opened"


# -- actors that die, resize -----------------------------------------------------------------


def _outcomes(fs: list[cf.Future[Any]]) -> tuple[list[Any], int]:
    ok, lost = [], 0
    for f in fs:
        try:
            ok.append(f.result(WAIT))
        except ShardLost as exc:
            assert "may or may not have run" in str(exc)
            lost += 1
    return ok, lost


def test_actor_killed_mid_stream(cluster: str) -> None:
    with fresh(2, 1) as ex2:
        fs = [ex2.submit(k, tasks.record, k, i, 0.002) for i in range(40) for k in range(8)]
        assert wait_until(lambda: ex2.metrics().completed >= 40, WAIT)
        victim = ex2.actor_handles()[0]
        ray.kill(victim)
        ok, lost = _outcomes(fs)
        assert ok and lost
        routed.check_order(ok)
        assert wait_until(lambda: ex2.actor_handles().get(0) not in (None, victim), WAIT)
        assert [ex2.submit(k, tasks.identity, k).result(WAIT) for k in range(8)] == list(range(8))
        m = ex2.metrics()
        assert (m.lost, m.restarts, m.pending) == (lost, 1, 0)


def test_task_calling_os_exit(cluster: str) -> None:
    with fresh(1, 2) as ex2:
        fs = [ex2.submit("a", tasks.record, "a", i, 0.002) for i in range(20)]
        dead = ex2.submit("d", tasks.die)
        with pytest.raises(ShardLost, match="shard 0 died"):
            dead.result(WAIT)
        ok, _lost = _outcomes(fs)
        routed.check_order(ok)
        assert ex2.submit("d", tasks.identity, 2).result(WAIT) == 2
        assert ex2.metrics().restarts == 1


@pytest.mark.parametrize("how", ["ray.kill", "os._exit"])
def test_retry_runs_every_task_at_least_once_in_order(cluster: str, tmp_path: Path,
                                                      how: str) -> None:
    log, marker = tmp_path / "log", str(tmp_path / "died")

    def die_once() -> None:  # by value (cloudpickle): dies once, then runs
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)

    keys, n = 6, 30
    with fresh(2, 1, on_loss="retry") as ex2:
        fs = [ex2.submit(k, tasks.append, str(log), k, i, 0.002) for i in range(n)
              for k in range(keys)]
        assert wait_until(lambda: ex2.metrics().completed >= 30, WAIT)
        if how == "ray.kill":
            ray.kill(ex2.actor_handles()[0])
        else:
            ex2.execute("killer", die_once)
        results = [f.result(WAIT) for f in fs]
        assert results == [i for i in range(n) for _k in range(keys)]
        # The killer may still be on its way when the others are done: wait for its
        # second, successful run (the death and the retry are behind it).
        assert ex2.wait_key("killer", WAIT)
        m = ex2.metrics()
        assert m.restarts >= 1 and m.retried > 0
    runs: dict[int, list[int]] = {}
    for line in log.read_text().splitlines():
        k, i = map(int, line.split())
        runs.setdefault(k, []).append(i)
    for k in range(keys):
        assert sorted(set(runs[k])) == list(range(n)), k  # every task, at least once
        assert runs[k][0] == 0
        assert all(b <= a + 1 for a, b in zip(runs[k], runs[k][1:])), runs[k]  # in order


def test_resize_under_load(cluster: str) -> None:
    with fresh(2, 1, batch_size=8) as ex2:
        idle = {n: ex2.submit(("idle", n), tasks.pid).result(WAIT) for n in range(30)}
        fs = [ex2.submit(k, tasks.record, k, i, 0.001) for i in range(15) for k in range(10)]
        ex2.resize(3)
        assert ex2.actors == 3 and ex2.stats().workers == 3
        fs += [ex2.submit(k, tasks.record, k, i, 0.001) for i in range(15, 30)
               for k in range(10)]
        grown = {n: ex2.submit(("idle", n), tasks.pid).result(WAIT) for n in range(30)}
        moved = [n for n in idle if grown[n] != idle[n]]
        assert 0 < len(moved) < 30  # some idle keys moved (to the new actor), not all
        assert len(set(grown.values())) == 3
        ex2.resize(1)
        fs += [ex2.submit(k, tasks.record, k, i, 0.001) for i in range(30, 40)
               for k in range(10)]
        results = [f.result(WAIT) for f in fs]
        routed.check_order(results)
        assert [(r[0], r[1]) for r in results] == [(k, i) for i in range(40) for k in range(10)]
        assert wait_until(lambda: ex2._transport.alive() == 1, WAIT)  # the others left
        assert len({ex2.submit(("idle", n), tasks.pid).result(WAIT) for n in range(30)}) == 1
        ex2.resize(2)  # a retired shard comes back
        assert len({ex2.submit(("idle", n), tasks.pid).result(WAIT) for n in range(30)}) == 2
        m = ex2.metrics()
        assert (m.actors, m.lost, m.restarts) == (2, 0, 0)


# -- connecting: the executor's own ray.init, and address= ---------------------------------


def test_own_ray_init_and_address(cluster: str) -> None:
    """In a fresh interpreter: with address= the executor connects to this
    session's cluster and disconnects at shutdown (the cluster lives on); without
    Ray initialised it starts a cluster of its own and shuts it down, leaving no
    process behind."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_HERE, _ROOT, env.get("PYTHONPATH", "")])
    env.pop("RAY_ADDRESS", None)
    body = textwrap.dedent("""
        import sys, time, psutil, ray
        import _process_tasks as tasks
        from keyedexec.ray import RayKeyedExecutor
        with RayKeyedExecutor(1, address=sys.argv[1]) as ex:
            assert ex.submit("k", tasks.identity, 1).result(60) == 1
        assert not ray.is_initialized()
        with RayKeyedExecutor(1, actor_options={"num_cpus": 0}) as ex:
            assert ray.is_initialized()
            assert ray.get_runtime_context().gcs_address != sys.argv[1]
            assert ex.submit("k", tasks.identity, 2).result(60) == 2
        assert not ray.is_initialized()
        end = time.monotonic() + 20
        while psutil.Process().children(recursive=True) and time.monotonic() < end:
            time.sleep(0.1)
        print("left:", [p.pid for p in psutil.Process().children(recursive=True)])
    """)
    proc = subprocess.run([sys.executable, "-c", body, cluster], env=env,
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "left: []", proc.stdout
    assert ray.get(ray.put(5)) == 5  # this session's cluster lives on


# -- model: the same programs on the threaded executor -----------------------------------

OPS = routed.programs(max_size=15)



@pytest.fixture(scope="module")
def model_pair(cluster: str) -> Iterator[tuple[Any, Any]]:
    with fresh(1, 1) as ray_ex, KeyedExecutor(1) as thread_ex:
        yield ray_ex, thread_ex


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(program=OPS)
def test_model_against_the_threaded_executor(
    model_pair: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory,
    program: list[tuple[Any, ...]],
) -> None:
    """Random submits, cancel_key and wait_key(timeout=0) behind a gate that holds
    the only worker: both executors return the same, end every future the same
    way, and run each key's tasks in order."""
    routed.run_model(model_pair, tmp_path_factory.mktemp("model"), program, WAIT)
