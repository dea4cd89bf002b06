"""RayKeyedExecutor (keyedexec.ray) against the naive ordered Ray pattern.

The naive pattern: one plain synchronous actor per shard (Ray runs one caller's
calls to it in order), keys hashed to shards, one remote call per task.

* ``ray-submit``: no-op tasks over 1,000 keys, 2 actors, ``submit`` then every
  ``result()`` (naive: ``.remote()`` each, then ``ray.get``).
* ``ray-cpu``: CPU-bound pure-Python tasks of about 1 ms (calibrated once),
  100 keys: 2 actors against 1 (the GIL does not stop actors), in interleaved
  rounds next to ``ray-capacity``: 2 plain actors each running its half of the
  work in one call, what Ray gets of the machine's two cores in this run.
* ``ray-latency-p50`` / ``-p99``: one task at a time, from the submit call to
  the result in the caller, against the naive pattern.

One local cluster for the module (2 CPUs, no dashboard); actors are started and
warmed before the clock starts. Skipped where the ``ray`` extra is missing.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed")

import _ray_tasks as tasks  # noqa: E402
from harness import FULL, TIMEOUT, interleaved, percentile, record, record_rate  # noqa: E402

from keyedexec.ray import RayKeyedExecutor  # noqa: E402

ACTORS = 2
SUBMIT_TASKS = 100_000 if FULL else 20_000
NAIVE_SUBMIT_TASKS = 10_000 if FULL else 2_000
CPU_TASKS = 2_000 if FULL else 1_000
LATENCY_SAMPLES = 1_000 if FULL else 200
ROUNDS = 3
CPU_ROUNDS = 7 if FULL else 5


def _calibrate() -> int:
    """Loop count for about 1 ms of work on this machine (best of 5: the least loaded)."""
    n = 20_000
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        tasks.work(n)
        best = min(best, time.perf_counter() - start)
    return max(1, int(n * 0.001 / best))


LOOPS = _calibrate()


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    if ray.is_initialized():
        yield
        return
    here = str(Path(__file__).resolve().parent)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([here] + ([old] if old else []))
    try:
        ray.init(num_cpus=ACTORS, include_dashboard=False, object_store_memory=200 * 2**20,
                 log_to_driver=False)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    try:
        yield
    finally:
        ray.shutdown()


class Naive:
    """The naive pattern behind a submit(key, fn, *args) -> ref interface."""

    def __init__(self, shards: int) -> None:
        cls = ray.remote(tasks.NaiveShard)
        self.actors = [cls.options(max_restarts=0, max_task_retries=0).remote()
                       for _ in range(shards)]

    def submit(self, key: Any, fn: Callable[..., Any], *args: Any) -> Any:
        return self.actors[hash(key) % len(self.actors)].run.remote(fn, *args)

    def results(self, refs: list[Any]) -> None:
        ray.get(refs, timeout=TIMEOUT)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)


def _collect() -> None:
    gc.collect()  # the previous round's garbage is not this round's cost


def _open(name: str) -> Any:
    if name == "ray-naive":
        ex: Any = Naive(ACTORS)
        ex.results([ex.submit(k, tasks.noop) for k in range(100)])
    else:
        ex = RayKeyedExecutor(1 if name == "ray-1" else ACTORS, 1)
        for f in [ex.submit(k, tasks.noop) for k in range(100)]:  # actors up and warm
            f.result(TIMEOUT)
    return ex


def _submit_all(name: str, ex: Any, n: int, keys: int, fn: Callable[..., Any],
                *args: Any) -> None:
    submit = ex.submit
    handles = [submit(i % keys, fn, *args) for i in range(n)]
    if name == "ray-naive":
        ex.results(handles)
    else:
        for f in handles:
            f.result(TIMEOUT)


def _run(benchmark: Any, name: str, n: int, keys: int, fn: Callable[..., Any],
         *args: Any) -> None:
    ex = _open(name)
    try:
        benchmark.pedantic(lambda: _submit_all(name, ex, n, keys, fn, *args),
                           setup=_collect, rounds=ROUNDS)
    finally:
        ex.shutdown()


@pytest.mark.benchmark(group="ray: no-op submit + result, 1,000 keys, 2 actors")
@pytest.mark.parametrize("name", ["ray", "ray-naive"])
def test_ray_submit(benchmark: Any, name: str) -> None:
    n = SUBMIT_TASKS if name == "ray" else NAIVE_SUBMIT_TASKS
    _run(benchmark, name, n, 1000, tasks.noop)
    record_rate(benchmark, "ray-submit", name, n, baseline=("ray-submit", "ray-naive"))


@pytest.mark.benchmark(group="ray: CPU-bound ~1 ms tasks, 100 keys")
def test_ray_cpu(benchmark: Any) -> None:
    """2 actors against 1 in interleaved rounds, next to Ray's capacity here: 2
    plain actors each running its half of the work in one call."""
    pools = {name: _open(name) for name in ("ray", "ray-1")}
    plain = Naive(ACTORS)
    plain.results([a.run.remote(tasks.noop) for a in plain.actors])
    runs: dict[str, Callable[[], object]] = {
        name: (lambda name=name: _submit_all(name, pools[name], CPU_TASKS, 100, tasks.work,
                                             LOOPS))
        for name in pools
    }
    share = CPU_TASKS // ACTORS
    runs["ray-capacity"] = lambda: plain.results(
        [a.run.remote(tasks.work_many, share, LOOPS) for a in plain.actors])
    try:
        medians = interleaved(benchmark, runs, CPU_ROUNDS, setup=_collect)
    finally:
        for ex in pools.values():
            ex.shutdown()
        plain.shutdown()
    for name, seconds in medians.items():
        record("ray-cpu", name, CPU_TASKS / seconds, "tasks/s", baseline=("ray-cpu", "ray-1"),
               extra={"tasks": CPU_TASKS, "median_s": seconds, "rounds": CPU_ROUNDS})


@pytest.mark.benchmark(group="ray: latency submit -> result, one task at a time")
@pytest.mark.parametrize("name", ["ray", "ray-naive"])
def test_ray_latency(benchmark: Any, name: str) -> None:
    """p50 and p99 from the submit call to the result in the caller."""
    p50s: list[float] = []
    p99s: list[float] = []
    ex = _open(name)

    def run() -> None:
        perf = time.perf_counter_ns
        lat = []
        for i in range(LATENCY_SAMPLES):
            t0 = perf()
            handle = ex.submit(i % 1000, tasks.noop)
            if name == "ray-naive":
                ex.results([handle])
            else:
                handle.result(TIMEOUT)
            lat.append(perf() - t0)
        lat.sort()
        p50s.append(percentile(lat, 0.50) / 1000)
        p99s.append(percentile(lat, 0.99) / 1000)

    try:
        benchmark.pedantic(run, setup=_collect, rounds=ROUNDS)
    finally:
        ex.shutdown()
    p50, p99 = statistics.median(p50s), statistics.median(p99s)
    extra = {"p50_us": p50, "p99_us": p99, "samples_per_round": LATENCY_SAMPLES}
    record("ray-latency-p50", name, p50, "us", baseline=("ray-latency-p50", "ray-naive"),
           extra=extra)
    record("ray-latency-p99", name, p99, "us", baseline=("ray-latency-p99", "ray-naive"),
           extra=extra)
    benchmark.extra_info.update(extra)
