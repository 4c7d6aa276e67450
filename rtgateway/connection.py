"""One client connection over websockets' asyncio layer: the only home of its internals.

:class:`GatewayConnection` extends websockets' ``ServerConnection`` with what
the outbox needs (flush on ``resume_writing``, a close frame sent without
awaiting), a guard on the transport's write buffer, socket accounting and
admission (``admission.py``), and the bare-LF refusal. It relies on these
websockets internals, tested with websockets 17 (pinned in pyproject.toml):
``protocol`` (``send_close``, ``reject``, ``send_response``, ``state``,
``close_sent``/``close_rcvd``, ``handshake_exc``), ``send_data()``,
``close_deadline``, ``paused``, and ``request``/``response``.

:func:`serve_connection` is the lifecycle of one accepted WebSocket, in the
shape of websockets' own handler: register, drive the endpoint's
:class:`~rtgateway.session.Handler` (the room protocol or the echo) with every
message, and in ``finally`` close the handler, forget the outbox and count the
disconnect (``errors.Disconnect``). Nothing here writes to a socket except
through the connection's :class:`~rtgateway.outbox.Outbox`, and nothing
outside this module knows it runs on websockets' asyncio connection.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import socket
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, InvalidMessage
from websockets.protocol import OPEN

from .admission import address_key
from .errors import (
    ABORTED,
    CLIENT_CLOSE,
    INTERNAL_ERROR,
    WRITE_BUFFER,
    Disconnect,
    by_close_code,
)
from .outbox import Outbox
from .session import Echo, Handler, Session
from .state import Context, ServerState

__all__ = ["GatewayConnection", "serve_connection"]


class GatewayConnection(ServerConnection):
    """websockets' connection, with the hooks the outbox and the limits need.

    Made by the factory the gateway gives websockets' ``serve``
    (``functools.partial(GatewayConnection, ctx=..., state=...)``).
    """

    def __init__(self, *args: Any, ctx: Context, state: ServerState, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ctx = ctx
        self.server_state = state
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
        state = self.server_state
        self.made_at = self.loop.time()
        state.sockets.add(self)
        peer = self.transport.get_extra_info("peername")
        self.address = address_key(peer[0]) if peer else "?"
        admission = state.admission
        if len(state.sockets) > state.limits.max_sockets:
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
            self.ctx.config.first_byte_timeout_s, self.reject, "first_byte_timeout"
        )
        sndbuf = self.ctx.config.socket_sndbuf_bytes
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
        self.ctx.metrics.handshake_rejected(reason)
        self._admitted()
        self.server_state.sockets.discard(self)
        self.transport.abort()

    def abort(self) -> None:
        """Drop the TCP connection now, without a close frame (``state.Socket``)."""
        self.transport.abort()

    def _admitted(self) -> None:
        """No longer pending: the request head is read, or the socket is gone."""
        if self.first_byte_handle is not None:
            self.first_byte_handle.cancel()
            self.first_byte_handle = None
        if self.pending:
            self.pending = False
            self.server_state.admission.done(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.server_state.sockets.discard(self)
        self._admitted()
        if self.counted:
            self.counted = False
            self.server_state.admission.closed(self.address)
        if self.abort_handle is not None:
            self.abort_handle.cancel()
            self.abort_handle = None
        if self.request is None and self.rejected is None:
            metrics = self.ctx.metrics
            if self.loop.time() - self.made_at >= self.ctx.config.open_timeout_s * 0.95:
                metrics.handshake_rejected("timeout")
            elif self.protocol.handshake_exc is not None:
                metrics.handshake_rejected("bad_request")

    def data_received(self, data: bytes) -> None:
        if self.head_tail is not None:  # the request head is still coming
            if not self.spoke:
                self.spoke = True
                if self.first_byte_handle is not None:
                    self.first_byte_handle.cancel()
                    self.first_byte_handle = None
                if self.pending:
                    self.server_state.admission.spoke(self)
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
        if self.transport.get_write_buffer_size() > self.server_state.limits.max_write_buffer_bytes:
            if self.outbox is not None:
                self.outbox.discard()
                self.outbox.disconnect = WRITE_BUFFER
            self.transport.abort()

    def _bare_lf(self, data: bytes) -> bool:
        """Whether the request head so far has a LF without its CR.

        websockets closes such a request without an answer; it gets a 400
        here, as on the API port (see ``http11._Connection._read_head`` for why it is
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
        response.headers["Server"] = self.ctx.server_name
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
                self.ctx.config.close_timeout_s, self.transport.abort
            )


def disconnect_of(conn: GatewayConnection, outbox: Outbox) -> Disconnect:
    """Why a connection ended: the gateway's own reason, else what websockets sent or got."""
    if outbox.disconnect is not None:
        return outbox.disconnect
    sent = conn.protocol.close_sent
    if sent is not None:
        by_code = by_close_code(sent.code, sent.reason)
        if by_code is not None:
            return by_code
    if conn.protocol.close_rcvd is not None:
        return CLIENT_CLOSE
    return ABORTED


async def serve_connection(ctx: Context, state: ServerState, conn: GatewayConnection) -> None:
    """The handler websockets runs for each connection after the handshake."""
    metrics = ctx.metrics
    config = ctx.config
    outbox = Outbox(
        conn,
        ctx.flusher,
        metrics,
        max_messages=config.outbox_max_messages,
        max_bytes=config.outbox_max_bytes,
    )
    conn.outbox = outbox
    conn_id = secrets.token_urlsafe(9)
    peer = _peer(conn)
    # The logger is bound per connection when it is used, not kept for the
    # connection's lifetime: 0.5 KiB per connection, on 10k idle ones.
    log = functools.partial(_bound, ctx, conn_id, peer)
    state.session_opened(outbox)
    metrics.connection_opened()
    path = conn.request.path.partition("?")[0] if conn.request else ""
    log().debug("connection_open", path=path)
    # The handshake's headers (about 3 KiB) would otherwise live as long as
    # the connection: websockets' parser keeps the request object too.
    if conn.request is not None:
        conn.request.headers.clear()
    conn.response = None
    handler: Handler = (
        Echo(ctx, outbox) if path == "/ws/echo" else Session(ctx, state, outbox, conn_id)
    )
    try:
        handler.open()
        flusher = ctx.flusher
        async for message in conn:
            pending = handler.received(message)
            if pending is not None:
                await pending
            # websockets hands over queued messages without yielding: a burst
            # of heavy ones is spread over loop iterations (outbox.py).
            if flusher.heavy:
                await flusher.relieve()
    except ConnectionClosed:
        pass
    except Exception:
        log().exception("connection_failed")
        outbox.kill(INTERNAL_ERROR)
    finally:
        handler.closed()
        state.session_closed(outbox)
        outbox.discard()
        disconnect = disconnect_of(conn, outbox)
        metrics.connection_closed(disconnect)
        log().debug("connection_closed", reason=disconnect.label, code=conn.close_code)


def _bound(ctx: Context, conn_id: str, peer: str) -> Any:
    return ctx.log.bind(conn_id=conn_id, peer=peer)


def _peer(conn: GatewayConnection) -> str:
    try:
        host, port = conn.remote_address[:2]
    except (TypeError, ValueError):
        return "?"
    return f"{host}:{port}"
