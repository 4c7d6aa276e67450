"""Many connections on one host: RTG_WORKERS gateways sharing a port, rooms through Redis.

Prepared for the 16-core machine (one script that sets up, runs and prints
everything); runs at small sizes anywhere:

    python bench/c100k.py --redis-server /usr/bin/redis-server            # 100k, 8+8 processes
    python bench/c100k.py --redis-server redis-server --connections 2000 \\
        --workers 2 --load-procs 2 --duration 5                           # a 2-core try
    python bench/c100k.py --broker-url redis://127.0.0.1:6379 ...         # a Redis you run

It starts ``redis-server`` (unless ``--broker-url``), then ``python -m rtgateway`` with
``RTG_WORKERS=N`` on a port below the ephemeral range, then ``--load-procs`` load processes
(bench/loadclient.py: raw sockets on uvloop), each from its own source address
(127.0.0.2, 127.0.0.3, ...: one source address reaches ~28k connections). Every client joins
one of ``--rooms`` rooms, so each room has members on every worker and every publication
crosses Redis to all of them. Then one publisher publishes ``--rate`` messages per second
for ``--duration`` seconds, round-robin over the rooms, and the script prints:

- connections: opened, failed (by kind), per worker (from the merged /metrics, which
  also says whether the kernel spread them evenly);
- memory: each worker's RSS before and after, and the difference per connection;
- fan-out: deliveries received against expected, ``seq`` gaps seen by members,
  latency (publish to receive, one monotonic clock) p50/p99/max,
  deliveries per gateway CPU-second (all workers) and Redis's CPU-seconds;
- the drain: SIGTERM to the supervisor, its exit status and how long it took.

Figures are the output, not a pass mark; it also writes ``results/c100k.json``.
A load generator on the same host competes with the gateway for CPU: compare
CPU-seconds per delivery between runs, not wall-clock rates.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from array import array
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadclient import worker_main

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
REDIS_ARGS = ("--save", "", "--appendonly", "no", "--maxclients", "1000")


def free_port() -> int:
    """A free port below the ephemeral range (32768-60999), where load sockets live."""
    for port in range(21000, 32000, 7):
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def by_worker(text: str, name: str) -> dict[int, float]:
    """``name`` by worker; a single gateway (no ``worker`` label) is worker 0."""
    pattern = re.compile(rf'^{name}(?:\{{worker="(\d+)"\}})? (\S+)$', re.M)
    return {int(w or 0): float(v) for w, v in pattern.findall(text)}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def percentiles_ms(values: array[int]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6, 2)

    return {"p50": at(0.50), "p99": at(0.99), "max": round(ordered[-1] / 1e6, 2)}


class Redis:
    def __init__(self, binary: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", HOST, *REDIS_ARGS],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Gateway:
    """The supervisor and its workers; ready once ``supervisor_ready`` is logged."""

    def __init__(self, workers: int, broker_url: str, connections: int) -> None:
        self.port = free_port()
        per_worker = connections // workers + 1000
        env = {
            **os.environ,
            "RTG_WORKERS": str(workers),
            "RTG_BROKER_URL": broker_url,
            "RTG_ADDR": f"{HOST}:{self.port}",
            "RTG_API_ADDR": "",
            "RTG_PUBLISH_REQUIRES_JOIN": "false",  # the publisher is not a member
            "RTG_LOG_FORMAT": "json",
            "RTG_STATS_INTERVAL_S": "0",
            "RTG_MAX_CONNECTIONS": str(per_worker),
            "RTG_DRAIN_WINDOW_S": "5",
            "RTG_DRAIN_TIMEOUT_S": "30",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rtgateway"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.single = workers == 1  # no supervisor: the gateway itself
        self.ready = threading.Event()
        self.pids: list[int] = []
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(60):
            self.proc.kill()
            raise RuntimeError("gateway did not start:\n" + "\n".join(self.lines[-20:]))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if '"supervisor_ready"' in line:
                self.pids = json.loads(line)["pids"]
                self.ready.set()
            elif self.single and '"gateway_listening"' in line:
                self.pids = [self.proc.pid]
                self.ready.set()

    def died(self) -> int:
        return sum('"worker_died"' in line for line in self.lines)

    def cpu(self) -> float:
        total = 0.0
        for pid in self.pids:
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid)
        return total


class Load:
    """Load processes driven over pipes (the protocol of bench/loadclient.py)."""

    def __init__(self, count: int) -> None:
        ctx = mp.get_context("fork")
        self.pipes = []
        for _ in range(count):
            ours, theirs = ctx.Pipe()
            ctx.Process(target=worker_main, args=(theirs, None), daemon=True).start()
            self.pipes.append(ours)

    def wait(self, index: int) -> Any:
        while True:
            kind, result = self.pipes[index].recv()
            if kind == "done":
                return result

    def call_all(self, cmd: str, arg: Any = None) -> list[Any]:
        for pipe in self.pipes:
            pipe.send((cmd, arg))
        return [self.wait(i) for i in range(len(self.pipes))]

    def connect(self, port: int, rooms: list[str | None]) -> dict[str, Any]:
        n = len(self.pipes)
        for i, pipe in enumerate(self.pipes):
            spec = {
                "host": HOST,
                "port": port,
                "path": "/ws",
                "sources": [f"127.0.0.{2 + i}"],
                "rooms": rooms[i::n],
                "echo": False,
                "publisher": i == 0,
                "concurrency": 500,
            }
            pipe.send(("connect", spec))
        results: list[Any] = [None] * n
        progress = [0] * n
        last = 0.0
        while any(r is None for r in results):
            for i, pipe in enumerate(self.pipes):
                while results[i] is None and pipe.poll(0.05):
                    kind, value = pipe.recv()
                    if kind == "progress":
                        progress[i] = value
                    else:
                        results[i] = value
                        progress[i] = value["connected"]
            if time.monotonic() - last > 1:
                last = time.monotonic()
                print(f"\r  connecting {sum(progress)}/{len(rooms)}", end="", file=sys.stderr)
        print(file=sys.stderr)
        failures: dict[str, int] = {}
        for r in results:
            for kind, count in r["failures"].items():
                failures[kind] = failures.get(kind, 0) + count
        return {
            "connected": sum(r["connected"] for r in results),
            "failed": sum(r["failed"] for r in results),
            "failures": failures,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cores = os.cpu_count() or 2
    parser.add_argument("--connections", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=max(1, cores // 2))
    parser.add_argument("--load-procs", type=int, default=max(1, cores // 2))
    parser.add_argument("--rooms", type=int, default=1)
    parser.add_argument("--rate", type=float, default=2.0, help="publications per second")
    parser.add_argument("--duration", type=float, default=10.0, help="publishing seconds")
    parser.add_argument("--redis-server", help="start this redis-server binary")
    parser.add_argument("--broker-url", help="use this Redis instead")
    parser.add_argument(
        "--no-broker",
        action="store_true",
        help="baseline: one gateway without Redis (needs --workers 1)",
    )
    parser.add_argument("--label", default="", help="a note stored with the figures")
    args = parser.parse_args()
    if args.no_broker and args.workers != 1:
        parser.error("--no-broker needs --workers 1: workers share rooms through Redis")
    if not args.broker_url and not args.redis_server and not args.no_broker:
        args.redis_server = shutil.which("redis-server")
        if not args.redis_server:
            parser.error("give --redis-server PATH or --broker-url URL")
    per_source = args.connections / args.load_procs
    if per_source > 19_000:
        parser.error(f"{per_source:.0f} connections per load process: past the 20000-files limit")

    report: dict[str, Any] = {"label": args.label, "args": vars(args), "cores": cores}
    redis = Redis(args.redis_server) if not (args.broker_url or args.no_broker) else None
    url = args.broker_url or (redis.url if redis else "")
    print(f"redis {url}; starting {args.workers} workers", file=sys.stderr)
    gateway = Gateway(args.workers, url, args.connections)
    load = Load(args.load_procs)
    try:
        before = scrape(gateway.port)
        rss_before = by_worker(before, "process_resident_memory_bytes")

        started = time.monotonic()
        rooms: list[str | None] = [f"room{i % args.rooms}" for i in range(args.connections)]
        connected = load.connect(gateway.port, rooms)
        connected["seconds"] = round(time.monotonic() - started, 2)
        after = scrape(gateway.port)
        per_worker = by_worker(after, "rtgateway_connections_current")
        rss_after = by_worker(after, "process_resident_memory_bytes")
        report["connect"] = {**connected, "per_worker": per_worker}
        report["memory"] = {
            "rss_mb_before": {w: round(v / 2**20, 1) for w, v in rss_before.items()},
            "rss_mb_after": {w: round(v / 2**20, 1) for w, v in rss_after.items()},
            "kib_per_connection": round(
                (sum(rss_after.values()) - sum(rss_before.values()))
                / max(1, connected["connected"])
                / 1024,
                2,
            ),
        }

        load.call_all("reset")
        cpu0, redis_cpu0 = gateway.cpu(), cpu_seconds(redis.proc.pid) if redis else 0.0
        load.pipes[0].send(
            ("publish", {"rooms": sorted(set(r for r in rooms if r)), "rate": args.rate,
                         "duration_s": args.duration})
        )  # fmt: skip
        published = load.wait(0)
        time.sleep(2)  # deliveries still in flight
        counts = load.call_all("counts")
        cpu1, redis_cpu1 = gateway.cpu(), cpu_seconds(redis.proc.pid) if redis else 0.0
        latencies: array[int] = array("q")
        for i in range(len(load.pipes)):
            load.pipes[i].send(("latencies", None))
            latencies.frombytes(load.wait(i))
        received = sum(c["received"] for c in counts)
        expected = published["acked"] * connected["connected"] // args.rooms
        gateway_cpu = cpu1 - cpu0
        report["fanout"] = {
            "published": published["sent"],
            "acked": published["acked"],
            "deliveries_expected": expected,
            "deliveries_received": received,
            "seq_gaps": sum(c["out_of_order"] for c in counts),
            "latency_ms": percentiles_ms(latencies),
            "gateway_cpu_s": round(gateway_cpu, 2),
            "redis_cpu_s": round(redis_cpu1 - redis_cpu0, 2),
            "deliveries_per_gateway_cpu_s": round(received / gateway_cpu) if gateway_cpu else None,
        }
        report["workers_died"] = gateway.died()
    finally:
        drain_started = time.monotonic()
        gateway.proc.send_signal(signal.SIGTERM)
        try:
            rc = gateway.proc.wait(60)
        except subprocess.TimeoutExpired:
            gateway.proc.kill()
            rc = None
        report["drain"] = {"exit_status": rc, "seconds": round(time.monotonic() - drain_started, 2)}
        with contextlib.suppress(Exception):
            load.call_all("close")
        if redis:
            redis.stop()
    Path(ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "c100k.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
