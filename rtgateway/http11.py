"""A small HTTP/1.1 server on asyncio streams and h11, for a listener of our own.

It owns the wire: the listener and its connection limit, reading requests and
writing responses, keep-alive and pipelining on a connection. An application
gives it a :class:`Handler` that answers a parsed :class:`Request` with a
:class:`Response`, renders an :exc:`HttpError` in its own format, and counts
requests.

h11, the sans-I/O HTTP/1.1 library that uvicorn drives, parses each request
(RFC 9112 §2-7): the request line and header fields, the body framed by
``Content-Length`` or chunked, ``Expect: 100-continue``, whether the connection
may carry another request (HTTP/1.0 and ``Connection: close`` may not); and it
writes the responses (``HEAD`` gets no body). This module feeds it one request
at a time and keeps what a pipelining peer sent past it, so that every request
head is seen whole before h11 reads it. Where h11 is more lenient than we mean
to be, and request smuggling could come through, the head is refused here
first (:func:`~rtgateway.httpmsg.check_head`) or after h11 has read it
(:meth:`_Connection._parse_request`).

What a peer can make it hold is bounded: connections (``max_connections``,
503 past it), the request head (:data:`MAX_HEAD_BYTES`, :data:`MAX_HEADERS`,
``header_timeout_s``), the body (a limit the handler names per request,
refused from ``Content-Length`` before reading and counted while a chunked
body is read; ``body_timeout_s``), idle keep-alive time, and the time a
response may take to be read.

This module must not know what it serves: no routes, no error codes beyond
HTTP statuses, no gateway, hub or WebSocket.
"""

from __future__ import annotations

import asyncio
import http
import random
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import Any, Final, Protocol

import h11

from .httpmsg import MAX_HEADERS, OTHER, HttpError, Request, Response, check_head

__all__ = [
    "BODY_TIMEOUT_S",
    "HEADER_TIMEOUT_S",
    "IDLE_TIMEOUT_S",
    "MAX_CONNECTIONS",
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "OTHER",
    "WRITE_TIMEOUT_S",
    "BodyReader",
    "Handler",
    "HttpError",
    "HttpServer",
    "Request",
    "Response",
    "retry_after",
]


MAX_CONNECTIONS: Final = 256
MAX_HEAD_BYTES: Final = 16 * 1024
MAX_EMPTY_LINES: Final = 4  # before a request line, skipped (RFC 9112 §2.2)
HEADER_TIMEOUT_S: Final = 10.0
BODY_TIMEOUT_S: Final = 10.0
IDLE_TIMEOUT_S: Final = 15.0
WRITE_TIMEOUT_S: Final = 10.0
STOP_TIMEOUT_S: Final = 5.0
# After an error that leaves a body unread, read and drop what the peer still
# sends for a while before closing: closing a socket with unread data makes
# the kernel send RST, and the peer could lose the response (RFC 9112 §9.6).
LINGER_S: Final = 2.0
REFUSAL_LINGER_S: Final = 0.25
LINGER_MAX_BYTES: Final = 1 << 20
READ_BYTES: Final = 65536

# Headers that a request may carry once; h11 checks Host, check_head the framing.
SINGLE_HEADERS: Final = frozenset(("authorization", "content-type"))
# What a client is told when h11 refuses a request: never h11's own message,
# which quotes the offending bytes.
H11_REFUSALS: Final = {431: "the request is too large", 501: "not implemented"}
REASONS: Final = {status.value: status.phrase.encode() for status in http.HTTPStatus}


# Reads the request's body, refusing one larger than the argument (bytes).
BodyReader = Callable[[int], Awaitable[bytes]]


class Handler(Protocol):
    """What an application gives :class:`HttpServer`."""

    async def handle(self, request: Request, read_body: BodyReader, started: float) -> Response:
        """Answer a request, or raise :exc:`HttpError`; ``started`` is from ``perf_counter``."""
        ...

    def error_response(self, error: HttpError) -> Response:
        """The response that tells the peer about ``error``."""
        ...

    def observe(self, request: Request | None, status: int, seconds: float) -> None:
        """Count an answer; ``request`` is None when the head could not be parsed."""
        ...

    def keep_alive(self) -> bool:
        """Whether a connection may wait for another request (False while draining)."""
        ...


def retry_after() -> dict[str, str]:
    # Spread the retries of a refused fleet of clients.
    return {"Retry-After": str(random.randint(1, 5))}


class HttpServer:
    """A listener and the connections it serves, answering through a :class:`Handler`.

    ``name`` is what the listener serves as people say it (``API``): a refused
    connection is told ``too many API connections``, and the log events are
    ``api_connection_failed``, ``api_request_failed`` and
    ``api_listener_close_timeout``.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        name: str,
        log: Any,
        server_name: str,
        max_connections: int = MAX_CONNECTIONS,
        header_timeout_s: float = HEADER_TIMEOUT_S,
        body_timeout_s: float = BODY_TIMEOUT_S,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        write_timeout_s: float = WRITE_TIMEOUT_S,
    ) -> None:
        self.handler = handler
        self.name = name
        self.log = log
        self.server_name = server_name
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.write_timeout_s = write_timeout_s
        self.addresses: list[str] = []
        self.server: asyncio.Server | None = None
        self.connections = 0
        self.closing = False
        # One task per connection (started by asyncio, owned here) and its writer.
        self.writers: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self.idle: set[asyncio.Task[Any]] = set()  # those waiting for a request

    def _event(self, what: str) -> str:
        return f"{self.name.lower()}_{what}"

    async def start(self, host: str | None, port: int, *, backlog: int) -> None:
        self.server = await asyncio.start_server(self._serve, host, port, backlog=backlog)
        self.addresses = [_format_addr(s.getsockname()) for s in self.server.sockets]

    async def stop(self) -> tuple[int, int]:
        """Stop listening, close idle connections, give busy ones a bounded wait.

        Return how many connections were open and how many of them were aborted.
        """
        if self.server is None:
            return 0, 0
        self.closing = True
        self.server.close()
        # Closing the transport ends a handler, cancelling it would not: Python
        # 3.11's start_server callback logs a cancelled handler as an error.
        for task in list(self.idle):
            self.writers[task].close()  # waiting for a request: nothing is lost
        busy = set(self.writers)
        aborted = 0
        if busy:
            _, pending = await asyncio.wait(busy, timeout=STOP_TIMEOUT_S)
            for task in pending:
                if task in self.writers:
                    self.writers[task].transport.abort()
            aborted = len(pending)
            await asyncio.wait(busy, timeout=1.0)
        try:
            await asyncio.wait_for(self.server.wait_closed(), timeout=2.0)
        except TimeoutError:
            self.log.warning(self._event("listener_close_timeout"))
        self.server = None
        return len(busy), aborted

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.writers[task] = writer
        self.connections += 1
        connection = _Connection(self, reader, writer)
        try:
            if self.connections > self.max_connections:
                await self._refuse(connection)
                return
            first = True
            while not self.closing and await connection.exchange(first):
                first = False
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the peer went away
        except Exception:
            self.log.exception(self._event("connection_failed"))
        finally:
            self.connections -= 1
            del self.writers[task]
            writer.close()

    async def _refuse(self, connection: _Connection) -> None:
        if self.connections > 2 * self.max_connections:
            # A flood: answering costs a descriptor for a while, dropping does not.
            connection.writer.transport.abort()
            self.handler.observe(None, 503, 0.0)
            return
        refusal = HttpError(
            503, f"too many {self.name} connections", close=True, headers=retry_after()
        )
        response = self.handler.error_response(refusal)
        await connection.send(response, keep_alive=False)
        self.handler.observe(None, response.status, 0.0)
        await connection.linger(REFUSAL_LINGER_S)


class _Connection:
    """One connection: h11 for the request in hand, and what was read past it.

    h11 is given a request head only once the whole head is here and checked,
    and a ``Content-Length`` body only up to its length. Where a chunked body
    ends only h11 can tell; what it was given past that is taken back. A new
    :class:`h11.Connection` reads each request, and ``pending`` carries the
    bytes from one to the next.
    """

    def __init__(
        self, server: HttpServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.pending = bytearray()  # read from the socket, not yet given to h11
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.method = b""  # of the request that h11 read, if it read one
        self.whole = False  # whether that request was read to its end
        self.body_left: int | None = 0  # body bytes not yet given to h11; None: chunked

    async def exchange(self, first: bool) -> bool:
        """Read one request and answer it; return whether to read another."""
        server, handler = self.server, self.server.handler
        request: Request | None = None
        if not self.pending and not await self._wait_for_request(first):
            return False
        started = time.perf_counter()
        try:
            request = await self._read_request()
            started = time.perf_counter()
            response = await handler.handle(request, self._read_body, started)
        except HttpError as exc:
            response = handler.error_response(exc)
        except (ConnectionError, asyncio.IncompleteReadError):
            raise
        except Exception:
            endpoint = request and request.endpoint
            server.log.exception(server._event("request_failed"), endpoint=endpoint)
            response = handler.error_response(HttpError(500, "internal error", close=True))
        keep_alive = (
            self.whole and not response.close and not server.closing and handler.keep_alive()
        )
        sent = await self.send(response, keep_alive)
        handler.observe(request, response.status, time.perf_counter() - started)
        if not sent:
            return False
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self._next_cycle()  # h11 sees no reason to close either
            return True
        if not self.whole:
            await self.linger()
        return False

    def _next_cycle(self) -> None:
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.method = b""
        self.whole = False

    async def _wait_for_request(self, first: bool) -> bool:
        """Wait for a request's first bytes; False when the peer closed or stayed idle too long."""
        task = asyncio.current_task()
        assert task is not None
        server = self.server
        server.idle.add(task)
        try:
            async with asyncio.timeout(server.header_timeout_s if first else server.idle_timeout_s):
                data = await self.reader.read(READ_BYTES)
        except TimeoutError:
            return False
        finally:
            server.idle.discard(task)
        self.pending += data
        return bool(data)

    async def _read(self) -> None:
        data = await self.reader.read(READ_BYTES)
        if not data:
            raise asyncio.IncompleteReadError(bytes(self.pending), None)
        self.pending += data

    def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            return self.h11.next_event()
        except h11.RemoteProtocolError as exc:
            # The status h11 suggests; never its message, which quotes the request.
            status = exc.error_status_hint
            message = H11_REFUSALS.get(status, "malformed request")
            raise HttpError(status, message, close=True) from None

    async def _read_request(self) -> Request:
        try:
            async with asyncio.timeout(self.server.header_timeout_s):
                head = await self._read_head()
        except TimeoutError:
            raise HttpError(408, "the request head took too long", close=True) from None
        self.body_left = check_head(head)
        self.h11.receive_data(bytes(head))
        event = self._next_event()
        if not isinstance(event, h11.Request):  # a whole head is a request or an error
            raise HttpError(400, "malformed request", close=True)
        self.method = event.method
        request = self._parse_request(event)
        if self.body_left == 0:
            self._next_event()  # EndOfMessage: nothing more to read
            self.whole = True
        return request

    async def _read_head(self) -> bytearray:
        """The request head at the front of ``pending``, its final CRLF CRLF included.

        A bare LF is refused at once rather than waited on: h11 reads it as a
        line ending (RFC 9112 §2.2 allows either, nginx too), and a proxy in
        front that splits lines differently would see other requests in the
        same bytes. A few empty lines before the request line are skipped
        (RFC 9112 §2.2); h11 refuses them.
        """
        pending = self.pending
        skipped = 0
        scanned = 0  # how far the head has been checked for bare LFs
        while True:
            while pending.startswith(b"\r\n") and skipped < MAX_EMPTY_LINES:
                del pending[:2]
                skipped += 1
                scanned = 0
            end = pending.find(b"\r\n\r\n", max(scanned - 3, 0), MAX_HEAD_BYTES)
            stop = len(pending) if end == -1 else end + 4
            # LFs without a CR before them, in the bytes not yet checked.
            if pending.count(b"\n", scanned, stop) != pending.count(
                b"\r\n", max(scanned - 1, 0), stop
            ):
                raise HttpError(400, "lines must end with CRLF", close=True)
            if end != -1:
                head = pending[:stop]
                del pending[:stop]
                return head
            if len(pending) >= MAX_HEAD_BYTES:
                raise HttpError(431, "the request head is too large", close=True)
            scanned = stop
            await self._read()

    def _parse_request(self, event: h11.Request) -> Request:
        """The request h11 read, refused where h11 takes more than we serve."""
        if event.http_version not in (b"1.1", b"1.0"):  # h11 reads any DIGIT.DIGIT
            raise HttpError(400, "malformed request line", close=True)
        # Origin form only (RFC 9112 §3.2.1); h11 also reads absolute and
        # authority forms and "*". h11 has checked that it is visible ASCII.
        target = event.target.decode("ascii")
        if not target.startswith("/"):
            raise HttpError(400, "malformed request line", close=True)
        headers: dict[str, str] = {}
        for raw_name, raw_value in event.headers:
            name = raw_name.decode("ascii")  # a token, lowercased by h11
            value = raw_value.decode("latin-1")
            if name in headers:
                if name in SINGLE_HEADERS:
                    raise HttpError(400, f"{name} given more than once", close=True)
                value = f"{headers[name]}, {value}"
            headers[name] = value
        path, _, query = target.partition("?")
        method, version = event.method.decode("ascii"), event.http_version.decode("ascii")
        return Request(method, path, query, version, headers)

    async def _read_body(self, limit: int) -> bytes:
        if self.whole:
            return b""  # none, or read already
        if self.body_left is not None and self.body_left > limit:
            raise HttpError(413, f"the body may be at most {limit} bytes", close=True)
        if self.h11.they_are_waiting_for_100_continue:
            interim = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
            self.writer.write(self.h11.send(interim))
        body = bytearray()
        try:
            async with asyncio.timeout(self.server.body_timeout_s):
                while True:
                    event = self._next_event()
                    if isinstance(event, h11.EndOfMessage):
                        break
                    if isinstance(event, h11.Data):
                        body += event.data
                    if len(body) + _chunk_left(self.h11) > limit:
                        raise HttpError(413, f"the body may be at most {limit} bytes", close=True)
                    if event is h11.NEED_DATA:
                        await self._feed_body()
        except TimeoutError:
            raise HttpError(408, "the body took too long", close=True) from None
        self.whole = True
        if self.body_left is None:
            # What h11 read past a chunked body is the next request's.
            self.pending[:0] = self.h11.trailing_data[0]
        return bytes(body)

    async def _feed_body(self) -> None:
        if not self.pending:
            await self._read()
        if self.body_left is None:
            size = len(self.pending)
        else:
            size = min(self.body_left, len(self.pending))
            self.body_left -= size
        self.h11.receive_data(bytes(self.pending[:size]))
        del self.pending[:size]

    async def send(self, response: Response, keep_alive: bool) -> bool:
        """Write ``response``; False when the peer did not read it in time (then aborted)."""
        fields = [
            ("Date", formatdate(usegmt=True)),
            ("Server", self.server.server_name),
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            # h11 makes it "close" where the request asked for that (or was HTTP/1.0).
            ("Connection", "keep-alive" if keep_alive else "close"),
            *response.headers.items(),
        ]
        reason = REASONS.get(response.status, b"")
        data = self.h11.send(
            h11.Response(status_code=response.status, headers=fields, reason=reason)
        )
        if self.method != b"HEAD":
            data += self.h11.send(h11.Data(data=response.body))
        data += self.h11.send(h11.EndOfMessage())
        self.writer.write(data)
        try:
            async with asyncio.timeout(self.server.write_timeout_s):
                await self.writer.drain()
        except TimeoutError:
            self.writer.transport.abort()  # a peer that does not read its response
            return False
        return True

    async def linger(self, linger_s: float = LINGER_S) -> None:
        writer = self.writer
        if writer.can_write_eof():
            writer.write_eof()
        dropped = 0
        try:
            async with asyncio.timeout(linger_s):
                while dropped < LINGER_MAX_BYTES:
                    data = await self.reader.read(READ_BYTES)
                    if not data:
                        break
                    dropped += len(data)
        except (TimeoutError, ConnectionError):
            pass


def _chunk_left(connection: h11.Connection) -> int:
    """What the chunk being read still declares and h11 has not delivered yet.

    h11 delivers a chunk's bytes as they come and offers no public way to ask
    how many its size line declared; its reader holds the count. Reading it
    refuses a chunk that declares more than the body may hold at once, as a
    ``Content-Length`` is, instead of after the body timeout. Should a later h11
    keep it elsewhere, this reads 0 and the body is still cut at the limit as
    its bytes arrive; ``tests/test_http11.py`` notices.
    """
    return int(getattr(getattr(connection, "_reader", None), "_bytes_in_chunk", 0))


def _format_addr(sockname: Any) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
