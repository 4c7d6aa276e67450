"""An asyncio client for the room protocol, for applications, tests and benchmarks.

::

    async with Client.connect("ws://127.0.0.1:8083/ws") as client:
        await client.join("lobby")
        await client.publish("lobby", {"text": "hello"})
        async for message in client.messages():
            print(message["room"], message["seq"], message["data"])

Requests carry an ``id`` and their coroutine returns the matching ``ack``, or
raises :exc:`ServerError` with the ``error`` the gateway sent. One reader task,
owned by the client, routes replies to their waiters and publications to
:meth:`messages`; the rooms the backend removed this client from are in
:attr:`Client.removed`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

__all__ = ["Client", "ServerError"]


class ServerError(Exception):
    """The gateway answered a request with an ``error``."""

    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(f"{reply.get('code')}: {reply.get('message')}")
        self.code: str = reply.get("code", "")
        self.reply = reply


class Client:
    def __init__(self, ws: ClientConnection, hello: dict[str, Any], max_queue: int) -> None:
        self.ws = ws
        self.hello = hello
        self.conn_id: str = hello.get("conn_id", "")
        self._ids = itertools.count(1)
        self._waiters: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue(max_queue)
        self.errors: list[dict[str, Any]] = []  # errors that answered no request
        self.removed: list[dict[str, Any]] = []  # {"op": "removed", "room", "reason"?}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, *, max_queue: int = 0, **kwargs: Any) -> Client:
        ws = await connect(url, compression=None, **kwargs)
        hello = json.loads(await ws.recv())
        return cls(ws, hello, max_queue)

    @classmethod
    def connect(cls, url: str, **kwargs: Any) -> _Connect:
        return _Connect(url, kwargs)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = json.loads(raw)
                op = msg.get("op")
                if op == "message":
                    await self._messages.put(msg)
                    continue
                waiter = self._waiters.pop(msg.get("id"), None) if "id" in msg else None
                if waiter is not None and not waiter.done():
                    if op == "error":
                        waiter.set_exception(ServerError(msg))
                    else:
                        waiter.set_result(msg)
                elif op == "error":
                    self.errors.append(msg)
                elif op == "removed":
                    self.removed.append(msg)
        except ConnectionClosed:
            pass
        finally:
            for waiter in self._waiters.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionError("connection closed"))
            self._waiters.clear()

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        id = next(self._ids)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[id] = waiter
        await self.ws.send(json.dumps({"op": op, "id": id, **fields}))
        reply: dict[str, Any] = await waiter
        return reply

    async def join(self, room: str, policy: str | None = None) -> dict[str, Any]:
        if policy is None:
            return await self.request("join", room=room)
        return await self.request("join", room=room, policy=policy)

    async def leave(self, room: str) -> dict[str, Any]:
        return await self.request("leave", room=room)

    async def publish(self, room: str, data: Any) -> int:
        """Publish and wait for the ack; return the publication's ``seq``."""
        ack = await self.request("publish", room=room, data=data)
        return int(ack["seq"])

    async def publish_nowait(self, room: str, data: Any) -> None:
        """Publish without an id: no ack, errors land in :attr:`errors`."""
        await self.ws.send(json.dumps({"op": "publish", "room": room, "data": data}))

    async def ping(self) -> dict[str, Any]:
        return await self.request("ping")

    async def next_message(self, timeout: float | None = None) -> dict[str, Any]:
        return await asyncio.wait_for(self._messages.get(), timeout)

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        while not (self._reader.done() and self._messages.empty()):
            get = asyncio.ensure_future(self._messages.get())
            done, _ = await asyncio.wait({get, self._reader}, return_when=asyncio.FIRST_COMPLETED)
            if get in done:
                yield get.result()
            else:
                get.cancel()

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


class _Connect:
    def __init__(self, url: str, kwargs: dict[str, Any]) -> None:
        self.url = url
        self.kwargs = kwargs
        self.client: Client | None = None

    def __await__(self) -> Any:
        return Client.open(self.url, **self.kwargs).__await__()

    async def __aenter__(self) -> Client:
        self.client = await Client.open(self.url, **self.kwargs)
        return self.client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self.client is not None
        await self.client.close()
