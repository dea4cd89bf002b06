"""Multi-core scaling: throughput at W workers as a ratio to W = 1.

Two kinds of task, many keys (so ordering never limits parallelism):

* ``io``: ``time.sleep(0.001)``, which releases the GIL: should scale with W on
  any interpreter (goal: >= 0.9 * W x the 1-worker throughput).
* ``cpu``: pure-Python arithmetic (~0.3 ms): scales only where there is no GIL
  (free-threaded CPython, 3.13t); on a GIL build it stays near 1 x.

Competitors: keyedexec (native core), and ThreadPoolExecutor for reference.
Standalone (stdlib only), so it runs on any machine with the package built:

    python bench/multicore.py --workers 1,2,4,8,16 --json out.json

Every figure is tasks/s in this run; ratios are against W = 1 of the same
competitor in the same run. Each point is the median of --repeat runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import sys
import threading
import time

import keyedexec
from keyedexec import KeyedExecutor


def io_task() -> None:
    time.sleep(0.001)


def cpu_task() -> int:
    # Local state only: shared objects would make threads contend on refcounts.
    total = 0
    for i in range(6000):
        total += i * i % 7
    return total


TASKS = {"io": io_task, "cpu": cpu_task}


def run_keyedexec(fn, workers: int, n: int) -> float:
    with KeyedExecutor(workers=workers) as ex:
        # Start the workers first, so thread start-up is not measured.
        for k in range(workers):
            ex.execute(("warm", k), time.sleep, 0.01)
        time.sleep(0.05)
        start = time.perf_counter()
        futures = [ex.submit(i % 10_000, fn) for i in range(n)]
        for f in futures:
            f.result()
        return n / (time.perf_counter() - start)


def run_tpe(fn, workers: int, n: int) -> float:
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        barrier = threading.Barrier(workers + 1)
        for _ in range(workers):
            ex.submit(barrier.wait)
        barrier.wait()
        start = time.perf_counter()
        futures = [ex.submit(fn) for _ in range(n)]
        for f in futures:
            f.result()
        return n / (time.perf_counter() - start)


COMPETITORS = {"keyedexec": run_keyedexec, "ThreadPoolExecutor": run_tpe}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="1,2,4,8,16")
    ap.add_argument("--scenarios", default="io,cpu")
    ap.add_argument("--per-worker", type=int, default=300, help="tasks per worker per run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ws = [int(w) for w in args.workers.split(",")]
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    info = {
        "python": platform.python_version() + ("" if gil else " (free-threaded, GIL off)"),
        "cpus": os.cpu_count(),
        "native": keyedexec.NATIVE,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(info))
    results = []
    for scenario in args.scenarios.split(","):
        fn = TASKS[scenario]
        for name, run in COMPETITORS.items():
            base = None
            for w in ws:
                n = args.per_worker * w
                rate = statistics.median(run(fn, w, n) for _ in range(args.repeat))
                base = base or rate
                row = {
                    "scenario": scenario,
                    "competitor": name,
                    "workers": w,
                    "tasks_per_s": round(rate, 1),
                    "ratio_vs_1": round(rate / base, 2),
                }
                results.append(row)
                print(f"{scenario:4} {name:18} W={w:<3} {rate:12,.0f} tasks/s  {rate / base:6.2f} x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
