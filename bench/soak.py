#!/usr/bin/env python3
"""Soak: a churn load against a gateway subprocess; resources and delivery at the end.

    python bench/soak.py --duration 300            # `make soak DURATION=300`
    python bench/soak.py --duration 45 --json reports/soak.json

The gateway runs as ``python -m rtgateway`` on 127.0.0.1 port 0. The load, all
from this process, for ``--duration`` seconds:

- **observers** (healthy, the clients of record): join one room each at the
  start and stay; they must receive every publication acknowledged in their
  room, in order, none twice;
- **churners** (healthy): connect, join a room, publish a few messages (each
  acknowledged), leave, disconnect, again; each must see its own publications
  and no gap between the first and last message it saw;
- **slow clients**: join a room with a 4 KiB receive buffer and never read,
  under each slow-consumer policy, then vanish (reset);
- **abusive clients**: publish floods (rate limit, then 1008), protocol
  violations, oversized messages, poisoned JSON, half frames then a reset,
  trickled handshakes, ping floods without reading.

Before the run a warm-up of the same load runs and ends; with every client
gone the gateway's RSS, open descriptors (``/proc/PID/fd``) and asyncio task
count (``rtgateway_tasks_current`` when the gateway exports it) are the
baseline. After the run, with every client gone again, they are measured
against it. Exit status 1 when a healthy client lost a message, the gateway
logged a traceback or died, or growth passed ``--max-rss-growth-mib``,
``--max-fd-growth`` or ``--max-task-growth``.

Traffic stays on 127.0.0.1; the run ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import socket
import struct
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtgateway.client import Client, ServerError
from rtgateway.testing import GatewayProcess, rss_bytes

TASKS_METRIC = "rtgateway_tasks_current"


# The gateway under test.


class Gateway(GatewayProcess):
    """``python -m rtgateway`` on an ephemeral port, with the soak's readings."""

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def metrics(self) -> dict[str, float]:
        """Every sample, keyed ``name{labels}`` as in the exposition text."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples

    def resources(self) -> dict[str, float | None]:
        assert self.proc is not None
        pid = self.proc.pid
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        tasks = self.metrics().get(TASKS_METRIC)
        return {"rss_bytes": rss_bytes(pid), "open_fds": fds, "tasks": tasks}


# Raw sockets for the clients that misbehave (the protocol client cannot).


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0
) -> bytes:
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    mask_bit = 0x80 if mask else 0
    if n < 126:
        header = struct.pack("!BB", first, mask_bit | n)
    elif n < 65536:
        header = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, n)
    if not mask:
        return header + payload
    key = os.urandom(4)
    stream = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return header + key + (masked if n else b"")


def text(obj: Any) -> bytes:
    return frame(0x1, json.dumps(obj).encode())


def handshake(path: str = "/ws") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


class Raw:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, rcvbuf: int | None = None) -> Raw:
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        return cls(*await asyncio.open_connection(sock=sock))

    @classmethod
    async def open(cls, port: int, path: str = "/ws", rcvbuf: int | None = None) -> Raw:
        raw = await cls.connect(port, rcvbuf)
        await raw.send(handshake(path))
        head = await asyncio.wait_for(raw.reader.readuntil(b"\r\n\r\n"), 10)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raw.reset()
            raise ConnectionError(head.split(b"\r\n", 1)[0].decode())
        return raw

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def drain_until_eof(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(timeout):
                while await self.reader.read(1 << 16):
                    pass

    def reset(self) -> None:
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


# The load.


@dataclass
class Tally:
    acked: dict[str, list[int]] = field(default_factory=dict)  # room -> acknowledged seqs
    churn_cycles: int = 0
    churn_errors: dict[str, int] = field(default_factory=dict)
    churn_gaps: int = 0
    churn_missing_own: int = 0
    churn_received: int = 0
    slow_cycles: int = 0
    abuse: dict[str, int] = field(default_factory=dict)

    def count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1


class Observer:
    def __init__(self, client: Client, room: str) -> None:
        self.client, self.room = client, room
        self.seqs: list[int] = []
        self.task = asyncio.ensure_future(self._collect())

    async def _collect(self) -> None:
        async for msg in self.client.messages():
            if msg["room"] == self.room:
                self.seqs.append(msg["seq"])


async def churner(
    gw: Gateway, rooms: list[str], tally: Tally, stop: asyncio.Event, rng: random.Random
) -> None:
    while not stop.is_set():
        room = rng.choice(rooms)
        try:
            client = await Client.open(gw.ws_url)
        except (TimeoutError, OSError) as exc:
            tally.count(tally.churn_errors, type(exc).__name__)
            await asyncio.sleep(0.1)
            continue
        own: list[int] = []
        try:
            await client.join(room)
            for _ in range(rng.randrange(1, 6)):
                seq = await client.publish(room, {"pad": "x" * rng.randrange(10, 1500)})
                own.append(seq)
                tally.acked.setdefault(room, []).append(seq)
                await asyncio.sleep(rng.uniform(0.02, 0.15))
            await client.leave(room)
        except (ServerError, ConnectionError, OSError) as exc:
            tally.count(tally.churn_errors, type(exc).__name__)
        finally:
            await client.close()
        seen = []
        while not client._messages.empty():
            msg = client._messages.get_nowait()
            if msg["room"] == room:
                seen.append(msg["seq"])
        tally.churn_received += len(seen)
        if seen and seen != list(range(seen[0], seen[0] + len(seen))):
            tally.churn_gaps += 1
        tally.churn_missing_own += len(set(own) - set(seen))
        tally.churn_cycles += 1
        await asyncio.sleep(rng.uniform(0, 0.1))


async def slow_client(
    gw: Gateway, rooms: list[str], tally: Tally, stop: asyncio.Event, rng: random.Random
) -> None:
    while not stop.is_set():
        policy = rng.choice(["disconnect", "drop_oldest", "drop_newest"])
        try:
            raw = await Raw.open(gw.port, rcvbuf=4096)
            await raw.send(text({"op": "join", "room": rng.choice(rooms), "policy": policy}))
        except (TimeoutError, OSError):
            await asyncio.sleep(0.2)
            continue
        # Never read; vanish after a while.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.uniform(5, 20))
        raw.reset()
        tally.slow_cycles += 1


def poison() -> bytes:
    return frame(0x1, b'{"op":"publish","room":"abuse","data":"\\ud800","id":1}')


ABUSES = (
    "flood",
    "bad_frame",
    "oversize",
    "poison",
    "half_frame_reset",
    "slowloris",
    "ping_flood",
    "reset_after_handshake",
)
BAD_FRAMES = (
    frame(0x1, b"\xff\xfe"),  # invalid UTF-8
    frame(0x1, b'{"op":"ping"}', mask=False),  # unmasked
    frame(0x1, b'{"op":"ping"}', rsv=4),  # reserved bit
    frame(0x3, b"x"),  # reserved opcode
    frame(0x0, b"x"),  # continuation without a start
    frame(0x9, b"x" * 126),  # control frame too long
)


async def abusive(
    gw: Gateway, tally: Tally, stop: asyncio.Event, rng: random.Random, max_bytes: int
) -> None:
    while not stop.is_set():
        kind = rng.choice(ABUSES)
        tally.count(tally.abuse, kind)
        try:
            if kind == "slowloris":
                raw = await Raw.connect(gw.port)
                for byte in handshake()[:40]:
                    await raw.send(bytes([byte]))
                    await asyncio.sleep(0.02)
                raw.reset()
                continue
            raw = await Raw.open(gw.port, "/ws" if rng.random() < 0.7 else "/ws/echo")
            if kind == "flood":
                # Reads while it floods (else it is a slow consumer first): the
                # rate limit answers with errors, then closes with 1008.
                reading = asyncio.ensure_future(raw.drain_until_eof(10))
                burst = b"".join(
                    text({"op": "publish", "room": "abuse", "data": i, "id": i}) for i in range(400)
                )
                with contextlib.suppress(ConnectionError):
                    await raw.send(burst)
                await reading
                raw.reset()
            elif kind in ("bad_frame", "oversize", "poison"):
                data = {
                    "bad_frame": rng.choice(BAD_FRAMES),
                    "oversize": frame(0x1, b"x" * (max_bytes + 1)),
                    "poison": poison(),
                }[kind]
                await raw.send(data)
                await raw.drain_until_eof(0.5 if kind == "poison" else 10)
                with contextlib.suppress(ConnectionError):
                    await raw.send(frame(0x8, struct.pack("!H", 1000)))
                raw.writer.close()
            elif kind == "half_frame_reset":
                whole = text({"op": "ping", "id": 1, "pad": "z" * 300})
                await raw.send(whole[: len(whole) // 2])
                raw.reset()
            elif kind == "ping_flood":
                ping = frame(0x9, b"p" * 125)
                with contextlib.suppress(ConnectionError, TimeoutError):
                    for _ in range(50):
                        await asyncio.wait_for(raw.send(ping * 100), 2)
                raw.reset()
            else:
                raw.reset()
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            pass
        await asyncio.sleep(rng.uniform(0.05, 0.5))


async def wait_idle(gw: Gateway, timeout: float) -> bool:
    """Wait until the gateway holds no connection."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = (await asyncio.to_thread(gw.metrics)).get("rtgateway_connections_current")
        if current == 0:
            return True
        await asyncio.sleep(0.2)
    return False


async def settle(gw: Gateway, seconds: float) -> dict[str, float | None]:
    """Resources once idle: the last of a few samples a moment apart."""
    sample = await asyncio.to_thread(gw.resources)
    for _ in range(max(1, int(seconds / 0.5))):
        await asyncio.sleep(0.5)
        sample = await asyncio.to_thread(gw.resources)
    return sample


async def load(
    gw: Gateway,
    args: argparse.Namespace,
    seconds: float,
    tally: Tally,
    rng: random.Random,
    peaks: dict[str, float],
) -> dict[str, Any]:
    rooms = [f"room-{i}" for i in range(args.rooms)]
    stop = asyncio.Event()
    observers = []
    for room in rooms:
        for _ in range(args.observers):
            client = await Client.open(gw.ws_url)
            await client.join(room)
            observers.append(Observer(client, room))
    workers = [
        *(
            churner(gw, rooms, tally, stop, random.Random(rng.random()))
            for _ in range(args.churners)
        ),
        *(
            slow_client(gw, rooms, tally, stop, random.Random(rng.random()))
            for _ in range(args.slow)
        ),
        *(
            abusive(gw, tally, stop, random.Random(rng.random()), args.max_message_bytes)
            for _ in range(args.abusive)
        ),
    ]
    tasks = [asyncio.ensure_future(w) for w in workers]

    async def sample_peaks() -> None:
        while not stop.is_set():
            res = await asyncio.to_thread(gw.resources)
            for key in ("rss_bytes", "open_fds"):
                peaks[key] = max(peaks.get(key, 0), float(res[key] or 0))
            await asyncio.sleep(1)

    sampler = asyncio.ensure_future(sample_peaks())
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks, sampler)

    # Observers: every acknowledged publication in their room, once, in order.
    lost = duplicated = expected = delivered = 0
    deadline = time.monotonic() + 20
    for obs in observers:
        want = sorted(tally.acked.get(obs.room, []))
        while len(obs.seqs) < len(want) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        expected += len(want)
        delivered += len(obs.seqs)
        lost += len(set(want) - set(obs.seqs))
        duplicated += len(obs.seqs) - len(set(obs.seqs))
        if obs.seqs != sorted(obs.seqs):
            duplicated += 1
    for obs in observers:
        await obs.client.close()
        await obs.task
    return {
        "observers": len(observers),
        "published_acked": sum(len(v) for v in tally.acked.values()),
        "expected_deliveries_to_observers": expected,
        "delivered_to_observers": delivered,
        "lost": lost,
        "duplicated_or_out_of_order": duplicated,
    }


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    env = {
        "RTG_MAX_MESSAGE_BYTES": str(args.max_message_bytes),
        "RTG_OUTBOX_MAX_MESSAGES": "256",
        # Slow clients fill their outbox in seconds instead of filling 4 MiB of kernel buffer.
        "RTG_SOCKET_SNDBUF_BYTES": "65536",
        "RTG_OPEN_TIMEOUT_S": "2",
        "RTG_PING_INTERVAL_S": "5",
        "RTG_PING_TIMEOUT_S": "5",
        "RTG_CLOSE_TIMEOUT_S": "2",
        "RTG_STATS_INTERVAL_S": "0",
        "RTG_DRAIN_WINDOW_S": "0.5",
        "RTG_DRAIN_TIMEOUT_S": "10",
        **dict(kv.split("=", 1) for kv in args.gateway_env),
    }
    gw = Gateway(env)
    gw.start()
    rng = random.Random(args.seed)
    started = time.monotonic()
    try:
        # Warm-up, then the baseline with every client gone.
        warm = Tally()
        await load(gw, args, args.warmup, warm, rng, {})
        idle = await wait_idle(gw, 30)
        baseline = await settle(gw, 3)

        tally = Tally()
        peaks: dict[str, float] = {}
        delivery = await load(gw, args, args.duration, tally, rng, peaks)
        idle = await wait_idle(gw, 30) and idle
        final = await settle(gw, 3)
        metrics = await asyncio.to_thread(gw.metrics)
    finally:
        exit_status = gw.stop()

    def growth(key: str) -> float | None:
        a, b = baseline[key], final[key]
        return None if a is None or b is None else b - a

    counters = {
        key.removeprefix("rtgateway_"): value
        for key, value in metrics.items()
        if key.startswith(("rtgateway_disconnects_total", "rtgateway_handshake_rejections_total"))
        and value
    }
    for name in ("publishes_total", "deliveries_total", "connections_total", "rate_limited_total"):
        counters[name] = metrics.get("rtgateway_" + name, 0.0)
    counters["messages_dropped_total"] = sum(
        v for k, v in metrics.items() if k.startswith("rtgateway_messages_dropped_total")
    )
    return {
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "wall_s": round(time.monotonic() - started, 1),
        "seed": args.seed,
        "baseline": baseline,
        "final": final,
        "peak": peaks,
        "growth": {
            "rss_mib": round((growth("rss_bytes") or 0) / 2**20, 2),
            "open_fds": growth("open_fds"),
            "tasks": growth("tasks"),
        },
        "tasks_metric": TASKS_METRIC if baseline["tasks"] is not None else None,
        "delivery": delivery,
        "churn": {
            "cycles": tally.churn_cycles,
            "received": tally.churn_received,
            "gaps": tally.churn_gaps,
            "own_publications_missing": tally.churn_missing_own,
            "errors": tally.churn_errors,
        },
        "slow_cycles": tally.slow_cycles,
        "abuse": tally.abuse,
        "gateway": counters,
        "idle_after_run": idle,
        "gateway_exit_status": exit_status,
        "gateway_tracebacks": gw.tracebacks()[:5],
    }


def verdict(report: dict[str, Any], args: argparse.Namespace) -> list[str]:
    problems = []
    growth = report["growth"]
    if report["delivery"]["lost"]:
        problems.append(f"{report['delivery']['lost']} publications lost by observers")
    if report["delivery"]["duplicated_or_out_of_order"]:
        problems.append("observers saw duplicates or disorder")
    if report["churn"]["gaps"] or report["churn"]["own_publications_missing"]:
        problems.append(
            f"churners: {report['churn']['gaps']} gaps, "
            f"{report['churn']['own_publications_missing']} own publications missing"
        )
    if report["delivery"]["published_acked"] == 0:
        problems.append("nothing was published")
    if growth["rss_mib"] > args.max_rss_growth_mib:
        problems.append(f"RSS grew {growth['rss_mib']} MiB > {args.max_rss_growth_mib}")
    if (growth["open_fds"] or 0) > args.max_fd_growth:
        problems.append(f"open fds grew by {growth['open_fds']} > {args.max_fd_growth}")
    if growth["tasks"] is not None and growth["tasks"] > args.max_task_growth:
        problems.append(f"asyncio tasks grew by {growth['tasks']} > {args.max_task_growth}")
    if not report["idle_after_run"]:
        problems.append("connections were still open after every client left")
    if report["gateway_tracebacks"]:
        problems.append("the gateway logged tracebacks")
    if report["gateway_exit_status"] != 0:
        problems.append(f"the gateway exited with {report['gateway_exit_status']}")
    return problems


def print_report(report: dict[str, Any], problems: list[str]) -> None:
    b, f, p, g = report["baseline"], report["final"], report["peak"], report["growth"]
    d = report["delivery"]
    mib = 2**20
    tasks = (
        f"{b['tasks']:.0f} -> {f['tasks']:.0f}"
        if b["tasks"] is not None and f["tasks"] is not None
        else f"n/a (the gateway exports no {TASKS_METRIC})"
    )
    print(f"soak: {report['duration_s']} s of churn after {report['warmup_s']} s of warm-up")
    print(
        f"  RSS        {b['rss_bytes'] / mib:7.1f} MiB -> {f['rss_bytes'] / mib:7.1f} MiB "
        f"(growth {g['rss_mib']} MiB, peak {p.get('rss_bytes', 0) / mib:.1f} MiB)"
    )
    print(
        f"  open fds   {b['open_fds']:7.0f}     -> {f['open_fds']:7.0f}     "
        f"(growth {g['open_fds']}, peak {p.get('open_fds', 0):.0f})"
    )
    print(f"  tasks      {tasks}")
    print(
        f"  published (acked) {d['published_acked']}; to observers: expected "
        f"{d['expected_deliveries_to_observers']}, delivered {d['delivered_to_observers']}, "
        f"lost {d['lost']}"
    )
    c = report["churn"]
    print(
        f"  churn cycles {c['cycles']} (received {c['received']}, gaps {c['gaps']}, "
        f"own missing {c['own_publications_missing']}, errors {c['errors']})"
    )
    print(f"  slow-client cycles {report['slow_cycles']}; abuse {report['abuse']}")
    print(f"  gateway counters {report['gateway']}")
    for problem in problems:
        print(f"  FAIL {problem}")
    print("  OK" if not problems else f"  {len(problems)} problem(s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300, help="seconds of churn")
    parser.add_argument("--warmup", type=float, default=None, help="seconds (default: 15%%, 5-30)")
    parser.add_argument("--rooms", type=int, default=4)
    parser.add_argument("--observers", type=int, default=2, help="per room")
    parser.add_argument("--churners", type=int, default=16)
    parser.add_argument("--slow", type=int, default=4)
    parser.add_argument("--abusive", type=int, default=4)
    parser.add_argument("--max-message-bytes", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-rss-growth-mib", type=float, default=32.0)
    parser.add_argument("--max-fd-growth", type=int, default=0)
    parser.add_argument("--max-task-growth", type=int, default=0)
    parser.add_argument("--gateway-env", action="append", default=[], metavar="RTG_X=V")
    parser.add_argument("--json", dest="json_path", help="write the report here too")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(30.0, max(5.0, args.duration * 0.15))
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    report = runner(soak(args))
    problems = verdict(report, args)
    report["problems"] = problems
    print_report(report, problems)
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
