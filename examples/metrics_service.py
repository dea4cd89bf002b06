"""A payment service under load that serves /metrics for Prometheus.

Payments for one account are applied one at a time, in order; accounts are
served in parallel by a KeyedExecutor. One account's partner API is stuck:
its first call hangs for most of a second while its later payments pile up
behind it. Every global figure looks healthy; /metrics says which key backs
up (``keyedexec_hot_key_queued_tasks``), how long its oldest payment has
waited, and the slow-task log names it too.

Needs the exporter: pip install keyedexec[prometheus]
Run: python examples/metrics_service.py
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.parser import text_string_to_metric_families

from keyedexec import KeyedExecutor
from keyedexec.contrib.prometheus import KeyedExecutorCollector

ACCOUNTS = 200
PAYMENTS = 2000
STUCK = "acct-7"
STUCK_PAYMENTS = 30


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # no access log on stderr


class SlowTasks(logging.Handler):
    """Collects the keys the slow-task log names."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "slow_task_threshold" in record.getMessage():
            self.keys.append(record.getMessage().split("key ")[1].split(" has")[0])


def apply_payment(account: str, amount: int) -> None:
    time.sleep(0.0005)  # a database write


def call_partner(account: str, first: bool) -> None:
    time.sleep(0.8 if first else 0.005)  # the partner API hangs, then recovers


def serve(registry: CollectorRegistry) -> tuple[WSGIServer, str]:
    server = make_server("127.0.0.1", 0, make_wsgi_app(registry), handler_class=QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/metrics"


def main() -> None:
    slow = SlowTasks()
    logging.getLogger("keyedexec").addHandler(slow)
    logging.getLogger("keyedexec").propagate = False
    registry = CollectorRegistry()
    with KeyedExecutor(8, name="payments", slow_task_threshold=0.4) as executor:
        KeyedExecutorCollector(executor, registry=registry, hot_keys=3)
        server, url = serve(registry)
        for i in range(STUCK_PAYMENTS):
            executor.execute(STUCK, call_partner, STUCK, i == 0)
        for i in range(PAYMENTS):
            executor.execute(f"acct-{100 + i % ACCOUNTS}", apply_payment, "acct", i)
        time.sleep(0.6)  # under load: what an operator's scrape sees
        with urllib.request.urlopen(url, timeout=10) as response:
            status, text = response.status, response.read().decode()
        print(f"GET /metrics: {status}")
        for line in text.splitlines():
            if line.startswith(("keyedexec_hot_key", "keyedexec_tasks_", "keyedexec_active")):
                print("  " + line)
        queued = {
            s.labels["key"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "keyedexec_hot_key_queued_tasks"
        }
        print(f"hottest key: {max(queued, key=lambda k: queued[k])}")
    server.shutdown()
    m = executor.metrics()
    print(f"payments: {m.submitted} submitted, {m.completed} completed, {m.failed} failed")
    print(f"slow-task log: {', '.join(slow.keys)}")
    print(f"timed: 1 task in {executor.timings().sample_every}")


if __name__ == "__main__":
    main()
