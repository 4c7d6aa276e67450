"""What bench/c100k.py runs and watches: Redis, the gateway, the load processes.

:class:`Gateway` starts ``python -m rtgateway`` with the environment it is
given (through :class:`rtgateway.testing.GatewayProcess`: readiness, worker
pids) and counts the warnings it logs by event;
:class:`Load` drives bench/loadclient.py processes over pipes, a thread per
pipe keeping each one's latest status report; :class:`Sampler` records a row
of /proc figures (RSS and CPU of every process, host memory, slab and TCP
buffers, host CPU) every second and the gateway's own connection counts from
``/metrics`` every few. The helpers read /proc and the merged ``/metrics``
text (every series labelled by ``worker``; a single gateway is worker 0).

This module decides nothing about the benchmark: no sizes, rates or settings.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import re
import socket
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from loadclient import worker_main

from rtgateway.testing import GatewayProcess, cpu_seconds, free_port, rss_bytes

__all__ = [
    "Gateway",
    "Load",
    "Redis",
    "Sampler",
    "cpu_seconds",
    "free_port",
    "gateway_counters",
    "host_cpu",
    "host_memory",
    "rss_bytes",
    "scrape",
]

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PAGE = os.sysconf("SC_PAGE_SIZE")
REDIS_ARGS = ("--save", "", "--appendonly", "no", "--maxclients", "1000")


# /proc and /metrics.


def host_memory() -> dict[str, int]:
    """Host-wide bytes: used (MemTotal - MemAvailable), kernel slab, TCP buffers."""
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        info[key] = int(value.split()[0]) * 1024
    tcp = Path("/proc/net/sockstat").read_text().split("TCP:")[1].split("\n")[0].split()
    stats = dict(zip(tcp[::2], map(int, tcp[1::2]), strict=True))
    return {
        "used": info["MemTotal"] - info["MemAvailable"],
        "slab": info["Slab"],
        "tcp_buffers": stats["mem"] * PAGE,
        "tcp_sockets": stats["inuse"],
    }


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole host."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def scrape(port: int, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=timeout) as resp:
        return str(resp.read().decode())


SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$", re.M)
LABEL = re.compile(r'(\w+)="([^"]*)"')


def series(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of ``name``, keyed by their labels; a single gateway is worker 0."""
    out = {}
    for sample, labels, value in SAMPLE.findall(text):
        if sample == name:
            pairs = dict(LABEL.findall(labels or ""))
            pairs.setdefault("worker", "0")
            out[tuple(sorted(pairs.items()))] = float(value)
    return out


def by_worker(text: str, name: str, label: str = "") -> dict[str, Any]:
    """``name`` per worker, or per worker and ``label``."""
    out: dict[str, Any] = {}
    for key, value in series(text, name).items():
        labels = dict(key)
        if label:
            counts = out.setdefault(labels["worker"], {})
            if value:
                counts[labels.get(label, "")] = int(value)
        else:
            out[labels["worker"]] = value
    return out


# The processes.


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


class Gateway(GatewayProcess):
    """The supervisor and its workers (or one gateway), and the warnings they log."""

    def __init__(self, env: dict[str, str]) -> None:
        self.warnings: Counter[str] = Counter()  # warning and error events, by name
        self.warning_lines: list[str] = []  # the first few of them, whole
        single = env.get("RTG_WORKERS", "1") == "1"  # no supervisor: the gateway itself
        ready_event = "gateway_listening" if single else "supervisor_ready"  # with worker pids
        super().__init__(env, ready_event=ready_event, max_lines=40)

    def on_line(self, line: str, event: dict[str, Any]) -> None:
        if event.get("level") in ("warning", "error"):
            self.warnings[event.get("event", "")] += 1
            if len(self.warning_lines) < 20:
                self.warning_lines.append(line)

    def rss(self) -> list[int]:
        return [rss_bytes(pid) for pid in self.pids]


class LoadProcess:
    """One load process; a thread reads its pipe (status reports, command results)."""

    def __init__(self, ctx: Any, status_interval_s: float) -> None:
        self.pipe, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(theirs, None, status_interval_s))
        self.proc.daemon = True
        self.proc.start()
        self.results: queue.Queue[Any] = queue.Queue()
        self.status: dict[str, Any] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                kind, value = self.pipe.recv()
            except (EOFError, OSError):
                self.results.put(EOFError("load process exited"))
                return
            if kind == "status":
                self.status = value
            elif kind == "done":
                self.results.put(value)

    def send(self, cmd: str, arg: Any = None) -> None:
        self.pipe.send((cmd, arg))

    def result(self, timeout: float | None = 120.0) -> Any:
        value = self.results.get(timeout=timeout)
        if isinstance(value, Exception):
            raise value
        return value

    def call(self, cmd: str, arg: Any = None) -> Any:
        self.send(cmd, arg)
        return self.result()


class Load:
    """The subscribers' processes and the publisher's."""

    def __init__(self, count: int, status_interval_s: float) -> None:
        ctx = mp.get_context("fork")
        self.subscribers = [LoadProcess(ctx, status_interval_s) for _ in range(count)]
        self.publisher = LoadProcess(ctx, status_interval_s)

    @property
    def pids(self) -> list[int]:
        return [p.proc.pid for p in (*self.subscribers, self.publisher)]

    def call_all(self, cmd: str, arg: Any = None) -> list[Any]:
        for p in self.subscribers:
            p.send(cmd, arg)
        return [p.result() for p in self.subscribers]

    def total(self, key: str) -> int:
        return sum(p.status.get(key, 0) for p in self.subscribers)

    def close(self) -> None:
        for p in (*self.subscribers, self.publisher):
            with contextlib.suppress(Exception):
                p.send("close")
        for p in (*self.subscribers, self.publisher):
            p.proc.join(5)
            if p.proc.is_alive():
                p.proc.kill()


class Sampler(threading.Thread):
    """A row of /proc figures every ``interval`` s, /metrics every ``scrape_interval`` s.

    No scrape while ``quiet`` is set: a scrape makes one worker fetch its
    siblings' text, blocking its event loop meanwhile (up to 0.5 s per busy
    sibling), which would show in the latency and CPU being measured.
    """

    def __init__(
        self,
        t0: float,
        gateway: Gateway,
        load: Load,
        redis: Redis | None,
        interval: float,
        scrape_interval: float,
    ) -> None:
        super().__init__(daemon=True)
        self.t0 = t0
        self.gateway = gateway
        self.load = load
        self.redis = redis
        self.interval = interval
        self.scrape_interval = scrape_interval
        self.rows: list[dict[str, Any]] = []
        self.stopped = threading.Event()
        self.quiet = threading.Event()

    def run(self) -> None:
        last_scrape = 0.0
        while not self.stopped.is_set():
            now = time.monotonic()
            mem = host_memory()
            busy, total = host_cpu()
            row: dict[str, Any] = {
                "t": round(now - self.t0, 2),
                "gateway_rss": self.gateway.rss(),
                "gateway_cpu_s": round(self.gateway.cpu_seconds(), 2),
                "redis_cpu_s": round(cpu_seconds(self.redis.proc.pid), 2) if self.redis else 0,
                "load_rss": sum(rss_bytes(pid) for pid in self.load.pids),
                "host_used": mem["used"],
                "host_slab": mem["slab"],
                "host_tcp_buffers": mem["tcp_buffers"],
                "host_cpu_busy": busy,
                "host_cpu_total": total,
                "open": self.load.total("open"),
                "connected": self.load.total("connected"),
                "failed": self.load.total("failed"),
                "in_flight": self.load.total("in_flight"),
            }
            if (
                self.scrape_interval
                and now - last_scrape >= self.scrape_interval
                and not self.quiet.is_set()
            ):
                last_scrape = now
                with contextlib.suppress(OSError):
                    text = scrape(self.gateway.port, timeout=2)
                    row["gateway_connections"] = by_worker(text, "rtgateway_connections_current")
                    row["scrape_s"] = round(time.monotonic() - now, 3)
            self.rows.append(row)
            self.stopped.wait(self.interval)


def gateway_counters(text: str) -> dict[str, Any]:
    """What the gateway itself counted, per worker."""
    return {
        "connections_current": by_worker(text, "rtgateway_connections_current"),
        "connections_opened": by_worker(text, "rtgateway_connections_total"),
        "handshake_rejections": by_worker(text, "rtgateway_handshake_rejections_total", "reason"),
        "disconnects": by_worker(text, "rtgateway_disconnects_total", "reason"),
        "protocol_errors": by_worker(text, "rtgateway_protocol_errors_total", "code"),
        "messages_dropped": by_worker(text, "rtgateway_messages_dropped_total", "policy"),
        "broker_errors": by_worker(text, "rtgateway_broker_errors_total"),
        "rss_bytes": by_worker(text, "process_resident_memory_bytes"),
        "event_loop_lags": loop_lags(text),
    }


def loop_lags(text: str) -> dict[str, dict[str, int]]:
    """Per worker: how often its event loop ran a timer later than 0.1, 0.25 and 1 s."""
    counts = by_worker(text, "rtgateway_event_loop_lag_seconds_count")
    buckets = by_worker(text, "rtgateway_event_loop_lag_seconds_bucket", "le")
    return {
        w: {
            f"over_{le}_s": int(total - buckets.get(w, {}).get(le, 0))
            for le in ("0.1", "0.25", "1.0")
        }
        for w, total in counts.items()
    }
