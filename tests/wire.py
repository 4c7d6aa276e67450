"""WebSocket on the wire, by hand: for tests that must send what no good client sends.

websockets' own client refuses to send an unmasked frame, a reserved bit, an
unknown opcode or invalid UTF-8, and it answers pings by itself; these tests
need all of that. :func:`encode_frame` builds any frame, valid or not
(RFC 6455 §5.2), :class:`FrameReader` parses the server's frames, and
:class:`RawConnection` drives one socket: the opening handshake, frames out,
frames in, and an abortive close (RST) on request.

Nothing here validates: a test decides what is wrong.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import socket
import struct
from typing import Any, ClassVar

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "Frame",
    "FrameReader",
    "RawConnection",
    "close_payload",
    "encode_frame",
    "handshake_request",
    "http_exchange",
    "parse_close",
]

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA


def encode_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    mask_key: bytes | None = None,
    length: int | None = None,
    length_form: str | None = None,
) -> bytes:
    """One frame as bytes. Clients must mask (§5.3); ``mask=False`` breaks that rule.

    ``rsv`` is the three reserved bits (0-7), ``length`` declares a length other
    than the payload's, and ``length_form`` ("7", "16", "64") forces an
    encoding of the length even where a shorter one would do.
    """
    declared = len(payload) if length is None else length
    first = (0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0x0F)
    mask_bit = 0x80 if mask else 0
    form = length_form or ("7" if declared < 126 else "16" if declared < 65536 else "64")
    if form == "7":
        header = bytes((first, mask_bit | (declared & 0x7F)))
    elif form == "16":
        header = struct.pack("!BBH", first, mask_bit | 126, declared & 0xFFFF)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, declared & 0xFFFF_FFFF_FFFF_FFFF)
    if not mask:
        return header + payload
    key = mask_key if mask_key is not None else os.urandom(4)
    return header + key + _xor(payload, key)


def _xor(data: bytes, key: bytes) -> bytes:
    if not data:
        return b""
    n = len(data)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def close_payload(code: int | None, reason: bytes = b"") -> bytes:
    return b"" if code is None else struct.pack("!H", code) + reason


def parse_close(payload: bytes) -> tuple[int | None, str]:
    if len(payload) < 2:
        return None, ""
    (code,) = struct.unpack("!H", payload[:2])
    return code, payload[2:].decode("utf-8", "replace")


def handshake_request(
    path: str = "/ws",
    *,
    host: str = "127.0.0.1",
    headers: tuple[tuple[str, str], ...] = (),
    key: str | None = None,
) -> bytes:
    key = key or base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclasses.dataclass(frozen=True)
class Frame:
    fin: bool
    rsv: int
    opcode: int
    payload: bytes
    masked: bool = False

    def json(self) -> Any:
        return json.loads(self.payload)


class FrameReader:
    """Incremental parser for a stream of frames (the server's, or anyone's)."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self.buffer += data
        frames = []
        while True:
            frame = self._next()
            if frame is None:
                return frames
            frames.append(frame)

    def _next(self) -> Frame | None:
        buf = self.buffer
        if len(buf) < 2:
            return None
        first, second = buf[0], buf[1]
        length = second & 0x7F
        offset = 2
        if length == 126:
            if len(buf) < 4:
                return None
            (length,) = struct.unpack_from("!H", buf, 2)
            offset = 4
        elif length == 127:
            if len(buf) < 10:
                return None
            (length,) = struct.unpack_from("!Q", buf, 2)
            offset = 10
        masked = bool(second & 0x80)
        key = b""
        if masked:
            if len(buf) < offset + 4:
                return None
            key = bytes(buf[offset : offset + 4])
            offset += 4
        if len(buf) < offset + length:
            return None
        payload = bytes(buf[offset : offset + length])
        del buf[: offset + length]
        if masked:
            payload = _xor(payload, key)
        return Frame(bool(first & 0x80), (first >> 4) & 7, first & 0x0F, payload, masked)


class HandshakeRefused(Exception):
    def __init__(self, status: int, response: bytes) -> None:
        super().__init__(f"handshake refused with {status}: {response[:200]!r}")
        self.status = status
        self.response = response


class RawConnection:
    """One WebSocket connection driven frame by frame.

    Every one made is remembered in :attr:`opened` until :meth:`reset_all`,
    which the suite calls at the end of each test (``conftest.py``): a raw
    client a test leaves open is reset then, on the test's own event loop.
    """

    opened: ClassVar[list[RawConnection]] = []

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        RawConnection.opened.append(self)
        self.frames = FrameReader()
        self.pending: list[Frame] = []
        self.status = 0
        self.response = b""

    @classmethod
    async def connect(
        cls, port: int, *, host: str = "127.0.0.1", rcvbuf: int | None = None
    ) -> RawConnection:
        """A TCP connection, nothing sent yet. ``rcvbuf`` shrinks the receive buffer."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect(): the window scale is negotiated in the SYN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        # The reader buffers up to twice its limit before it stops reading the
        # socket: with a small receive buffer, keep that small too, so that a
        # test that stops reading is a slow consumer on the wire, at once.
        limit = 1 << 22 if rcvbuf is None else max(rcvbuf, 1 << 12)
        reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        return cls(reader, writer)

    @classmethod
    async def open(
        cls,
        port: int,
        path: str = "/ws",
        *,
        headers: tuple[tuple[str, str], ...] = (),
        rcvbuf: int | None = None,
        timeout: float = 10.0,
    ) -> RawConnection:
        """Connect and complete the opening handshake; raise HandshakeRefused unless 101."""
        conn = await cls.connect(port, rcvbuf=rcvbuf)
        try:
            await conn.send(handshake_request(path, headers=headers))
            response = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), timeout)
        except BaseException:
            conn.abort()
            raise
        conn.response = response
        conn.status = int(response.split(b" ", 2)[1])
        if conn.status != 101:
            conn.abort()
            raise HandshakeRefused(conn.status, response)
        return conn

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_frame(self, opcode: int, payload: bytes = b"", **kwargs: Any) -> None:
        await self.send(encode_frame(opcode, payload, **kwargs))

    async def send_json(self, obj: Any) -> None:
        await self.send_frame(OP_TEXT, json.dumps(obj).encode())

    async def recv_frame(self, timeout: float = 5.0) -> Frame | None:
        """The next frame, or None at end of stream (raises TimeoutError on timeout)."""
        async with asyncio.timeout(timeout):
            while not self.pending:
                try:
                    data = await self.reader.read(1 << 16)
                except (ConnectionResetError, BrokenPipeError):
                    data = b""
                if not data:
                    return None
                self.pending.extend(self.frames.feed(data))
        return self.pending.pop(0)

    async def recv_json(self, timeout: float = 5.0) -> Any:
        """The next text frame as JSON, skipping control frames."""
        while True:
            frame = await self.recv_frame(timeout)
            if frame is None:
                raise EOFError("connection closed")
            if frame.opcode == OP_TEXT:
                return frame.json()
            if frame.opcode == OP_CLOSE:
                raise EOFError(f"close frame {parse_close(frame.payload)}")

    async def recv_close(self, timeout: float = 10.0) -> tuple[int | None, str, list[Frame]]:
        """Read until a close frame: (code, reason, frames before it); code None at EOF."""
        seen: list[Frame] = []
        while True:
            frame = await self.recv_frame(timeout)
            if frame is None:
                return None, "", seen
            if frame.opcode == OP_CLOSE:
                code, reason = parse_close(frame.payload)
                return code, reason, seen
            seen.append(frame)

    async def wait_eof(self, timeout: float = 10.0) -> bytes:
        """Read and discard until the server closes the TCP connection; return what came."""
        got = bytearray()
        async with asyncio.timeout(timeout):
            while True:
                try:
                    data = await self.reader.read(1 << 16)
                except (ConnectionResetError, BrokenPipeError):
                    return bytes(got)
                if not data:
                    return bytes(got)
                got += data

    def abort(self) -> None:
        """Close with a TCP RST (SO_LINGER 0): the peer sees a reset, not a FIN."""
        # Idempotent: a second abort (a test's, then its fixture's) changes nothing.
        with contextlib.suppress(OSError, ValueError):  # ValueError: uvloop, already closed
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    @classmethod
    def reset_all(cls) -> int:
        """Reset every connection still open; how many there were."""
        left = [conn for conn in cls.opened if not conn.writer.transport.is_closing()]
        cls.opened.clear()
        for conn in left:
            conn.abort()
        return len(left)


async def http_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection; return everything until the server closes."""
    conn = await RawConnection.connect(port)
    try:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            await conn.send(data)
        return await conn.wait_eof(timeout)
    finally:
        conn.abort()
