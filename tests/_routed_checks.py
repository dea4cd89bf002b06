"""Checks shared by the routed executors' tests (processes and Ray).

Tasks come from ``_process_tasks`` (importable by children and Ray workers);
gates between processes are files. ``wait`` is each suite's patience in
seconds: Ray workers start more slowly than child processes.
"""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path
from typing import Any, Sequence

from hypothesis import strategies as st

import _process_tasks as tasks
from conftest import wait_until

Run = tuple[Any, int, int, float, float]  # _process_tasks.record's (key, n, pid, start, end)


def check_order(results: list[Run]) -> None:
    """Per key: tasks ran in submission order, one at a time."""
    by_key: dict[Any, list[Run]] = {}
    for r in results:
        by_key.setdefault(r[0], []).append(r)
    for key, runs in by_key.items():
        runs.sort(key=lambda r: r[3])  # by start
        assert [r[1] for r in runs] == sorted(r[1] for r in runs), key
        for before, after in zip(runs, runs[1:]):
            assert before[4] <= after[3], f"key {key}: tasks {before[1]} and {after[1]} overlap"


def blocker(ex: Any, key: Any, tmp: Path, wait: float) -> tuple[Path, cf.Future[Any]]:
    """A task of ``key`` that holds its worker until the returned gate file exists."""
    started, gate = tmp / f"started-{key}", tmp / f"gate-{key}"
    fut = ex.submit(key, tasks.touch_then_wait, str(started), str(gate))
    assert wait_until(started.exists, wait)
    return gate, fut


# -- the model: the same random programs on a routed and the threaded executor -------------

GATE = "__gate__"
KEYS = st.sampled_from(["a", "b", "c", 1, (2, "x")])


def programs(max_size: int) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    """Random submits (raising or not), cancel_key and wait_key(k, 0)."""
    return st.lists(
        st.one_of(
            st.tuples(st.just("submit"), KEYS, st.booleans()),
            st.tuples(st.just("cancel"), KEYS),
            st.tuples(st.just("wait0"), KEYS),
        ),
        max_size=max_size,
    )


def _outcome(f: cf.Future[Any], wait: float) -> tuple[str, Any]:
    if f.cancelled():
        return ("cancelled", None)
    exc = f.exception(wait)
    if exc is not None:
        return ("raised", (type(exc), str(exc)))
    r = f.result()
    return ("ok", (r[0], r[1]))


def run_model(executors: Sequence[Any], tmp: Path, program: list[tuple[Any, ...]],
              wait: float) -> None:
    """Run ``program`` on each executor behind a gate that holds its only worker:
    all return the same, end every future the same way, and run each key's
    tasks in order."""
    observed = []
    for i, ex in enumerate(executors):
        started, gate = tmp / f"s{i}", tmp / f"g{i}"
        gate_task = ex.submit(GATE, tasks.touch_then_wait, str(started), str(gate))
        assert wait_until(started.exists, wait)
        returned: list[Any] = []
        futures = []
        for n, op in enumerate(program):
            if op[0] == "submit":
                futures.append(ex.submit(op[1], tasks.raise_value_error, n) if op[2]
                               else ex.submit(op[1], tasks.record, op[1], n))
            elif op[0] == "cancel":
                returned.append(ex.cancel_key(op[1]))
            else:
                waited = ex.wait_key(op[1], 0)
                # The threaded executor frees a key whose queued tasks cancel_key
                # dropped only once a worker passes by: until then wait_key(k, 0)
                # is False there and True here. Compared where no cancel came first.
                if ("cancel", op[1]) not in program[:n]:
                    returned.append(waited)
        gate.touch()
        assert gate_task.result(wait) == "opened"
        outcomes = [_outcome(f, wait) for f in futures]
        ran = [f.result() for f in futures if not f.cancelled() and f.exception() is None]
        check_order(ran)
        observed.append((returned, outcomes))
    assert all(o == observed[0] for o in observed[1:])
