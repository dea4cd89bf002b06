"""Shared fixtures: every behaviour test runs against both implementations.

``impl`` is parametrized over "native" (keyedexec._core) and "pure"
(keyedexec._pure): it carries the two facades bound to that scheduler. With
KEYEDEXEC_PURE_PYTHON=1 the native variant is skipped (a machine without the
extension); with KEYEDEXEC_REQUIRE_NATIVE=1 a missing extension is an error.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import pytest


import keyedexec  # noqa: F401  (chooses the implementation first)
from keyedexec import KeyedExecutor, TaskPool, _pure
from keyedexec._impl import _flag

try:
    from keyedexec import _core
except ImportError:  # pragma: no cover - exercised only without a build
    _core = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Impl:
    name: str
    Scheduler: Any
    KeyedExecutor: type[KeyedExecutor[Any]]
    TaskPool: type[TaskPool[Any]]

    def __repr__(self) -> str:
        return self.name


def _make(name: str, scheduler: Any) -> Impl:
    executor = type(f"{name.title()}KeyedExecutor", (KeyedExecutor,), {"_Scheduler": scheduler})
    pool = type(f"{name.title()}TaskPool", (TaskPool,), {"_Scheduler": scheduler})
    return Impl(name, scheduler, executor, pool)


@pytest.fixture(params=["native", "pure"], scope="session")
def impl(request: pytest.FixtureRequest) -> Impl:
    if request.param == "native":
        if _flag("KEYEDEXEC_PURE_PYTHON"):
            pytest.skip("KEYEDEXEC_PURE_PYTHON=1: pure-Python mode")
        if _core is None:
            if _flag("KEYEDEXEC_REQUIRE_NATIVE"):
                pytest.fail("keyedexec._core is missing and KEYEDEXEC_REQUIRE_NATIVE=1")
            pytest.skip("keyedexec._core is not built")
        return _make("native", _core.Scheduler)
    return _make("pure", _pure.Scheduler)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "native_only: needs the compiled core")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # native_only tests run on the "native" parameter only.
    for item in items:
        if item.get_closest_marker("native_only") and "[pure" in item.nodeid:
            item.add_marker(pytest.mark.skip(reason="native-only test"))


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.005) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; returns its last value."""
    end = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= end:
            return predicate()
        time.sleep(interval)


@pytest.fixture
def thread_guard() -> Any:
    """Fails a test that leaves extra non-daemon threads running after it."""
    before = set(threading.enumerate())
    yield
    assert wait_until(
        lambda: not [t for t in threading.enumerate() if t not in before and t.is_alive()], 10
    ), [t.name for t in threading.enumerate() if t not in before]


NATIVE_AVAILABLE = _core is not None
STRESS = float(os.environ.get("KEYEDEXEC_STRESS", "1"))


class Harness:
    """Executors and gates of one test (the ``h`` fixture): teardown opens every
    gate, then shuts the executors down, bounded so that a broken scheduler
    fails the teardown instead of hanging it."""

    wait = 10.0  # seconds any single wait may take

    def __init__(self, impl: Any) -> None:
        self.impl = impl
        self.executors: list[KeyedExecutor[Any]] = []
        self.gates: list[threading.Event] = []

    def executor(self, workers: int = 4, **kw: Any) -> KeyedExecutor[Any]:
        ex = self.impl.KeyedExecutor(workers, **kw)
        self.executors.append(ex)
        return ex

    def gate(self) -> threading.Event:
        ev = threading.Event()
        self.gates.append(ev)
        return ev

    def block(self, ex: KeyedExecutor[Any], key: Any) -> tuple[threading.Event, cf.Future[Any]]:
        """Occupy ``key`` with a running task until the returned gate is set."""
        return self.block_with(lambda fn: ex.submit(key, fn))

    def block_with(
        self, submit: Callable[[Callable[[], str]], cf.Future[Any]]
    ) -> tuple[threading.Event, cf.Future[Any]]:
        """Run a task through ``submit`` that holds its key until the returned gate is set."""
        started, gate = threading.Event(), self.gate()

        def blocker() -> str:
            started.set()
            gate.wait()
            return "blocker"

        fut = submit(blocker)
        assert started.wait(self.wait)
        return gate, fut

    def close(self) -> None:
        # Opening the gates first lets a failed test's blockers finish.
        for gate in self.gates:
            gate.set()
        for ex in self.executors:
            ex.shutdown(wait=False, cancel_futures=True)
        for ex in self.executors:
            assert wait_until(lambda: ex.metrics().workers == 0, self.wait), ex
            ex.shutdown(wait=True)  # joins the exited threads


@pytest.fixture
def h(impl: Any) -> Any:
    harness = Harness(impl)
    yield harness
    harness.close()
