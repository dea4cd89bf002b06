"""Integrations with other libraries, each behind its own extra.

* ``keyedexec.contrib.prometheus`` (``pip install keyedexec[prometheus]``):
  a ``prometheus_client`` collector.
* ``keyedexec.contrib.otel`` (``pip install keyedexec[otel]``): OpenTelemetry
  metrics instruments.

Importing ``keyedexec`` imports none of them, nor the libraries they need.
Both cover KeyedExecutor, TaskPool, AsyncKeyedExecutor, ProcessKeyedExecutor
and RayKeyedExecutor: anything with ``name``, ``metrics()``, ``timings()`` and
``hot_keys(n)`` (:class:`Observed`), its ``metrics()`` read by field name
(:func:`readings`).
"""

from __future__ import annotations

from typing import Any, Protocol

from .._router import RoutedExecutor
from .._timings import HotKey, Timings

__all__ = [
    "COUNTERS", "GAUGES", "KEY_LABEL_MAX", "ROUTED_COUNTERS", "ROUTED_GAUGES", "Observed",
    "check_hot_keys", "executor_name", "key_labels", "readings", "sampling",
]


class Observed(Protocol):
    """What the exporters read from an executor."""

    @property
    def name(self) -> str: ...

    def metrics(self) -> Any: ...

    def timings(self) -> Timings: ...

    def hot_keys(self, n: int = 10) -> list[HotKey]: ...


#: (reading, description): counters every executor has...
COUNTERS = [
    ("submitted", "Tasks accepted"),
    ("completed", "Tasks that ran to the end, returning or raising"),
    ("failed", "Tasks that raised (also counted in completed)"),
    ("cancelled", "Tasks that never ran: cancelled, skipped, or dropped"),
]
#: ... and gauges.
GAUGES = [
    ("pending", "Tasks queued, not started (processes, Ray: not yet sent to a shard)"),
    ("running", "Tasks running now (processes, Ray: sent to a shard and not back, "
                "running or queued there)"),
    ("active_keys", "Keys with queued or running tasks"),
    ("workers", "Worker threads (runner tasks for asyncio; all shards' for processes, Ray)"),
]
#: Those of the executors whose tasks run elsewhere (processes, Ray).
ROUTED_COUNTERS = [
    ("lost", "Tasks failed with ShardLost: their shard died before reporting them"),
    ("retried", "Tasks sent again after their shard died (on_loss='retry')"),
    ("restarts", "Shards (child processes, Ray actors) replaced after dying"),
    ("recycled", "Shards replaced after their max_tasks_per_* tasks"),
]
ROUTED_GAUGES = [
    ("shards", "Shards: child processes alive, or Ray actors taking keys"),
]


def readings(executor: Observed) -> dict[str, int]:
    """``executor.metrics()`` as the exporters name its figures (COUNTERS and
    GAUGES, plus ROUTED_* for the executors whose tasks run in other
    processes)."""
    m: dict[str, int] = executor.metrics()._asdict()
    if not isinstance(executor, RoutedExecutor):
        return m
    in_flight = m["in_flight"]
    shards = m["children"] if "children" in m else m["actors"]
    return {**m, "pending": m["pending"] - in_flight, "running": in_flight,
            "workers": executor.stats().workers, "shards": shards}


def check_hot_keys(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"hot_keys must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"hot_keys must be >= 0, got {n}")
    return n


def executor_name(executor: Observed, name: object) -> str:
    """The label an executor is exported under: ``name``, or else its own."""
    if name is None:
        return executor.name
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    return name


def sampling(every: int) -> str:
    """How the timed tasks were chosen, for a metric's description."""
    if every == 0:
        return "timing is off: sample_timings=0"
    return "every task timed" if every == 1 else f"1 task in {every} timed"


#: The longest a hot key's label may be: a key's repr is cut there.
KEY_LABEL_MAX = 80


def key_labels(keys: list[Any]) -> list[str]:
    """Keys as metric labels, distinct within one scrape: a str as it is,
    anything else as its repr, cut to KEY_LABEL_MAX characters; a label met
    again (the int 1 and the str "1", two long keys cut alike) gets a suffix."""
    out: list[str] = []
    seen: set[str] = set()
    for key in keys:
        text = _text(key)
        if len(text) > KEY_LABEL_MAX:
            text = text[: KEY_LABEL_MAX - 1] + "…"
        label, n = text, 1
        while label in seen:
            n += 1
            label = f"{text} #{n}"
        seen.add(label)
        out.append(label)
    return out


def _text(key: Any) -> str:
    # One odd key must not fail a whole scrape: a repr that raises, or a str
    # that UTF-8 cannot encode (a lone surrogate from os.fsdecode) is escaped.
    if isinstance(key, str):
        text = key
    else:
        try:
            text = repr(key)
        except Exception as exc:
            return f"<{type(key).__name__}: repr() raised {type(exc).__name__}>"
        if not isinstance(text, str):  # a C type's repr can return anything
            return f"<{type(key).__name__}>"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text
