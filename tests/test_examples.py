"""Each script in examples/ runs to completion and prints what its docstring promises.

Run as a user would (``python examples/NAME.py``), once per implementation:
the native core, and pure Python (``KEYEDEXEC_PURE_PYTHON=1``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NATIVE_AVAILABLE

from keyedexec._impl import _flag

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Lines each script must print (exactly, as whole lines).
EXPECTED = {
    "notifications.py": [
        "alice: 7 notifications, in order",
        "bob: 6 notifications, in order",
        "dave: 5 notifications, in order",
        "failed: dave: device token expired",
        "peak sends in flight: 4 (limit 4)",
        "sent 30, failed 1, users still tracked: 0",
    ],
    "ledger.py": [
        "acct-1: balance 300, 97 applied, 3 rejected",
        "acct-2: balance 30, 83 applied, 13 rejected",
        "matches sequential replay: True",
        "tasks run: 606 (600 transactions, 6 reads)",
    ],
    "metrics_service.py": [
        "GET /metrics: 200",
        "hottest key: acct-7",
        "payments: 2030 submitted, 2030 completed, 0 failed",
        "slow-task log: 'acct-7'",
        "timed: 1 task in 32",
    ],
    "stream_consumer.py": [
        "processed 1500 records of 40 entities",
        "out of order: 0",
        "backpressure: consumer waited for a full entity queue: yes",
        "partition 3: committed offset 460 (460 processed)",
        "jobs discarded at stop: 0",
    ],
}


def test_every_example_is_covered() -> None:
    """A new script in examples/ needs its expected output here."""
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["native", "pure"])
@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs_and_prints_expected_lines(script: str, mode: str) -> None:
    """Exit status 0, nothing on stderr, and the expected lines on stdout."""
    env = dict(os.environ)
    env.pop("KEYEDEXEC_PURE_PYTHON", None)
    if mode == "pure":
        env["KEYEDEXEC_PURE_PYTHON"] = "1"
    elif _flag("KEYEDEXEC_PURE_PYTHON"):
        pytest.skip("KEYEDEXEC_PURE_PYTHON=1: pure-Python mode")
    elif not NATIVE_AVAILABLE:
        pytest.skip("keyedexec._core is not built")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=50,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    missing = [line for line in EXPECTED[script] if line not in lines]
    assert not missing, proc.stdout
