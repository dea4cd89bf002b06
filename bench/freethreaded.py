"""Submitters x workers: no-op throughput as threads are added, with and without a GIL.

The matrix of issue 17: ``execute`` (fire and forget) and ``submit`` + ``result()``
with 1, 2 and 4 submitter threads x 1, 2 and 4 workers, no-op tasks over 1,000
keys, plus two baselines measured in the same run on the same interpreter:

* ``floor``: one thread calling the no-op in a bare loop (pops ``(key, fn)``
  from a filled deque, as bench/harness.py's floor does);
* ``tpe``: ``ThreadPoolExecutor(4).submit`` from one thread (then ``result()``
  on each future for the submit row), as bench/harness.py's ``tpe``.

Every cell is the median over ``--rounds`` rounds, and the rounds are
interleaved (round 1 of every cell, then round 2 ...), so a burst of load from
elsewhere spreads over all cells instead of sinking one. ``--runs`` repeats the
whole matrix; the spread between runs is the "varies by" column. Each round
opens a pool with its workers started (thread start-up is not timed), releases
the submitters together and stops the clock once every task has run.

Stdlib only, so ``make bench`` runs it on every interpreter it has (the
project's .venv, and the free-threaded 3.13t when one is cached):

    python bench/freethreaded.py [--tasks 200000] [--rounds 5] [--runs 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import platform
import statistics
import sys
import threading
import time
from typing import Any, Callable

import keyedexec
from keyedexec import KeyedExecutor

SUBMITTERS = (1, 2, 4)
WORKERS = (1, 2, 4)
KEYS = 1000
TIMEOUT = 120.0


def noop() -> None:
    pass


def gil_enabled() -> bool:
    probe = getattr(sys, "_is_gil_enabled", None)
    return True if probe is None else bool(probe())


def _submitters(n: int, body: Callable[[int], None], finish: Callable[[], None]) -> float:
    """Run ``body(i)`` on ``n`` threads released together, then ``finish()``;
    seconds from the release until ``finish`` returned."""
    ready = threading.Barrier(n + 1, timeout=TIMEOUT)
    errors: list[BaseException] = []

    def main(i: int) -> None:
        ready.wait()
        try:
            body(i)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=main, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join(TIMEOUT)
    finish()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed


def _open_keyed(workers: int) -> KeyedExecutor:
    ex = KeyedExecutor(workers)
    barrier = threading.Barrier(workers + 1, timeout=TIMEOUT)
    for i in range(workers):
        ex.execute(("warm", i), barrier.wait)
    barrier.wait()
    return ex


def keyed_round(kind: str, submitters: int, workers: int, tasks: int) -> float:
    """Tasks/s of one round: ``tasks`` no-ops split over the submitters."""
    ex = _open_keyed(workers)
    # Submitter i takes tasks i, i + S, i + 2S ...: every key gets tasks from each.
    slices = [[k % KEYS for k in range(i, tasks, submitters)] for i in range(submitters)]

    def run_execute(i: int) -> None:
        execute = ex.execute
        for k in slices[i]:
            execute(k, noop)

    def run_submit(i: int) -> None:
        submit = ex.submit
        for f in [submit(k, noop) for k in slices[i]]:
            f.result()

    body = run_execute if kind == "execute" else run_submit
    # shutdown(wait=True): the clock stops once every task has run.
    return tasks / _submitters(submitters, body, lambda: ex.shutdown(wait=True))


def floor_round(tasks: int) -> float:
    q = collections.deque((k % KEYS, noop) for k in range(tasks))
    popleft = q.popleft
    start = time.perf_counter()
    while q:
        _k, fn = popleft()
        fn()
    return tasks / (time.perf_counter() - start)


def tpe_round(kind: str, tasks: int) -> float:
    pool = concurrent.futures.ThreadPoolExecutor(4)
    barrier = threading.Barrier(5, timeout=TIMEOUT)
    for _ in range(4):
        pool.submit(barrier.wait)
    barrier.wait()
    submit = pool.submit
    start = time.perf_counter()
    if kind == "execute":
        for _ in range(tasks):
            submit(noop)
    else:
        for f in [submit(noop) for _ in range(tasks)]:
            f.result()
    pool.shutdown(wait=True)
    return tasks / (time.perf_counter() - start)


def cells(tasks: int, base_tasks: int) -> dict[str, Callable[[], float]]:
    out: dict[str, Callable[[], float]] = {"floor": lambda: floor_round(tasks)}
    for kind in ("execute", "submit"):
        out[f"tpe {kind}"] = lambda kind=kind: tpe_round(kind, base_tasks)  # type: ignore[misc]
        for s in SUBMITTERS:
            for w in WORKERS:
                out[f"{kind} {s}x{w}"] = (
                    lambda kind=kind, s=s, w=w: keyed_round(kind, s, w, tasks)  # type: ignore[misc]
                )
    return out


def run_matrix(tasks: int, base_tasks: int, rounds: int, only: list[str]) -> dict[str, float]:
    todo = cells(tasks, base_tasks)
    if only:
        todo = {name: fn for name, fn in todo.items() if name in only}
    samples: dict[str, list[float]] = {name: [] for name in todo}
    for _ in range(rounds):
        for name, fn in todo.items():
            samples[name].append(fn())
    return {name: statistics.median(v) for name, v in samples.items()}


def goals(m: dict[str, float], spread: dict[str, float] | None) -> list[tuple[str, float, float]]:
    """(what, figure, goal): issue 17's goals, as ratios within one run."""
    base = m["execute 1x1"]
    out = [(f"execute {c} / execute 1x1", m[f"execute {c}"] / base, 0.9) for c in ("1x2", "2x2", "2x4")]
    out.append(("execute 1x4 / floor", m["execute 1x4"] / m["floor"], 0.4))
    out.append(("execute 1x4 / tpe execute", m["execute 1x4"] / m["tpe execute"], 25.0))
    out.append(("submit 1x4 / tpe submit", m["submit 1x4"] / m["tpe submit"], 10.0))
    if spread is not None:
        worst = max(spread, key=lambda k: spread[k])
        # As a goal ">=": 1 - spread must stay >= 0.75.
        out.append((f"1 - worst spread between runs ({worst})", 1.0 - spread[worst], 0.75))
    return out


def table(m: dict[str, float], spread: dict[str, float] | None) -> str:
    lines = []
    for kind in ("execute", "submit"):
        lines.append(f"{kind:<8} (M tasks/s)  " + "".join(f"{w} worker{'s' if w > 1 else ' '}  " for w in WORKERS))
        for s in SUBMITTERS:
            row = f"  {s} submitter{'s' if s > 1 else ' '}      "
            for w in WORKERS:
                name = f"{kind} {s}x{w}"
                cell = f"{m[name] / 1e6:5.2f}"
                if spread is not None:
                    cell += f" ±{spread[name] * 100:2.0f}%"
                row += f"{cell:<11}"
            lines.append(row)
    lines.append(f"floor {m['floor'] / 1e6:.2f} M/s, tpe execute {m['tpe execute'] / 1e3:.0f} k/s, "
                 f"tpe submit {m['tpe submit'] / 1e3:.0f} k/s")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=200_000, help="tasks per keyedexec/floor round")
    ap.add_argument("--base-tasks", type=int, default=25_000, help="tasks per ThreadPoolExecutor round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per cell (median)")
    ap.add_argument("--runs", type=int, default=2, help="runs of the whole matrix")
    ap.add_argument("--json", help="write the figures there")
    ap.add_argument("--cells", default="", help="only these cells, comma-separated (A/B runs): "
                    "'floor', 'tpe execute', 'execute 2x4' ...; no table, no goals")
    args = ap.parse_args()

    gil = "GIL on" if gil_enabled() else "GIL off"
    print(f"keyedexec {keyedexec.__version__} (native={keyedexec.NATIVE}) on "
          f"{platform.python_implementation()} {platform.python_version()} ({gil}), "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
    only = [c.strip() for c in args.cells.split(",") if c.strip()]
    runs = [run_matrix(args.tasks, args.base_tasks, args.rounds, only) for _ in range(args.runs)]
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    spread = None
    if len(runs) > 1:
        spread = {k: (max(r[k] for r in runs) - min(r[k] for r in runs)) / median[k] for k in median}
    checks: list[tuple[str, float, float]] = []
    if only:
        for k, v in median.items():
            print(f"  {k:<14} {v / 1e6:6.3f} M/s")
    else:
        print(table(median, spread))
        checks = goals(median, spread)
    met = 0
    for what, figure, goal in checks:
        ok = figure >= goal
        met += ok
        print(f"  {'PASS ' if ok else 'SHORT'} {what}: {figure:.2f} (goal >= {goal})")
    print(f"{met}/{len(checks)} goals met (load {os.getloadavg()[0]:.1f} at the end)")
    if args.json:
        info: dict[str, Any] = {
            "python": platform.python_version(), "gil": gil_enabled(), "cpus": os.cpu_count(),
            "tasks": args.tasks, "base_tasks": args.base_tasks, "rounds": args.rounds,
            "runs": runs, "median": median, "spread": spread,
            "goals": [{"what": w, "figure": f, "goal": g} for w, f, g in checks],
            "date": time.strftime("%Y-%m-%d"),
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(info, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
