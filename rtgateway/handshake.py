"""An accepted socket until its WebSocket upgrade: admission, deadlines, the answer.

:class:`Accepted` is the first half of a connection's one object
(``connection.GatewayConnection`` extends it with the WebSocket session): an
``asyncio.Protocol`` with ``__slots__`` around websockets' sans-I/O
``ServerProtocol``, which parses the request head and builds the answers;
nothing here awaits, except the rare answer that must (a worker's host-wide
``/metrics``). In order:

- admission (``admission.py``): the socket counts as pending until its
  request head is read; past the descriptors kept for sockets, or past a
  pending budget, a pending socket is evicted or this one dropped;
- the first-byte deadline, then the open timeout, both from the accept, on
  the listener's :class:`~rtgateway.wheel.Wheel` (one deadline at a time);
- a request head with a bare LF is refused with 400 (websockets would close
  without an answer);
- the request is answered by ``http.process_request`` (health, metrics,
  pages, refusals) or upgraded by websockets' ``accept()``, with a ``Server``
  header and ``http.process_response``'s count of websockets' own refusals:
  the answers websockets' asyncio server gave.

Each refusal is counted once, under its reason (``rtgateway_handshake_rejections_total``).
"""

from __future__ import annotations

import asyncio
import http
import logging
import socket
import sys
from collections.abc import Awaitable
from typing import Any, Protocol, cast

from websockets.exceptions import InvalidMessage
from websockets.http11 import Request, Response
from websockets.protocol import CONNECTING, OPEN
from websockets.protocol import Protocol as SansIO
from websockets.server import ServerProtocol
from websockets.streams import StreamReader

from .admission import address_key
from .http import process_request, process_response
from .outbox import WRITE_THROUGH_BYTES
from .state import Context, ServerState
from .wheel import Wheel

__all__ = ["Accepted", "Port"]

# The code objects of websockets' parser generators (Accepted._restart_parser).
_HANDSHAKE_PARSE = ServerProtocol.parse.__code__
_FRAMES_PARSE = SansIO.parse.__code__
_AT_EOF = StreamReader.at_eof.__code__
# One logger for every ServerProtocol (websockets' asyncio layer wraps it in
# an adapter per connection).
_PROTOCOL_LOG = logging.getLogger("websockets.server")


class Port(Protocol):
    """What a socket needs of the port that accepted it (``connection.Listener``)."""

    ctx: Context
    state: ServerState
    loop: asyncio.AbstractEventLoop
    wheel: Wheel
    debug: bool  # whether connections log their opening and closing

    def track(self, future: asyncio.Future[None]) -> None: ...


class Accepted(asyncio.Protocol):
    """A socket the listener accepted, until its request is answered."""

    __slots__ = (
        "address",
        "closing",
        "counted",
        "deadline",
        "head_tail",
        "pending",
        "port",
        "protocol",
        "rejected",
        "requested",
        "spoke",
        "transport",
    )

    def __init__(self, port: Port) -> None:
        self.port = port
        self.protocol = ServerProtocol(
            max_size=port.ctx.config.max_message_bytes, logger=_PROTOCOL_LOG
        )
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made
        self.deadline: float | None = None  # on the port's wheel (wheel.Timer)
        self.closing = False  # a close frame or EOF was written: TCP should end soon
        # The last bytes of the request head read so far; None once it is whole.
        self.head_tail: bytes | None = b""
        # Admission (admission.py): the source address its limits count
        # against, whether it has sent a byte, whether its head is still
        # pending, whether it counts as a WebSocket of its address.
        self.address = ""
        self.spoke = False
        self.pending = False
        self.counted = False
        self.requested = False  # a request head was parsed
        self.rejected: str | None = None  # why the gateway dropped it, counted

    # What the WebSocket session provides (connection.GatewayConnection).

    def _send_output(self) -> None:
        raise NotImplementedError

    def _open(self, path: str) -> None:
        raise NotImplementedError

    def _frames(self, frames: list[Any]) -> None:
        raise NotImplementedError

    # Accounting: every accepted socket, handshake done or not.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(WRITE_THROUGH_BYTES)
        port = self.port
        config, state = port.ctx.config, port.state
        state.sockets.add(self)
        peer = transport.get_extra_info("peername")
        # Interned: the connections from one address share its string.
        self.address = sys.intern(address_key(peer[0])) if peer else "?"
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
        port.wheel.schedule(self, port.loop.time() + config.first_byte_timeout_s)
        if config.socket_sndbuf_bytes:
            # Bounds the kernel's share of a slow consumer's backlog (Linux
            # otherwise grows it up to net.ipv4.tcp_wmem's maximum, 4 MiB).
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, config.socket_sndbuf_bytes)

    def reject(self, reason: str) -> None:
        """Drop this socket before its request was read, counted under ``reason``."""
        if self.rejected is not None or self.requested:
            return
        self.rejected = reason
        self.port.ctx.metrics.handshake_rejected(reason)
        self._admitted()
        self.port.state.sockets.discard(self)
        self.transport.abort()

    def abort(self) -> None:
        """Drop the TCP connection now, without a close frame (``state.Socket``)."""
        self.transport.abort()

    def _admitted(self) -> None:
        """No longer pending: the request head is read, or the socket is gone."""
        if self.pending:
            self.pending = False
            self.port.state.admission.done(self)

    def _forget(self) -> None:
        """The socket is gone (``connection_lost``): leave the wheel and the books."""
        port = self.port
        port.wheel.cancel(self)
        port.state.sockets.discard(self)
        self._admitted()
        if self.counted:
            self.counted = False
            port.state.admission.closed(self.address)
        self.protocol.receive_eof()  # idempotent; the state becomes CLOSED
        if not self.requested and self.rejected is None and self.protocol.handshake_exc:
            self.rejected = "bad_request"  # refused by the protocol itself, or by _refuse
            port.ctx.metrics.handshake_rejected("bad_request")

    def _closing(self) -> None:
        """A close frame or EOF is out: the TCP connection must end within the close timeout."""
        if not self.closing:
            self.closing = True
            port = self.port
            port.wheel.schedule(self, port.loop.time() + port.ctx.config.close_timeout_s)

    def expire(self, now: float) -> None:
        """The deadline passed (``wheel.Timer``): the closing handshake's, or the handshake's."""
        if self.closing or self.protocol.state is not CONNECTING:
            self.transport.abort()
        elif not self.spoke:
            self.reject("first_byte_timeout")
        elif not self.requested:
            self.reject("timeout")  # the open timeout
        else:
            self.transport.abort()  # its answer took longer than the open timeout

    def _restart_parser(self) -> bool:
        """Restart websockets' frame parser if it waits between frames; whether it did.

        Its generator keeps in its locals the request it parsed (headers
        and all) and then the last frame it parsed (a 64 KiB message stays
        as long as the connection is idle). Between frames it holds nothing
        else: the protocol keeps the state of a fragmented message itself.
        """
        protocol = self.protocol
        if protocol.state is not OPEN:
            return False  # the parser may be discard(), which must stay
        parser: Any = protocol.parser  # a generator: gi_code, gi_yieldfrom
        inner = parser.gi_yieldfrom
        if parser.gi_code is _HANDSHAKE_PARSE and inner is not None:
            parser, inner = inner, inner.gi_yieldfrom  # frames are parsed inside it
        if parser.gi_code is not _FRAMES_PARSE or inner is None or inner.gi_code is not _AT_EOF:
            return False
        protocol.parser = SansIO.parse(protocol)
        next(protocol.parser)
        return True

    # The request.

    def _handshake_received(self, data: bytes) -> None:
        protocol = self.protocol
        if self.head_tail is not None:  # the request head is still coming
            if not self.spoke:
                self._spoke()
            if self._bare_lf(data):
                self._refuse(400, "lines must end with CRLF\n")
                return
        protocol.receive_data(data)
        events = protocol.events_received()
        if events and not self.requested:
            request = events[0]  # ServerProtocol's first event
            assert isinstance(request, Request)
            self.requested = True
            self._admitted()
            self._request(request, events[1:])
            return
        if protocol.writes:  # not HTTP (EOF), or 414, 431
            self._send_output()

    def _spoke(self) -> None:
        self.spoke = True
        port = self.port
        if self.pending:
            port.state.admission.spoke(self)
        if self.deadline is not None:
            # From the first-byte deadline to the open timeout, both counted
            # from the accept.
            config = port.ctx.config
            accepted = self.deadline - config.first_byte_timeout_s
            port.wheel.schedule(self, accepted + config.open_timeout_s)

    def _bare_lf(self, data: bytes) -> bool:
        """Whether the request head so far has a LF without its CR.

        websockets closes such a request without an answer; it gets a 400
        here, as on the API port (see ``http11._Connection._read_head`` for
        why it is refused rather than read as nginx does).
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
        protocol = self.protocol
        protocol.handshake_exc = InvalidMessage(text.strip())
        response = protocol.reject(status, text)
        response.headers["Server"] = self.port.ctx.server_name
        protocol.send_response(response)
        self._send_output()
        self.transport.close()

    def _request(self, request: Request, frames: list[Any]) -> None:
        """Answer the request: a route's answer, a refusal, or the upgrade (``http.py``)."""
        port = self.port
        try:
            answer = process_request(port.ctx, port.state, self, request)
        except Exception as exc:
            answer = self._internal_error(exc, "process_request_failed")
        if answer is None or isinstance(answer, Response):
            self._respond(request, answer, frames)
            return
        # Asynchronous (a worker's host-wide /metrics): never an upgrade.
        port.track(asyncio.ensure_future(self._respond_later(request, answer)))

    async def _respond_later(self, request: Request, answer: Awaitable[Response]) -> None:
        try:
            response = await answer
        except Exception as exc:
            response = self._internal_error(exc, "process_request_failed")
        if self.protocol.state is CONNECTING and not self.transport.is_closing():
            self._respond(request, response, [])

    def _internal_error(self, exc: Exception, event: str) -> Response:
        self.protocol.handshake_exc = exc
        self.port.ctx.log.exception(event)
        return self.protocol.reject(
            http.HTTPStatus.INTERNAL_SERVER_ERROR,
            "Failed to open a WebSocket connection.\nSee server log for more information.\n",
        )

    def _respond(self, request: Request, response: Response | None, frames: list[Any]) -> None:
        protocol, ctx = self.protocol, self.port.ctx
        if response is None:
            response = protocol.accept(request)
        try:
            process_response(ctx, self, request, response)
        except Exception as exc:
            response = self._internal_error(exc, "process_response_failed")
        response.headers["Server"] = ctx.server_name
        # Pongs to frames a client sent before our answer go after it.
        early = protocol.data_to_send()
        protocol.send_response(response)
        self._send_output()
        if protocol.state is not OPEN:
            return  # refused: EOF is written, the close timeout runs
        protocol.writes[:0] = early
        if not self._restart_parser():
            request.headers.clear()  # the request lives on in the parser until it can restart
        self._open(request.path.partition("?")[0])
        if protocol.writes:
            self._send_output()
        if frames:
            self._frames(frames)
