"""A ``prometheus_client`` collector for keyedexec executors (``keyedexec[prometheus]``).

::

    from keyedexec.contrib.prometheus import KeyedExecutorCollector
    KeyedExecutorCollector(executor)            # registered with prometheus_client.REGISTRY
    prometheus_client.start_http_server(9100)   # or make_wsgi_app(), etc.

Each scrape reads the executor's ``metrics()``, ``timings()`` and
``hot_keys(hot_keys)``; nothing is recorded per task on the Python side. With
the default ``namespace="keyedexec"`` the families are (every sample labelled
``executor=<name>``):

* counters ``keyedexec_tasks_{submitted,completed,failed,cancelled}_total``;
* gauges ``keyedexec_tasks_pending`` (queued), ``keyedexec_tasks_running``,
  ``keyedexec_active_keys``, ``keyedexec_workers``; for ProcessKeyedExecutor
  and RayKeyedExecutor, ``pending`` counts the tasks not yet sent to a shard
  and ``running`` those sent and not back (running or queued there);
* for those two only (the families appear once one is exported): counters
  ``keyedexec_tasks_{lost,retried}_total``,
  ``keyedexec_shard_{restarts,recycled}_total`` and the gauge
  ``keyedexec_shards`` (children alive, or actors);
* histograms ``keyedexec_task_wait_seconds`` (submit -> start) and
  ``keyedexec_task_run_seconds`` (start -> end) over the *timed* tasks: one
  in ``sample_timings`` (the HELP text says how many), so ``_count`` is not
  the number of tasks; ``histogram_quantile()`` over them is what to read;
* gauges ``keyedexec_hot_key_queued_tasks``, ``keyedexec_hot_key_running``
  and ``keyedexec_hot_key_oldest_wait_seconds`` for the top ``hot_keys``
  keys, labelled ``key``: at most ``hot_keys`` series each per scrape, however
  many keys the executor holds (see ``keyedexec.contrib.key_labels``).

Several executors share one collector (:meth:`KeyedExecutorCollector.add`),
each under its own ``executor`` label. The collector holds them weakly: an
executor that is gone is no longer exported.
"""

from __future__ import annotations

import threading
import weakref
from typing import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from .._timings import Histogram
from . import (
    COUNTERS,
    GAUGES,
    ROUTED_COUNTERS,
    ROUTED_GAUGES,
    Observed,
    check_hot_keys,
    executor_name,
    key_labels,
    readings,
    sampling,
)

__all__ = ["KeyedExecutorCollector"]

# Family name (after the namespace) of each reading.
_NAMES = {
    **{field: f"tasks_{field}" for field, _doc in COUNTERS},
    "pending": "tasks_pending", "running": "tasks_running", "active_keys": "active_keys",
    "workers": "workers", "lost": "tasks_lost", "retried": "tasks_retried",
    "restarts": "shard_restarts", "recycled": "shard_recycled", "shards": "shards",
}


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class KeyedExecutorCollector(Collector):
    """Exports executors (KeyedExecutor, TaskPool, AsyncKeyedExecutor,
    ProcessKeyedExecutor, RayKeyedExecutor): the one given here, and those
    :meth:`add` adds. One collector per registry: a registry refuses two
    collectors of the same metric names.

    ``name`` (default: the executor's) is its ``executor`` label. ``hot_keys``
    is how many hot keys to export per executor (0: none). ``registry``:
    where to register now (None: do not register).
    """

    def __init__(
        self,
        executor: Observed,
        *,
        name: str | None = None,
        namespace: str = "keyedexec",
        hot_keys: int = 10,
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"namespace must be a non-empty str, got {namespace!r}")
        self._prefix = namespace + "_"
        self._lock = threading.Lock()
        self._exported: dict[str, tuple[weakref.ref[Observed], int]] = {}
        self.add(executor, name=name, hot_keys=hot_keys)
        if registry is not None:
            registry.register(self)

    def add(self, executor: Observed, *, name: str | None = None, hot_keys: int = 10) -> None:
        """Export another executor too, under its own ``name`` (ValueError if taken)."""
        check_hot_keys(hot_keys)
        name = executor_name(executor, name)
        with self._lock:
            if name in self._exported and self._exported[name][0]() is not None:
                raise ValueError(f"an executor named {name!r} is exported already: pass name=")
            self._exported[name] = (weakref.ref(executor), hot_keys)

    def describe(self) -> list[Metric]:
        # The names, for the registry's clash check, without reading the executors.
        return list(self._families([], every_family=True))

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            exported = [(name, ref(), n) for name, (ref, n) in self._exported.items()]
        yield from self._families([(name, ex, n) for name, ex, n in exported if ex is not None])

    def _families(self, exported: list[tuple[str, Observed, int]],
                  every_family: bool = False) -> Iterator[Metric]:
        p, labels = self._prefix, ["executor"]
        metrics = [(name, readings(ex)) for name, ex, _n in exported]
        routed = every_family or any("shards" in m for _name, m in metrics)
        counters = COUNTERS + (ROUTED_COUNTERS if routed else [])
        gauges = GAUGES + (ROUTED_GAUGES if routed else [])
        for field, doc in counters:
            c = CounterMetricFamily(f"{p}{_NAMES[field]}", doc + ".", labels=labels)
            for name, m in metrics:
                if field in m:
                    c.add_metric([name], m[field])
            yield c
        for field, doc in gauges:
            g = GaugeMetricFamily(f"{p}{_NAMES[field]}", doc + ".", labels=labels)
            for name, m in metrics:
                if field in m:
                    g.add_metric([name], m[field])
            yield g
        timings = [(name, ex.timings()) for name, ex, _n in exported]
        every = ", ".join(f"{name}: {sampling(t.sample_every)}" for name, t in timings)
        for what, doc in (("wait", "Submit to start"), ("run", "Start to end")):
            h = HistogramMetricFamily(
                f"{p}task_{what}_seconds",
                f"{doc} of the timed tasks ({every or 'sample_timings'}).", labels=labels,
            )
            for name, t in timings:
                hist: Histogram = getattr(t, what)
                h.add_metric([name], [(_le(b), n) for b, n in hist.cumulative()], hist.sum)
            yield h
        key_labels_ = ["executor", "key"]
        queued = GaugeMetricFamily(
            f"{p}hot_key_queued_tasks", "Queued tasks of the keys with the most.",
            labels=key_labels_,
        )
        running = GaugeMetricFamily(
            f"{p}hot_key_running", "1 if a task of this hot key runs now.", labels=key_labels_
        )
        oldest = GaugeMetricFamily(
            f"{p}hot_key_oldest_wait_seconds",
            "How long the oldest queued task of this hot key has waited.", labels=key_labels_,
        )
        for name, ex, n in exported:
            hot = ex.hot_keys(n) if n else []
            for k, label in zip(hot, key_labels([k.key for k in hot])):
                queued.add_metric([name, label], k.queued)
                running.add_metric([name, label], int(k.running))
                if k.oldest_wait is not None:
                    oldest.add_metric([name, label], k.oldest_wait)
        yield queued
        yield running
        yield oldest
