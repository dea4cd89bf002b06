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
  ``keyedexec.active_keys``, ``keyedexec.workers``;
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

The callbacks hold the executor weakly and observe nothing once it is gone.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from typing import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from .._timings import Histogram, HotKey
from . import Observed, key_labels, sampling

__all__ = ["instrument"]

_COUNTERS = [
    ("submitted", 4, "Tasks accepted"),
    ("completed", 5, "Tasks that ran to the end, returning or raising"),
    ("failed", 6, "Tasks that raised (also counted in completed)"),
    ("cancelled", 7, "Tasks that never ran: cancelled, skipped, or dropped"),
]
_GAUGES = [
    ("tasks.pending", 2, "{task}", "Tasks queued, not started"),
    ("tasks.running", 1, "{task}", "Tasks running now"),
    ("active_keys", 3, "{key}", "Keys with queued or running tasks"),
    ("workers", 0, "{thread}", "Worker threads (runner tasks for asyncio) alive"),
]

Callback = Callable[[CallbackOptions], Iterable[Observation]]


class _HotKeys:
    """One hot-key scan per collection: the first gauge's callback scans, the
    other reuses the answer if it is less than ``fresh`` seconds old."""

    def __init__(self, ref: weakref.ref[Observed], n: int, fresh: float = 1.0) -> None:
        self._ref, self._n, self._fresh = ref, n, fresh
        self._lock = threading.Lock()
        self._at = -math.inf
        self._last: list[tuple[str, HotKey]] = []
        self._served: set[str] = set()

    def take(self, gauge: str) -> list[tuple[str, HotKey]]:
        with self._lock:
            now = time.monotonic()
            if gauge in self._served or now - self._at > self._fresh:
                executor = self._ref()
                hot = [] if executor is None else executor.hot_keys(self._n)
                self._last = list(zip(key_labels([k.key for k in hot]), hot))
                self._at, self._served = now, set()
            self._served.add(gauge)
            return self._last


def instrument(
    executor: Observed,
    meter: Meter,
    *,
    name: str | None = None,
    prefix: str = "keyedexec",
    hot_keys: int = 10,
) -> None:
    """Create ``executor``'s instruments on ``meter`` (see the module docstring).

    ``name`` (default: the executor's) is the ``keyedexec.executor``
    attribute. ``hot_keys``: how many hot keys to export (0: none).
    """
    if isinstance(hot_keys, bool) or not isinstance(hot_keys, int):
        raise TypeError(f"hot_keys must be an int, got {type(hot_keys).__name__}")
    if hot_keys < 0:
        raise ValueError(f"hot_keys must be >= 0, got {hot_keys}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    ref = weakref.ref(executor)
    attrs = {"keyedexec.executor": executor.name if name is None else name}

    def metric(index: int) -> Callback:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            ex = ref()
            return [] if ex is None else [Observation(ex.metrics()[index], attrs)]
        return observe

    for field, index, doc in _COUNTERS:
        meter.create_observable_counter(
            f"{prefix}.tasks.{field}", [metric(index)], unit="{task}", description=doc
        )
    for field, index, unit, doc in _GAUGES:
        meter.create_observable_up_down_counter(
            f"{prefix}.{field}", [metric(index)], unit=unit, description=doc
        )

    every = sampling(getattr(executor.timings(), "sample_every", 0))
    for what, doc in (("wait", "Submit to start"), ("run", "Start to end")):
        _histogram(meter, ref, attrs, f"{prefix}.task.{what}", what, f"{doc} ({every})")

    if hot_keys:
        scans = _HotKeys(ref, hot_keys)

        def hot(gauge: str, value: Callable[[HotKey], float | None]) -> Callback:
            def observe(options: CallbackOptions) -> Iterable[Observation]:
                return [
                    Observation(v, {**attrs, "keyedexec.key": label})
                    for label, k in scans.take(gauge)
                    if (v := value(k)) is not None
                ]
            return observe

        meter.create_observable_gauge(
            f"{prefix}.hot_key.queued", [hot("queued", lambda k: k.queued)], unit="{task}",
            description=f"Queued tasks of the {hot_keys} keys with the most",
        )
        meter.create_observable_gauge(
            f"{prefix}.hot_key.oldest_wait", [hot("oldest", lambda k: k.oldest_wait)], unit="s",
            description="How long the oldest queued task of a hot key has waited",
        )


def _histogram(
    meter: Meter, ref: weakref.ref[Observed], attrs: dict[str, str], name: str, what: str,
    doc: str,
) -> None:
    def histogram() -> Histogram | None:
        ex = ref()
        if ex is None:
            return None
        h: Histogram = getattr(ex.timings(), what)
        return h

    def buckets(options: CallbackOptions) -> Iterable[Observation]:
        h = histogram()
        if h is None:
            return []
        return [
            Observation(n, {**attrs, "le": "+Inf" if math.isinf(le) else repr(le)})
            for le, n in h.cumulative()
        ]

    def count(options: CallbackOptions) -> Iterable[Observation]:
        h = histogram()
        return [] if h is None else [Observation(h.count, attrs)]

    def total(options: CallbackOptions) -> Iterable[Observation]:
        h = histogram()
        return [] if h is None else [Observation(h.sum, attrs)]

    meter.create_observable_counter(f"{name}.bucket", [buckets], unit="{task}",
                                    description=f"{doc}: timed tasks up to le seconds")
    meter.create_observable_counter(f"{name}.count", [count], unit="{task}",
                                    description=f"{doc}: timed tasks")
    meter.create_observable_counter(f"{name}.sum", [total], unit="s",
                                    description=f"{doc}: their total")
