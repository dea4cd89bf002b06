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
  ``keyedexec_active_keys``, ``keyedexec_workers``;
* histograms ``keyedexec_task_wait_seconds`` (submit -> start) and
  ``keyedexec_task_run_seconds`` (start -> end) over the *timed* tasks: one
  in ``sample_timings`` (the HELP text says how many), so ``_count`` is not
  the number of tasks; ``histogram_quantile()`` over them is what to read;
* gauges ``keyedexec_hot_key_queued_tasks``, ``keyedexec_hot_key_running``
  and ``keyedexec_hot_key_oldest_wait_seconds`` for the top ``hot_keys``
  keys, labelled ``key``: at most ``hot_keys`` series each per scrape, however
  many keys the executor holds (see ``keyedexec.contrib.key_labels``).

The collector holds the executor weakly: once the executor is gone, it
yields nothing (unregister it to drop it from the registry).
"""

from __future__ import annotations

import weakref
from typing import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from .._timings import Histogram
from . import Observed, key_labels, sampling

__all__ = ["KeyedExecutorCollector"]

_COUNTERS = [
    ("submitted", 4, "Tasks accepted"),
    ("completed", 5, "Tasks that ran to the end, returning or raising"),
    ("failed", 6, "Tasks that raised (also counted in completed)"),
    ("cancelled", 7, "Tasks that never ran: cancelled, skipped, or dropped"),
]
_GAUGES = [
    ("tasks_pending", 2, "Tasks queued, not started"),
    ("tasks_running", 1, "Tasks running now"),
    ("active_keys", 3, "Keys with queued or running tasks"),
    ("workers", 0, "Worker threads (runner tasks for asyncio) alive"),
]


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class KeyedExecutorCollector(Collector):
    """Exports one executor (KeyedExecutor, TaskPool or AsyncKeyedExecutor).

    ``name`` (default: the executor's) is the ``executor`` label; two
    executors in one registry need different names. ``hot_keys`` is how many
    hot keys are exported (0: none). ``registry``: where to register now
    (None: do not register).
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
        if isinstance(hot_keys, bool) or not isinstance(hot_keys, int):
            raise TypeError(f"hot_keys must be an int, got {type(hot_keys).__name__}")
        if hot_keys < 0:
            raise ValueError(f"hot_keys must be >= 0, got {hot_keys}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"namespace must be a non-empty str, got {namespace!r}")
        self._executor = weakref.ref(executor)
        self._name = executor.name if name is None else name
        self._prefix = namespace + "_"
        self._hot_keys = hot_keys
        if registry is not None:
            registry.register(self)

    def describe(self) -> list[Metric]:
        # Registration checks names for clashes without a scrape.
        return list(self._families(None))

    def collect(self) -> Iterator[Metric]:
        executor = self._executor()
        if executor is not None:
            yield from self._families(executor)

    def _families(self, executor: Observed | None) -> Iterator[Metric]:
        p, labels, values = self._prefix, ["executor"], [self._name]
        m = None if executor is None else executor.metrics()
        for field, index, doc in _COUNTERS:
            c = CounterMetricFamily(f"{p}tasks_{field}", doc + ".", labels=labels)
            if m is not None:
                c.add_metric(values, m[index])
            yield c
        for field, index, doc in _GAUGES:
            g = GaugeMetricFamily(f"{p}{field}", doc + ".", labels=labels)
            if m is not None:
                g.add_metric(values, m[index])
            yield g
        t = None if executor is None else executor.timings()
        every = "sampled" if t is None else sampling(t.sample_every)
        for what, doc in (("wait", "Submit to start"), ("run", "Start to end")):
            h = HistogramMetricFamily(
                f"{p}task_{what}_seconds", f"{doc} of the timed tasks ({every}).",
                labels=labels,
            )
            if t is not None:
                hist: Histogram = getattr(t, what)
                h.add_metric(
                    values,
                    [(_le(bound), n) for bound, n in hist.cumulative()],
                    hist.sum,
                )
            yield h
        if not self._hot_keys:
            return
        hot = [] if executor is None else executor.hot_keys(self._hot_keys)
        key_labels_ = ["executor", "key"]
        queued = GaugeMetricFamily(
            f"{p}hot_key_queued_tasks",
            f"Queued tasks of the {self._hot_keys} keys with the most.", labels=key_labels_,
        )
        running = GaugeMetricFamily(
            f"{p}hot_key_running", "1 if a task of this hot key runs now.", labels=key_labels_
        )
        oldest = GaugeMetricFamily(
            f"{p}hot_key_oldest_wait_seconds",
            "How long the oldest queued task of this hot key has waited.", labels=key_labels_,
        )
        for k, label in zip(hot, key_labels([k.key for k in hot])):
            queued.add_metric([self._name, label], k.queued)
            running.add_metric([self._name, label], int(k.running))
            if k.oldest_wait is not None:
                oldest.add_metric([self._name, label], k.oldest_wait)
        yield queued
        yield running
        yield oldest
