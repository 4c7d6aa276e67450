"""The load processes of ``bench/bench.py`` and ``bench/c100k.py``: raw sockets, uvloop.

Each worker is a ``multiprocessing`` process that runs one uvloop event loop
and takes commands from the orchestrator over a pipe. A client is a bare
``asyncio.Protocol``: the opening handshake is written by hand, server frames
are parsed with a few slices (no JSON), and client frames carry a zero mask
key (RFC 6455 §5.3 requires a key, not an unpredictable one from a non-browser
client), so the load costs as little CPU as Python allows.

Publications carry the publisher's ``time.monotonic_ns()`` as their ``data``;
a subscriber reads it back from the end of the frame, so latency is publish to
receive on one clock (CLOCK_MONOTONIC is shared by processes on one host).
Every subscriber checks, per room, that ``seq`` grows by one, and counts what
it received per room: ``lost`` is what was acknowledged to the publisher but
never reached a member.

Opening is paced (:class:`Pacer`): at most a window of handshakes in flight,
optionally at most a rate of new ones per second, and, with a latency target,
the window halves when a handshake takes longer than the target and grows back
by one per window of fast ones. Nothing is retried: a failed open counts once,
by the stage it failed in and why (``handshake: HTTP 503``, ``tcp:
EADDRNOTAVAIL``, ``join: timeout``...). A close frame from the server is
answered with the same code (RFC 6455 §5.5.1) and the code is kept per client.
A client binds its source address with ``IP_BIND_ADDRESS_NO_PORT``, so that
``connect()`` picks the port per destination (see :meth:`Worker.open`).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import json
import os
import socket
import time
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["worker_main"]

HANDSHAKE = 0
OPEN = 1
CLOSING = 2  # a close frame came and was answered; the server closes TCP
CLOSED = 3
MESSAGE_PREFIX = b'{"op":"message"'
ROOM_AT = len(b'{"op":"message","room":"')
SEQ_AFTER_ROOM = len(b'","seq":')
NO_CLOSE_FRAME = 1006  # RFC 6455 §7.1.5: the connection closed without a close frame
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux 4.2
monotonic_ns = time.monotonic_ns


def client_frame(payload: bytes, opcode: int = 1) -> bytes:
    """A final client frame with a zero mask key (the payload is sent as is)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


class Refused(Exception):
    """An open that failed for a reason worth its own count (``kind``)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class Stats:
    __slots__ = (
        "by_room",
        "echo_running",
        "latencies",
        "missing",
        "open",
        "out_of_order",
        "received",
        "received_at",
    )

    def __init__(self) -> None:
        self.received = 0
        self.out_of_order = 0  # seq gaps: a publication whose seq is not the last one + 1
        self.missing = 0  # publications skipped over by those gaps
        self.latencies = array.array("q")
        self.received_at = array.array("q")
        self.by_room: dict[bytes, int] = {}
        self.echo_running = False
        self.open = 0  # clients past the handshake whose TCP connection is still up


class Client(asyncio.Protocol):
    __slots__ = (
        "acks",
        "buf",
        "close_code",
        "control",
        "echo",
        "mark",
        "replies",
        "rooms",
        "seqs",
        "state",
        "stats",
        "transport",
        "worker",
    )

    def __init__(self, stats: Stats, echo: bool = False) -> None:
        self.stats = stats
        self.echo = echo
        self.buf = b""
        self.state = HANDSHAKE
        self.seqs: dict[bytes, int] | None = None  # room -> last seq seen
        self.mark: dict[bytes, int] | None = None  # seqs at the last reset
        self.rooms: tuple[bytes, ...] = ()  # rooms joined
        self.worker = 0  # the gateway worker that said hello
        self.acks = 0
        self.close_code: int | None = None
        self.replies: list[bytes] | None = None  # the publisher keeps every ack and error
        self.transport: asyncio.Transport | None = None
        self.control: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state in (OPEN, CLOSING):
            self.stats.open -= 1
            if self.close_code is None:
                self.close_code = NO_CLOSE_FRAME
        self.state = CLOSED
        if self.control is not None and not self.control.done():
            self.control.set_exception(ConnectionError("connection lost"))

    def expect(self) -> asyncio.Future[bytes]:
        """A future for the next non-publication message (hello, ack, echo reply)."""
        self.control = asyncio.get_running_loop().create_future()
        return self.control

    def send(self, payload: bytes, opcode: int = 1) -> None:
        assert self.transport is not None
        self.transport.write(client_frame(payload, opcode))

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        if self.state == HANDSHAKE:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            if not data.startswith(b"HTTP/1.1 101"):
                if self.control is not None and not self.control.done():
                    status = data[9:12].decode("latin-1")
                    self.control.set_exception(Refused(f"handshake: HTTP {status}"))
                assert self.transport is not None
                self.transport.close()
                return
            self.state = OPEN
            self.stats.open += 1
            data = data[end + 4 :]
            if self.echo and self.control is not None and not self.control.done():
                self.control.set_result(b"")
        now = monotonic_ns()
        n = len(data)
        pos = 0
        stats = self.stats
        while n - pos >= 2:
            length = data[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
                start = pos + 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > n:
                break
            opcode = data[pos] & 0x0F
            payload = data[start:end]
            pos = end
            if opcode == 1 or opcode == 2:
                if payload.startswith(MESSAGE_PREFIX):
                    stats.received += 1
                    stats.latencies.append(now - int(payload[payload.rindex(b":") + 1 : -1]))
                    stats.received_at.append(now)
                    quote = payload.index(b'"', ROOM_AT)
                    room = payload[ROOM_AT:quote]
                    i = quote + SEQ_AFTER_ROOM
                    seq = int(payload[i : payload.index(b",", i)])
                    stats.by_room[room] = stats.by_room.get(room, 0) + 1
                    seqs = self.seqs
                    if seqs is None:
                        seqs = self.seqs = {}
                    last = seqs.get(room)
                    if last is not None and seq != last + 1:
                        stats.out_of_order += 1
                        if seq > last + 1:
                            stats.missing += seq - last - 1
                    seqs[room] = seq
                elif self.echo and stats.echo_running:
                    stats.received += 1
                    stats.latencies.append(now - int(payload))
                    self.send(b"%d" % monotonic_ns())
                else:
                    if payload.startswith(b'{"op":"ack"'):
                        self.acks += 1
                    if self.replies is not None and not payload.startswith(b'{"op":"hello"'):
                        self.replies.append(payload)
                    if self.control is not None and not self.control.done():
                        self.control.set_result(payload)
            elif opcode == 9:  # ping: answer with the same payload
                self.send(payload, 0xA)
            elif opcode == 8:
                # Answer with the same code and let the server close TCP first
                # (RFC 6455 §5.5.1, §7.1.1).
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                if self.state == OPEN:
                    self.state = CLOSING
                    self.send(payload[:2], 8)
                return
        if pos < n:
            self.buf = data[pos:]


class Pacer:
    """How many opens may be in flight, and when the next one may start.

    ``maximum`` handshakes in flight at most; ``rate`` (per second, 0 = none)
    spaces the starts. With ``target_s`` the window adapts: an open slower than
    the target (or failing) halves it, at most once per ``target_s``; a fast
    one grows it by ``1 / window`` (one per window of fast opens), up to
    ``maximum``. Without a target the window is ``maximum`` throughout.
    """

    def __init__(self, maximum: int, initial: int = 0, target_s: float = 0.0, rate: float = 0.0):
        self.maximum = max(1, maximum)
        self.window = float(min(self.maximum, initial) if initial and target_s else self.maximum)
        self.target_s = target_s
        self.interval_s = 1.0 / rate if rate > 0 else 0.0
        self.in_flight = 0
        self.next_start = 0.0
        self.last_cut = 0.0
        self.cuts = 0
        self.wake = asyncio.Event()

    async def acquire(self) -> None:
        while self.in_flight >= int(self.window):
            self.wake.clear()
            await self.wake.wait()
        if self.interval_s:
            now = time.monotonic()
            if self.next_start > now:
                await asyncio.sleep(self.next_start - now)
            self.next_start = max(now, self.next_start) + self.interval_s
        self.in_flight += 1

    def release(self, seconds: float) -> None:
        """One open ended after ``seconds`` (``inf`` when it failed)."""
        self.in_flight -= 1
        if self.target_s:
            if seconds > self.target_s:
                now = time.monotonic()
                if now - self.last_cut > self.target_s:
                    self.window = max(1.0, self.window / 2)
                    self.last_cut = now
                    self.cuts += 1
            elif self.window < self.maximum:
                self.window = min(float(self.maximum), self.window + 1 / self.window)
        self.wake.set()


class Worker:
    def __init__(self, pipe: Connection, status_interval_s: float = 0.0) -> None:
        self.pipe = pipe
        self.status_interval_s = status_interval_s
        self.stats = Stats()
        self.clients: list[Client] = []
        self.publisher: Client | None = None
        self.pacer: Pacer | None = None
        self.failed = 0
        self.failures: dict[str, int] = {}
        self.per_worker: dict[int, int] = {}  # gateway worker (from the hello) -> clients
        self.joined: dict[str, int] = {}  # room -> members this process joined
        self.handshake_s = array.array("d")  # TCP connect to hello, per open client
        self.open_s = array.array("d")  # TCP connect to the last join ack

    async def open(
        self,
        host: str,
        port: int,
        path: str,
        source: str,
        rooms: str | list[str] | None,
        echo: bool,
        timeout_s: float = 30.0,
    ) -> Client:
        """Open one client and join its rooms; raises :exc:`Refused` with the kind of failure."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        stage = "tcp"
        client: Client | None = None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            async with asyncio.timeout(timeout_s):
                # The port is chosen by connect(), per (source, destination), not
                # by bind(): bind(addr, 0) searches the whole port range for one
                # free on every address, which grows slower with every socket (on
                # Linux 6.x, ~1 ms a call past ~7k per address once libuv's
                # SO_REUSEADDR confines the search to half the range).
                sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((source, 0))
                sock.setblocking(False)
                await loop.sock_connect(sock, (host, port))
                _, client = await loop.create_connection(
                    lambda: Client(self.stats, echo), sock=sock
                )
                stage = "handshake"
                hello = client.expect()
                client.transport.write(  # type: ignore[union-attr]
                    b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\n" % (path.encode(), host.encode(), port)
                )
                # The room protocol starts with a hello; the echo endpoints with nothing.
                greeting = await hello
                self.handshake_s.append(time.monotonic() - started)
                at = greeting.find(b'"worker":')
                index = int(greeting[at + 9 : greeting.index(b",", at)]) if at >= 0 else 0
                stage = "join"
                for room in [rooms] if isinstance(rooms, str) else rooms or ():
                    ack = client.expect()
                    client.send(b'{"op":"join","room":"%s","id":1}' % room.encode())
                    reply = await ack
                    if not reply.startswith(b'{"op":"ack"'):
                        code = json.loads(reply).get("code", "?")
                        raise Refused(f"join: error {code}")
        except BaseException as exc:
            if client is not None and client.transport is not None:
                client.transport.abort()
            else:
                sock.close()
            if isinstance(exc, Refused):
                raise
            if isinstance(exc, TimeoutError):
                raise Refused(f"{stage}: timeout") from None
            if isinstance(exc, OSError) and exc.errno:
                raise Refused(f"{stage}: {errno.errorcode.get(exc.errno, exc.errno)}") from None
            if isinstance(exc, ConnectionError):
                raise Refused(f"{stage}: closed by the server") from None
            raise
        self.open_s.append(time.monotonic() - started)
        self.per_worker[index] = self.per_worker.get(index, 0) + 1
        joined = [rooms] if isinstance(rooms, str) else rooms or []
        for room in joined:
            self.joined[room] = self.joined.get(room, 0) + 1
        client.worker = index
        client.rooms = tuple(room.encode() for room in joined)
        return client

    async def connect(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Open one client per entry of ``spec["rooms"]`` (None, a room or a list of rooms)."""
        plans: list[str | list[str] | None] = spec["rooms"]
        pacer = self.pacer = Pacer(
            spec.get("concurrency", 200),
            spec.get("window_initial", 0),
            spec.get("latency_target_s", 0.0),
            spec.get("rate", 0.0),
        )
        timeout_s = spec.get("timeout_s", 30.0)
        done = 0
        last_report = time.monotonic()
        tasks: set[asyncio.Task[None]] = set()

        async def one(i: int) -> None:
            nonlocal done, last_report
            started = time.monotonic()
            source = spec["sources"][i % len(spec["sources"])]
            try:
                client = await self.open(
                    spec["host"], spec["port"], spec["path"], source, plans[i], spec["echo"],
                    timeout_s,
                )  # fmt: skip
            except Refused as exc:
                pacer.release(float("inf"))
                self.failed += 1
                self.failures[exc.kind] = self.failures.get(exc.kind, 0) + 1
                return
            pacer.release(time.monotonic() - started)
            self.clients.append(client)
            done += 1
            now = time.monotonic()
            if now - last_report > 0.5 and not self.status_interval_s:
                last_report = now
                self.pipe.send(("progress", done))

        for i in range(len(plans)):
            await pacer.acquire()
            task = asyncio.create_task(one(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.wait(set(tasks))
        if spec.get("publisher"):
            self.publisher = await self.open(
                spec["host"], spec["port"], spec["path"], spec["sources"][0], None, False
            )
            self.publisher.replies = []
        return {
            "connected": len(self.clients),
            "failed": self.failed,
            "failures": self.failures,
            "per_worker": self.per_worker,
            "joined": self.joined,
            "window_cuts": pacer.cuts,
            "handshake_s": self.handshake_s.tobytes(),
            "open_s": self.open_s.tobytes(),
        }

    async def publish(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Publish for ``duration_s``, rooms round-robin.

        With ``rate``: ``rate`` bursts of ``burst`` publications per second,
        each burst in one write. With ``window`` instead: at most ``window``
        publications unacknowledged (both servers acknowledge after the fan-out),
        so the server is never idle: fan-out at the limit.
        """
        pub = self.publisher
        assert pub is not None and pub.transport is not None
        rooms = [r.encode() for r in spec["rooms"]]
        burst = spec.get("burst", 1)
        window = spec.get("window", 0)
        acks_before = pub.acks
        replies = pub.replies = []
        sent_to: list[bytes] = []  # publication id - 1 -> its room
        sent = 0
        last_sent_ns = 0
        started = time.monotonic()
        deadline = started + spec["duration_s"]

        def frames(count: int) -> bytes:
            nonlocal sent, last_sent_ns
            last_sent_ns = monotonic_ns()
            out = []
            for _ in range(count):
                room = rooms[sent % len(rooms)]
                sent += 1
                sent_to.append(room)
                out.append(
                    client_frame(
                        b'{"op":"publish","room":"%s","id":%d,"data":%d}'
                        % (room, sent, monotonic_ns())
                    )
                )
            return b"".join(out)

        if window:
            while time.monotonic() < deadline:
                acked = pub.acks - acks_before
                if sent - acked < window:
                    pub.transport.write(frames(window - (sent - acked)))
                waiter = pub.expect()
                try:
                    await asyncio.wait_for(waiter, 10)
                except TimeoutError:
                    break
        else:
            interval = 1.0 / spec["rate"]
            tick = started
            while tick < deadline:
                pub.transport.write(frames(burst))
                tick += interval
                delay = tick - time.monotonic()
                await asyncio.sleep(max(0.0, delay))
        publishing_s = time.monotonic() - started
        wait_until = time.monotonic() + 10
        while len(replies) < sent and time.monotonic() < wait_until:
            with contextlib.suppress(TimeoutError, ConnectionError):
                await asyncio.wait_for(pub.expect(), 0.5)
        acked_by_room: dict[str, int] = {}
        errors: dict[str, int] = {}
        refused_by_room: dict[str, int] = {}
        for reply in replies:
            message = json.loads(reply)
            if message.get("op") == "ack":
                room = sent_to[int(message["id"]) - 1].decode()
                acked_by_room[room] = acked_by_room.get(room, 0) + 1
            else:
                code = str(message.get("code", message.get("op")))
                errors[code] = errors.get(code, 0) + 1
                if isinstance(message.get("id"), int) and 0 < message["id"] <= len(sent_to):
                    room = sent_to[message["id"] - 1].decode()
                    refused_by_room[room] = refused_by_room.get(room, 0) + 1
        return {
            "sent": sent,
            "acked": pub.acks - acks_before,
            "acked_by_room": acked_by_room,
            "errors": errors,
            "refused_by_room": refused_by_room,
            "unanswered": max(0, sent - len(replies)),
            "publishing_s": publishing_s,
            "last_sent_ns": last_sent_ns,
            "elapsed_s": time.monotonic() - started,
        }

    async def echo(self, spec: dict[str, Any]) -> dict[str, Any]:
        self.stats.echo_running = True
        for client in self.clients:
            client.send(b"%d" % monotonic_ns())
        await asyncio.sleep(spec["duration_s"])
        self.stats.echo_running = False
        await asyncio.sleep(0.2)  # replies still in flight are not counted
        return {"round_trips": self.stats.received}

    def counts(self) -> dict[str, Any]:
        return {
            "received": self.stats.received,
            "out_of_order": self.stats.out_of_order,
            "missing": self.stats.missing,
            "by_room": {room.decode(): n for room, n in self.stats.by_room.items()},
            "open": self.stats.open,
        }

    def reset(self) -> dict[str, Any]:
        self.stats.received = 0
        self.stats.out_of_order = 0
        self.stats.missing = 0
        self.stats.by_room = {}
        self.stats.latencies = array.array("q")
        self.stats.received_at = array.array("q")
        for client in self.clients:
            client.mark = dict(client.seqs) if client.seqs else None
        return {}

    def silent(self) -> dict[str, dict[str, int]]:
        """Members that received nothing in a room since the last reset, by worker and room.

        A whole room silent on one worker says that worker missed the room's
        publications (its subscription), not that a client was slow.
        """
        silent: dict[str, dict[str, int]] = {}
        for client in self.clients:
            seqs, mark = client.seqs or {}, client.mark or {}
            for room in client.rooms:
                last = seqs.get(room)
                if last is None or last == mark.get(room):
                    rooms = silent.setdefault(str(client.worker), {})
                    rooms[room.decode()] = rooms.get(room.decode(), 0) + 1
        return silent

    def latencies(self) -> bytes:
        return self.stats.latencies.tobytes()

    def deliveries(self) -> dict[str, bytes]:
        """Every delivery since the last reset: its latency and when it arrived (ns)."""
        return {
            "latency_ns": self.stats.latencies.tobytes(),
            "received_at_ns": self.stats.received_at.tobytes(),
        }

    def closes(self) -> dict[str, Any]:
        """Close codes the clients saw (1006: none came), and how many are still open."""
        codes: dict[int, int] = {}
        still_open = 0
        for client in self.clients:
            if client.state == CLOSED:
                code = client.close_code or NO_CLOSE_FRAME
                codes[code] = codes.get(code, 0) + 1
            else:
                still_open += 1
        return {"codes": codes, "still_open": still_open}

    def status(self) -> dict[str, Any]:
        pacer = self.pacer
        return {
            "t": time.monotonic(),
            "connected": len(self.clients),
            "failed": self.failed,
            "open": self.stats.open,
            "in_flight": pacer.in_flight if pacer else 0,
            "window": round(pacer.window, 1) if pacer else 0,
            "received": self.stats.received,
        }

    async def report_status(self) -> None:
        """Send :meth:`status` every ``status_interval_s``, whatever command runs."""
        while True:
            self.pipe.send(("status", self.status()))
            await asyncio.sleep(self.status_interval_s)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        reporter = asyncio.create_task(self.report_status()) if self.status_interval_s else None
        while True:
            cmd, arg = await loop.run_in_executor(None, self.pipe.recv)
            if cmd == "connect":
                result: Any = await self.connect(arg)
            elif cmd == "publish":
                result = await self.publish(arg)
            elif cmd == "echo":
                result = await self.echo(arg)
            elif cmd == "counts":
                result = self.counts()
            elif cmd == "reset":
                result = self.reset()
            elif cmd == "latencies":
                result = self.latencies()
            elif cmd == "deliveries":
                result = self.deliveries()
            elif cmd == "silent":
                result = self.silent()
            elif cmd == "closes":
                result = self.closes()
            elif cmd == "close":
                if reporter is not None:
                    reporter.cancel()
                for client in [*self.clients, self.publisher]:
                    if client is not None and client.transport is not None:
                        client.transport.abort()
                self.pipe.send(("done", {}))
                return
            else:
                result = {"error": f"unknown command {cmd}"}
            self.pipe.send(("done", result))


def worker_main(pipe: Connection, cpus: set[int] | None, status_interval_s: float = 0.0) -> None:
    import uvloop

    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)
    uvloop.run(Worker(pipe, status_interval_s).serve())
