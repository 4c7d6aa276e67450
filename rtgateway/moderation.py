"""Moderation from the backend: disconnect a connection, remove it from a room, list a room's.

The publish API's moderation routes call the :class:`Moderator`. A
connection's ``conn_id`` says which gateway process holds it:
``<node>.<token>``, where *node* is a random token each process draws at start
(``Context.node``). Requests for a connection are therefore sent to one
process, never broadcast.

- **Alone** (no broker), every connection is here: the moderator acts on the
  sessions the server state registers (:class:`Moderated`, implemented by
  ``session.Session``).
- **With a broker** between processes (Redis, :class:`Control`), a request
  for a connection of another node is asked of that node
  (:meth:`Control.ask_node`), which acts and answers; one for a connection of
  this node is done here. A room's connections are asked of the processes
  that have members in the room (:meth:`Control.ask_room`, on the room's own
  channel, which exactly those processes subscribe to), and their answers
  merged, a page at a time in ``conn_id`` order.

What the broker brings back are :class:`Answers`: the replies, and whether
every process that received the request answered in time. A disconnect or a
removal that one process confirms is done; one that nobody received is for an
unknown connection (its process is gone, or never was); one that was received
but not confirmed in time may or may not have been done
(:exc:`~rtgateway.errors.BrokerOutcomeUnknown`). A listing that misses an
answer is not given at all (:exc:`~rtgateway.errors.BrokerUnavailable`).

The requests and answers are plain JSON-ready dicts, the same whether they
are carried by a broker or answered here (:meth:`Moderator.answer`). This
module must not know about sockets or websockets.
"""

from __future__ import annotations

import heapq
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from .errors import BrokerOutcomeUnknown, BrokerUnavailable

if TYPE_CHECKING:
    from .outbox import Outbox
    from .rooms import Hub

__all__ = ["Answers", "Control", "Moderated", "Moderator", "node_of"]

# What a disconnect or a removal comes to, best first.
DONE = "done"
NOT_JOINED = "not_joined"
UNKNOWN_CONNECTION = "unknown_connection"
RESULTS = (DONE, NOT_JOINED, UNKNOWN_CONNECTION)

Member = tuple[str, int]  # (conn_id, when it joined, epoch ms)


class Moderated(Protocol):
    """What the moderator needs of a room-protocol session (``session.Session``)."""

    conn_id: str
    outbox: Outbox
    rooms: dict[str, tuple[str, int]]  # room -> (its policy, when it joined, epoch ms)

    def kick(self, code: int, reason: str) -> None: ...

    def remove(self, room: str, reason: str) -> bool: ...


class Answers(NamedTuple):
    """What a broker brought back for one request."""

    replies: list[dict[str, Any]]
    complete: bool  # every process that received the request answered in time


class Control(Protocol):
    """What the moderator needs of a broker between processes (``broker.RedisBroker``)."""

    def serve(self, answer: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """Answer requests from other processes with ``answer`` (called once)."""

    def ask_node(self, node: str, request: dict[str, Any]) -> Awaitable[Answers]:
        """Ask the process ``node``; no reply when no such process listens."""
        ...

    def ask_room(self, room: str, request: dict[str, Any]) -> Awaitable[Answers]:
        """Ask every process with members in ``room``."""
        ...


def node_of(conn_id: str) -> str:
    return conn_id.partition(".")[0]


class Moderator:
    """Disconnects, removals and listings, here or through the broker."""

    def __init__(
        self,
        node: str,
        sessions: Mapping[str, Moderated],
        session_of: Mapping[Outbox, Moderated],
        hub: Hub,
        control: Control | None = None,
    ) -> None:
        self.node = node
        self.sessions = sessions
        self.session_of = session_of
        self.hub = hub
        self.control = control
        if control is not None:
            control.serve(self.answer)

    async def disconnect(self, conn_id: str, code: int, reason: str) -> str:
        """Close ``conn_id`` with ``code`` and ``reason``: ``done`` or ``unknown_connection``."""
        request = {"op": "disconnect", "conn_id": conn_id, "code": code, "reason": reason}
        return await self._one(conn_id, request)

    async def remove(self, conn_id: str, room: str, reason: str) -> str:
        """Take ``conn_id`` out of ``room``: ``done``, ``not_joined`` or ``unknown_connection``."""
        request = {"op": "remove", "conn_id": conn_id, "room": room, "reason": reason}
        return await self._one(conn_id, request)

    async def connections(
        self, room: str, cursor: str | None, limit: int
    ) -> tuple[list[Member], str | None]:
        """One page of ``room``'s members in ``conn_id`` order, and the next page's cursor."""
        request = {"op": "connections", "room": room, "cursor": cursor, "limit": limit}
        if self.control is None:
            found: Iterable[Member] = self._connections(request)
        else:
            answers = await self.control.ask_room(room, request)
            if not answers.complete:
                raise BrokerUnavailable("a gateway with members in the room did not answer")
            found = (m for reply in answers.replies for m in _members(reply, cursor))
        members = heapq.nsmallest(limit + 1, found)
        page = members[:limit]
        return page, page[-1][0] if len(members) > limit else None

    async def _one(self, conn_id: str, request: dict[str, Any]) -> str:
        """A request for one connection, wherever it is."""
        node = node_of(conn_id)
        if self.control is None or node == self.node:
            return str(self.answer(request).get("result", UNKNOWN_CONNECTION))
        answers = await self.control.ask_node(node, request)
        results = {reply.get("result") for reply in answers.replies}
        for result in RESULTS[:-1]:
            if result in results:
                return result
        if not answers.complete:
            raise BrokerOutcomeUnknown("the gateway holding the connection did not answer")
        return UNKNOWN_CONNECTION  # nobody holds it, or its process no longer does

    # Requests, from here or from another process.

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """Act on one request for this process's connections; the JSON-ready answer."""
        op = request.get("op")
        if op == "connections":
            return {"connections": [list(m) for m in self._connections(request)]}
        conn_id = request.get("conn_id")
        session = self.sessions.get(conn_id) if isinstance(conn_id, str) else None
        if op == "disconnect":
            code, reason = request.get("code"), request.get("reason")
            if not isinstance(code, int) or not isinstance(reason, str):
                return {"error": "bad request"}
            if session is None:
                return {"result": UNKNOWN_CONNECTION}
            session.kick(code, reason)
            return {"result": DONE}
        if op == "remove":
            room, reason = request.get("room"), request.get("reason")
            if not isinstance(room, str) or not isinstance(reason, str):
                return {"error": "bad request"}
            if session is None:
                return {"result": UNKNOWN_CONNECTION}
            return {"result": DONE if session.remove(room, reason) else NOT_JOINED}
        return {"error": "unknown op"}

    def _connections(self, request: dict[str, Any]) -> list[Member]:
        """This process's members of the request's room after its cursor: at most limit + 1."""
        room, cursor, limit = request.get("room"), request.get("cursor"), request.get("limit")
        if not isinstance(limit, int) or (cursor is not None and not isinstance(cursor, str)):
            return []
        found = self.hub.rooms.get(room) if isinstance(room, str) else None
        if found is None:
            return []
        session_of = self.session_of
        members = (
            (session.conn_id, session.rooms.get(found.name, ("", 0))[1])
            for outbox in found.members
            if (session := session_of.get(outbox)) is not None
            and (cursor is None or session.conn_id > cursor)
        )
        return heapq.nsmallest(limit + 1, members)


def _members(reply: dict[str, Any], cursor: str | None) -> Iterable[Member]:
    """The well-formed members of another process's answer."""
    members = reply.get("connections")
    if not isinstance(members, list):
        return
    for member in members:
        if (
            isinstance(member, list)
            and len(member) == 2
            and isinstance(member[0], str)
            and isinstance(member[1], int)
            and (cursor is None or member[0] > cursor)
        ):
            yield member[0], member[1]
