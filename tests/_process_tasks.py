"""Task functions for tests/test_process_executor.py, run in child processes.

A module of its own, so that a spawned child imports this (and keyedexec)
only, not pytest and the test module.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

initialized: Any = None


def init(value: Any) -> None:
    global initialized
    initialized = value


def init_fails() -> None:
    raise ValueError("initializer failed on purpose")


def get_initialized() -> Any:
    return initialized


def record(key: Any, i: int, pause: float = 0.0) -> tuple[Any, int, int, float, float]:
    """(key, i, pid, start, end): monotonic clocks compare across processes on Linux."""
    start = time.monotonic()
    if pause:
        time.sleep(pause)
    return key, i, os.getpid(), start, time.monotonic()


def identity(value: Any) -> Any:
    return value


def pid() -> int:
    return os.getpid()


def append(path: str, key: Any, i: int, pause: float = 0.0) -> int:
    """Appends "key i" to ``path`` (O_APPEND: one write, whole lines across processes)."""
    if pause:
        time.sleep(pause)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{key} {i}\n".encode())
    finally:
        os.close(fd)
    return i


def wait_for_file(path: str, timeout: float = 30.0) -> str:
    """Blocks its key until ``path`` exists: a gate another process opens."""
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(path)
        time.sleep(0.002)
    return "opened"


def touch_then_wait(started: str, gate: str) -> str:
    open(started, "w").close()
    return wait_for_file(gate)


class Custom(Exception):
    pass


class NeedsTwo(Exception):
    """Pickles, but does not unpickle (``__init__`` wants two arguments)."""

    def __init__(self, a: Any, b: Any) -> None:
        super().__init__(f"{a}-{b}")


def raise_custom(x: Any) -> None:
    raise Custom(x)


def raise_value_error(x: Any) -> None:
    raise ValueError(x)


def raise_needs_two() -> None:
    raise NeedsTwo(1, 2)


def raise_unpicklable() -> None:
    err = RuntimeError("holds a lock")
    err.lock = threading.Lock()  # type: ignore[attr-defined]
    raise err


def return_lock() -> Any:
    return threading.Lock()


class _ExitOnPickle:
    def __reduce__(self) -> Any:
        raise SystemExit("no pickling")


class HostileError(Exception):
    """Pickling it raises KeyboardInterrupt; so do its repr() and str()."""

    def __reduce__(self) -> Any:
        raise KeyboardInterrupt

    def __repr__(self) -> str:
        raise KeyboardInterrupt

    __str__ = __repr__


def return_exit_on_pickle() -> Any:
    return _ExitOnPickle()


def raise_hostile() -> None:
    raise HostileError


def die(code: int = 1) -> None:
    os._exit(code)


def spin(ms: float) -> int:
    """CPU-bound for about ``ms`` milliseconds."""
    end = time.perf_counter() + ms / 1000
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


class ByIdentity:
    """A key compared by identity (object's default): its unpickled copy is another key."""


class ExitsWhenUnpickled:
    """Pickles in the child; unpickling it raises SystemExit (in the parent)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_exit_on_load, ())


def _exit_on_load() -> None:
    raise SystemExit("unpickled")


def return_exits_when_unpickled() -> Any:
    return ExitsWhenUnpickled()
