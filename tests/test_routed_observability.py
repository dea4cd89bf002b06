"""Observability of the routed executors (issue 16): hot_keys, timings,
slow_task_threshold and the exporters, on ProcessKeyedExecutor.

RayKeyedExecutor shares the router that computes all of it; its own test (with
a real cluster) is in test_ray_executor.py. Children are forked where the
platform can (fast), spawned where a test needs a child with fresh logging.
Task functions live in ``_process_tasks``; gates between processes are files.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import multiprocessing
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

import _process_tasks as tasks
from conftest import wait_until
from keyedexec import ShardLost
from keyedexec._timings import HotKey
from keyedexec.process import ProcessKeyedExecutor

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]

METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
T = 30.0


@pytest.fixture
def ex() -> Iterator[ProcessKeyedExecutor[Any]]:
    """One child with one worker: a task holding it holds every key sent there."""
    executor: ProcessKeyedExecutor[Any] = ProcessKeyedExecutor(
        1, mp_context=METHOD, name="orders", on_error=lambda key, exc: None)
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def blocker(ex: ProcessKeyedExecutor[Any], key: Any, tmp: Path) -> tuple[Path, cf.Future[Any]]:
    """A task of ``key`` running in its child until the test creates the gate file."""
    started, gate = tmp / f"started-{key}", tmp / f"gate-{key}"
    fut = ex.submit(key, tasks.touch_then_wait, str(started), str(gate))
    assert wait_until(started.exists, T)
    return gate, fut


# -- hot_keys ------------------------------------------------------------------------------


def test_hot_keys_of_a_busy_key_and_one_behind_it(ex: ProcessKeyedExecutor[Any],
                                                  tmp_path: Path) -> None:
    assert ex.hot_keys() == []
    gate, held = blocker(ex, "busy", tmp_path)
    busy = [ex.submit("busy", tasks.identity, i) for i in range(4)]
    other = [ex.submit("other", tasks.identity, i) for i in range(2)]
    assert wait_until(lambda: ex.metrics().in_flight == 7, T)  # all sent, none back
    hot = ex.hot_keys(5)
    assert [(k.key, k.queued, k.running) for k in hot] == [("busy", 4, True), ("other", 1, True)]
    assert all(isinstance(k, HotKey) and k.oldest_wait is not None and k.oldest_wait >= 0
               for k in hot)
    assert hot[0].oldest_wait >= hot[1].oldest_wait  # type: ignore[operator]  # older: first
    assert [k.key for k in ex.hot_keys(1)] == ["busy"]
    gate.touch()
    assert held.result(T) == "opened"
    assert [f.result(T) for f in busy + other] == [0, 1, 2, 3, 0, 1]
    assert wait_until(lambda: ex.hot_keys() == [], T)


def test_hot_keys_without_a_sent_task_is_not_running(tmp_path: Path) -> None:
    """A key whose tasks all wait here (its batch not sent yet) is not running."""
    with ProcessKeyedExecutor(1, mp_context=METHOD, linger=3600, batch_size=1000) as slow:
        fs = [slow.submit("k", tasks.identity, i) for i in range(3)]
        [hot] = slow.hot_keys()
        assert (hot.key, hot.queued, hot.running) == ("k", 3, False)
        slow.shutdown(wait=False)  # closing sends the batch at once
        assert [f.result(T) for f in fs] == [0, 1, 2]


@pytest.mark.parametrize("n, error", [(0, ValueError), (-1, ValueError), ("3", TypeError),
                                      (True, TypeError), (2.0, TypeError), (None, TypeError)])
def test_hot_keys_refuses_a_bad_n(ex: ProcessKeyedExecutor[Any], n: Any,
                                  error: type[Exception]) -> None:
    with pytest.raises(error, match=r"\bn\b"):
        ex.hot_keys(n)


# -- timings -------------------------------------------------------------------------------


def test_timings_count_every_task_that_ran(ex: ProcessKeyedExecutor[Any],
                                           tmp_path: Path) -> None:
    t = ex.timings()
    assert (t.sample_every, t.wait.count, t.run.count) == (1, 0, 0)
    assert [f.result(T) for f in [ex.submit(i, tasks.identity, i) for i in range(10)]] == list(
        range(10))
    with pytest.raises(ValueError):
        ex.submit("bad", tasks.raise_value_error, 1).result(T)
    # A task that runs 0.2 s, and one of its key that must wait for it.
    slow = ex.submit("slow", tasks.record, "slow", 0, 0.2)
    behind = ex.submit("slow", tasks.identity, "behind")
    gate, held = blocker(ex, "gate", tmp_path)
    dropped = ex.submit("gate", tasks.identity, "dropped")
    assert ex.cancel_key("gate") == 1 and dropped.cancelled()
    gate.touch()
    assert slow.result(T)[0] == "slow" and behind.result(T) == "behind" and held.result(T)
    t = ex.timings()
    assert t.wait.count == t.run.count == 14  # the cancelled task did not run
    assert t.wait.buckets[-1] == math.inf and len(t.run.counts) == len(t.run.buckets)
    assert t.run.sum >= 0.2
    # The slow run and the wait behind it land in buckets above 0.2 s.
    assert sum(n for b, n in zip(t.run.buckets, t.run.counts) if b > 0.2) >= 1
    assert sum(n for b, n in zip(t.wait.buckets, t.wait.counts) if b > 0.2) >= 1
    assert t.wait.sum >= 0.2


def test_sample_timings(tmp_path: Path) -> None:
    with ProcessKeyedExecutor(1, mp_context=METHOD, sample_timings=0) as off:
        assert off.submit("k", tasks.identity, 1).result(T) == 1
        t = off.timings()
        assert (t.sample_every, t.wait.count, t.run.count) == (0, 0, 0)
    with ProcessKeyedExecutor(1, mp_context=METHOD, sample_timings=4) as some:
        for f in [some.submit(i, tasks.identity, i) for i in range(40)]:
            f.result(T)
        t = some.timings()
        assert t.sample_every == 4 and 1 <= t.run.count < 40 and t.wait.count == t.run.count


@pytest.mark.parametrize("kwargs, error, match", [
    ({"sample_timings": -1}, ValueError, "sample_timings"),
    ({"sample_timings": 2**32}, ValueError, "sample_timings"),
    ({"sample_timings": "1"}, TypeError, "sample_timings"),
    ({"sample_timings": True}, TypeError, "sample_timings"),
    ({"slow_task_threshold": 0}, ValueError, "slow_task_threshold"),
    ({"slow_task_threshold": -1.0}, ValueError, "slow_task_threshold"),
    ({"slow_task_threshold": "1"}, TypeError, "slow_task_threshold"),
])
def test_bad_arguments_start_no_child(kwargs: dict[str, Any], error: type[Exception],
                                      match: str) -> None:
    before = multiprocessing.active_children()
    with pytest.raises(error, match=match):
        ProcessKeyedExecutor(1, mp_context=METHOD, **kwargs)
    assert multiprocessing.active_children() == before


# -- slow-task log -----------------------------------------------------------------------


def test_slow_task_is_logged_by_its_child(capfd: pytest.CaptureFixture[str]) -> None:
    """Spawned: the child's logging is unconfigured, so the warning reaches its
    stderr (this process's, which capfd reads)."""
    with ProcessKeyedExecutor(1, mp_context="spawn", name="billing",
                              slow_task_threshold=0.05) as slow:
        assert slow.submit("acct-7", tasks.record, "acct-7", 0, 0.4).result(T)[0] == "acct-7"
        assert slow.submit("quick", tasks.identity, 1).result(T) == 1
    err = capfd.readouterr().err
    assert err.count("billing-shard: a task of key 'acct-7' has been running for more") == 1
    assert "quick" not in err


# -- exporters -----------------------------------------------------------------------------


@pytest.fixture
def loaded(ex: ProcessKeyedExecutor[Any], tmp_path: Path) -> Iterator[ProcessKeyedExecutor[Any]]:
    """After a known workload: 5 tasks that return, 2 that raise, 1 cancelled,
    1 lost with its child (and the child replaced); then "busy" held with 3
    tasks behind it."""
    for i in range(5):
        ex.submit(i, tasks.identity, i).result(T)
    for _ in range(2):
        ex.execute("bad", tasks.raise_value_error, 1)
    gate, held = blocker(ex, "queue", tmp_path)
    dropped = ex.submit("queue", tasks.identity, 0)
    assert ex.cancel_key("queue") == 1 and dropped.cancelled()
    gate.touch()
    held.result(T)
    with pytest.raises(ShardLost):
        ex.submit("doomed", tasks.die, 3).result(T)
    assert wait_until(lambda: ex.metrics().children == 1 and ex.metrics().completed == 8, T)
    gate, held = blocker(ex, "busy", tmp_path)
    for i in range(3):
        ex.execute("busy", tasks.identity, i)
    assert wait_until(lambda: ex.metrics().in_flight == 4, T)
    yield ex
    gate.touch()
    held.result(T)


def test_prometheus_scrape(loaded: ProcessKeyedExecutor[Any]) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from test_contrib import one, scrape

    from keyedexec.contrib.prometheus import KeyedExecutorCollector

    registry = prometheus_client.CollectorRegistry()
    KeyedExecutorCollector(loaded, registry=registry, hot_keys=2)
    s = scrape(registry)
    ex = {"executor": "orders"}
    assert one(s["keyedexec_tasks_submitted_total"], **ex) == 5 + 2 + 2 + 1 + 1 + 3
    assert one(s["keyedexec_tasks_completed_total"], **ex) == 8
    assert one(s["keyedexec_tasks_failed_total"], **ex) == 2
    assert one(s["keyedexec_tasks_cancelled_total"], **ex) == 1
    assert one(s["keyedexec_tasks_lost_total"], **ex) == 1
    assert one(s["keyedexec_tasks_retried_total"], **ex) == 0
    assert one(s["keyedexec_shard_restarts_total"], **ex) == 1
    assert one(s["keyedexec_shard_recycled_total"], **ex) == 0
    assert one(s["keyedexec_shards"], **ex) == 1
    assert one(s["keyedexec_workers"], **ex) == 1
    assert one(s["keyedexec_tasks_pending"], **ex) == 0  # every task was sent
    assert one(s["keyedexec_tasks_running"], **ex) == 4  # sent, not back
    assert one(s["keyedexec_active_keys"], **ex) == 1
    for what in ("wait", "run"):  # every task that ran: not the cancelled or the lost one
        assert one(s[f"keyedexec_task_{what}_seconds_count"], **ex) == 8
        assert one(s[f"keyedexec_task_{what}_seconds_bucket"], le="+Inf", **ex) == 8
    assert s["keyedexec_hot_key_queued_tasks"] == {(("executor", "orders"), ("key", "busy")): 3}
    assert one(s["keyedexec_hot_key_running"], key="busy", **ex) == 1
    assert one(s["keyedexec_hot_key_oldest_wait_seconds"], key="busy", **ex) >= 0


def test_otel_in_memory_reader(loaded: ProcessKeyedExecutor[Any]) -> None:
    pytest.importorskip("opentelemetry.sdk.metrics")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from test_contrib import one, otel_points

    from keyedexec.contrib.otel import instrument

    reader = InMemoryMetricReader()
    instrument(loaded, MeterProvider(metric_readers=[reader]).get_meter("test"), hot_keys=2)
    p = otel_points(reader)
    ex = {"keyedexec.executor": "orders"}
    assert one(p["keyedexec.tasks.submitted"], **ex) == 14
    assert one(p["keyedexec.tasks.completed"], **ex) == 8
    assert one(p["keyedexec.tasks.failed"], **ex) == 2
    assert one(p["keyedexec.tasks.cancelled"], **ex) == 1
    assert one(p["keyedexec.tasks.lost"], **ex) == 1
    assert one(p["keyedexec.shard.restarts"], **ex) == 1
    assert one(p["keyedexec.shards"], **ex) == 1
    assert one(p["keyedexec.tasks.running"], **ex) == 4
    assert one(p["keyedexec.task.run.count"], **ex) == 8
    assert one(p["keyedexec.task.wait.bucket"], le="+Inf", **ex) == 8
    assert p["keyedexec.hot_key.queued"] == {
        (("keyedexec.executor", "orders"), ("keyedexec.key", "busy")): 3
    }


def test_import_process_imports_no_exporter() -> None:
    import subprocess
    import sys

    code = ("import sys, keyedexec, keyedexec.process; "
            "bad = [m for m in ('prometheus_client', 'opentelemetry', 'ray', "
            "'keyedexec.contrib') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stdout + out.stderr
