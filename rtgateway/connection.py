"""One client connection: the websockets connection subclass and the session.

:class:`GatewayConnection` extends websockets' server connection with what the
outbox needs (flush on ``resume_writing``, a close frame sent without awaiting),
a guard on the transport's write buffer, and socket accounting.

:func:`serve_connection` is the lifecycle of one accepted WebSocket: register,
run the endpoint (:class:`Session` for the room protocol, :func:`echo`),
and in ``finally`` leave every room, forget the outbox and count the
disconnect by reason. Nothing here writes to a socket except through the
connection's :class:`~rtgateway.outbox.Outbox`.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import socket
import time
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, InvalidMessage
from websockets.protocol import OPEN

from . import protocol
from .admission import address_key
from .outbox import Outbox
from .ratelimit import RateLimit
from .rooms import BrokerOutcomeUnknown, BrokerUnavailable

if TYPE_CHECKING:
    from .app import Gateway
    from .config import Config

__all__ = ["GatewayConnection", "Session", "echo", "serve_connection"]

# Close codes (RFC 6455 §7.4.1, and the private range 4000-4999 for ours).
POLICY_VIOLATION = 1008
INTERNAL_ERROR = 1011
SERVICE_RESTART = 1012
RATE_LIMIT_WINDOW_S = 10.0
# Bytes a publication's message adds around its data: the JSON keys, a seq and
# a ts of up to 20 digits each.
MESSAGE_ENVELOPE_BYTES = len(b'{"op":"message","room":"","seq":,"ts":,"data":}') + 40


class GatewayConnection(ServerConnection):
    """websockets' connection, with the hooks the outbox and the limits need."""

    gateway: Gateway  # set on the subclass that Gateway.start() creates

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outbox: Outbox | None = None
        self.made_at = 0.0
        self.abort_handle: asyncio.TimerHandle | None = None
        # The last bytes of the request head read so far; None once it is whole.
        self.head_tail: bytes | None = b""
        # Admission (admission.py): the source address its limits count
        # against, whether it has sent a byte, whether its head is still
        # pending, whether it counts as a WebSocket of its address.
        self.address = ""
        self.spoke = False
        self.pending = False
        self.counted = False
        self.first_byte_handle: asyncio.TimerHandle | None = None
        self.rejected: str | None = None  # why the gateway dropped it before a handshake

    # Accounting: every accepted socket, handshake done or not.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        gateway = self.gateway
        self.made_at = self.loop.time()
        gateway.connections.add(self)
        peer = self.transport.get_extra_info("peername")
        self.address = address_key(peer[0]) if peer else "?"
        admission = gateway.admission
        if len(gateway.connections) > gateway.max_sockets:
            # Past the descriptors kept for sockets: make room by dropping a
            # socket that has not finished its handshake, or close this one
            # now rather than run into EMFILE.
            if not admission.pending:
                self.reject("fd_limit")
                return
            admission.oldest().reject("pending_evicted")
        self.pending = True
        victim = admission.admit(self)
        if victim is not None:
            victim[0].reject(victim[1])
        self.first_byte_handle = self.loop.call_later(
            gateway.config.first_byte_timeout_s, self.reject, "first_byte_timeout"
        )
        sndbuf = gateway.config.socket_sndbuf_bytes
        if sndbuf:
            # Bounds the kernel's share of a slow consumer's backlog (Linux
            # otherwise grows it up to net.ipv4.tcp_wmem's maximum, 4 MiB).
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)

    def reject(self, reason: str) -> None:
        """Drop this socket before its handshake is done, counted under ``reason``."""
        if self.rejected is not None or self.request is not None:
            return
        self.rejected = reason
        self.gateway.metrics.handshake_rejected(reason)
        self._admitted()
        self.gateway.connections.discard(self)
        self.transport.abort()

    def _admitted(self) -> None:
        """No longer pending: the request head is read, or the socket is gone."""
        if self.first_byte_handle is not None:
            self.first_byte_handle.cancel()
            self.first_byte_handle = None
        if self.pending:
            self.pending = False
            self.gateway.admission.done(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        gateway = self.gateway
        gateway.connections.discard(self)
        self._admitted()
        if self.counted:
            self.counted = False
            gateway.admission.closed(self.address)
        if self.abort_handle is not None:
            self.abort_handle.cancel()
            self.abort_handle = None
        if self.request is None and self.rejected is None:
            if self.loop.time() - self.made_at >= gateway.config.open_timeout_s * 0.95:
                gateway.metrics.handshake_rejected("timeout")
            elif self.protocol.handshake_exc is not None:
                gateway.metrics.handshake_rejected("bad_request")

    def data_received(self, data: bytes) -> None:
        if self.head_tail is not None:  # the request head is still coming
            if not self.spoke:
                self.spoke = True
                if self.first_byte_handle is not None:
                    self.first_byte_handle.cancel()
                    self.first_byte_handle = None
                if self.pending:
                    self.gateway.admission.spoke(self)
            if self._bare_lf(data):
                self._refuse(400, "lines must end with CRLF\n")
                return
        super().data_received(data)
        if self.pending and self.request is not None:
            self._admitted()
        # websockets sets close_deadline when it fails the connection or
        # answers a close frame here, but only a pending send enforces it: a
        # peer that never closes TCP would hold the socket until a keepalive
        # ping, or forever without keepalive.
        if (
            self.close_deadline is not None
            and self.abort_handle is None
            and not self.transport.is_closing()
        ):
            self.abort_handle = self.loop.call_at(self.close_deadline, self.transport.abort)
        # websockets answers pings inside data_received, bypassing any write
        # limit: a peer that sends pings and never reads would grow this
        # buffer without bound.
        if self.transport.get_write_buffer_size() > self.gateway.max_write_buffer_bytes:
            if self.outbox is not None:
                self.outbox.discard()
                self.outbox.close_reason = "write_buffer"
            self.transport.abort()

    def _bare_lf(self, data: bytes) -> bool:
        """Whether the request head so far has a LF without its CR.

        websockets closes such a request without an answer; it gets a 400
        here, as on the API port (see ``http11._read_lines`` for why it is
        refused rather than read as nginx does).
        """
        assert self.head_tail is not None
        seen = self.head_tail
        joined = seen + data
        end = joined.find(b"\r\n\r\n")
        head = joined if end == -1 else joined[: end + 4]
        self.head_tail = None if end != -1 else head[-3:]
        # LFs without a CR before them, in the new bytes (the tail was checked).
        bare = head.count(b"\n") - head.count(b"\r\n")
        return bare > seen.count(b"\n") - seen.count(b"\r\n")

    def _refuse(self, status: int, text: str) -> None:
        """Answer a request head that websockets would not read, and close."""
        self.head_tail = None  # whatever else comes is websockets' to discard
        self.protocol.handshake_exc = InvalidMessage(text.strip())
        response = self.protocol.reject(status, text)
        response.headers["Server"] = self.gateway.server_name
        self.protocol.send_response(response)
        self.send_data()
        self.transport.close()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.outbox is not None:
            self.outbox.flush()

    # What the outbox needs.

    def is_open(self) -> bool:
        return self.protocol.state is OPEN and not self.transport.is_closing()

    def send_close(self, code: int, reason: str) -> None:
        """Send a close frame now, without awaiting; abort if the peer never answers."""
        if self.protocol.state is OPEN:
            self.protocol.send_close(code, reason)
            self.send_data()
        if self.abort_handle is None and not self.transport.is_closing():
            self.abort_handle = self.loop.call_later(
                self.gateway.config.close_timeout_s, self.transport.abort
            )


def _disconnect_reason(conn: GatewayConnection, outbox: Outbox) -> str:
    if outbox.close_reason is not None:
        return outbox.close_reason
    sent = conn.protocol.close_sent
    if sent is not None:
        if sent.code == 1009:
            return "message_too_large"
        if sent.code in (1002, 1003, 1007):
            return "protocol_error"
        if sent.code == INTERNAL_ERROR and "keepalive" in sent.reason:
            return "ping_timeout"
    if conn.protocol.close_rcvd is not None:
        return "client_close"
    return "aborted"


async def serve_connection(gateway: Gateway, conn: GatewayConnection) -> None:
    """The handler websockets runs for each connection after the handshake."""
    metrics = gateway.metrics
    outbox = Outbox(
        conn,
        gateway.flusher,
        metrics,
        max_messages=gateway.config.outbox_max_messages,
        max_bytes=gateway.config.outbox_max_bytes,
    )
    conn.outbox = outbox
    conn_id = secrets.token_urlsafe(9)
    peer = _peer(conn)
    # The logger is bound per connection when it is used, not kept for the
    # connection's lifetime: 0.5 KiB per connection, on 10k idle ones.
    log = functools.partial(_bound, gateway, conn_id, peer)
    gateway.outboxes.add(outbox)
    metrics.connection_opened()
    path = conn.request.path.partition("?")[0] if conn.request else ""
    log().debug("connection_open", path=path)
    # The handshake's headers (about 3 KiB) would otherwise live as long as
    # the connection: websockets' parser keeps the request object too.
    if conn.request is not None:
        conn.request.headers.clear()
    conn.response = None
    try:
        if path == "/ws/echo":
            await echo(conn, outbox)
        else:
            await Session(gateway, conn, outbox, conn_id).run()
    except ConnectionClosed:
        pass
    except Exception:
        log().exception("connection_failed")
        outbox.kill(INTERNAL_ERROR, "internal error", "error")
    finally:
        gateway.outboxes.discard(outbox)
        if not gateway.outboxes:
            gateway.sessions_done.set()
        outbox.discard()
        reason = _disconnect_reason(conn, outbox)
        metrics.connection_closed(reason)
        log().debug("connection_closed", reason=reason, code=conn.close_code)


def _bound(gateway: Gateway, conn_id: str, peer: str) -> Any:
    return gateway.log.bind(conn_id=conn_id, peer=peer)


def _peer(conn: GatewayConnection) -> str:
    try:
        host, port = conn.remote_address[:2]
    except (TypeError, ValueError):
        return "?"
    return f"{host}:{port}"


def _rate_limit(config: Config, now: float) -> RateLimit:
    return RateLimit(
        config.rate_limit_msgs_per_s,
        config.rate_limit_burst,
        config.rate_limit_bytes_per_s,
        max_message_bytes=config.max_message_bytes,
        max_rejected=config.rate_limit_max_rejected,
        window_s=RATE_LIMIT_WINDOW_S,
        now=now,
    )


def rate_limited_error(wait: float, id: protocol.MessageId = None) -> str:
    return protocol.error(
        "rate_limited",
        "too many messages; slow down",
        id,
        retry_after_ms=max(1, round(wait * 1000)),
    )


async def echo(conn: GatewayConnection, outbox: Outbox) -> None:
    """``/ws/echo``: every message back as it came, text or binary.

    The connection's rate limits apply as on ``/ws``: a message over them is
    answered with a ``rate_limited`` error (a text frame) instead of its echo,
    and too many of those close the connection 1008.
    """
    gateway = conn.gateway
    metrics = gateway.metrics
    limit = _rate_limit(gateway.config, conn.loop.time())
    async for message in conn:
        payload = message.encode() if isinstance(message, str) else message
        metrics.received(len(payload))
        if outbox.closed:
            continue  # closing: nothing more is echoed
        wait = limit.check(conn.loop.time(), len(payload))
        if wait:
            metrics.rate_limited += 1
            if limit.exceeded:
                outbox.close(POLICY_VIOLATION, "rate limit exceeded", "rate_limited")
            else:
                metrics.protocol_error("rate_limited")
                outbox.push(protocol.text_frame(rate_limited_error(wait).encode()), "reply")
            continue
        if isinstance(message, str):
            outbox.push(protocol.text_frame(payload), "reply")
        else:
            outbox.push(protocol.binary_frame(payload), "reply")
        if gateway.flusher.heavy:
            await gateway.flusher.relieve()


class Session:
    """The room protocol on ``/ws`` for one connection."""

    __slots__ = (
        "config",
        "conn",
        "conn_id",
        "gateway",
        "hub",
        "joining",
        "limit",
        "outbox",
        "rooms",
    )

    def __init__(
        self, gateway: Gateway, conn: GatewayConnection, outbox: Outbox, conn_id: str
    ) -> None:
        self.gateway = gateway
        self.config = gateway.config
        self.hub = gateway.hub
        self.conn = conn
        self.outbox = outbox
        self.conn_id = conn_id
        self.rooms: dict[str, str] = {}  # room -> this connection's policy there
        # Rooms whose join waits for the broker -> the ids to acknowledge then.
        self.joining: dict[str, list[protocol.MessageId]] = {}
        self.limit = _rate_limit(self.config, conn.loop.time())

    def reply(self, text: str) -> None:
        self.outbox.push(protocol.text_frame(text.encode()), "reply")

    def error(self, code: str, message: str, id: protocol.MessageId = None, **extra: Any) -> None:
        self.gateway.metrics.protocol_error(code)
        self.reply(protocol.error(code, message, id, **extra))

    async def run(self) -> None:
        gateway = self.gateway
        self.reply(
            protocol.hello(
                self.conn_id, gateway.server_name, gateway.hello_limits, **gateway.hello_extra
            )
        )
        try:
            flusher = gateway.flusher
            async for message in self.conn:
                await self.handle(message)
                # websockets hands over queued messages without yielding: a
                # burst of heavy publications is spread over iterations.
                if flusher.heavy:
                    await flusher.relieve()
        finally:
            for room in list(self.rooms):
                self.hub.leave(room, self.outbox)
            self.rooms.clear()

    async def handle(self, message: str | bytes) -> None:
        started = time.perf_counter()
        size = len(message) if isinstance(message, bytes) else len(message.encode())
        self.gateway.metrics.received(size)
        if self.outbox.closed:
            return  # closing: what the client still sends is not acted on
        wait = self.limit.check(self.conn.loop.time(), size)
        if wait:
            self.gateway.metrics.rate_limited += 1
            if self.limit.exceeded:
                self.outbox.close(POLICY_VIOLATION, "rate limit exceeded", "rate_limited")
                return
            self.gateway.metrics.protocol_error("rate_limited")
            self.reply(rate_limited_error(wait, _peek_id(message)))
            return
        if isinstance(message, bytes):
            self.error("bad_message", "binary frames are not supported; send JSON text")
            return
        try:
            msg = protocol.parse(message)
        except protocol.ProtocolError as exc:
            self.error(exc.code, exc.message, exc.id)
            return
        try:
            if isinstance(msg, protocol.Publish):
                await self.publish(msg, started)
            elif isinstance(msg, protocol.Join):
                self.join(msg)
            elif isinstance(msg, protocol.Leave):
                self.leave(msg)
            else:
                self.reply(protocol.pong(msg.id))
        except ConnectionClosed:
            raise
        except Exception:
            # A bug handling one message costs that message, not the
            # connection; the log has the traceback.
            self.gateway.log.exception("message_failed", conn_id=self.conn_id)
            self.error("internal", "the gateway failed to handle this message", msg.id)

    def join(self, msg: protocol.Join) -> None:
        if self.gateway.draining:
            self.error("draining", "the gateway is restarting; reconnect", msg.id)
            return
        waiting = self.joining.get(msg.room)
        if waiting is not None:
            waiting.append(msg.id)  # answered with the first join
            return
        joined = self.rooms.get(msg.room)
        if joined is not None:
            # Joining twice is acknowledged and changes nothing.
            if msg.id is not None:
                members = self.hub.members(msg.room)
                self.reply(protocol.ack(msg.id, room=msg.room, members=members, policy=joined))
            return
        policy = msg.policy or self.config.slow_consumer_policy
        if policy not in self.config.slow_consumer_policies:
            self.error(
                "policy_not_allowed",
                "allowed policies: " + ", ".join(self.config.slow_consumer_policies),
                msg.id,
            )
            return
        if len(self.rooms) >= self.config.max_rooms_per_connection:
            self.error(
                "too_many_rooms",
                f"at most {self.config.max_rooms_per_connection} rooms per connection",
                msg.id,
            )
            return
        if msg.room not in self.hub.rooms and len(self.hub.rooms) >= self.config.max_rooms:
            self.error(
                "room_limit", "the gateway holds as many rooms as it may; retry later", msg.id
            )
            return
        self.rooms[msg.room] = policy
        self.joining[msg.room] = [msg.id]
        # Acknowledged once the room is live: at once with one process, once
        # Redis confirmed the subscription with workers.
        on_joined = functools.partial(self._joined, msg.room, policy)
        self.hub.join(msg.room, self.outbox, policy, on_joined)

    def _joined(self, room: str, policy: str, members: int | None) -> None:
        ids = self.joining.pop(room, [])
        if members is None:
            self.rooms.pop(room, None)
            for id in ids:
                self.error("unavailable", "the gateway could not join the room now; retry", id)
            return
        for id in ids:
            if id is not None:
                self.reply(protocol.ack(id, room=room, members=members, policy=policy))

    def leave(self, msg: protocol.Leave) -> None:
        if msg.room not in self.rooms:
            self.error("not_joined", f"not a member of {msg.room}", msg.id)
            return
        del self.rooms[msg.room]
        members = self.hub.leave(msg.room, self.outbox)
        if msg.id is not None:
            self.reply(protocol.ack(msg.id, room=msg.room, members=members))

    async def publish(self, msg: protocol.Publish, started: float) -> None:
        if self.gateway.draining:
            self.error("draining", "the gateway is restarting; reconnect", msg.id)
            return
        if self.config.publish_requires_join and msg.room not in self.rooms:
            self.error("not_joined", f"join {msg.room} before publishing to it", msg.id)
            return
        if len(msg.data) + len(msg.room) + MESSAGE_ENVELOPE_BYTES > self.config.max_message_bytes:
            # Members may hold the same size limit as the gateway: never send
            # them a message they would have to refuse.
            self.error(
                "message_too_large",
                f"the message to members would exceed {self.config.max_message_bytes} bytes",
                msg.id,
            )
            return
        try:
            seq = await self.hub.publish(msg.room, msg.data, started=started)
        except BrokerUnavailable:
            self.error("unavailable", "not published: publishing is unavailable; retry", msg.id)
            return
        except BrokerOutcomeUnknown:
            self.error(
                "outcome_unknown",
                "the broker did not confirm the publication in time; it may have been published",
                msg.id,
            )
            return
        if msg.id is not None:
            self.reply(protocol.ack(msg.id, room=msg.room, seq=seq))


def _peek_id(message: str | bytes) -> protocol.MessageId:
    """The id of a message refused before parsing, when it is cheap to find."""
    if isinstance(message, bytes) or len(message) > 4096:
        return None
    try:
        return protocol.parse(message).id
    except protocol.ProtocolError as exc:
        return exc.id
