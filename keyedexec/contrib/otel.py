"""OpenTelemetry metrics for keyedexec executors (``keyedexec[otel]``).

::

    from opentelemetry import metrics
    from keyedexec.contrib.otel import instrument
    instrument(executor, metrics.get_meter("my.service"))

Every instrument is *observable*: its callback reads the executor when the
SDK collects (``metrics()``, ``timings()``, ``hot_keys()``), so nothing is
recorded per task on the Python side. Each observation carries the
attribute ``keyedexec.executor`` (the executor's name). Instruments, with
the default ``prefix="keyedexec"``:

* counters ``keyedexec.tasks.{submitted,completed,failed,cancelled}``;
* up-down counters ``keyedexec.tasks.pending``, ``keyedexec.tasks.running``,
  ``keyedexec.active_keys``, ``keyedexec.workers``; for ProcessKeyedExecutor
  and RayKeyedExecutor, ``pending`` counts the tasks not yet sent to a shard
  and ``running`` those sent and not back (running or queued there);
* for those two only: counters ``keyedexec.tasks.{lost,retried}``,
  ``keyedexec.shard.{restarts,recycled}`` and the up-down counter
  ``keyedexec.shards`` (children alive, or actors);
* the two histograms. OpenTelemetry has no observable histogram, and
  recording each timed duration again through a synchronous one would cost
  per task what the core avoids; so each is exported as its buckets, the
  way Prometheus does: counters ``keyedexec.task.wait.bucket`` (attribute
  ``le``: upper bound in seconds, ``"+Inf"`` last; cumulative),
  ``keyedexec.task.wait.count`` and ``keyedexec.task.wait.sum`` (s), and the
  same for ``run``. They cover the timed tasks only (``sample_timings``);
* gauges ``keyedexec.hot_key.queued`` and ``keyedexec.hot_key.oldest_wait``
  (s) for the top ``hot_keys`` keys, attribute ``keyedexec.key``: at most
  ``hot_keys`` series each per collection, however many keys there are.
  One scan of the keys serves both gauges of a collection.

Several executors can be instrumented on one meter, each under its own name.
The callbacks hold them weakly and observe nothing for one that is gone.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from typing import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from .._timings import Histogram, HotKey
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
)

__all__ = ["instrument"]

# Instrument name (after the prefix) and unit of each reading.
_NAMES = {
    **{field: (f"tasks.{field}", "{task}") for field, _doc in COUNTERS},
    "pending": ("tasks.pending", "{task}"), "running": ("tasks.running", "{task}"),
    "active_keys": ("active_keys", "{key}"), "workers": ("workers", "{thread}"),
    "lost": ("tasks.lost", "{task}"), "retried": ("tasks.retried", "{task}"),
    "restarts": ("shard.restarts", "{shard}"), "recycled": ("shard.recycled", "{shard}"),
    "shards": ("shards", "{shard}"),
}

Callback = Callable[[CallbackOptions], Iterable[Observation]]


class _Exported:
    """One executor: its attributes, and one hot-key scan per collection (the
    first hot-key gauge's callback scans, the other reuses the answer while it
    is less than a second old)."""

    def __init__(self, executor: Observed, name: str, hot_keys: int) -> None:
        self.ref = weakref.ref(executor)
        self.attrs = {"keyedexec.executor": name}
        self.hot_keys = hot_keys
        self._at = -math.inf
        self._hot: list[tuple[str, HotKey]] = []
        self._served: set[str] = set()

    def hot(self, executor: Observed, gauge: str) -> list[tuple[str, HotKey]]:
        now = time.monotonic()
        if gauge in self._served or now - self._at > 1.0:
            hot = executor.hot_keys(self.hot_keys)
            self._hot = list(zip(key_labels([k.key for k in hot]), hot))
            self._at, self._served = now, set()
        self._served.add(gauge)
        return self._hot


class _Instruments:
    """The instruments of one (meter, prefix), for every executor instrumented
    there: a meter keeps the first instrument of a name, so a second
    ``instrument()`` call adds its executor to these."""

    def __init__(self, meter: Meter, prefix: str) -> None:
        self._meter, self._prefix = meter, prefix
        self._lock = threading.Lock()
        self._exported: dict[str, _Exported] = {}
        self._hot_gauges = False
        for field, doc in COUNTERS + ROUTED_COUNTERS:
            name, unit = _NAMES[field]
            meter.create_observable_counter(
                f"{prefix}.{name}", [self._metric(field)], unit=unit, description=doc
            )
        for field, doc in GAUGES + ROUTED_GAUGES:
            name, unit = _NAMES[field]
            meter.create_observable_up_down_counter(
                f"{prefix}.{name}", [self._metric(field)], unit=unit, description=doc
            )
        for what, doc in (("wait", "Submit to start"), ("run", "Start to end")):
            name = f"{prefix}.task.{what}"
            doc += " of the timed tasks (sample_timings)"
            meter.create_observable_counter(
                f"{name}.bucket", [self._histogram(what, "bucket")], unit="{task}",
                description=f"{doc}: those up to le seconds",
            )
            meter.create_observable_counter(
                f"{name}.count", [self._histogram(what, "count")], unit="{task}",
                description=doc,
            )
            meter.create_observable_counter(
                f"{name}.sum", [self._histogram(what, "sum")], unit="s",
                description=f"{doc}: their total",
            )

    def add(self, executor: Observed, name: str, hot_keys: int) -> None:
        with self._lock:
            old = self._exported.get(name)
            if old is not None and old.ref() is not None:
                raise ValueError(f"an executor named {name!r} is instrumented already: pass name=")
            self._exported[name] = _Exported(executor, name, hot_keys)
            create_hot_gauges = hot_keys > 0 and not self._hot_gauges
            self._hot_gauges = self._hot_gauges or create_hot_gauges
        if create_hot_gauges:
            self._meter.create_observable_gauge(
                f"{self._prefix}.hot_key.queued", [self._hot("queued")], unit="{task}",
                description="Queued tasks of the keys with the most",
            )
            self._meter.create_observable_gauge(
                f"{self._prefix}.hot_key.oldest_wait", [self._hot("oldest_wait")], unit="s",
                description="How long the oldest queued task of a hot key has waited",
            )

    def _live(self) -> list[tuple[_Exported, Observed]]:
        with self._lock:
            exported = list(self._exported.values())
        return [(e, ex) for e in exported if (ex := e.ref()) is not None]

    def _metric(self, field: str) -> Callback:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            out = []
            for e, ex in self._live():
                m = readings(ex)
                if field in m:  # the routed executors' own figures
                    out.append(Observation(m[field], e.attrs))
            return out
        return observe

    def _histogram(self, what: str, part: str) -> Callback:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            out = []
            for e, ex in self._live():
                h: Histogram = getattr(ex.timings(), what)
                if part == "count":
                    out.append(Observation(h.count, e.attrs))
                elif part == "sum":
                    out.append(Observation(h.sum, e.attrs))
                else:
                    out.extend(
                        Observation(n, {**e.attrs, "le": "+Inf" if math.isinf(le) else repr(le)})
                        for le, n in h.cumulative()
                    )
            return out
        return observe

    def _hot(self, gauge: str) -> Callback:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            out = []
            for e, ex in self._live():
                if not e.hot_keys:
                    continue
                with self._lock:  # the scan cache
                    hot = e.hot(ex, gauge)
                for label, k in hot:
                    value = k.queued if gauge == "queued" else k.oldest_wait
                    if value is not None:
                        out.append(Observation(value, {**e.attrs, "keyedexec.key": label}))
            return out
        return observe


_instruments: weakref.WeakKeyDictionary[Meter, dict[str, _Instruments]] = (
    weakref.WeakKeyDictionary()
)
_instruments_lock = threading.Lock()


def instrument(
    executor: Observed,
    meter: Meter,
    *,
    name: str | None = None,
    prefix: str = "keyedexec",
    hot_keys: int = 10,
) -> None:
    """Export ``executor`` through ``meter`` (see the module docstring).

    ``name`` (default: the executor's) is its ``keyedexec.executor``
    attribute: executors instrumented on one meter need different names
    (ValueError otherwise). ``hot_keys``: how many hot keys to export (0: none).
    """
    check_hot_keys(hot_keys)
    name = executor_name(executor, name)
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"prefix must be a non-empty str, got {prefix!r}")
    with _instruments_lock:
        by_prefix = _instruments.setdefault(meter, {})
        instruments = by_prefix.get(prefix)
        if instruments is None:
            instruments = by_prefix[prefix] = _Instruments(meter, prefix)
    instruments.add(executor, name, hot_keys)
