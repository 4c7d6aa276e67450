"""C100k on one host: 100,000 WebSockets over SO_REUSEPORT workers, rooms through Redis.

    make c100k                                       # the defaults below, ~6 minutes
    python bench/c100k.py --connections 3000 --workers 2 --load-procs 2 --hold 10
    python bench/c100k.py --no-broker --workers 1 --connections 15000   # one process, no Redis
    python bench/c100k.py --broker-url redis://127.0.0.1:6379 ...       # a Redis you run

What a run does, in order:

1. starts ``redis-server`` (unless ``--broker-url`` or ``--no-broker``), then
   ``python -m rtgateway`` with ``RTG_WORKERS=--workers`` on a port below the
   ephemeral range (its settings: :func:`gateway_env`), then ``--load-procs``
   load processes (bench/loadclient.py), each from its own source addresses
   (127.0.0.2, 127.0.0.3, ...: one per :data:`SOCKETS_PER_SOURCE` sockets),
   plus one publisher process;
2. opens ``--connections`` WebSockets, paced (at most ``--connect-window``
   handshakes in flight per load process, halved whenever one takes longer
   than ``--connect-latency-target``, optionally capped at ``--connect-rate``
   per second) so that no handshake comes near the gateway's 10 s open timeout;
   progress every few seconds; nothing retried, failures counted by kind.
   Every connection joins one room of ``--room-size`` members (r0, r1, ...),
   and ``--large-share`` of them (by default all) also join the large room
   ``all``: a publication there is a broadcast to the whole host, every worker
   fanning out to its whole share (~17k at 100k over 6 workers), the largest
   room one host holds and the per-process fan-out size the 16-core target
   is stated for (18k subscribers);
3. holds them for ``--hold`` seconds at least, and inside that window
   publishes from one client (not a member, RTG_PUBLISH_REQUIRES_JOIN=false:
   the path every client's publication takes, and an ack per publication on
   the same socket) at ``--rooms-rate`` publications/s round-robin over the
   rooms of ``--room-size``, then at ``--large-rate`` to the large room;
4. sends SIGTERM to the gateway and times the drain; every client answers the
   close frame and records its code.

Lost deliveries are counted per room (acknowledged publications times
members, less what the members received), ``seq`` gaps per member and room,
and members that received nothing by worker and room (a room silent on one
worker is that worker's subscription, not a slow client).

It prints a table (and whether each goal of issue 16 was met), writes
``--json`` (every figure, the 1 Hz timeline) and ``--plot`` (connections,
gateway RSS and delivery latency over time). The defaults derive from the
core count: :func:`defaults`. A load generator on the same host competes with
the gateway for CPU: compare deliveries per gateway CPU-second between runs,
not wall-clock rates.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from c100k_processes import (
    HOST,
    ROOT,
    Gateway,
    Load,
    Redis,
    Sampler,
    cpu_seconds,
    free_port,
    gateway_counters,
    host_cpu,
    host_memory,
    rss_bytes,
    scrape,
)
from c100k_report import figures, plot, print_report

# Sockets per gateway worker or load process: the 20000 open-files limit per
# process, less what a process needs besides, less the kernel's uneven spread
# of connections over SO_REUSEPORT listeners (a few hundred at 17k each).
PER_PROCESS = 17_000
MAX_PER_PROCESS = 19_000
# Sockets per source address. connect() picks a source port from one half of
# the ephemeral range first (~14k ports); past it every pick scans the other
# half. Each load process takes enough addresses to stay well inside it.
SOCKETS_PER_SOURCE = 6000
# Offered deliveries/s per core in the two publishing phases. Two cores hold
# 100k idle connections at ~0.6 of a core (pings and timers) and carry the load
# generator too; at twice these rates the small rooms' latency grew for the
# whole phase (2 cores, 100k: 30k/s offered, 20k/s delivered).
ROOMS_DELIVERIES_PER_CORE = 7_500
LARGE_DELIVERIES_PER_CORE = 10_000
LARGE_ROOM = "all"
STATUS_INTERVAL_S = 1.0  # load processes report their counts this often
CLIENT_TIMEOUT_S = 15.0  # a load client gives up an open after this (> the gateway's 10 s)
DRAIN_TIMEOUT_S = 30.0
SETTLE_S = 3.0  # after connecting, before memory is read; after publishing, for stragglers


def defaults(cores: int, connections: int) -> dict[str, Any]:
    """What the flags default to on a host with ``cores`` cores.

    Processes: enough that each holds at most :data:`PER_PROCESS` sockets, and at
    least one per two cores (on 16 cores: 8 workers and 8 load processes). Rates:
    an offered load per core that two shared cores sustained with the load
    generator on them (docs/scaleout.md).
    """
    processes = max(1, cores // 2, math.ceil(connections / PER_PROCESS))
    return {
        "workers": processes,
        "load_procs": processes,
        "rooms_deliveries_per_s": ROOMS_DELIVERIES_PER_CORE * cores,
        "large_deliveries_per_s": LARGE_DELIVERIES_PER_CORE * cores,
    }


def gateway_env(args: argparse.Namespace, port: int, broker_url: str) -> dict[str, str]:
    """Every gateway setting this benchmark changes: the one place to change them."""
    return {
        "RTG_WORKERS": str(args.workers),
        "RTG_BROKER_URL": broker_url,
        "RTG_ADDR": f"{HOST}:{port}",
        "RTG_API_ADDR": "",
        "RTG_DEMO": "false",
        "RTG_LOG_FORMAT": "json",
        "RTG_LOG_LEVEL": "info",
        "RTG_STATS_INTERVAL_S": "0",
        # 0: each worker derives its limit from the 20000-files limit (19,600).
        "RTG_MAX_CONNECTIONS": "0",
        # The defaults, stated: the pacing keeps handshakes far inside the open
        # timeout, and the drain closes 1012 over 5 s, aborting after 30 s.
        "RTG_OPEN_TIMEOUT_S": "10",
        "RTG_DRAIN_WINDOW_S": "5",
        "RTG_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
        # One publisher connection, not a member, sends every publication.
        "RTG_PUBLISH_REQUIRES_JOIN": "false",
        "RTG_RATE_LIMIT_MSGS_PER_S": "1000000",
        "RTG_RATE_LIMIT_BURST": "1000000",
        "RTG_RATE_LIMIT_BYTES_PER_S": "0",
        # All the load comes from a few addresses, ~6k connections each: the
        # limits per client address would refuse it.
        "RTG_MAX_CONNECTIONS_PER_ADDRESS": "0",
        "RTG_MAX_PENDING_HANDSHAKES_PER_ADDRESS": "0",
    }


# The phases.


def snapshot(gateway: Gateway, load: Load) -> dict[str, Any]:
    return {
        "gateway_rss": gateway.rss(),
        "load_rss": [rss_bytes(p) for p in load.pids],
        **host_memory(),
    }


def connect(args: argparse.Namespace, gateway: Gateway, load: Load) -> dict[str, Any]:
    """Open every connection, paced; print progress; the figures of the phase."""
    n_rooms = max(1, math.ceil(args.connections / args.room_size))
    plans: list[list[str]] = []
    for i in range(args.connections):
        rooms = [f"r{i % n_rooms}"]
        if int((i + 1) * args.large_share) > int(i * args.large_share):
            rooms.append(LARGE_ROOM)
        plans.append(rooms)
    spec = {
        "host": HOST,
        "port": gateway.port,
        "path": "/ws",
        "echo": False,
        "concurrency": args.connect_window,
        "window_initial": min(8, args.connect_window),
        "latency_target_s": args.connect_latency_target,
        "rate": args.connect_rate / len(load.subscribers),
        "timeout_s": CLIENT_TIMEOUT_S,
    }
    n = len(load.subscribers)
    per_source = math.ceil(args.connections / n / SOCKETS_PER_SOURCE)
    sources = [[f"127.0.0.{2 + i * per_source + j}" for j in range(per_source)] for i in range(n)]
    pub_source = f"127.0.0.{2 + n * per_source}"
    publisher = {**spec, "rooms": [], "sources": [pub_source], "publisher": True}
    load.publisher.call("connect", publisher)
    started = time.monotonic()
    for i, p in enumerate(load.subscribers):
        p.send("connect", {**spec, "rooms": plans[i::n], "sources": sources[i]})
    results: list[Any] = [None] * n
    last_print, last_done = started, 0
    while any(r is None for r in results):
        for i, p in enumerate(load.subscribers):
            if results[i] is None:
                with contextlib.suppress(queue.Empty):
                    results[i] = p.result(timeout=0.05)
        now = time.monotonic()
        if now - last_print >= args.progress_interval or all(r is not None for r in results):
            done = load.total("connected")
            print(
                f"  {now - started:6.0f} s  connected {done:>7,}/{args.connections:,}"
                f"  failed {load.total('failed'):,}  in flight {load.total('in_flight'):>4}"
                f"  {(done - last_done) / max(1e-9, now - last_print):6.0f}/s",
                file=sys.stderr,
                flush=True,
            )
            last_print, last_done = now, done
    seconds = time.monotonic() - started
    failures: Counter[str] = Counter()
    per_worker: Counter[str] = Counter()
    joined: Counter[str] = Counter()
    handshake, opened = array("d"), array("d")
    for r in results:
        failures.update(r["failures"])
        per_worker.update({str(w): c for w, c in r["per_worker"].items()})
        joined.update(r["joined"])
        handshake.frombytes(r["handshake_s"])
        opened.frombytes(r["open_s"])
    connected = sum(r["connected"] for r in results)
    return {
        "connected": connected,
        "failed": sum(r["failed"] for r in results),
        "failures": dict(failures),
        "per_worker_clients": dict(sorted(per_worker.items())),
        "members": dict(joined),
        "seconds": round(seconds, 2),
        "rate_per_s": round(connected / seconds, 1) if seconds else None,
        "window_cuts": sum(r["window_cuts"] for r in results),
        "handshake_s": handshake,
        "open_s": opened,
    }


def idle(duration_s: float, gateway: Gateway, load: Load, redis: Redis | None) -> dict[str, Any]:
    """What holding the connections costs with nothing published: pings, timers."""
    print(f"  idle: {duration_s:g} s", file=sys.stderr, flush=True)
    cpu0, redis0 = gateway.cpu_seconds(), cpu_seconds(redis.proc.pid) if redis else 0.0
    load_cpu0 = sum(cpu_seconds(pid) for pid in load.pids)
    busy0, total0 = host_cpu()
    started = time.monotonic()
    time.sleep(duration_s)
    seconds = time.monotonic() - started
    busy1, total1 = host_cpu()
    return {
        "seconds": round(seconds, 2),
        "open": load.total("open"),
        "gateway_cpu_s": round(gateway.cpu_seconds() - cpu0, 2),
        "redis_cpu_s": round((cpu_seconds(redis.proc.pid) if redis else 0.0) - redis0, 2),
        "load_cpu_s": round(sum(cpu_seconds(pid) for pid in load.pids) - load_cpu0, 2),
        "host_cpu_busy": round((busy1 - busy0) / max(1, total1 - total0), 3),
    }


def publish(
    name: str,
    rooms: list[str],
    members: dict[str, int],
    rate: float,
    duration_s: float,
    gateway: Gateway,
    load: Load,
    redis: Redis | None,
) -> dict[str, Any]:
    """One publishing phase: rooms round-robin at ``rate``, then wait for the deliveries."""
    offered = rate * sum(members.get(r, 0) for r in rooms) / max(1, len(rooms))
    print(
        f"  {name}: {rate:g} publications/s for {duration_s:g} s to {len(rooms)} room(s)"
        f" (~{offered:,.0f} deliveries/s offered)",
        file=sys.stderr,
        flush=True,
    )
    load.call_all("reset")
    cpu0, redis0 = gateway.cpu_seconds(), cpu_seconds(redis.proc.pid) if redis else 0.0
    load_cpu0 = sum(cpu_seconds(pid) for pid in load.pids)
    busy0, total0 = host_cpu()
    started_ns = time.monotonic_ns()
    pub = load.publisher.call("publish", {"rooms": rooms, "rate": rate, "duration_s": duration_s})
    expected = sum(n * members.get(room, 0) for room, n in pub["acked_by_room"].items())
    received, last_change = -1, time.monotonic()
    while time.monotonic() - last_change < SETTLE_S:
        counts = load.call_all("counts")
        now_received = sum(c["received"] for c in counts)
        if now_received >= expected:
            break
        if now_received != received:
            received, last_change = now_received, time.monotonic()
        time.sleep(0.2)
    cpu1, redis1 = gateway.cpu_seconds(), cpu_seconds(redis.proc.pid) if redis else 0.0
    load_cpu1 = sum(cpu_seconds(pid) for pid in load.pids)
    busy1, total1 = host_cpu()
    latency, received_at = array("q"), array("q")
    for d in load.call_all("deliveries"):
        latency.frombytes(d["latency_ns"])
        received_at.frombytes(d["received_at_ns"])
    by_room: Counter[str] = Counter()
    for c in counts:
        by_room.update(c["by_room"])
    silent: dict[str, Counter[str]] = {}
    for part in load.call_all("silent"):
        for worker, rooms_silent in part.items():
            silent.setdefault(worker, Counter()).update(
                {r: n for r, n in rooms_silent.items() if r in pub["acked_by_room"]}
            )
    short = {r: n * members.get(r, 0) - by_room[r] for r, n in pub["acked_by_room"].items()}
    extra = {r: by_room[r] - pub["acked_by_room"].get(r, 0) * members.get(r, 0) for r in by_room}
    return {
        "rate": rate,
        "duration_s": duration_s,
        "rooms": len(rooms),
        "members_per_room": round(sum(members.get(r, 0) for r in rooms) / max(1, len(rooms)), 1),
        "offered_deliveries_per_s": round(offered),
        "published": pub["sent"],
        "acked": pub["acked"],
        "refused": pub["errors"],
        "refused_by_room": pub["refused_by_room"],
        "unanswered": pub["unanswered"],
        "deliveries_expected": expected,
        "deliveries_received": sum(by_room.values()),
        "lost": sum(v for v in short.values() if v > 0),
        "rooms_with_loss": {r: v for r, v in sorted(short.items()) if v > 0},
        "silent_members": {w: dict(sorted(c.items())) for w, c in sorted(silent.items()) if c},
        "unacknowledged_delivered": sum(v for v in extra.values() if v > 0),
        "seq_gaps": sum(c["out_of_order"] for c in counts),
        "seq_missing": sum(c["missing"] for c in counts),
        "publishing_s": round(pub["publishing_s"], 2),
        "last_sent_ns": pub["last_sent_ns"],
        "started_ns": started_ns,
        "gateway_cpu_s": round(cpu1 - cpu0, 2),
        "redis_cpu_s": round(redis1 - redis0, 2),
        "load_cpu_s": round(load_cpu1 - load_cpu0, 2),
        "host_cpu_busy": round((busy1 - busy0) / max(1, total1 - total0), 3),
        "latency_ns": latency,
        "received_at_ns": received_at,
    }


def drain(gateway: Gateway, load: Load) -> dict[str, Any]:
    """SIGTERM, the exit status and time, and the close codes the clients saw."""
    print("  drain: SIGTERM", file=sys.stderr, flush=True)
    started = time.monotonic()
    gateway.proc.send_signal(signal.SIGTERM)
    try:
        rc: int | None = gateway.proc.wait(DRAIN_TIMEOUT_S + 30)
    except subprocess.TimeoutExpired:
        gateway.proc.kill()
        rc = None
    seconds = time.monotonic() - started
    deadline = time.monotonic() + 10
    while load.total("open") and time.monotonic() < deadline:
        time.sleep(0.2)  # the last clients see their TCP close
    codes: Counter[int] = Counter()
    still_open = 0
    for c in load.call_all("closes"):
        codes.update({int(k): v for k, v in c["codes"].items()})
        still_open += c["still_open"]
    return {
        "exit_status": rc,
        "seconds": round(seconds, 2),
        "close_codes": dict(sorted(codes.items())),
        "still_open": still_open,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    report: dict[str, Any] = {"label": args.label, "args": vars(args), "cores": os.cpu_count()}
    redis = Redis(args.redis_server) if args.redis_server else None
    url = "" if args.no_broker else args.broker_url or (redis.url if redis else "")
    print(
        f"c100k: {args.connections:,} connections, {args.workers} workers,"
        f" {args.load_procs} load processes + 1 publisher, broker {url or 'none'}",
        file=sys.stderr,
        flush=True,
    )
    port = free_port()
    gateway = Gateway(gateway_env(args, port, url)).start(timeout=60)
    load = Load(args.load_procs, STATUS_INTERVAL_S)
    sampler = Sampler(t0, gateway, load, redis, args.sample_interval, args.scrape_interval)
    sampler.start()
    events: dict[str, float] = {}
    try:
        time.sleep(1.0)
        before = snapshot(gateway, load)
        events["connect_start"] = time.monotonic() - t0
        report["connect"] = connect(args, gateway, load)
        events["connect_end"] = held_from = time.monotonic() - t0
        time.sleep(SETTLE_S)
        report["memory"] = {"before": before, "after": snapshot(gateway, load)}
        sampler.quiet.set()  # from here to the drain, what is measured is the gateway's own
        events["idle_start"] = time.monotonic() - t0
        report["idle"] = idle(args.idle_duration, gateway, load, redis)
        events["idle_end"] = time.monotonic() - t0
        members = report["connect"]["members"]
        phases = {}
        n_rooms = max(1, math.ceil(args.connections / args.room_size))
        plan = [
            ("rooms", [f"r{i}" for i in range(n_rooms)], args.rooms_rate, args.rooms_duration),
            ("large", [LARGE_ROOM], args.large_rate, args.large_duration),
        ]
        for name, rooms, rate, duration in plan:
            if rate <= 0 or duration <= 0 or not members.get(rooms[0]):
                continue
            events[f"{name}_start"] = time.monotonic() - t0
            phases[name] = publish(name, rooms, members, rate, duration, gateway, load, redis)
            events[f"{name}_end"] = time.monotonic() - t0
        report["phases"] = phases
        sampler.quiet.clear()
        remaining = held_from + args.hold - (time.monotonic() - t0)
        if remaining > 0:
            print(f"  holding {remaining:.0f} s more", file=sys.stderr, flush=True)
            time.sleep(remaining)
        report["open_before_drain"] = sum(c["open"] for c in load.call_all("counts"))
        with contextlib.suppress(OSError):
            report["gateway"] = gateway_counters(scrape(gateway.port))
        events["drain_start"] = time.monotonic() - t0
        report["held_s"] = round(events["drain_start"] - held_from, 1)
    finally:
        if "drain_start" not in events:
            events["drain_start"] = time.monotonic() - t0
        report["drain"] = drain(gateway, load)
        events["drain_end"] = time.monotonic() - t0
        time.sleep(args.sample_interval)
        sampler.stopped.set()
        sampler.join()
        load.close()
        if redis:
            report["redis_cpu_s_total"] = round(cpu_seconds(redis.proc.pid), 2)
            redis.stop()
    report["gateway_warnings"] = dict(gateway.warnings)
    report["gateway_warning_lines"] = gateway.warning_lines
    report["events"] = {k: round(v, 2) for k, v in events.items()}
    report["timeline"] = sampler.rows
    report["t0_ns"] = int(t0 * 1e9)
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cores = os.cpu_count() or 2
    here = defaults(cores, 100_000)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--connections", type=int, default=100_000, help="WebSockets to open (default 100000)")
    add(
        "--workers",
        type=int,
        help=f"gateway processes (default: cores/2, at least connections/{PER_PROCESS};"
        f" here, for 100k: {here['workers']})",
    )
    add(
        "--load-procs",
        type=int,
        help="load processes, each from its own source address (default: as --workers)"
        " plus one publisher",
    )
    add("--room-size", type=int, default=1000, help="members of each small room (default 1000)")
    add(
        "--large-share",
        type=float,
        default=1.0,
        help="share of the connections that also join the large room (default 1.0: all)",
    )
    add(
        "--rooms-rate",
        type=float,
        help="publications/s to the small rooms, round-robin (default:"
        f" {ROOMS_DELIVERIES_PER_CORE} deliveries/s per core:"
        f" here {here['rooms_deliveries_per_s'] / 1000:g}/s to rooms of 1000)",
    )
    add(
        "--large-rate",
        type=float,
        help=f"publications/s to the large room (default: {LARGE_DELIVERIES_PER_CORE}"
        f" deliveries/s per core: here {here['large_deliveries_per_s'] / 100_000:g}/s"
        " to 100k members)",
    )
    add("--rooms-duration", type=float, help="seconds of publishing to the small rooms")
    add(
        "--large-duration",
        type=float,
        help="seconds of publishing to the large room (both default to hold/3, 1-20 s)",
    )
    add(
        "--hold",
        type=float,
        default=60.0,
        help="seconds from the last open to SIGTERM, at least; the publishing is inside (60)",
    )
    add(
        "--connect-window",
        type=int,
        default=64,
        help="handshakes in flight per load process, at most (64)",
    )
    add(
        "--connect-latency-target",
        type=float,
        default=0.5,
        help="halve a load process's window when a handshake takes longer, s (0.5; 0: fixed)",
    )
    add("--connect-rate", type=float, default=0.0, help="opens/s cap, all processes (0: none)")
    add("--progress-interval", type=float, default=3.0, help="seconds between progress lines")
    add("--sample-interval", type=float, default=1.0, help="seconds between /proc samples")
    add(
        "--scrape-interval",
        type=float,
        default=5.0,
        help="seconds between /metrics scrapes (each blocks one worker's loop briefly; 0: none)",
    )
    add("--redis-server", help="start this redis-server binary (default: the one on PATH)")
    add("--broker-url", help="use this Redis instead of starting one")
    add("--no-broker", action="store_true", help="one gateway without Redis (implies --workers 1)")
    add("--json", default=str(ROOT / "results" / "c100k.json"), help="results/c100k.json")
    add("--plot", default=str(ROOT / "results" / "c100k.png"), help="results/c100k.png")
    add("--no-plot", action="store_true")
    add("--label", default="", help="a note stored with the figures")
    args = parser.parse_args(argv)

    derived = defaults(cores, args.connections)
    if args.no_broker:
        if args.workers not in (None, 1):
            parser.error("--no-broker needs --workers 1: workers share rooms through Redis")
        args.workers = 1
    args.workers = args.workers or derived["workers"]
    args.load_procs = args.load_procs or derived["load_procs"]
    for what, count in (("gateway worker", args.workers), ("load process", args.load_procs)):
        per = math.ceil(args.connections / count)
        if per > MAX_PER_PROCESS:
            parser.error(
                f"{per:,} connections per {what}: past the 20000 open-files limit of a process;"
                f" use at least {math.ceil(args.connections / PER_PROCESS)} or fewer connections"
            )
    addresses = args.load_procs * math.ceil(args.connections / args.load_procs / SOCKETS_PER_SOURCE)
    if addresses + 1 > 250:
        parser.error(f"{addresses} source addresses (127.0.0.2 and up): at most 249")
    if not 0 <= args.large_share <= 1:
        parser.error("--large-share is a fraction between 0 and 1")
    large_members = int(args.connections * args.large_share)
    room_members = min(args.room_size, args.connections)
    if args.rooms_rate is None:
        args.rooms_rate = round(derived["rooms_deliveries_per_s"] / room_members, 2)
    if args.large_rate is None:
        args.large_rate = round(derived["large_deliveries_per_s"] / max(1, large_members), 3)
    phase_s = max(1.0, min(20.0, args.hold / 3))
    args.idle_duration = max(1.0, min(10.0, args.hold / 6))
    args.rooms_duration = phase_s if args.rooms_duration is None else args.rooms_duration
    args.large_duration = phase_s if args.large_duration is None else args.large_duration
    if not args.no_broker and not args.broker_url:
        args.redis_server = args.redis_server or shutil.which("redis-server")
        if not args.redis_server:
            parser.error("no redis-server on PATH: give --redis-server PATH or --broker-url URL")
    elif args.no_broker:
        args.redis_server = None
    return args


def main() -> int:
    args = parse_args()
    report = run(args)
    summary = figures(report)
    print_report(report, summary)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    if not args.no_plot:
        plot(report, summary, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
