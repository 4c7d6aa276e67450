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

A room is *live* once the broker delivers its publications here: at once with
the local broker, once Redis confirmed this process's subscription with Redis.
A join is answered only when its room is live (its ``on_joined`` callback), so
the acknowledgement means "every publication from now on reaches you"; until
then the joiner waits in ``Room.pending``, for at most the broker's timeout.

Publishers get backpressure by construction: with the local broker a publish
is fanned out before the publisher's next message is read, so no room has an
inbound queue to grow; member outboxes are bounded and never wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from . import protocol
from .metrics import Metrics
from .outbox import Outbox

__all__ = [
    "Broker",
    "BrokerOutcomeUnknown",
    "BrokerUnavailable",
    "Hub",
    "JoinCallback",
    "LocalBroker",
    "Room",
]

# Called once per join with the room's member count, or None when the broker
# could not make the room live in time (the joiner is then not a member).
JoinCallback = Callable[[int | None], None]


class BrokerUnavailable(Exception):
    """Not published: the broker could not take it (Redis is down, or never got it).

    Retrying cannot duplicate the publication.
    """


class BrokerOutcomeUnknown(Exception):
    """Sent to the broker but not confirmed in time: it may or may not have been published."""


class Room:
    __slots__ = ("live", "members", "name", "pending", "pending_timer", "seq")

    def __init__(self, name: str, live: bool) -> None:
        self.name = name
        self.members: dict[Outbox, str] = {}
        self.seq = 0
        self.live = live  # the broker delivers this room's publications here
        # Joiners waiting for the room to become live: their policy and callback.
        self.pending: dict[Outbox, tuple[str, JoinCallback]] = {}
        self.pending_timer: asyncio.TimerHandle | None = None

    def fan_out(self, frame: bytes) -> int:
        for outbox, policy in self.members.items():
            outbox.push(frame, policy)
        return len(self.members)


class Broker(Protocol):
    def submit(self, room: str, ts_ms: int, data: bytes, started: float) -> Awaitable[int]:
        """Publish to every member everywhere, in submission order; await the ``seq``.

        ``started`` is the ``time.perf_counter()`` at which the publication was
        read. Raises :exc:`BrokerUnavailable` when it cannot be taken now.
        """
        ...

    @property
    def available(self) -> bool:
        """Whether a room can become live now (False while Redis is down)."""
        ...

    def room_opened(self, room: str) -> bool:
        """The first local joiner came to ``room``; return whether it is live already.

        If not, the broker calls :meth:`Hub.room_live` once it is.
        """
        ...

    def room_closed(self, room: str) -> None:
        """The last local member or joiner left ``room``."""


class Hub:
    """This process's rooms. Single-threaded: only the event loop calls it."""

    def __init__(self, metrics: Metrics, join_timeout_s: float = 2.0) -> None:
        self.metrics = metrics
        self.join_timeout_s = join_timeout_s
        self.rooms: dict[str, Room] = {}
        self.broker: Broker = LocalBroker(self)

    def join(self, name: str, member: Outbox, policy: str, on_joined: JoinCallback) -> None:
        """Make ``member`` a member of ``name`` once the room is live; then ``on_joined``.

        ``on_joined`` runs before any publication reaches the new member: at
        once when the room is live, else when the broker confirms it (with
        ``None`` if it cannot within ``join_timeout_s``).
        """
        room = self.rooms.get(name)
        if room is None:
            if not self.broker.available:
                on_joined(None)
                return
            room = self.rooms[name] = Room(name, live=False)
            self.metrics.rooms_current += 1
            room.live = self.broker.room_opened(name)
        if room.live:
            self._add(room, member, policy)
            on_joined(len(room.members))
            return
        room.pending[member] = (policy, on_joined)
        if room.pending_timer is None:
            loop = asyncio.get_running_loop()
            room.pending_timer = loop.call_later(self.join_timeout_s, self._joins_failed, room)

    def _add(self, room: Room, member: Outbox, policy: str) -> None:
        if member not in room.members:
            self.metrics.room_members_current += 1
        room.members[member] = policy

    def room_live(self, name: str) -> None:
        """The broker delivers ``name``'s publications here now: admit its joiners."""
        room = self.rooms.get(name)
        if room is None or room.live:
            return
        room.live = True
        self._cancel_pending_timer(room)
        pending, room.pending = room.pending, {}
        for member, (policy, on_joined) in pending.items():
            self._add(room, member, policy)
            on_joined(len(room.members))

    def broker_down(self) -> None:
        """The broker lost its connection: no room is live; waiting joins fail now."""
        for room in list(self.rooms.values()):
            room.live = False
            self._joins_failed(room)

    def _joins_failed(self, room: Room) -> None:
        self._cancel_pending_timer(room)
        pending, room.pending = room.pending, {}
        for _policy, on_joined in pending.values():
            on_joined(None)
        self._close_if_empty(room)

    def _cancel_pending_timer(self, room: Room) -> None:
        if room.pending_timer is not None:
            room.pending_timer.cancel()
            room.pending_timer = None

    def leave(self, name: str, member: Outbox) -> int:
        """Remove ``member``; return how many members remain.

        A member still waiting for its room is answered first (joined, then left).
        """
        room = self.rooms.get(name)
        if room is None:
            return 0
        waiting = room.pending.pop(member, None)
        if waiting is not None:
            waiting[1](len(room.members) + 1)
        elif room.members.pop(member, None) is not None:
            self.metrics.room_members_current -= 1
        remaining = len(room.members)
        self._close_if_empty(room)
        return remaining

    def _close_if_empty(self, room: Room) -> None:
        if room.members or room.pending or self.rooms.get(room.name) is not room:
            return
        self._cancel_pending_timer(room)
        del self.rooms[room.name]
        self.metrics.rooms_current -= 1
        self.broker.room_closed(room.name)

    def members(self, name: str) -> int:
        room = self.rooms.get(name)
        return len(room.members) if room else 0

    def submit(
        self, name: str, data: bytes, ts_ms: int | None = None, started: float | None = None
    ) -> Awaitable[int]:
        """Publish JSON ``data`` (already encoded) to room ``name`` now; await its seq.

        What follows the call is ordered after it: publications submitted one
        after another keep their order without waiting for each other. Raises
        :exc:`BrokerUnavailable` when the broker cannot take it now; the
        awaitable may raise :exc:`BrokerUnavailable` or
        :exc:`BrokerOutcomeUnknown`.
        """
        if started is None:
            started = time.perf_counter()
        if ts_ms is None:
            ts_ms = time.time_ns() // 1_000_000
        return self.broker.submit(name, ts_ms, data, started)

    async def publish(
        self, name: str, data: bytes, ts_ms: int | None = None, started: float | None = None
    ) -> int:
        """:meth:`submit`, then wait for the seq."""
        return await self.submit(name, data, ts_ms, started)

    def seq(self, name: str) -> int:
        """The highest ``seq`` delivered here in ``name`` (0: none, or no such room)."""
        room = self.rooms.get(name)
        return room.seq if room is not None else 0

    def deliver(self, name: str, seq: int, ts_ms: int, data: bytes, started: float) -> int:
        """Fan one numbered publication out to the local members of ``name``.

        ``seq`` must be above every ``seq`` delivered in the room before: the
        broker drops what is not (see :meth:`seq`).
        """
        room = self.rooms.get(name)
        if room is None:
            return 0
        room.seq = seq
        recipients = room.fan_out(protocol.message_frame(name, seq, ts_ms, data))
        self.metrics.published(recipients, time.perf_counter() - started)
        return recipients


class LocalBroker:
    """Numbers publications per room and delivers them in this process."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def submit(self, room: str, ts_ms: int, data: bytes, started: float) -> Awaitable[int]:
        target = self.hub.rooms.get(room)
        seq = 0  # nobody is there to see it; nothing is numbered
        if target is not None:
            seq = target.seq + 1
            self.hub.deliver(room, seq, ts_ms, data, started)
        done = asyncio.get_running_loop().create_future()
        done.set_result(seq)
        return done

    available = True

    def room_opened(self, room: str) -> bool:
        return True

    def room_closed(self, room: str) -> None:
        pass
