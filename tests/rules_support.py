"""Helpers for the room-rules and moderation tests: a peer, the API, two workers and Redis.

- :class:`Peer` is a room-protocol client on a real websockets connection that
  keeps what it reads while it waits for a reply: publications, and pushes
  such as ``removed``.
- :func:`api` makes one request to the publish API on a fresh connection.
- :func:`two_workers` runs ``RTG_WORKERS=2`` with a real Redis as a
  subprocess; :func:`peers_on_each_worker` opens connections until one landed
  on each worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

from redisserver import RedisServer
from support import ROOT, SupervisorProcess, free_port, supervisor
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

__all__ = [
    "Peer",
    "Supervisor",
    "api",
    "peers_on_each_worker",
    "readme_rules",
    "two_workers",
    "write_rules",
]


def readme_rules() -> str:
    """The rules file the README shows (its "Room namespaces and moderation" section)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Room namespaces and moderation") :]
    return section[
        section.index("```toml\n") + 8 : section.index("\n```", section.index("```toml"))
    ]


def write_rules(tmp_path: Path, text: str) -> str:
    """``text`` as ``tmp_path``/rooms.toml; its path."""
    path = tmp_path / "rooms.toml"
    path.write_text(text)
    return str(path)


class Peer:
    """A room-protocol client that keeps publications and pushes while awaiting replies."""

    ids = itertools.count(1)
    # Every peer opened, so that a test's helper can close those left open
    # before the gateway goes (a transport open when the loop closes is a
    # ResourceWarning, an error in this suite).
    opened: ClassVar[list[Peer]] = []

    def __init__(self, ws: ClientConnection, hello: dict[str, Any]) -> None:
        self.opened.append(self)
        self.ws = ws
        self.hello = hello
        self.conn_id: str = hello["conn_id"]
        self.messages: list[dict[str, Any]] = []  # op message
        self.pushes: list[dict[str, Any]] = []  # anything else without an id (removed)

    @classmethod
    async def connect(cls, ws_url: str) -> Peer:
        ws = await connect(ws_url, open_timeout=10, compression=None)
        hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert hello["op"] == "hello", hello
        return cls(ws, hello)

    @property
    def worker(self) -> int:
        return int(self.hello.get("worker", 0))

    def _keep(self, reply: dict[str, Any]) -> None:
        if reply.get("op") == "message":
            self.messages.append(reply)
        else:
            self.pushes.append(reply)

    async def request(self, op: str, timeout: float = 10, **fields: Any) -> dict[str, Any]:
        msg = {"op": op, **fields, "id": next(self.ids)}
        await self.ws.send(json.dumps(msg))
        async with asyncio.timeout(timeout):
            while True:
                reply = json.loads(await self.ws.recv())
                if reply.get("id") == msg["id"] and reply.get("op") in ("ack", "error", "pong"):
                    return reply
                self._keep(reply)

    async def join(self, room: str, **fields: Any) -> dict[str, Any]:
        return await self.request("join", room=room, **fields)

    async def publish(self, room: str, data: Any) -> dict[str, Any]:
        return await self.request("publish", room=room, data=data)

    async def message(self, timeout: float = 10) -> dict[str, Any]:
        """The next publication."""
        async with asyncio.timeout(timeout):
            while not self.messages:
                self._keep(json.loads(await self.ws.recv()))
        return self.messages.pop(0)

    async def push(self, op: str, timeout: float = 10) -> dict[str, Any]:
        """The next push of kind ``op``."""
        async with asyncio.timeout(timeout):
            while True:
                for push in self.pushes:
                    if push.get("op") == op:
                        self.pushes.remove(push)
                        return push
                self._keep(json.loads(await self.ws.recv()))

    async def settled(self) -> None:
        """Every frame sent before this round trip has been read."""
        assert (await self.request("ping"))["op"] == "pong"

    async def closed(self, timeout: float = 10) -> tuple[int | None, str]:
        """Read until the gateway closes; its close code and reason."""
        async with asyncio.timeout(timeout):
            with contextlib.suppress(ConnectionClosed):
                while True:
                    self._keep(json.loads(await self.ws.recv()))
        rcvd = self.ws.close_code, self.ws.close_reason or ""
        return rcvd

    async def close(self) -> None:
        await self.ws.close()

    @classmethod
    async def close_all(cls) -> None:
        """Close every peer opened so far, and forget them."""
        peers, cls.opened[:] = list(cls.opened), []
        await asyncio.gather(*(peer.close() for peer in peers))


async def api(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One request to the publish API; its status and JSON body (None for a HEAD).

    ``body`` is sent as JSON, or as it is when it is bytes.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        raw = (
            body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
        )
        head = [f"{method} {path} HTTP/1.1", "Host: api", "Connection: close"]
        if body is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(raw)}"]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + raw)
        async with asyncio.timeout(20):
            data = await reader.read()
    finally:
        writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(payload) if payload else None


# Two workers and Redis.


class Supervisor(SupervisorProcess):
    """``RTG_WORKERS=2`` as a subprocess, and where its publish API listens."""

    def __init__(self, env: dict[str, str], api_port: int) -> None:
        super().__init__(env)
        self.api_port = api_port


@contextlib.asynccontextmanager
async def two_workers(redis: RedisServer, rooms_file: str, **env: str) -> AsyncIterator[Supervisor]:
    """``RTG_WORKERS=2`` on ``redis`` with ``rooms_file``; its peers closed before it is killed."""
    api_port = free_port()
    with supervisor(
        redis.url,
        lambda environ: Supervisor(environ, api_port),
        RTG_ROOMS_FILE=rooms_file,
        RTG_API_ADDR=f"127.0.0.1:{api_port}",
        **env,
    ) as proc:
        try:
            yield proc
        finally:
            await Peer.close_all()


async def peers_on_each_worker(ws_url: str, per_worker: int = 1) -> list[list[Peer]]:
    """``per_worker`` connections on each of two workers (the hello names the worker)."""
    found: dict[int, list[Peer]] = {0: [], 1: []}
    spare: list[Peer] = []
    for _ in range(40 * per_worker):
        peer = await Peer.connect(ws_url)
        if len(found[peer.worker]) < per_worker:
            found[peer.worker].append(peer)
        else:
            spare.append(peer)
        if all(len(peers) == per_worker for peers in found.values()):
            break
    for peer in spare:
        await peer.close()
    assert all(len(peers) == per_worker for peers in found.values()), "a worker got nobody"
    return [found[0], found[1]]
