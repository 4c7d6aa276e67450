"""Rooms, and the hub that owns them and their numbering.

A :class:`Room` owns its members: only the room adds, removes and fans out to
them, and a connection reaches another connection only through that
connection's outbox. A publication is encoded once, by the room, to the bytes
of one frame that every member's outbox shares.

The :class:`Hub` is this process's registry of rooms and the keeper of each
room's ``seq``, and holds the operator's rules (:mod:`~rtgateway.namespaces`):
a room resolves its namespace once, when it is created, and keeps its
:class:`~rtgateway.namespaces.Rules` (the metrics count by namespace from it).
Alone, it numbers a publication (the room's last ``seq`` + 1)
and fans it out at once. With a :class:`Broker` between processes (Redis),
the broker numbers publications centrally and tells the hub what arrived
through the narrow :class:`RoomEvents` interface the hub implements
(:meth:`Hub.deliver` and three others): a new broker implements
:class:`Broker` in one module and touches nothing else.

A room is *live* once its publications reach this process: at once alone,
once Redis confirmed this process's subscription with Redis. A join is
answered only when its room is live (its ``on_joined`` callback), so the
acknowledgement means "every publication from now on reaches you"; until then
the joiner waits in ``Room.pending``, for at most ``join_timeout_s``.

Publishers get backpressure by construction: alone, a publish is fanned out
before the publisher's next message is read, so no room has an inbound queue
to grow; member outboxes are bounded and never wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from . import protocol
from .metrics import Metrics
from .namespaces import Namespaces, Rules, parse
from .outbox import Outbox

__all__ = ["Broker", "Hub", "JoinCallback", "Room", "RoomEvents"]

# Called once per join with the room's member count, or None when the broker
# could not make the room live in time (the joiner is then not a member).
JoinCallback = Callable[[int | None], None]


class Room:
    __slots__ = ("live", "members", "name", "pending", "pending_timer", "rules", "seq")

    def __init__(self, name: str, live: bool, rules: Rules) -> None:
        self.name = name
        self.rules = rules  # its namespace's
        self.members: dict[Outbox, str] = {}
        self.seq = 0  # the last publication delivered here
        self.live = live  # its publications reach this process
        # Joiners waiting for the room to become live: their policy and callback.
        self.pending: dict[Outbox, tuple[str, JoinCallback]] = {}
        self.pending_timer: asyncio.TimerHandle | None = None

    def fan_out(self, frame: bytes) -> int:
        namespace = self.rules.index
        for outbox, policy in self.members.items():
            disconnect = outbox.push(frame, policy, namespace)
            if disconnect is not None:
                outbox.kill(disconnect)  # not reading, and its policy says so
        return len(self.members)


class Broker(Protocol):
    """What the hub needs of a broker between processes (``broker.RedisBroker``)."""

    def attach(self, events: RoomEvents) -> None:
        """The hub this broker tells what arrives (called once, by the hub)."""

    @property
    def available(self) -> bool:
        """Whether a room can become live now (False while Redis is down)."""
        ...

    def submit(
        self, room: str, floor: int, ts_ms: int, data: bytes, started: float
    ) -> Awaitable[int]:
        """Number and publish to every member everywhere, in submission order.

        ``floor`` is the highest ``seq`` delivered in the room here; the
        awaitable gives the publication's ``seq``. Raises
        :exc:`~rtgateway.errors.BrokerUnavailable` when it cannot be taken now.
        """
        ...

    def room_opened(self, room: str) -> bool:
        """The first local joiner came to ``room``; return whether it is live already.

        If not, the broker calls :meth:`RoomEvents.room_live` once it is.
        """
        ...

    def room_closed(self, room: str) -> None:
        """The last local member or joiner left ``room``."""


class RoomEvents(Protocol):
    """What a broker may tell the hub, and ask it: :class:`Hub` implements it."""

    def seq(self, name: str) -> int:
        """The highest ``seq`` delivered here in ``name`` (0: none, or no such room)."""
        ...

    def deliver(self, name: str, seq: int, ts_ms: int, data: bytes, started: float) -> int:
        """Fan a numbered publication out to this process's members; how many got it."""
        ...

    def room_live(self, name: str) -> None:
        """``name``'s publications reach this process from now on."""

    def broker_down(self) -> None:
        """The broker lost its connection: no room is live until it says so again."""


class Hub:
    """This process's rooms and their numbering. Single-threaded: only the event loop calls it."""

    def __init__(
        self,
        metrics: Metrics,
        broker: Broker | None = None,
        *,
        join_timeout_s: float = 2.0,
        namespaces: Namespaces | None = None,
    ) -> None:
        self.metrics = metrics
        self.broker = broker  # None: this process alone numbers and delivers
        self.join_timeout_s = join_timeout_s
        # The operator's rules; without any, every room is in the default namespace.
        self.namespaces = namespaces or parse({}, "")
        metrics.namespaces_declared(self.namespaces.names)
        self.rooms: dict[str, Room] = {}
        if broker is not None:
            broker.attach(self)

    @property
    def available(self) -> bool:
        return self.broker is None or self.broker.available

    # Membership.

    def join(self, name: str, member: Outbox, policy: str, on_joined: JoinCallback) -> None:
        """Make ``member`` a member of ``name`` once the room is live; then ``on_joined``.

        ``on_joined`` runs before any publication reaches the new member: at
        once when the room is live, else when the broker confirms it (with
        ``None`` if it cannot within ``join_timeout_s``, or is down).
        """
        room = self.rooms.get(name)
        if room is None:
            if not self.available:
                on_joined(None)
                return
            rules = self.namespaces.rules_for(name) or self.namespaces.default
            room = self.rooms[name] = Room(name, self.broker is None, rules)
            self.metrics.room_opened(rules.index)
            if self.broker is not None:
                room.live = self.broker.room_opened(name)
        if room.live:
            self._add(room, member, policy)
            on_joined(len(room.members))
            return
        if not self.available:
            on_joined(None)
            return
        room.pending[member] = (policy, on_joined)
        if room.pending_timer is None:
            loop = asyncio.get_running_loop()
            room.pending_timer = loop.call_later(self.join_timeout_s, self._joins_failed, room)

    def _add(self, room: Room, member: Outbox, policy: str) -> None:
        if member not in room.members:
            self.metrics.member_joined(room.rules.index)
        room.members[member] = policy

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
            self.metrics.member_left(room.rules.index)
        remaining = len(room.members)
        self._close_if_empty(room)
        return remaining

    def members(self, name: str) -> int:
        room = self.rooms.get(name)
        return len(room.members) if room else 0

    def occupancy(self, name: str) -> int:
        """Members and joiners waiting to be: what a room's ``max_members`` counts."""
        room = self.rooms.get(name)
        return len(room.members) + len(room.pending) if room else 0

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

    def _close_if_empty(self, room: Room) -> None:
        if room.members or room.pending or self.rooms.get(room.name) is not room:
            return
        self._cancel_pending_timer(room)
        del self.rooms[room.name]
        self.metrics.room_closed(room.rules.index)
        if self.broker is not None:
            self.broker.room_closed(room.name)

    # Publishing.

    def submit(
        self, name: str, data: bytes, ts_ms: int | None = None, started: float | None = None
    ) -> Awaitable[int]:
        """Publish JSON ``data`` (already encoded) to room ``name`` now; await its seq.

        What follows the call is ordered after it: publications submitted one
        after another keep their order without waiting for each other. Alone,
        the publication is numbered and fanned out before this returns (``seq``
        0 when the room has no members: nobody saw it, nothing was numbered).
        Raises :exc:`~rtgateway.errors.BrokerUnavailable` when the broker
        cannot take it now; the awaitable may raise ``BrokerUnavailable`` or
        ``BrokerOutcomeUnknown``.
        """
        if started is None:
            started = time.perf_counter()
        if ts_ms is None:
            ts_ms = time.time_ns() // 1_000_000
        if self.broker is not None:
            return self.broker.submit(name, self.seq(name), ts_ms, data, started)
        room = self.rooms.get(name)
        seq = 0
        if room is not None:
            seq = room.seq + 1
            self.deliver(name, seq, ts_ms, data, started)
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        done.set_result(seq)
        return done

    async def publish(
        self, name: str, data: bytes, ts_ms: int | None = None, started: float | None = None
    ) -> int:
        """:meth:`submit`, then wait for the seq."""
        return await self.submit(name, data, ts_ms, started)

    # RoomEvents: what the broker tells the hub.

    def seq(self, name: str) -> int:
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
        self.metrics.published(recipients, time.perf_counter() - started, room.rules.index)
        return recipients

    def room_live(self, name: str) -> None:
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
        for room in list(self.rooms.values()):
            room.live = False
            self._joins_failed(room)

    def room_down(self, name: str) -> None:
        """Only ``name`` lost its broker (a cluster node): as :meth:`broker_down`, for one room."""
        room = self.rooms.get(name)
        if room is not None:
            room.live = False
            self._joins_failed(room)
