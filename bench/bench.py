#!/usr/bin/env python3
"""Fan-out benchmark: rtgateway against stock websockets, measured in the same run.

    python bench/bench.py --quick            # `make bench BENCH_ARGS=--quick`, < 2 min
    python bench/bench.py                    # `make bench`: 15k idle, 10k fan-out
    python bench/bench.py --tiny --no-plot   # what tests/test_bench.py runs

Every scenario runs twice, once against the gateway (``python -m rtgateway``)
and once against ``bench/baseline_server.py`` (stock ``websockets.broadcast()``
or a bare echo server, same settings), each a fresh subprocess pinned to CPU 0.
The load comes from ``bench/loadclient.py`` worker processes on the other CPUs,
each from its own source address (127.0.0.2, 127.0.0.3, ...).

Scenarios: ``idle`` (memory per connection joined to one room), ``fanout``
(one room, N subscribers, R publications/s), ``rooms`` (rooms of k members),
``burst`` (bursts of 10 publications: server write syscalls per delivery),
``echo`` (``/ws/echo`` round trips). Figures: server CPU-seconds per 1000
deliveries (utime+stime from /proc/PID/stat), deliveries/s, publish-to-receive
latency p50/p95/p99/max, RSS delta per connection, messages lost, and write
syscalls per delivery (``syscw`` from /proc/PID/io, which counts write() and
writev(), what libuv uses for TCP; for the gateway also its own
``rtgateway_outbox_flush_frames`` histogram). Each gateway/baseline ratio is
printed; the table is also written to ``--json`` and plotted to ``--plot``.

Only the ratios mean something on a shared machine: other processes take CPU
from both servers alike only within one run.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import contextlib

from loadclient import worker_main

from rtgateway import testing
from rtgateway.testing import GatewayProcess

ROOT = Path(__file__).resolve().parent.parent
PROFILE: dict[str, Any] = {}  # --py-spy: where to write, and which fan-out to profile
GATEWAY_SRC: list[str | None] = [None]  # --gateway-src: a directory holding rtgateway/
VERSUS: list[str] = []  # --versus: a directory whose rtgateway/ stands in for the baseline
HOST = "127.0.0.1"
PER_WORKER_MAX = 9000  # sockets per load process: the 20000-files limit, with room
GATEWAY_ENV = {
    "RTG_ADDR": f"{HOST}:0",
    "RTG_LOG_LEVEL": "info",
    "RTG_LOG_FORMAT": "json",
    "RTG_API_ADDR": "",
    "RTG_STATS_INTERVAL_S": "0",
    "RTG_DEMO": "false",
    "RTG_PUBLISH_REQUIRES_JOIN": "false",
    # The publisher is one connection sending for everyone: no rate limit.
    "RTG_RATE_LIMIT_MSGS_PER_S": "1000000",
    "RTG_RATE_LIMIT_BURST": "1000000",
    "RTG_RATE_LIMIT_BYTES_PER_S": "0",
    # Thousands of connections from each load process's one source address,
    # 200 handshakes at a time each, on a loaded machine: no per-address
    # limits, room for every handshake in flight, and time for its first byte.
    "RTG_MAX_CONNECTIONS_PER_ADDRESS": "0",
    "RTG_MAX_PENDING_HANDSHAKES_PER_ADDRESS": "0",
    "RTG_MAX_PENDING_HANDSHAKES": "4096",
    "RTG_FIRST_BYTE_TIMEOUT_S": "30",
}


# Servers.


def server_cpus() -> set[int] | None:
    """The first CPU, for the server; the load gets the others. None on one CPU."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return {cpus[0]} if len(cpus) > 1 else None


class Server(GatewayProcess):
    """A server subprocess (gateway or baseline) pinned to the first CPU, and its /proc figures."""

    def __init__(
        self, kind: str, mode: str, argv: list[str] | None = None, src: str | None = None
    ) -> None:
        self.kind = kind
        self.mode = mode
        self.errors: list[str] = []  # every error line, whatever the bound on `lines`
        python = sys.executable
        if kind == "gateway":
            # argv: a wrapper script in place of `-m rtgateway` (bench/heap.py).
            command = [python, *(argv or ["-m", "rtgateway"])]
            env, ready_event = GATEWAY_ENV, None
            self.path = "/ws/echo" if mode == "echo" else "/ws"
        else:
            command = [python, str(ROOT / "bench" / "baseline_server.py"), "--host", HOST]
            command += ["--echo"] if mode == "echo" else []
            env, ready_event = {}, "baseline_listening"
            self.path = "/"
        # cwd: `python -m` imports rtgateway from its working directory first.
        super().__init__(
            env,
            command=command,
            cwd=src,
            cpus=server_cpus(),
            ready_event=ready_event,
            max_lines=200,
        )
        self.start(timeout=30)
        assert self.proc is not None
        self.pid = self.proc.pid

    def on_line(self, line: str, event: dict[str, Any]) -> None:
        if "Traceback" in line or event.get("level") == "error":
            self.errors.append(line.strip()[:300])

    def cpu_split(self) -> tuple[float, float]:
        """(user, system) CPU seconds: utime and stime from /proc/PID/stat."""
        return testing.cpu_times(self.pid)

    def rss_bytes(self) -> int:
        return testing.rss_bytes(self.pid)

    def write_syscalls(self) -> int | None:
        try:
            for line in Path(f"/proc/{self.pid}/io").read_text().splitlines():
                if line.startswith("syscw:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return None

    def flush_histogram(self) -> tuple[float, float] | None:
        """(writes, frames) from the gateway's rtgateway_outbox_flush_frames."""
        if self.kind != "gateway":
            return None
        text = urllib.request.urlopen(self.url + "/metrics", timeout=10).read().decode()
        count = re.search(r"^rtgateway_outbox_flush_frames_count (\S+)$", text, re.M)
        total = re.search(r"^rtgateway_outbox_flush_frames_sum (\S+)$", text, re.M)
        if not (count and total):
            return None
        return float(count.group(1)), float(total.group(1))


# Load processes.


class Load:
    """``workers`` load processes, each from its own source address."""

    def __init__(self, workers: int) -> None:
        ctx = mp.get_context("fork")
        all_cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        cpus = set(all_cpus[1:]) or None
        self.pipes = []
        self.procs = []
        for _ in range(workers):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(theirs, cpus), daemon=True)
            proc.start()
            self.pipes.append(ours)
            self.procs.append(proc)

    def call(self, index: int, cmd: str, arg: Any = None) -> Any:
        self.pipes[index].send((cmd, arg))
        while True:
            kind, result = self.pipes[index].recv()
            if kind == "done":
                return result

    def call_all(self, cmd: str, arg: Any = None) -> list[Any]:
        for pipe in self.pipes:
            pipe.send((cmd, arg))
        return [self._wait(i) for i in range(len(self.pipes))]

    def _wait(self, index: int) -> Any:
        while True:
            kind, result = self.pipes[index].recv()
            if kind == "done":
                return result

    def connect(
        self, server: Server, rooms: list[str | None], echo: bool, publisher: bool
    ) -> dict[str, Any]:
        """Spread ``rooms`` (one entry per client) over the workers; show progress."""
        n = len(self.pipes)
        for i, pipe in enumerate(self.pipes):
            spec = {
                "host": HOST,
                "port": server.port,
                "path": server.path,
                "sources": [f"127.0.0.{2 + i}"],
                "rooms": rooms[i::n],
                "echo": echo,
                "publisher": publisher and i == 0,
            }
            pipe.send(("connect", spec))
        progress = [0] * n
        results: list[Any] = [None] * n
        last_print = 0.0
        total = len(rooms)
        while any(r is None for r in results):
            for i, pipe in enumerate(self.pipes):
                while results[i] is None and pipe.poll(0.05):
                    kind, value = pipe.recv()
                    if kind == "progress":
                        progress[i] = value
                    else:
                        results[i] = value
                        progress[i] = value["connected"]
            now = time.monotonic()
            if total >= 1000 and now - last_print > 1.0:
                last_print = now
                print(f"\r    connecting {sum(progress)}/{total}", end="", file=sys.stderr)
        if total >= 1000:
            print(f"\r    connected {sum(progress)}/{total}      ", file=sys.stderr)
        failures: dict[str, int] = {}
        for r in results:
            for k, v in r["failures"].items():
                failures[k] = failures.get(k, 0) + v
        return {
            "connected": sum(r["connected"] for r in results),
            "failed": sum(r["failed"] for r in results),
            "failures": failures,
        }

    def received(self) -> tuple[int, int]:
        counts = self.call_all("counts")
        return sum(c["received"] for c in counts), sum(c["out_of_order"] for c in counts)

    def latencies(self) -> array[int]:
        merged: array[int] = array("q")
        for raw in self.call_all("latencies"):
            merged.frombytes(raw)
        return merged

    def close(self) -> None:
        with contextlib.suppress(EOFError, OSError):
            self.call_all("close")
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()


def workers_for(connections: int) -> int:
    return max(1, math.ceil(connections / PER_WORKER_MAX))


def percentiles_ms(values: array[int]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(values)
    n = len(ordered)

    def at(q: float) -> float:
        return round(ordered[min(n - 1, int(q * n))] / 1e6, 3)

    return {"p50_ms": at(0.50), "p95_ms": at(0.95), "p99_ms": at(0.99), "max_ms": at(1.0)}


# Scenarios. Each returns the figures for one server.


@dataclass
class Phase:
    """One measured load on an already connected set of clients."""

    name: str
    rate: float = 0.0  # bursts per second (open loop)
    burst: int = 1  # publications per burst, written at once
    window: int = 0  # instead of a rate: publications kept unacknowledged (closed loop)
    duration_s: float = 3.0


@dataclass
class Scenario:
    name: str
    mode: str  # "rooms" or "echo"
    clients: int
    room_size: int = 0  # 0: everyone in one room
    phases: list[Phase] = field(default_factory=list)
    workers: int = 0

    def rooms(self) -> list[str | None]:
        if self.mode == "echo":
            return [None] * self.clients
        if not self.room_size:
            return [self.name] * self.clients
        return [f"{self.name}-{i // self.room_size}" for i in range(self.clients)]


def run_scenario(kind: str, sc: Scenario) -> dict[str, dict[str, Any]]:
    if kind == "baseline" and VERSUS:
        # --versus DIR: the "baseline" is the gateway found in DIR (an A/B of a change).
        server = Server("gateway", sc.mode, src=VERSUS[0])
        server.kind = "gateway"
    else:
        server = Server(kind, sc.mode, src=GATEWAY_SRC[0] if kind == "gateway" else None)
    load = Load(sc.workers or workers_for(sc.clients))
    try:
        return _measure(server, load, sc)
    finally:
        load.close()
        server.kill()
        if server.errors:
            print(f"    {kind} logged errors: {server.errors[:3]}", file=sys.stderr)


def _measure(server: Server, load: Load, sc: Scenario) -> dict[str, dict[str, Any]]:
    time.sleep(0.3)
    rss_before = server.rss_bytes()
    rooms = sc.rooms()
    conn = load.connect(server, rooms, sc.mode == "echo", publisher=sc.mode != "echo")
    base: dict[str, Any] = {"connected": conn["connected"], "failed": conn["failed"]}
    if conn["failures"]:
        base["failures"] = conn["failures"]
    if not sc.phases:  # idle
        time.sleep(1.0)
        rss = server.rss_bytes()
        base["rss_mib"] = round(rss / 2**20, 1)
        base["kib_per_conn"] = round((rss - rss_before) / 1024 / max(1, conn["connected"]), 2)
        return {"": base}
    return {
        phase.name: {**base, **_phase(server, load, sc, phase, rooms, conn["connected"])}
        for phase in sc.phases
    }


def _phase(
    server: Server, load: Load, sc: Scenario, phase: Phase, rooms: list[str | None], connected: int
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    load.call_all("reset")
    user0, sys0 = server.cpu_split()
    cpu0 = user0 + sys0
    syscw0 = server.write_syscalls()
    hist0 = server.flush_histogram()
    if sc.mode == "echo":
        results = load.call_all("echo", {"duration_s": phase.duration_s})
        cpu = server.cpu_seconds() - cpu0
        trips = sum(r["round_trips"] for r in results)
        out.update(
            round_trips=trips,
            round_trips_per_s=round(trips / phase.duration_s, 1),
            cpu_s=round(cpu, 3),
            cpu_s_per_1000=round(1000 * cpu / max(1, trips), 5),
            per_cpu_s=round(trips / cpu, 1) if cpu else None,
            **percentiles_ms(load.latencies()),
        )
        return out
    room_names = sorted({r for r in rooms if r is not None})
    spy = None
    if (
        PROFILE
        and server.kind == "gateway"
        and sc.name == "fanout"
        and phase.window
        and sc.clients == PROFILE["subs"]
    ):
        spy = start_py_spy(server.pid, PROFILE["svg"], phase.duration_s)
    pub = load.call(
        0,
        "publish",
        {
            "rooms": room_names,
            "rate": phase.rate,
            "burst": phase.burst,
            "window": phase.window,
            "duration_s": phase.duration_s,
        },
    )
    if sc.room_size:
        # Round-robin over rooms: publication i went to room_names[i % len].
        members = {name: rooms.count(name) for name in room_names}
        expected = sum(members[room_names[i % len(room_names)]] for i in range(pub["acked"]))
    else:
        expected = pub["acked"] * connected
    if spy is not None:
        spy.wait(60)
    # Wait for the deliveries to arrive (or stop coming).
    received, out_of_order = load.received()
    last_change = time.monotonic()
    while received < expected and time.monotonic() - last_change < 5:
        time.sleep(0.05)
        now_received, out_of_order = load.received()
        if now_received != received:
            received = now_received
            last_change = time.monotonic()
    user1, sys1 = server.cpu_split()
    cpu = user1 + sys1 - cpu0
    out.update(
        published=pub["sent"],
        # Where the server's CPU goes: Python (user) or the kernel's write path (system).
        system_share=round((sys1 - sys0) / cpu, 3) if cpu else None,
        acked=pub["acked"],
        deliveries=received,
        lost=max(0, expected - received) + (pub["sent"] - pub["acked"]),
        out_of_order=out_of_order,
        deliveries_per_s=round(received / pub["elapsed_s"], 1),
        cpu_s=round(cpu, 3),
        cpu_s_per_1000=round(1000 * cpu / max(1, received), 5),
        per_cpu_s=round(received / cpu, 1) if cpu else None,
        **percentiles_ms(load.latencies()),
    )
    syscw1 = server.write_syscalls()
    if syscw0 is not None and syscw1 is not None:
        out["write_syscalls"] = syscw1 - syscw0
        out["writes_per_delivery"] = round((syscw1 - syscw0) / max(1, received), 4)
    hist1 = server.flush_histogram()
    if hist0 and hist1:
        writes, frames = hist1[0] - hist0[0], hist1[1] - hist0[1]
        out["flush_writes"] = int(writes)
        out["flush_frames"] = int(frames)
        out["frames_per_flush"] = round(frames / writes, 2) if writes else None
    return out


def start_py_spy(pid: int, svg: str, duration_s: float) -> subprocess.Popen[bytes] | None:
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        print("    py-spy is not installed: no profile", file=sys.stderr)
        return None
    Path(svg).parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(spy), "record", "-p", str(pid), "-d", str(max(1, int(duration_s) - 1))]
    cmd += ["-r", "250", "-f", "flamegraph", "-o", svg, "--nonblocking"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # attached before the first publication
    return proc


# Plans.


def plan(args: argparse.Namespace) -> list[Scenario]:
    """The scenarios of a run. ``fanout`` measures each subscriber count twice:
    ``rate`` at a fixed offered load (``--deliveries-per-s``, inside both
    servers' capacity: CPU per delivery at equal work, and latency), then
    ``max`` with 4 publications kept in flight (the server never idles:
    fan-out at the limit)."""
    rate_d = args.deliveries_per_s
    if args.tiny:
        d = 1.0
        fanouts, idle, rooms_n, burst_n, echo_n = [200], 200, 200, 100, 10
    elif args.quick:
        d = 2.0
        fanouts, idle, rooms_n, burst_n, echo_n = [1000, 3000], 3000, 1000, 500, 20
    else:
        d = 6.0
        fanouts, idle, rooms_n, burst_n, echo_n = [1000, 2500, 5000, 10000], 15000, 10000, 2000, 50
    if args.fanout:
        fanouts = [int(n) for n in args.fanout.split(",")]
    if args.idle:
        idle = args.idle
    plans = [Scenario("idle", "rooms", idle)]
    for subs in fanouts:
        plans.append(
            Scenario(
                "fanout",
                "rooms",
                subs,
                phases=[
                    Phase("rate", rate=max(1.0, rate_d / subs), duration_s=d),
                    Phase("max", window=4, duration_s=d),
                ],
            )
        )
    plans += [
        Scenario(
            "rooms",
            "rooms",
            rooms_n,
            room_size=20,
            phases=[Phase("rate", rate=rate_d / 20, duration_s=d)],
        ),
        Scenario(
            "burst",
            "rooms",
            burst_n,
            phases=[Phase("rate", rate=max(1.0, rate_d / burst_n / 10), burst=10, duration_s=d)],
        ),
        Scenario("echo", "echo", echo_n, phases=[Phase("closed_loop", duration_s=d)]),
    ]
    return plans


FIGURES = (
    ("per_cpu_s", "deliveries per server CPU-s", True),
    ("cpu_s_per_1000", "server CPU-s per 1000 deliveries", False),
    ("deliveries_per_s", "deliveries/s", True),
    ("round_trips_per_s", "round trips/s", True),
    ("p50_ms", "latency p50 ms", False),
    ("p95_ms", "latency p95 ms", False),
    ("p99_ms", "latency p99 ms", False),
    ("max_ms", "latency max ms", False),
    ("system_share", "server CPU share in the kernel", False),
    ("kib_per_conn", "KiB per connection", False),
    ("writes_per_delivery", "write syscalls per delivery", False),
    ("lost", "messages lost", False),
)


def label(sc: Scenario, phase: str) -> str:
    p = next((ph for ph in sc.phases if ph.name == phase), None)
    if sc.name == "fanout" and p is not None:
        how = "4 in flight (at the limit)" if p.window else f"{p.rate:g} pub/s"
        return f"fanout {sc.clients} subscribers, {how}"
    if sc.name == "rooms" and p is not None:
        return f"rooms {sc.clients // max(1, sc.room_size)} x {sc.room_size}, {p.rate:g} pub/s"
    if sc.name == "burst" and p is not None:
        return f"burst of 10 to {sc.clients} subscribers, {p.rate:g} bursts/s"
    if sc.name == "echo":
        return f"echo {sc.clients} clients, closed loop"
    return f"{sc.name} {sc.clients} connections"


def ratio(gw: Any, base: Any) -> float | None:
    if not isinstance(gw, (int, float)) or not isinstance(base, (int, float)) or not base:
        return None
    return round(gw / base, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller run, under 2 minutes")
    size.add_argument("--tiny", action="store_true", help="a few hundred connections (CI)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per scenario (median)")
    parser.add_argument(
        "--only", default="", help="comma list of scenarios (idle,fanout,rooms,burst,echo)"
    )
    parser.add_argument(
        "--deliveries-per-s",
        type=float,
        default=30000.0,
        help="offered load of the fixed-rate phases (default 30000)",
    )
    parser.add_argument(
        "--gateway-src", default=None, help="run the rtgateway package found in this directory"
    )
    parser.add_argument(
        "--versus",
        default=None,
        metavar="DIR",
        help="A/B: compare against the rtgateway package in DIR instead of stock websockets",
    )
    parser.add_argument("--fanout", default="", help="comma list of subscriber counts")
    parser.add_argument("--idle", type=int, default=0, help="connections of the idle scenario")
    parser.add_argument(
        "--py-spy",
        default="",
        metavar="SVG",
        help="record a py-spy flame graph of the gateway during the largest fan-out at the limit",
    )
    parser.add_argument("--json", default="results/bench.json")
    parser.add_argument("--plot", default="results/bench.png")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--plot-only", metavar="JSON", help="redraw the plot of a saved run")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.plot_only).read_text())["rows"], args.plot)
        return 0
    only = set(filter(None, args.only.split(",")))
    scenarios = [sc for sc in plan(args) if not only or sc.name in only]
    GATEWAY_SRC[0] = args.gateway_src
    if args.versus:
        VERSUS.append(args.versus)
    if args.py_spy:
        PROFILE["svg"] = args.py_spy
        PROFILE["subs"] = max(sc.clients for sc in scenarios if sc.name == "fanout")
    rows = []
    started = time.monotonic()
    for sc in scenarios:
        runs: dict[str, list[dict[str, dict[str, Any]]]] = {"gateway": [], "baseline": []}
        for rep in range(args.repeat):
            for kind in ("gateway", "baseline") if rep % 2 == 0 else ("baseline", "gateway"):
                print(f"  {sc.name} {sc.clients}: {kind} (run {rep + 1})", file=sys.stderr)
                runs[kind].append(run_scenario(kind, sc))
        for phase in runs["gateway"][0]:
            gw_runs = [r[phase] for r in runs["gateway"]]
            base_runs = [r[phase] for r in runs["baseline"]]
            row: dict[str, Any] = {
                "scenario": sc.name,
                "phase": phase,
                "label": label(sc, phase),
                "clients": sc.clients,
                "gateway": median_figures(gw_runs),
                "baseline": median_figures(base_runs),
                "runs": {"gateway": gw_runs, "baseline": base_runs},
            }
            row["ratio"] = {
                key: ratio(row["gateway"].get(key), row["baseline"].get(key))
                for key, _, _ in FIGURES
                if key in row["gateway"] and key != "lost"
            }
            rows.append(row)
            print_row(row)
    report = {
        "mode": "tiny" if args.tiny else "quick" if args.quick else "full",
        "repeat": args.repeat,
        "cpus": len(os.sched_getaffinity(0)),
        "python": sys.version.split()[0],
        "elapsed_s": round(time.monotonic() - started, 1),
        # What "gateway" and "baseline" were in this run (a saved file says it itself).
        "gateway_src": GATEWAY_SRC[0] or "this checkout",
        "baseline": f"rtgateway in {VERSUS[0]} (--versus)" if VERSUS else "stock websockets",
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    if not args.no_plot:
        plot(rows, args.plot)
    return 0


def median_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for key in runs[0]:
        values = [r.get(key) for r in runs]
        if all(isinstance(v, int) for v in values):
            merged[key] = statistics.median_low(values)  # type: ignore[type-var]
        elif all(isinstance(v, (int, float)) for v in values):
            merged[key] = statistics.median(values)  # type: ignore[type-var]
        else:
            merged[key] = values[0]
    if len(runs) > 1 and "lost" in merged:
        merged["lost"] = max(r.get("lost", 0) for r in runs)
    return merged


def print_row(row: dict[str, Any]) -> None:
    gw, base = row["gateway"], row["baseline"]
    print(f"\n{row['label']}   (connected {gw.get('connected')} / {base.get('connected')})")
    print(f"  {'figure':<34}{'gateway':>14}{'baseline':>14}{'gw/base':>10}")
    for key, title, _ in FIGURES:
        if key not in gw and key not in base:
            continue
        r = ratio(gw.get(key), base.get(key)) if key != "lost" else None
        print(
            f"  {title:<34}{fmt(gw.get(key)):>14}{fmt(base.get(key)):>14}"
            f"{(f'{r:.2f}x' if r is not None else ''):>10}"
        )
    if "frames_per_flush" in gw:
        print(f"  {'gateway frames per flush (histogram)':<34}{fmt(gw['frames_per_flush']):>14}")
    sys.stdout.flush()


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -r requirements/bench.txt)")
        return
    fan = [r for r in rows if r["scenario"] == "fanout" and r["phase"] == "rate"]
    top = [r for r in rows if r["scenario"] == "fanout" and r["phase"] == "max"]
    if not fan:
        return
    subs = [r["clients"] for r in fan]
    offered = fan[0]["gateway"].get("deliveries_per_s") or 0
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"gateway": "-", "baseline": "--"}
    for kind, style in styles.items():
        for key, marker in (("p50_ms", "o"), ("p95_ms", "s"), ("p99_ms", "^")):
            left.plot(
                subs, [r[kind].get(key) for r in fan], style, marker=marker, label=f"{kind} {key}"
            )
        right.plot(
            [r["clients"] for r in top],
            [r[kind].get("deliveries_per_s") for r in top],
            style,
            marker="o",
            label=f"{kind}: deliveries/s at the limit",
        )
        right.plot(
            [r["clients"] for r in top],
            [r[kind].get("per_cpu_s") for r in top],
            style,
            marker="s",
            label=f"{kind}: deliveries per server CPU-s at the limit",
        )
        right.plot(
            subs,
            [r[kind].get("per_cpu_s") for r in fan],
            style,
            marker="x",
            label=f"{kind}: deliveries per server CPU-s at {offered:,.0f}/s",
        )
    left.set(
        xlabel="subscribers",
        ylabel="publish to receive, ms",
        title=f"Fan-out latency at ~{offered:,.0f} deliveries/s",
    )
    left.set_yscale("log")
    right.set(xlabel="subscribers", ylabel="deliveries", title="Fan-out throughput")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
