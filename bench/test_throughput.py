"""Throughput: no-op tasks over 4 workers, fire-and-forget and with futures.

Each round opens a pool (workers started), runs every task and returns once
all finished; the figure is tasks / median round time. Key sets: 1,000 keys
round robin (the reference), one key, a key per task, Zipf over 10,000 keys.
"""

from __future__ import annotations

import gc
from typing import Any, Callable

import pytest
from harness import COMPETITORS, WORKERS, Competitor, keys_for, noop, record_rate

SUBMITTERS = [c for c in COMPETITORS if c.has_submit]


def _call(run: Callable[[], None]) -> None:
    run()


def _measure(benchmark: Any, comp: Competitor, scenario: str, dist: str, submit: bool,
             baseline: tuple[str, str]) -> None:
    n = comp.tasks()
    keys = keys_for(dist, n)
    prepare = comp.submit_round if submit else comp.execute_round

    def setup() -> tuple[tuple[Callable[[], None]], dict[str, Any]]:
        gc.collect()  # the previous round's garbage is not this round's cost
        return (prepare(WORKERS, keys, noop),), {}

    benchmark.pedantic(_call, setup=setup, rounds=comp.rounds())
    record_rate(benchmark, scenario, comp.name, n, baseline=baseline)


@pytest.mark.benchmark(group="execute: fire and forget, 1,000 keys")
@pytest.mark.parametrize("comp", COMPETITORS, ids=str)
def test_execute(benchmark: Any, comp: Competitor) -> None:
    """Fire-and-forget no-op tasks over 1,000 keys, until all have run."""
    _measure(benchmark, comp, "execute", "uniform", False, ("execute", "tpe"))


@pytest.mark.benchmark(group="submit: future per task, then result() on each, 1,000 keys")
@pytest.mark.parametrize("comp", SUBMITTERS, ids=str)
def test_submit(benchmark: Any, comp: Competitor) -> None:
    """submit -> future for each task, then result() on every future."""
    _measure(benchmark, comp, "submit", "uniform", True, ("submit", "tpe"))


@pytest.mark.benchmark(group="submit: 1 key")
@pytest.mark.parametrize("comp", SUBMITTERS, ids=str)
def test_submit_one_key(benchmark: Any, comp: Competitor) -> None:
    """The submit load with every task on one key (fully serial for keyed competitors)."""
    _measure(benchmark, comp, "submit-one", "one", True, ("submit", comp.name))


@pytest.mark.benchmark(group="submit: a distinct key per task")
@pytest.mark.parametrize("comp", SUBMITTERS, ids=str)
def test_submit_distinct_keys(benchmark: Any, comp: Competitor) -> None:
    """The submit load with every task on its own key (a key created and freed per task)."""
    _measure(benchmark, comp, "submit-distinct", "distinct", True, ("submit", comp.name))


@pytest.mark.benchmark(group="submit: Zipf keys (s = 1.1, 10,000 keys)")
@pytest.mark.parametrize("comp", SUBMITTERS, ids=str)
def test_submit_zipf(benchmark: Any, comp: Competitor) -> None:
    """The submit load with keys drawn from a Zipf distribution: the realistic case."""
    _measure(benchmark, comp, "submit-zipf", "zipf", True, ("submit", comp.name))
