"""Rooms and the hub that holds them, behind a small broker seam.

A :class:`Room` owns its members: only the room adds, removes and fans out to
them, and a connection reaches another connection only through that
connection's outbox. A publication is encoded once, by the room, to the bytes
of one frame that every member's outbox shares.

The :class:`Hub` is this process's registry of rooms. Publications go through
a :class:`Broker`: :class:`LocalBroker` numbers and delivers them in-process;
a broker between processes (Redis) numbers them centrally and calls
:meth:`Hub.deliver` on every process that has members. Connections and rooms
do not change when the broker does.

Publishers get backpressure by construction: with the local broker a publish
is fanned out before the publisher's next message is read, so no room has an
inbound queue to grow; member outboxes are bounded and never wait.
"""

from __future__ import annotations

import time
from typing import Protocol

from . import protocol
from .metrics import Metrics
from .outbox import Outbox

__all__ = ["Broker", "BrokerUnavailable", "Hub", "LocalBroker", "Room"]


class BrokerUnavailable(Exception):
    """The broker cannot take publications now (for example, Redis is down)."""


class Room:
    __slots__ = ("members", "name", "seq")

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: dict[Outbox, str] = {}
        self.seq = 0

    def fan_out(self, frame: bytes) -> int:
        for outbox, policy in self.members.items():
            outbox.push(frame, policy)
        return len(self.members)


class Broker(Protocol):
    async def publish(self, room: str, ts_ms: int, data: bytes, started: float) -> int:
        """Publish to every member everywhere; return the publication's ``seq``.

        ``started`` is the ``time.perf_counter()`` at which the publication was read.
        """
        ...

    def room_opened(self, room: str) -> None:
        """The first local member joined ``room``."""

    def room_closed(self, room: str) -> None:
        """The last local member left ``room``."""


class Hub:
    """This process's rooms. Single-threaded: only the event loop calls it."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.rooms: dict[str, Room] = {}
        self.broker: Broker = LocalBroker(self)

    def join(self, name: str, member: Outbox, policy: str) -> int:
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name)
            self.metrics.rooms_current += 1
            self.broker.room_opened(name)
        if member not in room.members:
            self.metrics.room_members_current += 1
        room.members[member] = policy
        return len(room.members)

    def leave(self, name: str, member: Outbox) -> int:
        """Remove ``member``; return how many members remain."""
        room = self.rooms.get(name)
        if room is None or room.members.pop(member, None) is None:
            return len(room.members) if room else 0
        self.metrics.room_members_current -= 1
        if not room.members:
            del self.rooms[name]
            self.metrics.rooms_current -= 1
            self.broker.room_closed(name)
        return len(room.members)

    def members(self, name: str) -> int:
        room = self.rooms.get(name)
        return len(room.members) if room else 0

    async def publish(
        self, name: str, data: bytes, ts_ms: int | None = None, started: float | None = None
    ) -> int:
        """Publish JSON ``data`` (already encoded) to room ``name``; return its seq.

        Raises :exc:`BrokerUnavailable` when the broker cannot take it.
        """
        if started is None:
            started = time.perf_counter()
        if ts_ms is None:
            ts_ms = time.time_ns() // 1_000_000
        return await self.broker.publish(name, ts_ms, data, started)

    def deliver(self, name: str, seq: int, ts_ms: int, data: bytes, started: float) -> int:
        """Fan one numbered publication out to the local members of ``name``."""
        room = self.rooms.get(name)
        if room is None:
            return 0
        if seq > room.seq:
            room.seq = seq
        recipients = room.fan_out(protocol.message_frame(name, seq, ts_ms, data))
        self.metrics.published(recipients, time.perf_counter() - started)
        return recipients


class LocalBroker:
    """Numbers publications per room and delivers them in this process."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def publish(self, room: str, ts_ms: int, data: bytes, started: float) -> int:
        target = self.hub.rooms.get(room)
        if target is None:
            return 0  # nobody is there to see it; nothing is numbered
        seq = target.seq + 1
        self.hub.deliver(room, seq, ts_ms, data, started)
        return seq

    def room_opened(self, room: str) -> None:
        pass

    def room_closed(self, room: str) -> None:
        pass
