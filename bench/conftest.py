"""pytest wiring of the benchmark suite (``make bench``; ``make bench-full``).

bench/ has its own conftest and none of tests/'s fixtures. This file:

* sends pytest-benchmark's JSON to bench/results/benchmark.json unless
  ``--benchmark-json`` says otherwise, and trims its per-group tables;
* gives every benchmark a generous pytest-timeout (the project default of 60 s
  is for unit tests);
* prints the summary table (report.py) at the end, and writes
  bench/results/latest.json and bench/results/bench.png.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import report
from harness import FULL

_load_start: tuple[float, float, float] | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _load_start
    try:
        _load_start = os.getloadavg()
    except OSError:
        _load_start = None
    # pytest-benchmark reads these options in its own (trylast) pytest_configure.
    if getattr(config.option, "benchmark_json", "absent") is None:
        report.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        config.option.benchmark_json = report.RESULTS_DIR / "benchmark.json"
    if getattr(config.option, "benchmark_columns", "absent") is None:
        config.option.benchmark_columns = ["median", "iqr", "rounds"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.pluginmanager.hasplugin("timeout"):
        for item in items:
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(3600 if FULL else 600))


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.section("keyedexec benchmark summary")
    for line in report.summary_lines(_load_start):
        terminalreporter.write_line(line)
