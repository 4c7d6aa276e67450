"""A small HTTP/1.1 server on asyncio streams, for a listener of our own.

It owns the wire: reading a request head (RFC 9112 §2-5) and its body
(``Content-Length`` or chunked, ``Expect: 100-continue``), writing responses,
keep-alive and pipelining on a connection, and the listener with its
connection limit. An application gives it a :class:`Handler` that answers a
parsed :class:`Request` with a :class:`Response`, renders an
:exc:`HttpError` in its own format, and counts requests.

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
import dataclasses
import functools
import http
import json
import random
import re
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import Any, Final, Protocol

__all__ = [
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "OTHER",
    "BodyReader",
    "Handler",
    "HttpError",
    "HttpServer",
    "Request",
    "Response",
    "parse_head",
    "retry_after",
]

OTHER: Final = "other"  # the endpoint label of a request that matched no route

MAX_CONNECTIONS: Final = 256
MAX_HEAD_BYTES: Final = 16 * 1024
MAX_HEADERS: Final = 64
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

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# The target is ASCII (RFC 9112 §3.2, RFC 3986 §2): other bytes arrive percent-encoded.
REQUEST_LINE_RE: Final = re.compile(rb"(" + _TOKEN + rb") (/[!-~]*) HTTP/(1\.[01])")
HEADER_RE: Final = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
CHUNK_SIZE_RE: Final = re.compile(rb"[0-9A-Fa-f]{1,8}")
# Headers that a request may carry once: two lengths are request smuggling.
SINGLE_HEADERS: Final = frozenset(
    ("content-length", "transfer-encoding", "host", "authorization", "content-type")
)


class HttpError(Exception):
    """A request refused with an HTTP status; the handler renders it.

    ``close`` ends the connection after the answer (the request could not be
    read to its end); ``headers`` go with the answer. An application may
    subclass it to carry fields of its own, an error code say.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        close: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        self.headers = headers or {}


@dataclasses.dataclass(slots=True)
class Request:
    """A parsed request head; ``endpoint`` is the label the handler gives it."""

    method: str
    path: str
    query: str
    version: str
    headers: dict[str, str]
    endpoint: str = OTHER
    body_pending: bool = False

    @property
    def keep_alive(self) -> bool:
        # HTTP/1.0 peers get one request per connection.
        tokens = self.headers.get("connection", "").lower().replace(" ", "").split(",")
        return self.version == "1.1" and "close" not in tokens


@dataclasses.dataclass(slots=True)
class Response:
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    close: bool = False

    @classmethod
    def json(
        cls, status: int, obj: Any, headers: dict[str, str] | None = None, close: bool = False
    ) -> Response:
        body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
        return cls(status, body, "application/json", headers or {}, close)

    def encode(self, server: str, keep_alive: bool, head_only: bool) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status} {http.HTTPStatus(self.status).phrase}",
            f"Date: {formatdate(usegmt=True)}",
            f"Server: {server}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Cache-Control: no-store",
            "X-Content-Type-Options: nosniff",
            f"Connection: {'keep-alive' if keep_alive else 'close'}",
            *(f"{name}: {value}" for name, value in self.headers.items()),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + self.body


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


def parse_head(head: bytes) -> Request:
    """Parse a request line and header fields (RFC 9112 §2-5); raise :exc:`HttpError`."""
    lines = head.lstrip(b"\r\n").split(b"\r\n")
    match = REQUEST_LINE_RE.fullmatch(lines[0])
    if match is None:
        raise HttpError(400, "malformed request line", close=True)
    if len(lines) > MAX_HEADERS + 3:
        raise HttpError(431, "too many header fields", close=True)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue  # the empty line that ends the head
        field = HEADER_RE.fullmatch(line)
        if field is None:
            # Includes obsolete line folding and whitespace before the colon,
            # which RFC 9112 §5.1-5.2 says to reject.
            raise HttpError(400, "malformed header field", close=True)
        name = field.group(1).decode("ascii").lower()
        value = field.group(2).decode("latin-1")
        if name in headers:
            if name in SINGLE_HEADERS:
                raise HttpError(400, f"{name} given more than once", close=True)
            value = f"{headers[name]}, {value}"
        headers[name] = value
    method, target = match.group(1).decode("ascii"), match.group(2).decode("ascii")
    version = match.group(3)
    path, _, query = target.partition("?")
    request = Request(method, path, query, version.decode(), headers)
    if request.version == "1.1" and "host" not in headers:
        raise HttpError(400, "Host is required", close=True)
    request.body_pending = "transfer-encoding" in headers or _content_length(headers) != "0"
    return request


def _content_length(headers: dict[str, str]) -> str:
    """The Content-Length as given, less leading zeros ("0" when there is none)."""
    return headers.get("content-length", "").strip().lstrip("0") or "0"


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
        self.server = await asyncio.start_server(
            self._serve, host, port, limit=MAX_HEAD_BYTES, backlog=backlog
        )
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

    # One connection.

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.writers[task] = writer
        self.connections += 1
        try:
            if self.connections > self.max_connections:
                await self._refuse(reader, writer)
                return
            first = True
            while not self.closing and await self._exchange(reader, writer, first):
                first = False
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the peer went away
        except Exception:
            self.log.exception(self._event("connection_failed"))
        finally:
            self.connections -= 1
            del self.writers[task]
            writer.close()

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections > 2 * self.max_connections:
            # A flood: answering costs a descriptor for a while, dropping does not.
            writer.transport.abort()
            self.handler.observe(None, 503, 0.0)
            return
        refusal = HttpError(
            503, f"too many {self.name} connections", close=True, headers=retry_after()
        )
        response = self.handler.error_response(refusal)
        await self._send(writer, response, None)
        self.handler.observe(None, response.status, 0.0)
        await self._linger(reader, writer, REFUSAL_LINGER_S)

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bool
    ) -> bool:
        """Read one request and answer it; return whether to read another."""
        request: Request | None = None
        started = time.perf_counter()
        try:
            head = await self._read_head(reader, first)
            if head is None:
                return False
            started = time.perf_counter()
            request = parse_head(head)
            read_body = functools.partial(self._read_body, request, reader, writer)
            response = await self.handler.handle(request, read_body, started)
        except HttpError as exc:
            response = self.handler.error_response(exc)
        except (ConnectionError, asyncio.IncompleteReadError):
            raise
        except Exception:
            self.log.exception(self._event("request_failed"), endpoint=request and request.endpoint)
            response = self.handler.error_response(HttpError(500, "internal error", close=True))
        keep_alive = (
            request is not None
            and request.keep_alive
            and not request.body_pending
            and not response.close
            and not self.closing
            and self.handler.keep_alive()
        )
        sent = await self._send(writer, response, request, keep_alive)
        self.handler.observe(request, response.status, time.perf_counter() - started)
        if sent and not keep_alive and (request is None or request.body_pending):
            await self._linger(reader, writer)
        return sent and keep_alive

    async def _read_head(self, reader: asyncio.StreamReader, first: bool) -> bytes | None:
        """The request head, or None when the peer closed or stayed idle too long."""
        task = asyncio.current_task()
        assert task is not None
        self.idle.add(task)
        try:
            async with asyncio.timeout(self.header_timeout_s if first else self.idle_timeout_s):
                byte = await reader.read(1)
        except TimeoutError:
            return None
        finally:
            self.idle.discard(task)
        if not byte:
            return None
        try:
            async with asyncio.timeout(self.header_timeout_s):
                return await _read_lines(reader, byte)
        except TimeoutError:
            raise HttpError(408, "the request head took too long", close=True) from None
        except asyncio.LimitOverrunError:
            raise HttpError(431, "the request head is too large", close=True) from None

    async def _read_body(
        self,
        request: Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        limit: int,
    ) -> bytes:
        headers = request.headers
        coding = headers.get("transfer-encoding")
        length = headers.get("content-length")
        if coding is not None:
            if length is not None:
                raise HttpError(400, "Content-Length and Transfer-Encoding together", close=True)
            if coding.strip().lower() != "chunked":
                raise HttpError(400, "only the chunked transfer coding", close=True)
        elif length is None:
            return b""
        elif not (length.isascii() and length.strip().isdigit()):
            raise HttpError(400, "malformed Content-Length", close=True)
        else:
            # Leading zeros say nothing (RFC 9110 §8.6); int() refuses more than
            # 4300 digits, and anything past 18 is too large anyway.
            length = _content_length(headers)
            if len(length) > 18 or int(length) > limit:
                raise HttpError(413, f"the body may be at most {limit} bytes", close=True)
            if length == "0":
                return b""
        if headers.get("expect", "").lower() == "100-continue" and request.version == "1.1":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            async with asyncio.timeout(self.body_timeout_s):
                if length is not None:
                    body = await reader.readexactly(int(length))
                else:
                    body = await _read_chunked(reader, limit)
        except TimeoutError:
            raise HttpError(408, "the body took too long", close=True) from None
        request.body_pending = False
        return body

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        response: Response,
        request: Request | None,
        keep_alive: bool = False,
    ) -> bool:
        head_only = request is not None and request.method == "HEAD"
        writer.write(response.encode(self.server_name, keep_alive, head_only))
        try:
            async with asyncio.timeout(self.write_timeout_s):
                await writer.drain()
        except TimeoutError:
            writer.transport.abort()  # a peer that does not read its response
            return False
        return True

    async def _linger(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, linger_s: float = LINGER_S
    ) -> None:
        if writer.can_write_eof():
            writer.write_eof()
        dropped = 0
        try:
            async with asyncio.timeout(linger_s):
                while dropped < LINGER_MAX_BYTES:
                    data = await reader.read(65536)
                    if not data:
                        break
                    dropped += len(data)
        except (TimeoutError, ConnectionError):
            pass


async def _read_lines(reader: asyncio.StreamReader, first: bytes) -> bytes:
    """A request head, line by line: CRLF endings only, at most :data:`MAX_HEAD_BYTES`.

    A bare LF is refused at once rather than waited on: a proxy in front that
    splits lines differently would see other requests in the same bytes
    (request smuggling; RFC 9112 §2.2 allows either, nginx accepts it). A few
    empty lines before the request line are skipped (RFC 9112 §2.2).
    """
    if first == b"\n":
        raise HttpError(400, "lines must end with CRLF", close=True)
    head = bytearray(first)
    start = 0  # where the line being read begins
    skipped = 0
    while True:
        head += await reader.readuntil(b"\n")
        if len(head) > MAX_HEAD_BYTES:
            raise HttpError(431, "the request head is too large", close=True)
        if head[-2:-1] != b"\r":
            raise HttpError(400, "lines must end with CRLF", close=True)
        if len(head) - start == 2:  # an empty line
            if start:
                return bytes(head)
            skipped += 1
            if skipped > MAX_EMPTY_LINES:
                raise HttpError(400, "no request line", close=True)
            del head[:]
            continue
        start = len(head)


async def _read_chunked(reader: asyncio.StreamReader, limit: int) -> bytes:
    """A chunked body (RFC 9112 §7.1), counted as it comes and cut at ``limit``."""
    parts: list[bytes] = []
    total = 0
    while True:
        line = await _read_line(reader)
        size_text = line.partition(b";")[0].strip()  # chunk extensions are ignored
        if CHUNK_SIZE_RE.fullmatch(size_text) is None:
            raise HttpError(400, "malformed chunk size", close=True)
        size = int(size_text, 16)
        if size == 0:
            break
        total += size
        if total > limit:
            raise HttpError(413, f"the body may be at most {limit} bytes", close=True)
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise HttpError(400, "malformed chunk", close=True)
    for _ in range(MAX_HEADERS):  # the trailer section, dropped
        if not await _read_line(reader):
            return b"".join(parts)
    raise HttpError(400, "too many trailer fields", close=True)


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        return (await reader.readuntil(b"\r\n"))[:-2]
    except asyncio.LimitOverrunError:
        raise HttpError(400, "a chunk line is too long", close=True) from None


def _format_addr(sockname: Any) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
