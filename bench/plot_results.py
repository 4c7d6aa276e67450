"""Draw the figures of docs/results.md from the raw results (results/ is not in git).

    .venv/bin/pip install matplotlib          # once; or requirements/bench.txt
    .venv/bin/python bench/plot_results.py    # reads results/, writes docs/img/*.png

- ``docs/img/latency-percentiles.png``: p50 / p95 / p99 / max of each scenario's headline
  latency, from ``results/<scenario>.json`` (k6's handleSummary); scenarios whose file is
  missing are left out.
- ``docs/img/c10k-connections-memory.png``: connections, RSS and CPU use of the gateway over the
  C10k run, from ``results/c10k-metrics.csv`` (bench/c10k_monitor.py).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent

# (results file, metric, label): the latency that answers each scenario's question.
HEADLINES = [
    ("echo", "echo_rtt", "echo: round trip"),
    ("rooms", "rooms_delivery_latency", "rooms: publish→receive"),
    ("storm", "ws_connecting", "storm: handshake"),
    ("soak", "soak_delivery_latency", "soak (90 s): publish→receive"),
    ("drain", "drain_reconnect_delay", "drain: 1012→rejoined"),
    ("c10k", "rooms_delivery_latency", "C10k: publish→receive"),
]
STATS = ["p(50)", "p(95)", "p(99)", "max"]


def latency_plot(results: Path, out: Path) -> None:
    rows = []
    for name, metric, label in HEADLINES:
        path = results / f"{name}.json"
        if not path.exists():
            continue
        values = json.loads(path.read_text())["metrics"].get(metric, {}).get("values")
        if values:
            rows.append((label, [values[s] for s in STATS]))
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.2
    for i, stat in enumerate(STATS):
        xs = [j + (i - 1.5) * width for j in range(len(rows))]
        bars = ax.bar(xs, [r[1][i] for r in rows], width, label=stat)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_yscale("log")
    ax.set_ylabel("milliseconds (log scale)")
    ax.set_xticks(range(len(rows)), [r[0] for r in rows], rotation=15, ha="right", fontsize=8)
    ax.set_title("Latency per scenario, k6 and gateway sharing a 2-core machine (docs/results.md)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def c10k_plot(csv_path: Path, out: Path) -> None:
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r["connections"]]
    t = [float(r["t_s"]) for r in rows]
    conns = [float(r["connections"]) for r in rows]
    rss = [float(r["rss_bytes"]) / 2**20 for r in rows]
    cpu = [float(r["cpu_s"]) for r in rows]
    cpu_pct = [0.0] + [
        100 * (cpu[i] - cpu[i - 1]) / max(1e-9, t[i] - t[i - 1]) for i in range(1, len(rows))
    ]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    top.plot(t, conns, color="tab:blue", label="connections")
    top.set_ylabel("open WebSockets", color="tab:blue")
    mem = top.twinx()
    mem.plot(t, rss, color="tab:red", label="RSS")
    mem.set_ylabel("gateway RSS (MiB)", color="tab:red")
    top.set_title("C10k: one gateway process, 10,000 WebSockets in 100 rooms (docs/results.md)")
    top.grid(alpha=0.3)
    bottom.plot(t, cpu_pct, color="tab:green")
    bottom.set_ylabel("gateway CPU (% of one core)")
    bottom.set_xlabel("seconds since the gateway started")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    latency_plot(args.results, args.out / "latency-percentiles.png")
    csv_path = args.results / "c10k-metrics.csv"
    if csv_path.exists():
        c10k_plot(csv_path, args.out / "c10k-connections-memory.png")


if __name__ == "__main__":
    main()
