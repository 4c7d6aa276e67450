"""One client connection: websockets' sans-I/O protocol under our own asyncio protocol.

:class:`GatewayConnection` is the whole of a connection once it is
accepted: one ``asyncio.Protocol`` object with ``__slots__`` around one
``websockets.server.ServerProtocol`` (which parses frames, validates them,
answers pings and close frames, and does no I/O), the connection's
:class:`~rtgateway.outbox.Outbox` and its :class:`~rtgateway.session.Handler`.
It extends :class:`~rtgateway.handshake.Accepted` (admission and the
handshake). There is no task, queue, future or coroutine per connection, where
websockets' asyncio layer has a reader, a keepalive task, a handler
coroutine, an assembler and two deques:

- frames are parsed in ``data_received``, assembled into messages (at most
  :data:`MAX_FRAGMENTS` fragments and ``max_size`` bytes across them; text
  decoded as UTF-8; else 1009 and 1007) and handed to the handler at once.
  When the handler returns an awaitable (a publication waiting for Redis), or
  after a message that made the flusher ``heavy`` (``outbox.py``), what else
  was parsed is held and reading is paused; hand-over resumes once the
  publication is answered, or on the next loop iteration. One client's
  messages are acted on in order, it cannot make the gateway hold more than
  one read of them, and one read of 16 heavy publications is not fanned out
  in one iteration;
- after the handshake, the outbox writes everything but close frames:
  replies, room frames, and the protocol's pongs and keepalive pings, so a
  ping flood fills the outbox like any other backlog. A pong that does not
  fit resets the connection (``errors.WRITE_BUFFER``: a peer that sends pings
  and reads nothing); a keepalive ping that does not fit is a slow consumer.
  A close frame leaves once the outbox has written what it holds;
- the open, close and keepalive deadlines live on one gateway-wide
  :class:`~rtgateway.wheel.Wheel`, one deadline per connection at a time;
- why a connection ended is known here and counted as its
  :class:`~rtgateway.errors.Disconnect`: the gateway's own reason, else what
  the protocol stopped on (its exception's type, a close frame, EOF).

websockets' internals relied on (websockets 17, pinned in pyproject.toml):
``Protocol.writes`` (checked before ``data_to_send()``: no call per read),
``parser``, ``Protocol.parse`` and ``StreamReader.at_eof`` (the parser is
restarted between frames, after the handshake, at each keepalive ping and at
its pong, so that it keeps neither the request nor the last frame),
``parser_exc``, ``handshake_exc``, ``close_rcvd``.

:class:`Listener` is the WebSocket port: its listening sockets and what every
connection shares (context, state, wheel, and the publications in flight,
which the drain waits for).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections import deque
from typing import Any

from websockets.exceptions import PayloadTooBig, ProtocolError
from websockets.frames import BINARY, CONT, PONG, TEXT, CloseCode, Frame
from websockets.protocol import CONNECTING, OPEN
from websockets.server import ServerProtocol

from .errors import (
    ABORTED,
    CLIENT_CLOSE,
    INTERNAL_ERROR,
    MESSAGE_TOO_LARGE,
    PING_TIMEOUT,
    PROTOCOL_ERROR,
    WRITE_BUFFER,
    Disconnect,
)
from .handshake import Accepted, Port
from .outbox import Outbox
from .session import Echo, Handler, Session
from .state import Context, ServerState
from .wheel import Wheel

__all__ = ["MAX_FRAGMENTS", "GatewayConnection", "Listener", "disconnect_of"]

# Fragments of one message, as websockets' assembler allows (WEBSOCKETS_MAX_FRAGMENTS).
MAX_FRAGMENTS = 4096
# The keepalive ping's payload: a pong that echoes it acknowledges it (RFC 6455 §5.5.3).
PING_PAYLOAD = b"rtg"
# The first byte of a frame the protocol serialized (FIN set, not masked).
_PING_HEAD, _PONG_HEAD, _CLOSE_HEAD = 0x89, 0x8A, 0x88


class GatewayConnection(Accepted):
    """One accepted socket, through its handshake (``Accepted``) and its WebSocket session."""

    __slots__ = ("awaiting_pong", "conn_id", "fragments", "handler", "inbox", "outbox", "paused")

    def __init__(self, port: Port) -> None:
        super().__init__(port)
        self.outbox: Outbox | None = None  # from the upgrade on
        self.handler: Handler | None = None  # from the upgrade until the socket is gone
        self.conn_id = ""
        self.paused = False  # the transport is above its high-water mark
        self.awaiting_pong = False
        # A message arriving in fragments: its frames so far.
        self.fragments: list[Frame] | None = None
        # Messages parsed but not yet handed over (a publication waits, or the
        # rest of a read was put off after a heavy one); None when none are held.
        self.inbox: deque[str | bytes] | None = None

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        if protocol.state is CONNECTING:
            self._handshake_received(data)
            return
        protocol.receive_data(data)
        # Pongs and close frames first, as websockets answers them while it
        # parses: a pong to a ping between two fragments precedes the echo
        # of their message (Autobahn 5.6).
        if protocol.writes:
            self._send_output()
        events = protocol.events_received()
        if events:
            self._frames(events)

    def eof_received(self) -> None:
        # A FIN without a closing handshake fails the connection (1006); the
        # transport closes once this returns.
        self.protocol.receive_eof()
        if self.protocol.writes:
            self._send_output()

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        handler, outbox = self.handler, self.outbox
        if handler is None or outbox is None:
            return
        self.handler = None  # nothing is handed over from now on
        self.inbox = self.fragments = None
        try:
            handler.closed()
        except Exception:
            self._log().exception("connection_failed")
        ctx = self.port.ctx
        self.port.state.session_closed(outbox)
        outbox.discard()
        disconnect = disconnect_of(self.protocol, outbox)
        ctx.metrics.connection_closed(disconnect)
        if self.port.debug:
            self._log().debug(
                "connection_closed", reason=disconnect.label, code=self.protocol.close_code
            )

    def _open(self, path: str) -> None:
        """The upgrade is done: the outbox, the handler, keepalive."""
        port = self.port
        ctx, state = port.ctx, port.state
        config, metrics = ctx.config, ctx.metrics
        outbox = self.outbox = Outbox(
            self,
            ctx.flusher,
            metrics,
            max_messages=config.outbox_max_messages,
            max_bytes=config.outbox_max_bytes,
        )
        # <node>.<token>: the node names this process, for the backend's moderation.
        token = secrets.token_urlsafe(9)
        self.conn_id = f"{ctx.node}.{token}" if ctx.node else token
        state.session_opened(outbox)
        metrics.connection_opened()
        if config.ping_interval_s:
            port.wheel.schedule(self, port.loop.time() + config.ping_interval_s)
        else:
            port.wheel.cancel(self)
        handler: Handler = (
            Echo(ctx, outbox) if path == "/ws/echo" else Session(ctx, state, outbox, self.conn_id)
        )
        self.handler = handler
        if port.debug:
            self._log().debug("connection_open", path=path)
        try:
            handler.open()
        except Exception:
            self._log().exception("connection_failed")
            outbox.kill(INTERNAL_ERROR)

    # Flow control and writing (what the outbox needs: outbox.Writable).

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.outbox is not None:
            self.outbox.flush()

    def is_open(self) -> bool:
        return not self.closing and not self.transport.is_closing()

    def send_close(self, code: int, reason: str) -> None:
        """Send a close frame now (the outbox has written what it holds); abort if unanswered."""
        if self.protocol.state is OPEN:
            self.protocol.send_close(code, reason)
            self._send_output()
        self._closing()

    def _send_output(self) -> None:
        """Write what the protocol has to send: pings and pongs through the outbox, the rest now."""
        transport, outbox = self.transport, self.outbox
        for data in self.protocol.data_to_send():
            if transport.is_closing():
                return
            if not data:  # websockets.protocol.SEND_EOF: half-close
                self._closing()
                if transport.can_write_eof():
                    transport.write_eof()
                else:
                    transport.close()
            elif outbox is not None and (data[0] == _PONG_HEAD or data[0] == _PING_HEAD):
                self._push_control(outbox, data)
            else:  # the handshake's answer, or a close frame
                if outbox is not None and data[0] == _CLOSE_HEAD:
                    outbox.flush()  # what was sent before the close leaves before it
                    self._closing()
                transport.write(data)

    def _push_control(self, outbox: Outbox, frame: bytes) -> None:
        disconnect = outbox.push(frame, "reply")
        if disconnect is None:
            return
        if frame[0] == _PING_HEAD:
            outbox.kill(disconnect)  # our keepalive ping: a slow consumer
            return
        # A pong that does not fit: the peer sends pings and reads nothing. A
        # close frame would wait behind what it does not read.
        outbox.discard()
        outbox.disconnect = WRITE_BUFFER
        self.transport.abort()

    def _fail(self, code: int, reason: str, disconnect: Disconnect) -> None:
        """Fail the WebSocket connection (RFC 6455 §7.1.7) for ``disconnect``."""
        outbox = self.outbox
        if outbox is not None:
            outbox.discard()
            if outbox.disconnect is None:
                outbox.disconnect = disconnect
        self.protocol.fail(code, reason)
        self._send_output()

    # Deadlines (wheel.Timer): one at a time, its meaning given by the state.

    def expire(self, now: float) -> None:
        if self.closing or self.protocol.state is not OPEN:
            super().expire(now)  # the handshake's deadlines, the closing handshake's
        elif self.awaiting_pong:
            self._fail(CloseCode.INTERNAL_ERROR, PING_TIMEOUT.reason, PING_TIMEOUT)
        else:
            config = self.port.ctx.config
            self._restart_parser()  # an idle connection keeps no frame
            self.protocol.send_ping(PING_PAYLOAD)
            self._send_output()
            if config.ping_timeout_s:
                self.awaiting_pong = True
                self.port.wheel.schedule(self, now + config.ping_timeout_s)
            else:
                self.port.wheel.schedule(self, now + config.ping_interval_s)

    def _pong(self, frame: Frame) -> None:
        if self.awaiting_pong and frame.data == PING_PAYLOAD:
            self.awaiting_pong = False
            self._restart_parser()  # it would keep this pong until the next frame
            config = self.port.ctx.config
            if self.deadline is not None and config.ping_interval_s != config.ping_timeout_s:
                # The next ping goes one interval after this one was sent.
                sent = self.deadline - config.ping_timeout_s
                self.port.wheel.schedule(self, sent + config.ping_interval_s)

    # Messages.

    def _frames(self, frames: list[Any]) -> None:
        """Assemble data frames into messages and hand them over (or hold them); note pongs."""
        for frame in frames:
            opcode = frame.opcode
            if opcode is TEXT or opcode is BINARY:
                if not frame.fin:
                    self.fragments = [frame]
                    continue
                try:
                    message = frame.data.decode() if opcode is TEXT else frame.data
                except UnicodeDecodeError as exc:
                    self._invalid_utf8(exc)
                    return
                self._message(message)
            elif opcode is CONT:
                fragments = self.fragments
                assert fragments is not None  # the protocol checks the sequence
                if len(fragments) >= MAX_FRAGMENTS:
                    self._fail(CloseCode.MESSAGE_TOO_BIG, "too many fragments", MESSAGE_TOO_LARGE)
                    return
                fragments.append(frame)
                if frame.fin:
                    self.fragments = None
                    data = b"".join(f.data for f in fragments)
                    try:
                        message = data.decode() if fragments[0].opcode is TEXT else data
                    except UnicodeDecodeError as exc:
                        self._invalid_utf8(exc)
                        return
                    self._message(message)
            elif opcode is PONG:
                self._pong(frame)
            # Pings and close frames: the protocol has answered them.

    def _invalid_utf8(self, exc: UnicodeDecodeError) -> None:
        self._fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}", PROTOCOL_ERROR)

    def _message(self, message: str | bytes) -> None:
        """Hand over one message, or hold it while earlier ones wait."""
        if self.inbox is not None:
            self.inbox.append(message)
        elif self.handler is not None:
            self._hand_over(message)

    def _hand_over(self, message: str | bytes) -> bool:
        handler, outbox = self.handler, self.outbox
        if handler is None or outbox is None:
            return False
        try:
            pending = handler.received(message)
        except Exception:
            self._log().exception("connection_failed")
            outbox.kill(INTERNAL_ERROR)
            return False
        if pending is not None:
            # A publication waits for the broker: the next message waits for it.
            self._hold()
            future = asyncio.ensure_future(pending)
            self.port.track(future)
            future.add_done_callback(self._published)
            return False
        flusher = outbox.flusher
        if flusher.heavy:
            # Let the loop run once (sockets read and written) before the next.
            flusher.heavy = False
            self._hold()
            self.port.loop.call_soon(self._resume)
            return False
        return True

    def _hold(self) -> None:
        if self.inbox is None:
            self.inbox = deque()
            self.transport.pause_reading()

    def _published(self, future: asyncio.Future[None]) -> None:
        if not future.cancelled() and future.exception() is not None:
            exc = future.exception()
            self._log().error("connection_failed", exc_info=exc)
            if self.outbox is not None:
                self.outbox.kill(INTERNAL_ERROR)
        self._resume()

    def _resume(self) -> None:
        """Hand over the held messages, until one has to wait again; then read on."""
        inbox = self.inbox
        if inbox is None or self.handler is None:
            return
        while inbox:
            if not self._hand_over(inbox.popleft()):
                return
        self.inbox = None
        self.transport.resume_reading()

    # Logging: the logger is bound when it is used, not kept per connection.

    def _log(self) -> Any:
        return self.port.ctx.log.bind(conn_id=self.conn_id, peer=_peer(self.transport))


def disconnect_of(protocol: ServerProtocol, outbox: Outbox) -> Disconnect:
    """Why a connection ended: the gateway's own reason, else what the protocol stopped on."""
    if outbox.disconnect is not None:
        return outbox.disconnect
    exc = protocol.parser_exc
    if isinstance(exc, PayloadTooBig):
        return MESSAGE_TOO_LARGE
    if isinstance(exc, (ProtocolError, UnicodeDecodeError)):
        return PROTOCOL_ERROR  # 1002, or 1007 for a close reason that is not UTF-8
    if protocol.close_rcvd is not None:
        return CLIENT_CLOSE
    return ABORTED


def _peer(transport: asyncio.BaseTransport | None) -> str:
    try:
        host, port = transport.get_extra_info("peername")[:2]  # type: ignore[union-attr]
    except (AttributeError, TypeError, ValueError):
        return "?"
    return f"{host}:{port}"


class Listener:
    """The WebSocket port: its listening sockets, and what all its connections share."""

    def __init__(self, ctx: Context, state: ServerState) -> None:
        self.ctx = ctx
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.wheel = Wheel(self.loop)
        # Whether connections log their opening and closing (binding a logger
        # per connection only to drop the event costs CPU and garbage).
        self.debug: bool = ctx.log.bind().is_enabled_for(logging.DEBUG)
        # Publications in flight and asynchronous answers: the drain waits for them.
        self.tasks: set[asyncio.Future[None]] = set()
        self.server: asyncio.Server | None = None

    def track(self, future: asyncio.Future[None]) -> None:
        self.tasks.add(future)
        future.add_done_callback(self.tasks.discard)

    async def start(self, host: str | None, port: int, *, backlog: int, reuse_port: bool) -> None:
        self.server = await self.loop.create_server(
            lambda: GatewayConnection(self),
            host,
            port,
            backlog=backlog,
            reuse_port=reuse_port,
        )

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self.server.sockets) if self.server is not None else []

    async def close(self, timeout_s: float = 2.0) -> bool:
        """Stop listening; whether the listener closed within ``timeout_s``."""
        self.wheel.close()
        if self.server is None:
            return True
        self.server.close()
        try:
            await asyncio.wait_for(self.server.wait_closed(), timeout=timeout_s)
        except TimeoutError:
            return False
        return True
