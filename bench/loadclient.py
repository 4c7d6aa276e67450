"""The load processes of ``bench/bench.py``: raw sockets, a minimal frame parser, uvloop.

Each worker is a ``multiprocessing`` process that runs one uvloop event loop
and takes commands from the orchestrator over a pipe. A client is a bare
``asyncio.Protocol``: the opening handshake is written by hand, server frames
are parsed with a few slices (no JSON), and client frames carry a zero mask
key (RFC 6455 §5.3 requires a key, not an unpredictable one from a non-browser
client), so the load costs as little CPU as Python allows.

Publications carry the publisher's ``time.monotonic_ns()`` as their ``data``;
a subscriber reads it back from the end of the frame, so latency is publish to
receive on one clock (CLOCK_MONOTONIC is shared by processes on one host).
Every subscriber checks that ``seq`` grows by one; ``lost`` is what was
acknowledged to the publisher but never reached a member.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import time
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["worker_main"]

HANDSHAKE = 0
OPEN = 1
CLOSED = 2
MESSAGE_PREFIX = b'{"op":"message"'
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


class Stats:
    __slots__ = ("echo_running", "latencies", "out_of_order", "received")

    def __init__(self) -> None:
        self.received = 0
        self.out_of_order = 0
        self.latencies = array.array("q")
        self.echo_running = False


class Client(asyncio.Protocol):
    __slots__ = ("acks", "buf", "control", "echo", "last_seq", "state", "stats", "transport")

    def __init__(self, stats: Stats, echo: bool = False) -> None:
        self.stats = stats
        self.echo = echo
        self.buf = b""
        self.state = HANDSHAKE
        self.last_seq = -1
        self.acks = 0
        self.transport: asyncio.Transport | None = None
        self.control: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
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
                    self.control.set_exception(ConnectionError(data[:40].decode("latin-1")))
                assert self.transport is not None
                self.transport.close()
                return
            self.state = OPEN
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
                    i = payload.index(b'"seq":') + 6
                    seq = int(payload[i : payload.index(b",", i)])
                    if self.last_seq >= 0 and seq != self.last_seq + 1:
                        stats.out_of_order += 1
                    self.last_seq = seq
                elif self.echo and stats.echo_running:
                    stats.received += 1
                    stats.latencies.append(now - int(payload))
                    self.send(b"%d" % monotonic_ns())
                elif payload.startswith(b'{"op":"ack"'):
                    self.acks += 1
                    if self.control is not None and not self.control.done():
                        self.control.set_result(payload)
                elif self.control is not None and not self.control.done():
                    self.control.set_result(payload)
            elif opcode == 9:  # ping: answer with the same payload
                self.send(payload, 0xA)
            elif opcode == 8:
                assert self.transport is not None
                self.transport.close()
                return
        if pos < n:
            self.buf = data[pos:]


class Worker:
    def __init__(self, pipe: Connection) -> None:
        self.pipe = pipe
        self.stats = Stats()
        self.clients: list[Client] = []
        self.publisher: Client | None = None
        self.failed = 0
        self.failures: dict[str, int] = {}

    async def open(
        self, host: str, port: int, path: str, source: str, room: str | None, echo: bool
    ) -> Client:
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(
            lambda: Client(self.stats, echo), host, port, local_addr=(source, 0)
        )
        hello = client.expect()
        client.transport.write(  # type: ignore[union-attr]
            b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (path.encode(), host.encode(), port)
        )
        # The room protocol starts with a hello; the echo endpoints with nothing.
        await asyncio.wait_for(hello, 30)
        if room is not None:
            ack = client.expect()
            client.send(b'{"op":"join","room":"%s","id":1}' % room.encode())
            await asyncio.wait_for(ack, 30)
        return client

    async def connect(self, spec: dict[str, Any]) -> dict[str, Any]:
        rooms: list[str | None] = spec["rooms"]
        sem = asyncio.Semaphore(spec.get("concurrency", 200))
        done = 0
        last_report = time.monotonic()

        async def one(i: int) -> None:
            nonlocal done, last_report
            async with sem:
                source = spec["sources"][i % len(spec["sources"])]
                try:
                    client = await self.open(
                        spec["host"], spec["port"], spec["path"], source, rooms[i], spec["echo"]
                    )
                except (TimeoutError, OSError) as exc:
                    self.failed += 1
                    kind = type(exc).__name__
                    self.failures[kind] = self.failures.get(kind, 0) + 1
                    return
                self.clients.append(client)
                done += 1
                now = time.monotonic()
                if now - last_report > 0.5:
                    last_report = now
                    self.pipe.send(("progress", done))

        await asyncio.gather(*(one(i) for i in range(len(rooms))))
        if spec.get("publisher"):
            self.publisher = await self.open(
                spec["host"], spec["port"], spec["path"], spec["sources"][0], None, False
            )
        return {"connected": len(self.clients), "failed": self.failed, "failures": self.failures}

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
        sent = 0
        started = time.monotonic()
        deadline = started + spec["duration_s"]

        def frames(count: int) -> bytes:
            nonlocal sent
            out = []
            for _ in range(count):
                room = rooms[sent % len(rooms)]
                sent += 1
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
        while pub.acks - acks_before < sent and time.monotonic() < wait_until:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pub.expect(), 0.5)
        return {
            "sent": sent,
            "acked": pub.acks - acks_before,
            "publishing_s": publishing_s,
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
        return {"received": self.stats.received, "out_of_order": self.stats.out_of_order}

    def reset(self) -> dict[str, Any]:
        self.stats.received = 0
        self.stats.out_of_order = 0
        self.stats.latencies = array.array("q")
        return {}

    def latencies(self) -> bytes:
        return self.stats.latencies.tobytes()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
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
            elif cmd == "close":
                for client in self.clients:
                    if client.transport is not None:
                        client.transport.abort()
                self.pipe.send(("done", {}))
                return
            else:
                result = {"error": f"unknown command {cmd}"}
            self.pipe.send(("done", result))


def worker_main(pipe: Connection, cpus: set[int] | None) -> None:
    import uvloop

    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)
    uvloop.run(Worker(pipe).serve())
