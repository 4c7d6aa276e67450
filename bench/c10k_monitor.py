"""Sample a gateway's /metrics once a second into a CSV.

    python bench/c10k_monitor.py http://127.0.0.1:8083 results/c10k-metrics.csv [--seconds N]

Columns: ``t_s`` (since the first sample), ``connections`` (rtgateway_connections_current),
``rss_bytes`` (process_resident_memory_bytes), ``cpu_s`` (process_cpu_seconds_total),
``deliveries`` (rtgateway_deliveries_total), ``open_fds``, ``load1`` (this machine's 1-minute
load average: the box is shared, so every sample says how busy it was).

A scrape that fails leaves an empty row rather than stopping the run. Standard library only;
``bench/c10k.py`` runs :func:`sample` in a thread, and it runs standalone against any gateway.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import re
import threading
import time
import urllib.request
from pathlib import Path

__all__ = ["COLUMNS", "sample"]

METRICS = {
    "connections": "rtgateway_connections_current",
    "rss_bytes": "process_resident_memory_bytes",
    "cpu_s": "process_cpu_seconds_total",
    "deliveries": "rtgateway_deliveries_total",
    "open_fds": "process_open_fds",
}
COLUMNS = ["t_s", *METRICS, "load1"]


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for column, name in METRICS.items():
        # Summed over labels (deliveries are counted by namespace).
        found = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
        if found:
            values[column] = sum(float(v) for v in found)
    return values


def sample(
    url: str, path: Path, stop: threading.Event, interval_s: float = 1.0, seconds: float = 0
) -> None:
    """Append one row per ``interval_s`` to ``path`` until ``stop`` is set (or ``seconds``)."""
    started = time.monotonic()
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, COLUMNS)
        writer.writeheader()
        tick = started
        while not stop.is_set() and not (seconds and time.monotonic() - started >= seconds):
            row: dict[str, object] = {"t_s": round(time.monotonic() - started, 2)}
            with contextlib.suppress(OSError):
                row.update(scrape(url))
            row["load1"] = Path("/proc/loadavg").read_text().split()[0]
            writer.writerow(row)
            out.flush()
            # A slow scrape (the gateway busy with a connection storm) moves the schedule on
            # rather than bursting samples afterwards to catch up.
            tick += interval_s
            if tick <= time.monotonic():
                tick = time.monotonic() + interval_s
            stop.wait(max(0.0, tick - time.monotonic()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the gateway's base URL, http://HOST:PORT")
    parser.add_argument("csv", type=Path)
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long (0: ^C)")
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        sample(args.url.rstrip("/"), args.csv, threading.Event(), args.interval, args.seconds)


if __name__ == "__main__":
    main()
