"""What a WebSocket connection speaks: the room protocol on ``/ws``, the echo on ``/ws/echo``.

Both are *handlers* (:class:`Handler`), driven by the connection that owns
the socket (``connection.py``), and know nothing of the socket or of
websockets:

- :meth:`Handler.open` once the handshake is done (the ``hello``);
- :meth:`Handler.received` for each message, text (``str``) or binary
  (``bytes``); it answers at once through the connection's outbox and returns
  ``None``, or returns an awaitable that the connection awaits before it hands
  over the next message (a publication waiting for Redis): one client's
  messages are acted on in the order they came;
- :meth:`Handler.closed` once the connection is gone: every room is left.

The room protocol applies the rules of each room's namespace
(:mod:`~rtgateway.namespaces`): who may join, who may publish, how many
members a room may have here, the policies, a publish rate per namespace. A
:class:`Session` is registered in the server state by its ``conn_id`` while it
is open, so that the backend can moderate it (:mod:`~rtgateway.moderation`:
:meth:`Session.kick`, :meth:`Session.remove`).

Everything a handler sends goes through its :class:`~rtgateway.outbox.Outbox`;
what the outbox cannot take is the handler's to act on (a slow consumer is
closed). Errors answer the one message (``protocol.error``); a bug while
handling one costs that message, never the connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Awaitable
from typing import Any, Protocol

from . import protocol
from .errors import (
    KICKED,
    RATE_LIMITED,
    BrokerOutcomeUnknown,
    BrokerUnavailable,
    ProtocolError,
)
from .namespaces import Rules
from .outbox import Outbox
from .ratelimit import RateLimit, TokenBucket
from .state import Context, ServerState

__all__ = ["Echo", "Handler", "Session"]

RATE_LIMIT_WINDOW_S = 10.0


class Handler(Protocol):
    """What a connection drives once its handshake is done."""

    def open(self) -> None: ...

    def received(self, message: str | bytes) -> Awaitable[None] | None: ...

    def closed(self) -> None: ...


def _rate_limit(ctx: Context) -> RateLimit:
    config = ctx.config
    return RateLimit(
        config.rate_limit_msgs_per_s,
        config.rate_limit_burst,
        config.rate_limit_bytes_per_s,
        max_message_bytes=config.max_message_bytes,
        max_rejected=config.rate_limit_max_rejected,
        window_s=RATE_LIMIT_WINDOW_S,
        now=ctx.clock(),
    )


def _rate_limited_error(wait: float, id: protocol.MessageId = None) -> str:
    return protocol.error(
        "rate_limited",
        "too many messages; slow down",
        id,
        retry_after_ms=max(1, round(wait * 1000)),
    )


class _Base:
    """What both handlers share: the outbox, the rate limit, how replies are sent."""

    __slots__ = ("ctx", "limit", "outbox")

    def __init__(self, ctx: Context, outbox: Outbox) -> None:
        self.ctx = ctx
        self.outbox = outbox
        self.limit = _rate_limit(ctx)

    def send(self, frame: bytes) -> None:
        """A frame for this client that is never dropped: a client that reads nothing is closed."""
        disconnect = self.outbox.push(frame, "reply")
        if disconnect is not None:
            self.outbox.kill(disconnect)

    def reply(self, text: str) -> None:
        self.send(protocol.text_frame(text.encode()))

    def refused(self, size: int, message: str | bytes) -> bool:
        """Count a received message; whether the rate limit refuses it (answered here)."""
        metrics = self.ctx.metrics
        metrics.received(size)
        if self.outbox.closed:
            return True  # closing: what the client still sends is not acted on
        wait = self.limit.check(self.ctx.clock(), size)
        if not wait:
            return False
        self.rate_limited(wait, _peek_id(message))
        return True

    def rate_limited(self, wait: float, id: protocol.MessageId) -> None:
        """Answer a message a rate limit refused; close the connection past the abuse threshold."""
        metrics = self.ctx.metrics
        metrics.rate_limit_refused()
        if self.limit.exceeded:
            self.outbox.close(RATE_LIMITED)
        else:
            metrics.protocol_error("rate_limited")
            self.reply(_rate_limited_error(wait, id))


class Echo(_Base):
    """``/ws/echo``: every message back as it came, text or binary.

    The connection's rate limits apply as on ``/ws``: a message over them is
    answered with a ``rate_limited`` error (a text frame) instead of its echo,
    and too many of those close the connection 1008.
    """

    __slots__ = ()

    def open(self) -> None:
        pass

    def received(self, message: str | bytes) -> None:
        payload = message.encode() if isinstance(message, str) else message
        if self.refused(len(payload), b""):
            return
        if isinstance(message, str):
            self.send(protocol.text_frame(payload))
        else:
            self.send(protocol.binary_frame(payload))

    def closed(self) -> None:
        pass


class Session(_Base):
    """The room protocol on ``/ws`` for one connection."""

    __slots__ = ("conn_id", "joining", "publish_limits", "rooms", "state")

    def __init__(self, ctx: Context, state: ServerState, outbox: Outbox, conn_id: str) -> None:
        super().__init__(ctx, outbox)
        self.state = state
        # The id says which gateway process holds the connection (its node),
        # so that the backend's moderation reaches it; an id that has a dot
        # is already routable.
        self.conn_id = conn_id if "." in conn_id or not ctx.node else f"{ctx.node}.{conn_id}"
        # Room -> this connection's policy there, and when the join took
        # effect (epoch ms; 0 while it waits for the broker).
        self.rooms: dict[str, tuple[str, int]] = {}
        # Rooms whose join waits for the broker -> the ids to acknowledge then
        # (None while there are none: most connections, most of the time).
        self.joining: dict[str, list[protocol.MessageId]] | None = None
        # Namespace (its index) -> this connection's publish bucket there.
        self.publish_limits: dict[int, TokenBucket] | None = None

    def error(self, code: str, message: str, id: protocol.MessageId = None, **extra: Any) -> None:
        self.ctx.metrics.protocol_error(code)
        self.reply(protocol.error(code, message, id, **extra))

    def open(self) -> None:
        ctx = self.ctx
        self.state.session_started(self)
        self.reply(
            protocol.hello(self.conn_id, ctx.server_name, ctx.hello_limits, **ctx.hello_extra)
        )

    def closed(self) -> None:
        self.state.session_ended(self)
        hub = self.ctx.hub
        for room in list(self.rooms):
            hub.leave(room, self.outbox)
        self.rooms.clear()

    # Moderation (the backend, through the publish API: moderation.py).

    def kick(self, code: int, reason: str) -> None:
        """Close with the backend's code and reason, after what is queued; counted ``kicked``."""
        self.outbox.close(dataclasses.replace(KICKED, code=code, reason=reason))

    def remove(self, room: str, reason: str) -> bool:
        """Leave ``room`` and tell the client (``removed``); False when not a member."""
        if room not in self.rooms or self.outbox.closed:
            return False
        del self.rooms[room]
        # A join still waiting for the broker is acknowledged first (hub.leave).
        self.ctx.hub.leave(room, self.outbox)
        self.reply(protocol.removed(room, reason))
        return True

    def received(self, message: str | bytes) -> Awaitable[None] | None:
        started = time.perf_counter()
        size = len(message) if isinstance(message, bytes) else len(message.encode())
        if self.refused(size, message):
            return None
        if isinstance(message, bytes):
            self.error("bad_message", "binary frames are not supported; send JSON text")
            return None
        try:
            msg = protocol.parse(message)
        except ProtocolError as exc:
            self.error(exc.code, exc.message, exc.id)
            return None
        try:
            if isinstance(msg, protocol.Publish):
                return self.publish(msg, started)
            if isinstance(msg, protocol.Join):
                self.join(msg)
            elif isinstance(msg, protocol.Leave):
                self.leave(msg)
            else:
                self.reply(protocol.pong(msg.id))
        except Exception:
            self._failed(msg.id)
        return None

    def _failed(self, id: protocol.MessageId) -> None:
        # A bug handling one message costs that message, not the connection;
        # the log has the traceback.
        self.ctx.log.exception("message_failed", conn_id=self.conn_id)
        self.error("internal", "the gateway failed to handle this message", id)

    def join(self, msg: protocol.Join) -> None:
        config = self.ctx.config
        hub = self.ctx.hub
        if self.state.draining:
            self.error("draining", "the gateway is restarting; reconnect", msg.id)
            return
        waiting = self.joining.get(msg.room) if self.joining else None
        if waiting is not None:
            waiting.append(msg.id)  # answered with the first join
            return
        rules = hub.namespaces.rules_for(msg.room)
        if rules is None:
            self.error("unknown_namespace", _unknown_namespace(msg.room), msg.id)
            return
        joined = self.rooms.get(msg.room)
        if joined is not None:
            # Joining twice is acknowledged and changes nothing.
            if msg.id is not None:
                self._ack_join(msg.id, msg.room, hub.members(msg.room), joined[0], rules)
            return
        if not rules.join:
            self.error(
                "join_not_allowed", f"clients may not join rooms of {_described(rules)}", msg.id
            )
            return
        policy = msg.policy or rules.policy
        if policy not in rules.policies:
            self.error(
                "policy_not_allowed",
                f"policies allowed in {_described(rules)}: " + ", ".join(rules.policies),
                msg.id,
            )
            return
        if len(self.rooms) >= config.max_rooms_per_connection:
            self.error(
                "too_many_rooms",
                f"at most {config.max_rooms_per_connection} rooms per connection",
                msg.id,
            )
            return
        if rules.max_members and hub.occupancy(msg.room) >= rules.max_members:
            self.error(
                "room_full",
                f"{msg.room} has its {rules.max_members} members on this gateway process",
                msg.id,
            )
            return
        if msg.room not in hub.rooms and len(hub.rooms) >= config.max_rooms:
            self.error(
                "room_limit", "the gateway holds as many rooms as it may; retry later", msg.id
            )
            return
        self.rooms[msg.room] = (policy, 0)
        if self.joining is None:
            self.joining = {}
        self.joining[msg.room] = [msg.id]
        # Acknowledged once the room is live: at once with one process, once
        # Redis confirmed the subscription with workers.
        hub.join(
            msg.room, self.outbox, policy, functools.partial(self._joined, msg.room, policy, rules)
        )

    def _joined(self, room: str, policy: str, rules: Rules, members: int | None) -> None:
        ids = self.joining.pop(room, []) if self.joining else []
        if not self.joining:
            self.joining = None
        if members is None:
            self.rooms.pop(room, None)
            for id in ids:
                self.error("unavailable", "the gateway could not join the room now; retry", id)
            return
        if room in self.rooms:
            self.rooms[room] = (policy, time.time_ns() // 1_000_000)
        for id in ids:
            if id is not None:
                self._ack_join(id, room, members, policy, rules)

    def _ack_join(
        self, id: protocol.MessageId, room: str, members: int, policy: str, rules: Rules
    ) -> None:
        # The rules that apply, so that a client can adapt (who may publish...).
        self.reply(
            protocol.ack(id, room=room, members=members, policy=policy, rules=rules.described)
        )

    def leave(self, msg: protocol.Leave) -> None:
        if msg.room not in self.rooms:
            self.error("not_joined", f"not a member of {msg.room}", msg.id)
            return
        del self.rooms[msg.room]
        members = self.ctx.hub.leave(msg.room, self.outbox)
        if msg.id is not None:
            self.reply(protocol.ack(msg.id, room=msg.room, members=members))

    def publish(self, msg: protocol.Publish, started: float) -> Awaitable[None] | None:
        config = self.ctx.config
        if self.state.draining:
            self.error("draining", "the gateway is restarting; reconnect", msg.id)
            return None
        rules = self.ctx.hub.namespaces.rules_for(msg.room)
        if rules is None:
            self.error("unknown_namespace", _unknown_namespace(msg.room), msg.id)
            return None
        if rules.publish == "api":
            self.error(
                "publish_not_allowed",
                f"only the backend publishes to rooms of {_described(rules)}; nothing was "
                "published",
                msg.id,
            )
            return None
        if rules.publish == "members" and msg.room not in self.rooms:
            self.error("not_joined", f"join {msg.room} before publishing to it", msg.id)
            return None
        if (
            len(msg.data) + len(msg.room) + protocol.MESSAGE_ENVELOPE_BYTES
            > config.max_message_bytes
        ):
            # Members may hold the same size limit as the gateway: never send
            # them a message they would have to refuse.
            self.error(
                "message_too_large",
                f"the message to members would exceed {config.max_message_bytes} bytes",
                msg.id,
            )
            return None
        if rules.publish_rate_per_s:
            wait = self._publish_bucket(rules).take(self.ctx.clock())
            if wait:
                # Counted as the connection's own limit counts a refusal.
                self.limit.note_refused(self.ctx.clock())
                self.rate_limited(wait, msg.id)
                return None
        try:
            pending = self.ctx.hub.submit(msg.room, msg.data, started=started)
        except BrokerUnavailable:
            self._published(msg, None)
            return None
        if isinstance(pending, asyncio.Future) and pending.done():
            # Numbered and fanned out already (this process alone): answer now.
            self._published(msg, pending)
            return None
        return self._wait_published(msg, pending)

    def _publish_bucket(self, rules: Rules) -> TokenBucket:
        """This connection's publish bucket in ``rules``' namespace, made on first use."""
        if self.publish_limits is None:
            self.publish_limits = {}
        bucket = self.publish_limits.get(rules.index)
        if bucket is None:
            bucket = self.publish_limits[rules.index] = TokenBucket(
                rules.publish_rate_per_s, rules.publish_burst, self.ctx.clock()
            )
        return bucket

    async def _wait_published(self, msg: protocol.Publish, pending: Awaitable[int]) -> None:
        future = asyncio.ensure_future(pending)
        await asyncio.wait((future,))
        self._published(msg, future)

    def _published(self, msg: protocol.Publish, outcome: asyncio.Future[int] | None) -> None:
        """Answer a publish: its ``seq``, or why it failed (``None``: not even sent)."""
        try:
            if outcome is None:
                raise BrokerUnavailable
            seq = outcome.result()
        except BrokerUnavailable:
            self.error("unavailable", "not published: publishing is unavailable; retry", msg.id)
        except BrokerOutcomeUnknown:
            self.error(
                "outcome_unknown",
                "the broker did not confirm the publication in time; it may have been published",
                msg.id,
            )
        except Exception:
            self._failed(msg.id)
        else:
            if msg.id is not None:
                self.reply(protocol.ack(msg.id, room=msg.room, seq=seq))


def _described(rules: Rules) -> str:
    return "the default namespace" if rules.index == 0 else f"namespace {rules.name}"


def _unknown_namespace(room: str) -> str:
    return f"{room.partition(':')[0]} is not a namespace of this gateway"


def _peek_id(message: str | bytes) -> protocol.MessageId:
    """The id of a message refused before parsing, when it is cheap to find."""
    if isinstance(message, bytes) or len(message) > 4096:
        return None
    try:
        return protocol.parse(message).id
    except ProtocolError as exc:
        return exc.id
