"""The exporters (issue 16) against the real libraries: a prometheus_client registry
scraped in the text exposition format, and an OpenTelemetry in-memory reader.

A known workload runs first: 20 tasks that return, 3 that raise, 2 cancelled
before they start, then a key held busy with 4 tasks queued behind it.
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import threading
from typing import Any, Iterator

import pytest
from conftest import wait_until

prometheus_client = pytest.importorskip("prometheus_client")
pytest.importorskip("opentelemetry.sdk.metrics")

from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from keyedexec import AsyncKeyedExecutor  # noqa: E402
from keyedexec.contrib import KEY_LABEL_MAX, key_labels  # noqa: E402
from keyedexec.contrib.otel import instrument  # noqa: E402
from keyedexec.contrib.prometheus import KeyedExecutorCollector  # noqa: E402

pytestmark = pytest.mark.timeout(60)

T = 10.0


def noop() -> None:
    pass


def boom() -> None:
    raise ValueError("boom")


@pytest.fixture
def loaded(h: Any) -> Iterator[Any]:
    """An executor after the known workload, with "busy" held and 4 tasks behind it."""
    ex = h.executor(2, name="orders", sample_timings=1, on_error=lambda key, exc: None)
    for i in range(20):
        ex.submit(i % 3, noop).result(T)
    for _ in range(3):
        ex.execute("bad", boom)
    gate, blocker = h.block(ex, "queue")
    dropped = [ex.submit("queue", noop) for _ in range(2)]
    assert ex.cancel_key("queue") == 2 and all(f.cancelled() for f in dropped)
    gate.set()
    blocker.result(T)
    assert wait_until(lambda: ex.metrics().completed == 24)
    gate, blocker = h.block(ex, "busy")
    for _ in range(4):
        ex.execute("busy", noop)
    yield ex
    gate.set()


def scrape(registry: CollectorRegistry) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Each sample of the text exposition as {sample name: {sorted labels: value}}."""
    text = generate_latest(registry).decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def one(samples: dict[tuple[tuple[str, str], ...], float], **labels: str) -> float:
    [value] = [v for k, v in samples.items() if dict(k) == labels]
    return value


# -- importing ---------------------------------------------------------------------------


def test_import_keyedexec_imports_no_exporter_library() -> None:
    code = (
        "import sys, keyedexec, keyedexec.contrib\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('prometheus_client', 'opentelemetry')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_key_labels_are_short_and_distinct() -> None:
    long = "x" * 500
    labels = key_labels(["acct-1", 1, "1", ("t", 2), long, long + "y", None])
    assert labels[:4] == ["acct-1", "1", "1 #2", "('t', 2)"]
    assert len(labels[4]) == KEY_LABEL_MAX and labels[4].endswith("…")
    assert labels[5] == labels[4] + " #2" and labels[6] == "None"
    assert len(set(labels)) == len(labels)


class _ReprRaises:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for this key")


def test_key_labels_of_keys_whose_repr_raises_or_that_do_not_encode() -> None:
    """A label is text a scrape can encode (UTF-8), whatever the key."""
    labels = key_labels([_ReprRaises(), "file-\udc80", "ok"])
    assert labels[0] == "<_ReprRaises: repr() raised RuntimeError>"
    assert labels[1] == "file-\\udc80" and labels[2] == "ok"
    for label in labels:
        label.encode("utf-8")


def test_prometheus_scrape_survives_keys_that_do_not_make_a_label(h: Any) -> None:
    """One odd key must not fail the whole scrape (a 500 on /metrics)."""
    ex = h.executor(1)
    registry = CollectorRegistry()
    KeyedExecutorCollector(ex, registry=registry, name="odd")
    gate, blocker = h.block(ex, "busy")
    for key in (_ReprRaises(), "file-\udc80"):
        ex.execute(key, noop)
    hot = scrape(registry)["keyedexec_hot_key_queued_tasks"]
    assert {dict(k)["key"] for k in hot} == {
        "busy", "<_ReprRaises: repr() raised RuntimeError>", "file-\\udc80"}
    gate.set()


# -- Prometheus ----------------------------------------------------------------------------


def test_prometheus_scrape_after_a_known_workload(loaded: Any) -> None:
    registry = CollectorRegistry()
    KeyedExecutorCollector(loaded, registry=registry, hot_keys=3)
    s = scrape(registry)
    ex = {"executor": "orders"}
    assert one(s["keyedexec_tasks_submitted_total"], **ex) == 20 + 3 + 1 + 2 + 1 + 4
    assert one(s["keyedexec_tasks_completed_total"], **ex) == 24
    assert one(s["keyedexec_tasks_failed_total"], **ex) == 3
    assert one(s["keyedexec_tasks_cancelled_total"], **ex) == 2
    assert one(s["keyedexec_tasks_pending"], **ex) == 4
    assert one(s["keyedexec_tasks_running"], **ex) == 1
    assert one(s["keyedexec_active_keys"], **ex) == 1
    assert one(s["keyedexec_workers"], **ex) == loaded.metrics().workers  # 1 or 2: timing
    for what in ("wait", "run"):
        count = one(s[f"keyedexec_task_{what}_seconds_count"], **ex)
        assert count == 24  # every task that ran: sample_timings=1
        buckets = sorted(
            (float(dict(k)["le"]), v) for k, v in s[f"keyedexec_task_{what}_seconds_bucket"].items()
        )
        assert len(buckets) == 28 and buckets[-1] == (float("inf"), count)
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
        assert one(s[f"keyedexec_task_{what}_seconds_sum"], **ex) > 0
    assert one(s["keyedexec_task_run_seconds_bucket"], le="+Inf", **ex) == 24
    assert s["keyedexec_hot_key_queued_tasks"] == {(("executor", "orders"), ("key", "busy")): 4}
    assert one(s["keyedexec_hot_key_running"], key="busy", **ex) == 1
    assert one(s["keyedexec_hot_key_oldest_wait_seconds"], key="busy", **ex) >= 0


def test_prometheus_histogram_help_says_how_tasks_are_sampled(h: Any) -> None:
    registry = CollectorRegistry()
    KeyedExecutorCollector(h.executor(1, name="svc"), registry=registry)
    text = generate_latest(registry).decode()
    assert "# HELP keyedexec_task_wait_seconds Submit to start of the timed tasks " \
           "(svc: 1 task in 32 timed)." in text


def test_prometheus_cardinality_is_bounded_with_100000_keys(h: Any) -> None:
    ex = h.executor(1, name="wide")
    gate, blocker = h.block(ex, "blocker")
    for i in range(100_000):
        ex.execute(("user", i), noop)
    for _ in range(5):
        ex.execute(("user", 77), noop)
    registry = CollectorRegistry()
    KeyedExecutorCollector(ex, registry=registry, hot_keys=10)
    s = scrape(registry)
    assert sum(len(v) for v in s.values()) < 120  # 8 + 2 x (28 + 2) + 3 x 10
    assert len(s["keyedexec_hot_key_queued_tasks"]) == 10
    assert one(s["keyedexec_hot_key_queued_tasks"], executor="wide", key="('user', 77)") == 6
    gate.set()
    blocker.result(T)


def test_prometheus_several_executors_in_one_collector(h: Any) -> None:
    a, b = h.executor(1, name="a"), h.executor(1, name="b")
    registry = CollectorRegistry()
    collector = KeyedExecutorCollector(a, registry=registry)
    collector.add(b)
    with pytest.raises(ValueError, match="'a'"):
        collector.add(h.executor(1, name="a"))
    collector.add(h.executor(1, name="a"), name="a2")
    a.submit("k", noop).result(T)
    s = scrape(registry)
    assert {dict(k)["executor"] for k in s["keyedexec_tasks_submitted_total"]} == {"a", "b", "a2"}
    assert one(s["keyedexec_tasks_submitted_total"], executor="a") == 1
    # A registry refuses a second collector of the same names.
    with pytest.raises(ValueError):
        KeyedExecutorCollector(b, registry=registry)


def test_prometheus_collector_holds_executors_weakly(impl: Any) -> None:
    registry = CollectorRegistry()
    ex = impl.KeyedExecutor(1, name="gone")
    KeyedExecutorCollector(ex, registry=registry)
    assert "keyedexec_tasks_submitted_total" in scrape(registry)
    ex.shutdown()
    del ex
    gc.collect()
    assert "keyedexec_tasks_submitted_total" not in scrape(registry)


@pytest.mark.parametrize(("value", "error"), [(-1, ValueError), ("3", TypeError)])
def test_prometheus_arguments_are_validated(h: Any, value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="hot_keys"):
        KeyedExecutorCollector(h.executor(1), hot_keys=value, registry=None)
    with pytest.raises(TypeError, match="name"):
        KeyedExecutorCollector(h.executor(1), name=3, registry=None)  # type: ignore[arg-type]


def test_prometheus_taskpool_and_async_executor(impl: Any) -> None:
    registry = CollectorRegistry()
    with impl.TaskPool(name="pool", sample_timings=1) as pool:
        collector = KeyedExecutorCollector(pool, registry=registry)
        done = threading.Event()
        pool.submit("k", lambda ctx: done.set())
        assert done.wait(T)
        assert wait_until(lambda: pool.metrics().completed == 1)

        async def main() -> None:
            async with AsyncKeyedExecutor(name="aio") as aex:
                collector.add(aex)
                await asyncio.wait_for(aex.submit("k", asyncio.sleep, 0), T)
                s = scrape(registry)
                assert one(s["keyedexec_tasks_completed_total"], executor="aio") == 1
                assert one(s["keyedexec_task_run_seconds_count"], executor="aio") == 1

        asyncio.run(main())
        s = scrape(registry)
        assert one(s["keyedexec_tasks_completed_total"], executor="pool") == 1
        assert one(s["keyedexec_task_wait_seconds_count"], executor="pool") == 1


# -- OpenTelemetry ---------------------------------------------------------------------------


def otel_points(reader: InMemoryMetricReader) -> dict[str, dict[tuple[tuple[str, Any], ...], Any]]:
    """{instrument name: {sorted attributes: value}} of one collection."""
    out: dict[str, dict[tuple[tuple[str, Any], ...], Any]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    out.setdefault(metric.name, {})[tuple(sorted(p.attributes.items()))] = p.value
    return out


def test_otel_in_memory_reader_after_a_known_workload(loaded: Any) -> None:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    instrument(loaded, meter, hot_keys=3)
    p = otel_points(reader)
    ex = {"keyedexec.executor": "orders"}
    assert one(p["keyedexec.tasks.submitted"], **ex) == 31
    assert one(p["keyedexec.tasks.completed"], **ex) == 24
    assert one(p["keyedexec.tasks.failed"], **ex) == 3
    assert one(p["keyedexec.tasks.cancelled"], **ex) == 2
    assert one(p["keyedexec.tasks.pending"], **ex) == 4
    assert one(p["keyedexec.tasks.running"], **ex) == 1
    assert one(p["keyedexec.active_keys"], **ex) == 1
    assert one(p["keyedexec.workers"], **ex) == loaded.metrics().workers  # 1 or 2: timing
    for what in ("wait", "run"):
        assert one(p[f"keyedexec.task.{what}.count"], **ex) == 24
        assert one(p[f"keyedexec.task.{what}.sum"], **ex) > 0
        buckets = p[f"keyedexec.task.{what}.bucket"]
        assert len(buckets) == 28 and one(buckets, le="+Inf", **ex) == 24
    assert p["keyedexec.hot_key.queued"] == {
        (("keyedexec.executor", "orders"), ("keyedexec.key", "busy")): 4
    }
    assert one(p["keyedexec.hot_key.oldest_wait"], **{"keyedexec.key": "busy"}, **ex) >= 0
    # A second collection sees what happened in between.
    loaded.execute("busy", noop)
    p = otel_points(reader)
    assert one(p["keyedexec.tasks.submitted"], **ex) == 32
    assert one(p["keyedexec.hot_key.queued"], **{"keyedexec.key": "busy"}, **ex) == 5


def test_otel_cardinality_is_bounded_with_100000_keys(h: Any) -> None:
    ex = h.executor(1, name="wide")
    gate, blocker = h.block(ex, "blocker")
    for i in range(100_000):
        ex.execute(i, noop)
    reader = InMemoryMetricReader()
    instrument(ex, MeterProvider(metric_readers=[reader]).get_meter("test"), hot_keys=10)
    p = otel_points(reader)
    assert len(p["keyedexec.hot_key.queued"]) == len(p["keyedexec.hot_key.oldest_wait"]) == 10
    assert sum(len(v) for v in p.values()) < 120
    gate.set()
    blocker.result(T)


def test_otel_several_executors_on_one_meter(impl: Any) -> None:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    a = impl.KeyedExecutor(1, name="a")
    pool = impl.TaskPool(name="pool")
    try:
        instrument(a, meter)
        instrument(pool, meter, hot_keys=0)
        with pytest.raises(ValueError, match="'a'"):
            instrument(impl.KeyedExecutor(1, name="a"), meter)
        a.submit("k", noop).result(T)
        p = otel_points(reader)
        assert one(p["keyedexec.tasks.submitted"], **{"keyedexec.executor": "a"}) == 1
        assert one(p["keyedexec.tasks.submitted"], **{"keyedexec.executor": "pool"}) == 0
    finally:
        a.shutdown()
        pool.stop()
