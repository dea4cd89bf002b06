"""The slow-task watchdog: one daemon thread per scheduler given ``slow_task_threshold``.

It asks the scheduler every ``period`` seconds which tasks have been running
longer than the threshold (``Scheduler._slow_tasks``: no timer and no clock
read per task) and logs each of them once, with its key, on the
``"keyedexec"`` logger (WARNING). It holds the scheduler weakly, so it never
keeps an executor alive, and exits once the scheduler is closed and its
workers are gone, or collected. After a fork the child has no watchdog: the
inherited scheduler is closed there.
"""

from __future__ import annotations

import reprlib
import threading
import weakref
from typing import Any

from ._report import logger

__all__ = ["period_for", "short_repr", "start"]

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 200


def short_repr(key: Any) -> str:
    """A key for a log line: its repr, shortened past 200 characters."""
    return _repr.repr(key)


def period_for(threshold: float) -> float:
    """Seconds between checks: a task is logged at most this late (from 10 ms to 0.25 s)."""
    return min(0.25, max(0.01, threshold / 4))


def start(scheduler: Any, threshold: float) -> threading.Thread:
    """Start ``scheduler``'s watchdog thread for tasks running over ``threshold`` seconds."""
    thread = threading.Thread(
        target=_watch,
        args=(weakref.ref(scheduler), threshold, scheduler.name),
        name=f"{scheduler.name}-watchdog",
        daemon=True,  # never holds up interpreter exit: the workers do
    )
    thread.start()
    return thread


def _watch(ref: weakref.ref[Any], threshold: float, name: str) -> None:
    threshold_ns = int(threshold * 1e9)
    period = period_for(threshold)
    sleep = threading.Event().wait
    while True:
        scheduler = ref()
        if scheduler is None:
            return
        try:
            for key, ran_ns in scheduler._slow_tasks(threshold_ns):
                logger.warning(
                    "%s: a task of key %s has been running for more than %.3f s (slow_task_threshold=%g s)",
                    name, short_repr(key), ran_ns / 1e9, threshold,
                )
            if scheduler._watch_done():
                return
        except BaseException as exc:  # noqa: BLE001 - a failing watchdog must say so, once
            logger.error("%s: the slow-task watchdog stopped", name, exc_info=exc)
            return
        finally:
            del scheduler  # between checks, the executor may be collected
        sleep(period)
