"""The summary: scenarios, goals, the table, bench/results/latest.json and the chart."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import harness
from harness import BATCH, LABELS, MODE, RESULTS, SIZES, Measurement

RESULTS_DIR = Path(__file__).resolve().parent / "results"

W1 = SIZES.io_workers[0]

#: Scenario id -> title, in table order.
SCENARIOS: dict[str, str] = {
    "execute": "execute, 1,000 keys",
    "submit": "submit + result() on each, 1,000 keys",
    "submit-one": "submit + result() on each, 1 key",
    "submit-distinct": "submit + result() each, key per task",
    "submit-zipf": "submit + result() each, Zipf 10k keys",
    "wait": "submit + wait(fs), 1,000 keys",
    "as-completed": "submit + as_completed(fs), 1,000 keys",
    "callback": "submit + add_done_callback, 1,000 keys",
    "wrap-future": "await wrap_future(submit), 1,000 keys",
    **{
        f"io-w{w}": f"I/O sleep 1 ms, {w} worker{'s' if w > 1 else ''}"
        for w in SIZES.io_workers
    },
    "latency-p50": "latency submit->start p50",
    "latency-p99": "latency submit->start p99",
    "fairness": "fairness: hot tasks before cold",
    "memory-bytes": "memory: bytes / queued task",
    "memory-native": "memory: native B / queued task",
    "memory-rss": "memory: RSS kept after drain",
    "memory-rss-trim": "  ... then after malloc_trim(0)",
    "pool-bytes": "TaskPool: bytes / active key",
    "submit-async": "asyncio: await submit_async (gather)",
    "aio-submit": "asyncio: AsyncKeyedExecutor.submit + gather",
    "aio-execute": "asyncio: AsyncKeyedExecutor.execute",
    "process-cpu": "processes: CPU ~1 ms tasks, 2 procs",
    "process-submit": "processes: no-op submit + result()",
    "process-rss": "processes: RSS per idle child",
    "process-bytes": "processes: bytes / queued task",
    "execute-untimed": "execute, timing off (sample_timings=0)",
    "execute-timed": "execute, timing on (default: 1 in 32)",
    "execute-timed-all": "execute, every task timed",
    "hot-keys": "hot_keys(10), 1,000,000 active keys",
    "hot-keys-hold": "  ... longest hold of the mutex",
    "ray-submit": "Ray: no-op submit + result(), 2 actors",
    "ray-cpu": "Ray: CPU ~1 ms tasks, 2 actors",
    "ray-latency-p50": "Ray: latency submit->result p50",
    "ray-latency-p99": "Ray: latency submit->result p99",
}

ORDER = [c.name for c in harness.COMPETITORS]

#: How the ratio column names a baseline that is the same competitor in another scenario.
OWN = {"submit": "own 1,000 keys", f"io-w{W1}": f"own {W1} worker"}
#: How the ratio column names a competitor that runs a scenario its own way.
AS = {("wrap-future", "tpe"): "run_in_executor(TPE)"}


def baseline_name(base: tuple[str, str], competitor: str) -> str:
    scenario, comp = base
    if comp != competitor:
        return AS.get(base, LABELS.get(comp, comp))
    return OWN.get(scenario, SCENARIOS.get(scenario, scenario))


@dataclass(frozen=True)
class Goal:
    scenario: str
    competitor: str
    text: str
    target: float
    base: tuple[str, str] | None = None
    """Relative goal: the figure divided by this one is compared with target.
    None: the figure itself is compared with target."""
    higher_is_better: bool = True

    def evaluate(self) -> dict[str, Any]:
        m = RESULTS.get((self.scenario, self.competitor))
        out: dict[str, Any] = {
            "scenario": self.scenario,
            "competitor": self.competitor,
            "goal": self.text,
            "target": self.target,
            "value": None if m is None else m.value,
            "unit": None if m is None else m.unit,
            "ratio": None,
            "status": "n/a",
        }
        if m is None:
            return out
        if self.base is None:
            ratio = m.value / self.target  # "x of the limit"
            measured = m.value
        else:
            b = RESULTS.get(self.base)
            if b is None or b.value == 0:
                return out
            ratio = measured = m.value / b.value
        ok = measured >= self.target if self.higher_is_better else measured <= self.target
        out.update(ratio=ratio, status="PASS" if ok else "SHORT")
        if self.base is not None:
            out["baseline"] = list(self.base)
        return out

    def ratio_text(self, ratio: float) -> str:
        if self.base is None:
            return f"{ratio:.2f} x limit"
        return f"{ratio:.2f} x {baseline_name(self.base, self.competitor)}"


GOALS: list[Goal] = [
    Goal("execute", "native", ">= 0.4 x floor", 0.4, ("execute", "floor")),
    Goal("execute", "native", ">= 25 x TPE", 25, ("execute", "tpe")),
    Goal("submit", "native", ">= 10 x TPE.submit", 10, ("submit", "tpe")),
    Goal("submit-one", "native", "within 2 x of 1,000 keys", 0.5, ("submit", "native")),
    Goal("submit-distinct", "native", "within 2 x of 1,000 keys", 0.5, ("submit", "native")),
    Goal("submit-zipf", "native", ">= 0.5 x 1,000 keys", 0.5, ("submit", "native")),
    Goal("wait", "native", ">= 5 x TPE", 5, ("wait", "tpe")),
    Goal("as-completed", "native", ">= 4 x TPE", 4, ("as-completed", "tpe")),
    Goal("callback", "native", ">= 5 x TPE", 5, ("callback", "tpe")),
    Goal("wrap-future", "native", ">= 1.5 x run_in_executor", 1.5, ("wrap-future", "tpe")),
    *(
        Goal(f"io-w{w}", "native", f">= {0.9 * w:g} x {W1} worker", 0.9 * w,
             (f"io-w{W1}", "native"))
        for w in SIZES.io_workers
        if w != W1
    ),
    Goal("latency-p99", "native", "<= TPE's p99", 1.0, ("latency-p99", "tpe"), False),
    Goal("fairness", "native", f"<= batch ({BATCH})", BATCH, None, False),
    Goal("memory-native", "native", "<= 150 B", 150, None, False),
    Goal("memory-rss", "native", "<= 10 % of peak", 10, None, False),
    Goal("pool-bytes", "native", "well under 1 KB: <= 512 B", 512, None, False),
    Goal("submit-async", "submit-async", ">= 5 x run_in_executor", 5,
         ("submit-async", "run-in-executor")),
    Goal("aio-submit", "aio-native", ">= 2 x Lock + Semaphore", 2, ("aio-submit", "aio-lock")),
    Goal("aio-submit", "aio-native", ">= 1.2 x bare gather", 1.2, ("aio-submit", "aio-gather")),
    Goal("aio-execute", "aio-native", ">= 10 x Lock + Semaphore", 10,
         ("aio-submit", "aio-lock")),
    Goal("process-cpu", "process", ">= 1.8 x threaded", 1.8, ("process-cpu", "native")),
    Goal("process-cpu", "process", ">= 1.0 x PPE", 1.0, ("process-cpu", "ppe")),
    # "(ours)": not an issue's goal. How much of what the machine gave this run the
    # executor used (capacity: the same work on 2 processes or actors, no executor).
    Goal("process-cpu", "process", ">= 0.9 x capacity (ours)", 0.9,
         ("process-cpu", "capacity")),
    Goal("process-submit", "process", ">= 5 x PPE.submit", 5, ("process-submit", "ppe")),
    Goal("execute-timed", "native", "costs <= 5 %: >= 0.95 x off", 0.95,
         ("execute-untimed", "native")),
    Goal("hot-keys", "native", "<= 50 ms", 50_000, None, False),
    Goal("hot-keys-hold", "native", "<= 1 ms", 1_000, None, False),
    Goal("ray-submit", "ray", ">= 10 x naive actor calls", 10, ("ray-submit", "ray-naive")),
    Goal("ray-cpu", "ray", ">= 1.7 x 1 actor", 1.7, ("ray-cpu", "ray-1")),
    Goal("ray-cpu", "ray", ">= 0.9 x capacity (ours)", 0.9, ("ray-cpu", "ray-capacity")),
]


def fmt_value(m: Measurement) -> str:
    v, unit = m.value, m.unit
    if unit == "tasks/s":
        return f"{v:,.0f} /s"
    if unit == "us":
        return f"{v:,.1f} us"
    if unit == "B":
        return f"{v:,.0f} B"
    if unit == "MB":
        return f"{v:,.1f} MB"
    if unit == "%":
        return f"{v:.0f} % of {m.extra.get('rss_peak_MB', 0):,.0f} MB"
    return f"{v:,.0f} {unit}"


def rows() -> list[list[str]]:
    """The table: one line per figure, plus one line per goal on that figure."""
    goals: dict[tuple[str, str], list[Goal]] = {}
    for g in GOALS:
        goals.setdefault((g.scenario, g.competitor), []).append(g)
    out = []
    for scenario, title in SCENARIOS.items():
        measured = [m for (s, _c), m in RESULTS.items() if s == scenario]
        measured.sort(key=lambda m: ORDER.index(m.competitor) if m.competitor in ORDER else 99)
        for m in measured:
            label = LABELS.get(m.competitor, m.competitor)
            lines = []
            for g in goals.get((scenario, m.competitor), []):
                ev = g.evaluate()
                ratio = "" if ev["ratio"] is None else g.ratio_text(ev["ratio"])
                lines.append([ratio, g.text, ev["status"]])
            if not lines:
                ratio = ""
                if m.baseline and m.baseline != (scenario, m.competitor):
                    b = RESULTS.get(m.baseline)
                    if b is not None and b.value:
                        who = baseline_name(m.baseline, m.competitor)
                        ratio = f"{m.value / b.value:.2f} x {who}"
                lines.append([ratio, "", ""])
            for i, (ratio, goal, status) in enumerate(lines):
                first = i == 0
                out.append(
                    [title if first else "", label if first else "",
                     fmt_value(m) if first else "", ratio, goal, status]
                )
            title = ""  # the scenario's name once
    return out


def table() -> str:
    head = ["scenario", "competitor", "median", "ratio", "goal", "status"]
    body = rows()
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def line(r: list[str]) -> str:
        cells = [
            r[i].rjust(widths[i]) if i == 2 else r[i].ljust(widths[i]) for i in range(len(head))
        ]
        return "  ".join(cells).rstrip()

    rule = "-" * len(line(["x" * w for w in widths]))
    return "\n".join([line(head), rule, *(line(r) for r in body)])


def info(load_start: tuple[float, float, float] | None) -> dict[str, Any]:
    import keyedexec

    return {
        "mode": MODE,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "native": keyedexec.NATIVE,
        "keyedexec": keyedexec.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_start": load_start,
        "loadavg_end": _loadavg(),
        "sizes": asdict(SIZES),
        "workers": harness.WORKERS,
        "argv": sys.argv[1:],
    }


def _loadavg() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def summary_lines(load_start: tuple[float, float, float] | None) -> list[str]:
    """Everything the terminal summary prints; writes latest.json and the chart."""
    if not RESULTS:
        return ["keyedexec bench: no figures recorded"]
    meta = info(load_start)
    evaluated = [g.evaluate() for g in GOALS]
    scored = [e for e in evaluated if e["status"] != "n/a"]
    short = [e for e in scored if e["status"] == "SHORT"]
    load = meta["loadavg_end"]
    lines = [
        f"keyedexec bench, {MODE} mode: {meta['python']}, {meta['cpus']} CPUs, "
        f"native core: {'yes' if meta['native'] else 'NO'}"
        + (f", load average {load[0]:.1f}" if load else "")
        + ". Figures are medians; ratios are against this run.",
        "",
        table(),
        "",
        f"goals: {len(scored) - len(short)} of {len(scored)} met"
        + (f" ({len(evaluated) - len(scored)} not measured)" if len(scored) < len(evaluated)
           else ""),
    ]
    for e in short:
        m = RESULTS[(e["scenario"], e["competitor"])]
        g = next(g for g in GOALS if g.scenario == e["scenario"] and g.text == e["goal"])
        lines.append(
            f"  SHORT  {SCENARIOS[e['scenario']]}: {fmt_value(m)}, goal {e['goal']}, "
            f"{g.ratio_text(e['ratio'])}"
        )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    latest = RESULTS_DIR / "latest.json"
    payload = {
        "info": meta,
        "results": [
            {**asdict(m), "title": SCENARIOS.get(m.scenario, m.scenario),
             "label": LABELS.get(m.competitor, m.competitor)}
            for m in RESULTS.values()
        ],
        "goals": evaluated,
    }
    latest.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    lines.append(f"summary JSON: {latest}")
    lines.append(chart(RESULTS_DIR / "bench.png"))
    return lines


def chart(path: Path) -> str:
    """Writes the PNG; returns the line to print (its path, or why it was skipped)."""
    try:
        import matplotlib
    except ImportError:
        path.unlink(missing_ok=True)  # a chart from an earlier run would pass for this one's
        return "chart skipped: matplotlib is not installed (pip install 'keyedexec[chart]')"
    try:
        # matplotlib's own warnings (fonts, backends) must not fail the run,
        # which treats warnings as errors.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            matplotlib.use("Agg")
            _draw(path)
    except Exception as exc:  # the chart is a convenience; the table is the result
        path.unlink(missing_ok=True)
        return f"chart skipped: {type(exc).__name__}: {exc}"
    return f"chart: {path}"


def _draw(path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 5.5))
    throughput = ["execute", "submit", "submit-one", "submit-distinct", "submit-zipf"]
    names = [c for c in ORDER if any((s, c) in RESULTS for s in throughput)]
    width = 0.8 / max(1, len(names))
    for i, c in enumerate(names):
        xs = [j + i * width for j, s in enumerate(throughput) if (s, c) in RESULTS]
        ys = [RESULTS[(s, c)].value for s in throughput if (s, c) in RESULTS]
        ax1.bar(xs, ys, width, label=LABELS.get(c, c))
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(throughput))])
    ax1.set_xticklabels(["execute", "submit", "1 key", "key/task", "Zipf"])
    ax1.set_yscale("log")
    ax1.set_ylabel("tasks/s (median)")
    ax1.set_title(f"Throughput, no-op tasks, {harness.WORKERS} workers")
    ax1.legend(fontsize=8)

    lat = [c for c in ORDER if ("latency-p50", c) in RESULTS]
    for i, (scenario, pct) in enumerate((("latency-p50", "p50"), ("latency-p99", "p99"))):
        xs = [j + i * 0.4 for j, c in enumerate(lat) if (scenario, c) in RESULTS]
        ys = [RESULTS[(scenario, c)].value for c in lat if (scenario, c) in RESULTS]
        ax2.bar(xs, ys, 0.4, label=pct)
    ax2.set_xticks([j + 0.2 for j in range(len(lat))])
    ax2.set_xticklabels([LABELS.get(c, c) for c in lat], rotation=20, ha="right", fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylabel("microseconds")
    ax2.set_title("Latency submit -> start, light load")
    ax2.legend(fontsize=8)

    ws = list(SIZES.io_workers)
    for c in ORDER:
        base = RESULTS.get((f"io-w{W1}", c))
        pts = [(w, RESULTS[(f"io-w{w}", c)].value) for w in ws if (f"io-w{w}", c) in RESULTS]
        if base is not None and pts:
            ax3.plot([w for w, _ in pts], [v / base.value for _, v in pts], "o-",
                     label=LABELS.get(c, c))
    ax3.plot(ws, [0.9 * w for w in ws], "k--", label="goal 0.9 W")
    ax3.set_xscale("log", base=2)
    ax3.set_yscale("log", base=2)
    ax3.set_xlabel("workers")
    ax3.set_ylabel(f"throughput / {W1}-worker throughput")
    ax3.set_title("I/O tasks (sleep 1 ms): scaling")
    ax3.legend(fontsize=8)

    fig.suptitle(f"keyedexec bench ({MODE} mode), {time.strftime('%Y-%m-%d')}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
