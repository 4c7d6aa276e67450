#!/usr/bin/env python3
"""What one idle connection's Python objects cost, object by object (``sys.getsizeof``).

    python bench/heap_objects.py     # `make bench-heap` prints it after bench/heap.py

Starts the real gateway in-process on uvloop, opens one WebSocket to ``/ws``
with a raw socket, joins it to a room, answers one keepalive ping, and then
walks the objects that the gateway holds for that connection alone (not what
every connection shares: the context, the config, the wheel, the room's own
object), printing each with its size. ``sys.getsizeof`` counts an object's
own allocation and, for containers, their slots, not what they point to; each
object is listed once. uvloop's transport and its libuv handle are C memory
that ``getsizeof`` sees only in part; ``bench/heap.py`` traces them.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import enum
import json
import os
import sys
from typing import Any

import uvloop

from rtgateway.app import Gateway
from rtgateway.config import Config
from rtgateway.connection import GatewayConnection
from rtgateway.log import configure

# What every connection shares: never counted for one.
_SHARED = (
    "Context",
    "ServerState",
    "Listener",
    "Flusher",
    "Metrics",
    "Config",
    "Hub",
    "Room",
    "Wheel",
    "Loop",
    "BoundLoggerLazyProxy",
    "Logger",
)


def frame_of(payload: bytes) -> bytes:
    """A client frame (FIN, text, masked with a zero key: the bytes are the payload)."""
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """One unmasked server frame's payload (shorter than 64 KiB)."""
    head = await reader.readexactly(2)
    length = head[1] & 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    return await reader.readexactly(length)


def walk(root: Any, shared: list[Any]) -> list[tuple[str, int]]:
    """Every object reachable from ``root`` through attributes and containers, once each.

    ``shared`` objects (the config's values, interned strings) are not counted.
    """
    seen: set[int] = {id(obj) for obj in shared}
    rows: list[tuple[str, int]] = []

    def visit(name: str, obj: Any, depth: int) -> None:
        kind = type(obj)
        if (
            obj is None
            or id(obj) in seen
            or isinstance(obj, type | bool)
            or kind.__name__ in _SHARED
            or isinstance(obj, enum.Enum)  # one object per member, shared
            or (callable(obj) and kind.__name__ != "generator")
            or (isinstance(obj, int) and -5 <= obj <= 256)  # the interpreter's small ints
        ):
            return
        seen.add(id(obj))
        rows.append((f"{'  ' * depth}{name} ({kind.__name__})", sys.getsizeof(obj)))
        children: list[tuple[str, Any]] = []
        if isinstance(obj, dict):
            children = [(f"[{k!r}]", v) for k, v in obj.items()]
            if name != "__dict__":  # an instance dict's keys are its class's attribute names
                children += [("key", k) for k in obj]
        elif isinstance(obj, list | tuple | set | frozenset) or kind.__name__ == "deque":
            children = [(f"[{i}]", v) for i, v in enumerate(obj)]
        elif kind.__name__ == "generator":
            children = [("gi_frame", obj.gi_frame), ("gi_yieldfrom", obj.gi_yieldfrom)]
        elif kind.__name__ == "frame":
            children = [(f"local {k}", v) for k, v in obj.f_locals.items()]
        else:
            for cls in kind.__mro__:
                for slot in getattr(cls, "__slots__", ()):
                    if hasattr(obj, slot):
                        children.append((slot, getattr(obj, slot)))
            if hasattr(obj, "__dict__") and not isinstance(obj, type):
                children.append(("__dict__", obj.__dict__))
        for child_name, child in children:
            visit(child_name, child, depth + 1)

    visit("connection", root, 0)
    return rows


async def main() -> int:
    configure("warning")  # the table alone on stdout
    config = Config(addr="127.0.0.1:0", api_addr="127.0.0.1:0", stats_interval_s=0)
    gw = Gateway(config)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.serve(stop.wait))
    await gw.ready.wait()
    port = int(gw.addresses[0].rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    await read_frame(reader)  # hello
    writer.write(frame_of(json.dumps({"op": "join", "room": "r", "id": 1}).encode()))
    assert json.loads(await read_frame(reader))["op"] == "ack"
    assert gw.state is not None
    [conn] = [s for s in gw.state.sockets if isinstance(s, GatewayConnection)]
    conn.expire(asyncio.get_running_loop().time())  # a keepalive ping, as every 20 s
    assert (await reader.readexactly(2))[0] == 0x89
    await reader.readexactly(3)  # its payload
    writer.write(bytes([0x8A, 0x83]) + b"\0\0\0\0" + b"rtg")  # the pong
    while conn.awaiting_pong:  # noqa: ASYNC110 (no event says that a pong was read)
        await asyncio.sleep(0.01)
    assert gw.ctx is not None
    config_values = [getattr(gw.ctx.config, f.name) for f in dataclasses.fields(gw.ctx.config)]
    rows = walk(conn, [*config_values, conn.address])  # the address is interned
    width = max(len(name) for name, _ in rows)
    for name, size in rows:
        print(f"  {name:<{width}}  {size:6d} B")
    print(f"  {'total':<{width}}  {sum(size for _, size in rows):6d} B")
    writer.transport.abort()
    stop.set()
    await task
    return 0


if __name__ == "__main__":
    sys.exit(uvloop.run(main()))
