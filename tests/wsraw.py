"""A raw WebSocket client on a plain socket, for tests that must misbehave.

It can shrink its receive buffer and stop reading (a real slow consumer),
send any frame (pings, bad opcodes, unmasked frames), and parse server frames
fast enough to follow thousands of messages.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct

__all__ = ["RawClient", "encode_frame"]


def encode_frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0
) -> bytes:
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    length = len(payload)
    mask_bit = 0x80 if mask else 0
    if length < 126:
        header = struct.pack("!BB", first, mask_bit | length)
    elif length < 65536:
        header = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, length)
    if not mask:
        return header + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return header + key + masked


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.bytes_received = 0
        self.close_code: int | None = None
        self.close_reason = ""

    @classmethod
    async def connect(
        cls, port: int, path: str = "/ws", *, rcvbuf: int | None = None, host: str = "127.0.0.1"
    ) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Set before connect so the window scale is negotiated small.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        limit = 2**16 if rcvbuf is None else max(rcvbuf, 2**12)
        reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.decode(errors="replace"))
        return cls(reader, writer)

    async def send(self, opcode: int, payload: bytes, **kwargs: object) -> None:
        self.writer.write(encode_frame(opcode, payload, **kwargs))  # type: ignore[arg-type]
        await self.writer.drain()

    async def send_text(self, text: str) -> None:
        await self.send(0x1, text.encode())

    async def recv_frame(self) -> tuple[int, bytes]:
        """The next frame as (opcode, payload); records a close frame's code."""
        head = await self.reader.readexactly(2)
        length = head[1] & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        payload = await self.reader.readexactly(length) if length else b""
        self.bytes_received += 2 + length
        opcode = head[0] & 0x0F
        if opcode == 0x8 and len(payload) >= 2:
            (self.close_code,) = struct.unpack("!H", payload[:2])
            self.close_reason = payload[2:].decode(errors="replace")
        return opcode, payload

    async def recv_until_close(self) -> list[bytes]:
        """Every text payload until the close frame (or EOF)."""
        texts = []
        try:
            while True:
                opcode, payload = await self.recv_frame()
                if opcode == 0x1:
                    texts.append(payload)
                elif opcode == 0x8:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        return texts

    def abort(self) -> None:
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
