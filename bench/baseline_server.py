#!/usr/bin/env python3
"""The baseline for ``bench/bench.py``: stock websockets, nothing of rtgateway.

    python bench/baseline_server.py --port 0           # room protocol, broadcast()
    python bench/baseline_server.py --port 0 --echo    # bare echo server

The room mode speaks just enough of the gateway's protocol for the same load
client: a ``hello`` on connect, ``join`` (acked with ``members``) and
``publish`` (acked with ``seq``) in any number of rooms, and publications
delivered as ``{"op":"message","room":...,"seq":N,"ts":T,"data":...}`` through
``websockets.broadcast()``, which frames the message once per connection.

Settings match the gateway's: uvloop, ``compression=None``, the same
``max_size``, ``max_queue``, ``write_limit``, ping interval and backlog.
Once it listens it prints one JSON line in the gateway's own form,
``{"event": "baseline_listening", "addresses": ["HOST:PORT"]}``, so that
:class:`rtgateway.testing.GatewayProcess` starts it like the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from typing import Any

import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

MAX_SIZE = 65536
WRITE_LIMIT = 64 * 1024
MESSAGE = '{{"op":"message","room":"{}","seq":{},"ts":{},"data":{}}}'
MESSAGE = '{{"op":"message","room":"{}","seq":{},"ts":{},"data":{}}}'


class Rooms:
    def __init__(self) -> None:
        self.members: dict[str, set[ServerConnection]] = {}
        self.seq: dict[str, int] = {}

    async def handler(self, ws: ServerConnection) -> None:
        joined: set[str] = set()
        await ws.send(
            json.dumps(
                {
                    "op": "hello",
                    "conn_id": secrets.token_urlsafe(9),
                    "server": "baseline/websockets",
                    "limits": {"max_message_bytes": MAX_SIZE},
                },
                separators=(",", ":"),
            )
        )
        try:
            async for text in ws:
                msg = json.loads(text)
                op = msg.get("op")
                room = msg.get("room")
                if op == "join":
                    joined.add(room)
                    members = self.members.setdefault(room, set())
                    members.add(ws)
                    self.seq.setdefault(room, 0)
                    reply: dict[str, Any] = {"op": "ack", "id": msg.get("id"), "room": room}
                    reply["members"] = len(members)
                    await ws.send(json.dumps(reply, separators=(",", ":")))
                elif op == "publish":
                    ts = time.time_ns() // 1_000_000
                    data = json.dumps(msg.get("data"), separators=(",", ":"))
                    seq = self.seq.get(room, 0) + 1
                    if room in self.members:
                        self.seq[room] = seq
                        message = MESSAGE.format(room, seq, ts, data)
                        broadcast(self.members[room], message)
                    if msg.get("id") is not None:
                        ack = {"op": "ack", "id": msg["id"], "room": room, "seq": seq}
                        await ws.send(json.dumps(ack, separators=(",", ":")))
                elif op == "ping":
                    await ws.send(json.dumps({"op": "pong", "id": msg.get("id")}))
        except ConnectionClosed:
            pass  # the load aborts its sockets at the end; as the gateway, not an error
        finally:
            for room in joined:
                members = self.members.get(room)
                if members is not None:
                    members.discard(ws)
                    if not members:
                        del self.members[room]


async def echo(ws: ServerConnection) -> None:
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:
        pass  # the load aborts its sockets at the end; as the gateway, not an error


async def main(host: str, port: int, echo_mode: bool) -> None:
    handler = echo if echo_mode else Rooms().handler
    async with serve(
        handler,
        host,
        port,
        compression=None,
        max_size=MAX_SIZE,
        max_queue=16,
        write_limit=WRITE_LIMIT,
        ping_interval=20,
        ping_timeout=20,
        backlog=4096,
    ) as server:
        bound = server.sockets[0].getsockname()[1]
        address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
        listening = {"event": "baseline_listening", "addresses": [address]}
        print(json.dumps(listening), flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--echo", action="store_true", help="bare echo server")
    args = parser.parse_args()
    uvloop.run(main(args.host, args.port, args.echo))
