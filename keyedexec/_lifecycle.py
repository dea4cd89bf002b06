"""Process lifecycle for every live scheduler: interpreter exit and fork.

Interpreter exit: like ``concurrent.futures.ThreadPoolExecutor``, accepted
tasks are drained. The hook runs before ``threading`` joins non-daemon threads
(``threading._register_atexit``), closes every scheduler to new work
("cannot schedule new tasks after interpreter shutdown") and waits for its
workers, which finish the queued tasks first.

Fork: each scheduler's lock is held across ``os.fork()`` so the child inherits
consistent state, and so are the futures' seal locks (``_future._SEALS``). In
the child the inherited scheduler has no threads: it is closed (submit raises
a clear RuntimeError), and its queued futures and those of the tasks its
workers were running are cancelled, so nothing in the child waits forever. A
new executor works there.
"""

from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures._base import CANCELLED
from typing import Any, Iterable

from ._future import _SEALS

_live: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()
_exiting = False
_forking: list[Any] = []


def register(scheduler: Any) -> None:
    """Track a new scheduler (weakly) for exit and fork handling."""
    with _lock:
        _live.add(scheduler)
        exiting = _exiting
    if exiting:
        scheduler._close_for_exit()


def _python_exit() -> None:
    global _exiting
    with _lock:
        _exiting = True
        schedulers = list(_live)
    for s in schedulers:
        s._close_for_exit()
    for s in schedulers:
        s.join()


def _before_fork() -> None:
    _lock.acquire()
    # A stable order, in case two forks ever race (they hold _lock anyway).
    _forking[:] = sorted(_live, key=id)
    for s in _forking:
        s._before_fork()
    # Held for an instant around a future's completion: a worker's, at the
    # fork, would stay held forever in the child.
    for seal in _SEALS:
        seal.acquire()


def _after_fork_parent() -> None:
    for seal in _SEALS:
        seal.release()
    for s in reversed(_forking):
        s._after_fork_parent()
    _forking.clear()
    _lock.release()


def _after_fork_child() -> None:
    global _lock
    _lock = threading.Lock()
    for seal in _SEALS:
        seal.release()
    schedulers = list(_forking)
    _forking.clear()
    for s in schedulers:
        s._after_fork_child()


def cancel_orphans(futures: Iterable[Any], *, on_worker: bool = False) -> None:
    """(fork child) Cancel the futures of tasks that were running in the
    parent's workers: they never finish here, and every future ends done.
    (Also the process executor's tasks cancelled after they were sent; from
    its receiver thread ``on_worker``: a callback's BaseException is logged.)"""
    for fut in list(futures):
        if fut is None or fut.done():
            continue
        with fut._condition:  # what Future.cancel does, from RUNNING
            fut._state = CANCELLED
            fut._condition.notify_all()
        try:
            fut._invoke_callbacks(on_worker=on_worker)
        finally:  # a callback's BaseException: the waiters are told all the same
            fut.set_running_or_notify_cancel()


threading._register_atexit(_python_exit)  # type: ignore[attr-defined]
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_parent,
        after_in_child=_after_fork_child,
    )
