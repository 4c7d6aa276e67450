"""The publish API: backends publish to rooms over HTTP, on a listener of its own.

A small HTTP/1.1 server on asyncio streams (keep-alive, pipelining,
``Content-Length`` and chunked bodies, ``Expect: 100-continue``) that answers
the routes in :data:`ROUTES` with JSON; ``docs/api.yaml`` describes them.
It sits beside the WebSocket listener, never on it: the WebSocket port faces
browsers, this one faces the backends and should stay private.

Publications go through :meth:`Hub.publish <rtgateway.rooms.Hub.publish>`,
the very call a WebSocket client's publish makes, so members see one ``seq``
sequence in one order whichever side published. The room protocol's rules
apply (room names, size, encodability, its error codes); HTTP adds a few codes
of its own (:data:`HTTP_ERROR_CODES`).

What a peer can make it hold is bounded: connections (``max_connections``,
503 past it), the request head (size, header count, ``header_timeout_s``), the
body (its limit is refused from ``Content-Length`` before reading and counted
while a chunked body is read; ``body_timeout_s``), idle keep-alive time, and
the time a response may take to be read. The bearer token is compared in
constant time and never logged.

This module must not touch WebSocket connections or outboxes: it only calls
the hub.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import hmac
import http
import json
import random
import re
import time
from collections.abc import Iterable
from email.utils import formatdate
from importlib import resources
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, unquote

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__, protocol
from .config import parse_addr
from .connection import MESSAGE_ENVELOPE_BYTES
from .metrics import LATENCY_BUCKETS, Histogram
from .rooms import BrokerUnavailable

if TYPE_CHECKING:
    from .app import Gateway

__all__ = ["API_ERROR_CODES", "ENDPOINTS", "HTTP_ERROR_CODES", "ApiError", "ApiServer"]

# Codes for failures that only HTTP has; the room protocol's codes mean the same here.
HTTP_ERROR_CODES: Final = (
    "bad_request",
    "unauthorized",
    "not_found",
    "method_not_allowed",
    "unsupported_media_type",
    "request_timeout",
)
API_ERROR_CODES: Final = (*protocol.ERROR_CODES, *HTTP_ERROR_CODES)
STATUS_OF: Final = {
    "bad_json": 400,
    "bad_message": 400,
    "invalid_room": 400,
    "bad_request": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "message_too_large": 413,
    "unsupported_media_type": 415,
    "rate_limited": 429,
    "internal": 500,
    "draining": 503,
    "unavailable": 503,
}

# Route templates and their methods. The template is the ``endpoint`` label.
ROUTES: Final = {
    "/api/publish": ("POST",),
    "/api/publish/batch": ("POST",),
    "/api/rooms": ("GET", "HEAD"),
    "/api/rooms/{room}": ("GET", "HEAD"),
    "/api/info": ("GET", "HEAD"),
    "/api/openapi.yaml": ("GET", "HEAD"),
}
OTHER: Final = "other"  # the endpoint label of requests that matched no route
ENDPOINTS: Final = (*ROUTES, OTHER)
ROOM_PREFIX: Final = "/api/rooms/"

MAX_CONNECTIONS: Final = 256
MAX_HEAD_BYTES: Final = 16 * 1024
MAX_HEADERS: Final = 64
MAX_BATCH_ITEMS: Final = 100
BATCH_BODY_FACTOR: Final = 16  # a batch body may be this many times RTG_MAX_MESSAGE_BYTES
MAX_PAGE: Final = 1000
DEFAULT_PAGE: Final = 100
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
REQUEST_LINE_RE: Final = re.compile(rb"(" + _TOKEN + rb") (/[^ \x00-\x1f\x7f]*) HTTP/(1\.[01])")
HEADER_RE: Final = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
CHUNK_SIZE_RE: Final = re.compile(rb"[0-9A-Fa-f]{1,8}")
# Headers that a request may carry once: two lengths are request smuggling.
SINGLE_HEADERS: Final = frozenset(
    ("content-length", "transfer-encoding", "host", "authorization", "content-type")
)


class ApiError(Exception):
    """A request the API refuses: answered with ``{"error": {"code", "message"}}``.

    ``close`` ends the connection after the answer (the request could not be
    read to its end); ``headers`` go with the answer; ``index`` is the
    position of the offending publication in a batch.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        close: bool = False,
        headers: dict[str, str] | None = None,
        index: int | None = None,
    ) -> None:
        assert code in API_ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or STATUS_OF[code]
        self.close = close
        self.headers = headers or {}
        self.index = index

    def response(self) -> Response:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.index is not None:
            error["index"] = self.index
        return Response.json(self.status, {"error": error}, self.headers, close=self.close)


@dataclasses.dataclass(slots=True)
class Request:
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


def parse_head(head: bytes) -> Request:
    """Parse a request line and header fields (RFC 9112 §2-5); raise :exc:`ApiError`."""
    lines = head.lstrip(b"\r\n").split(b"\r\n")
    match = REQUEST_LINE_RE.fullmatch(lines[0])
    if match is None:
        raise ApiError("bad_request", "malformed request line", close=True)
    if len(lines) > MAX_HEADERS + 3:
        raise ApiError("bad_request", "too many header fields", status=431, close=True)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue  # the empty line that ends the head
        field = HEADER_RE.fullmatch(line)
        if field is None:
            # Includes obsolete line folding and whitespace before the colon,
            # which RFC 9112 §5.1-5.2 says to reject.
            raise ApiError("bad_request", "malformed header field", close=True)
        name = field.group(1).decode("ascii").lower()
        value = field.group(2).decode("latin-1")
        if name in headers:
            if name in SINGLE_HEADERS:
                raise ApiError("bad_request", f"{name} given more than once", close=True)
            value = f"{headers[name]}, {value}"
        headers[name] = value
    method, target, version = match.group(1).decode(), match.group(2).decode(), match.group(3)
    path, _, query = target.partition("?")
    request = Request(method, path, query, version.decode(), headers)
    if request.version == "1.1" and "host" not in headers:
        raise ApiError("bad_request", "Host is required", close=True)
    request.body_pending = "transfer-encoding" in headers or headers.get(
        "content-length", "0"
    ).strip() not in ("", "0")
    return request


def route(path: str) -> tuple[str, str | None]:
    """The route template that ``path`` matches (or :data:`OTHER`) and its room."""
    if path in ROUTES:
        return path, None
    if path.startswith(ROOM_PREFIX):
        room = path[len(ROOM_PREFIX) :]
        if room and "/" not in room:
            try:
                return "/api/rooms/{room}", unquote(room, errors="strict")
            except UnicodeDecodeError:
                return "/api/rooms/{room}", room  # "%" makes it an invalid room
    return OTHER, None


def load_json(body: bytes) -> Any:
    """Parse a request body like the room protocol parses a message."""
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ApiError("bad_json", "the body is not UTF-8") from None
    except RecursionError:
        raise ApiError("bad_json", "the body is nested too deeply") from None
    except ValueError:
        # JSONDecodeError, NaN/Infinity, and integers past Python's 4300-digit limit.
        raise ApiError("bad_json", "the body is not valid JSON") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _retry_after() -> dict[str, str]:
    # Spread the retries of a refused fleet of backends.
    return {"Retry-After": str(random.randint(1, 5))}


class ApiMetrics(Collector):
    """``rtgateway_api_requests_total{endpoint,status}`` and the request-time histogram."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}
        self.seconds = {endpoint: Histogram(LATENCY_BUCKETS) for endpoint in ENDPOINTS}

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        key = (endpoint, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        self.seconds[endpoint].observe(seconds)

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "rtgateway_api_requests",
            "Publish API requests answered, by route template and HTTP status.",
            labels=["endpoint", "status"],
        )
        for (endpoint, status), count in sorted(self.requests.items()):
            requests.add_metric([endpoint, status], count)
        yield requests
        seconds = HistogramMetricFamily(
            "rtgateway_api_request_seconds",
            "From a request's head being read to its response being written.",
            labels=["endpoint"],
        )
        for endpoint, histogram in self.seconds.items():
            running = 0
            buckets = []
            for bound, count in zip(
                (*histogram.bounds, float("inf")), histogram.counts, strict=True
            ):
                running += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
            seconds.add_metric([endpoint], buckets, histogram.sum)
        yield seconds


class ApiServer:
    """The publish API's listener and the connections it serves."""

    def __init__(
        self,
        gateway: Gateway,
        *,
        addr: str | None = None,
        max_connections: int = MAX_CONNECTIONS,
        header_timeout_s: float = HEADER_TIMEOUT_S,
        body_timeout_s: float = BODY_TIMEOUT_S,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        write_timeout_s: float = WRITE_TIMEOUT_S,
    ) -> None:
        self.gateway = gateway
        self.config = gateway.config
        self.log = gateway.log.bind(listener="api")
        self.addr = self.config.api_addr if addr is None else addr
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.write_timeout_s = write_timeout_s
        self.token = self.config.api_token.encode()
        self.max_body_bytes = self.config.max_message_bytes
        self.max_batch_bytes = BATCH_BODY_FACTOR * self.config.max_message_bytes
        self.spec = (resources.files("rtgateway") / "static" / "api.yaml").read_bytes()
        self.metrics = ApiMetrics()
        self.addresses: list[str] = []
        self.server: asyncio.Server | None = None
        self.connections = 0
        self.closing = False
        # One task per connection (started by asyncio, owned here) and its writer.
        self.writers: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self.idle: set[asyncio.Task[Any]] = set()  # those waiting for a request

    async def start(self) -> None:
        host, port = parse_addr(self.addr)
        self.server = await asyncio.start_server(
            self._serve,
            host or None,
            port,
            limit=MAX_HEAD_BYTES,
            backlog=min(self.config.backlog, 1024),
        )
        self.addresses = [_format_addr(s.getsockname()) for s in self.server.sockets]
        self.gateway.metrics.registry.register(self.metrics)
        if not self.token and not all(_is_loopback(a) for a in self.addresses):
            self.log.warning(
                "api_unprotected",
                addresses=self.addresses,
                hint="set RTG_API_TOKEN or bind RTG_API_ADDR to loopback",
            )

    async def stop(self) -> None:
        """Stop listening, close idle connections, give busy ones a bounded wait."""
        if self.server is None:
            return
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
            self.log.warning("api_listener_close_timeout")
        self.gateway.metrics.registry.unregister(self.metrics)
        self.server = None
        self.log.info("api_stopped", connections=len(busy), aborted=aborted)

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
            self.log.exception("api_connection_failed")
        finally:
            self.connections -= 1
            del self.writers[task]
            writer.close()

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections > 2 * self.max_connections:
            # A flood: answering costs a descriptor for a while, dropping does not.
            writer.transport.abort()
            self.metrics.observe(OTHER, 503, 0.0)
            return
        refusal = ApiError(
            "unavailable", "too many API connections", close=True, headers=_retry_after()
        )
        await self._send(writer, refusal.response(), None)
        self.metrics.observe(OTHER, refusal.status, 0.0)
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
            response = await self._dispatch(request, reader, writer, started)
        except ApiError as exc:
            response = exc.response()
        except (ConnectionError, asyncio.IncompleteReadError):
            raise
        except Exception:
            self.log.exception("api_request_failed", endpoint=request and request.endpoint)
            response = ApiError("internal", "internal error", close=True).response()
        keep_alive = (
            request is not None
            and request.keep_alive
            and not request.body_pending
            and not response.close
            and not self.closing
            and not self.gateway.draining
        )
        sent = await self._send(writer, response, request, keep_alive)
        self.metrics.observe(
            request.endpoint if request else OTHER,
            response.status,
            time.perf_counter() - started,
        )
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
                return byte + await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            raise ApiError(
                "request_timeout", "the request head took too long", close=True
            ) from None
        except asyncio.LimitOverrunError:
            raise ApiError(
                "bad_request", "the request head is too large", status=431, close=True
            ) from None

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        response: Response,
        request: Request | None,
        keep_alive: bool = False,
    ) -> bool:
        head_only = request is not None and request.method == "HEAD"
        writer.write(response.encode(self.gateway.server_name, keep_alive, head_only))
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

    # One request.

    async def _dispatch(
        self,
        request: Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        started: float,
    ) -> Response:
        endpoint, room = route(request.path)
        request.endpoint = endpoint
        self._authorize(request)
        if endpoint == OTHER:
            raise ApiError("not_found", "no such path; see /api/openapi.yaml")
        methods = ROUTES[endpoint]
        if request.method not in methods:
            raise ApiError(
                "method_not_allowed",
                f"{endpoint} takes {' and '.join(methods)}",
                headers={"Allow": ", ".join(methods)},
            )
        if request.method == "POST":
            self._refuse_while_draining()
            content_type = request.headers.get("content-type", "")
            if content_type.partition(";")[0].strip().lower() != "application/json":
                # Also keeps browsers out: a page can POST text/plain to a
                # loopback address without a CORS preflight, not JSON.
                raise ApiError("unsupported_media_type", "send the body as application/json")
            batch = endpoint == "/api/publish/batch"
            body = await self._read_body(
                request, reader, writer, self.max_batch_bytes if batch else self.max_body_bytes
            )
            self._refuse_while_draining()
            if batch:
                return await self._publish_batch(load_json(body), started)
            return await self._publish(load_json(body), started)
        await self._read_body(request, reader, writer, self.max_body_bytes)
        if endpoint == "/api/rooms/{room}":
            assert room is not None
            return self._room(room)
        if endpoint == "/api/rooms":
            return self._rooms(request.query)
        if endpoint == "/api/info":
            return self._info()
        return Response(200, self.spec, "application/yaml")

    def _authorize(self, request: Request) -> None:
        if not self.token:
            return
        scheme, _, credentials = request.headers.get("authorization", "").strip().partition(" ")
        given = credentials.strip().encode("latin-1")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.token):
            raise ApiError(
                "unauthorized",
                "this API needs Authorization: Bearer <RTG_API_TOKEN>",
                headers={"WWW-Authenticate": 'Bearer realm="rtgateway"'},
            )

    def _refuse_while_draining(self) -> None:
        if self.gateway.draining:
            raise ApiError(
                "draining",
                "the gateway is shutting down; publish to another instance",
                headers=_retry_after(),
            )

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
                raise ApiError(
                    "bad_request", "Content-Length and Transfer-Encoding together", close=True
                )
            if coding.strip().lower() != "chunked":
                raise ApiError("bad_request", "only the chunked transfer coding", close=True)
        elif length is None:
            return b""
        elif not (length.isascii() and length.isdigit()):
            raise ApiError("bad_request", "malformed Content-Length", close=True)
        # int() refuses more than 4300 digits: anything past 18 is too large anyway.
        elif len(length) > 18 or int(length) > limit:
            raise ApiError(
                "message_too_large", f"the body may be at most {limit} bytes", close=True
            )
        elif int(length) == 0:
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
            raise ApiError("request_timeout", "the body took too long", close=True) from None
        request.body_pending = False
        return body

    # The routes.

    def _publication(self, item: Any, index: int | None = None) -> tuple[str, bytes]:
        if not isinstance(item, dict):
            raise ApiError("bad_message", "a publication is an object: room, data", index=index)
        if not isinstance(item.get("room"), str):
            raise ApiError("bad_message", "room is required, a string", index=index)
        room: str = item["room"]
        if not protocol.valid_room(room):
            raise ApiError(
                "invalid_room", "room must be 1-128 characters of A-Z a-z 0-9 _ . : -", index=index
            )
        if "data" not in item:
            raise ApiError("bad_message", "data is required", index=index)
        try:
            data = protocol.encode_data(item["data"])
        except protocol.ProtocolError as exc:
            raise ApiError(exc.code, exc.message, index=index) from None
        limit = self.config.max_message_bytes
        if len(data) + len(room) + MESSAGE_ENVELOPE_BYTES > limit:
            # Members may hold the same size limit as the gateway.
            raise ApiError(
                "message_too_large",
                f"the message to members would exceed {limit} bytes",
                index=index,
            )
        return room, data

    async def _publish(self, body: Any, started: float) -> Response:
        room, data = self._publication(body)
        try:
            seq = await self.gateway.hub.publish(room, data, started=started)
        except BrokerUnavailable:
            raise ApiError(
                "unavailable", "publishing is unavailable; retry later", headers=_retry_after()
            ) from None
        return Response.json(200, {"seq": seq})

    async def _publish_batch(self, body: Any, started: float) -> Response:
        if not isinstance(body, list):
            raise ApiError("bad_message", "the body must be an array of publications")
        if len(body) > MAX_BATCH_ITEMS:
            raise ApiError("bad_message", f"at most {MAX_BATCH_ITEMS} publications per batch")
        # Validate all first: a bad batch publishes nothing.
        publications = [self._publication(item, index) for index, item in enumerate(body)]
        results: list[dict[str, Any]] = []
        for room, data in publications:
            try:
                seq = await self.gateway.hub.publish(room, data, started=started)
            except BrokerUnavailable:
                message = "publishing is unavailable; retry this one later"
                results.append({"error": {"code": "unavailable", "message": message}})
            else:
                results.append({"seq": seq})
        return Response.json(200, results)

    def _room(self, room: str) -> Response:
        if not protocol.valid_room(room):
            raise ApiError("invalid_room", "room must be 1-128 characters of A-Z a-z 0-9 _ . : -")
        return Response.json(200, {"room": room, "members": self.gateway.hub.members(room)})

    def _rooms(self, query: str) -> Response:
        try:
            params = parse_qs(query, keep_blank_values=True, errors="strict", max_num_fields=64)
        except (ValueError, UnicodeDecodeError):
            raise ApiError("bad_request", "malformed query string") from None
        limit = DEFAULT_PAGE
        cursor = None
        for name, values in params.items():
            if name in ("limit", "cursor") and len(values) > 1:
                raise ApiError("bad_request", f"{name} given more than once")
        if "limit" in params:
            text = params["limit"][0]
            if not (text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_PAGE):
                raise ApiError("bad_request", f"limit must be an integer from 1 to {MAX_PAGE}")
            limit = int(text)
        if "cursor" in params:
            cursor = params["cursor"][0]
            if not protocol.valid_room(cursor):
                raise ApiError("bad_request", "cursor must be the next_cursor of a page")
        hub = self.gateway.hub
        after = (name for name in hub.rooms if cursor is None or name > cursor)
        names = heapq.nsmallest(limit + 1, after)
        page = names[:limit]
        next_cursor = page[-1] if len(names) > limit else None
        rooms = [{"room": name, "members": hub.members(name)} for name in page]
        return Response.json(200, {"rooms": rooms, "next_cursor": next_cursor})

    def _info(self) -> Response:
        gateway = self.gateway
        return Response.json(
            200,
            {
                "server": gateway.server_name,
                "version": __version__,
                "connections": gateway.metrics.connections_current,
                "rooms": len(gateway.hub.rooms),
                "draining": gateway.draining,
            },
        )


async def _read_chunked(reader: asyncio.StreamReader, limit: int) -> bytes:
    """A chunked body (RFC 9112 §7.1), counted as it comes and cut at ``limit``."""
    parts: list[bytes] = []
    total = 0
    while True:
        line = await _read_line(reader)
        size_text = line.partition(b";")[0].strip()  # chunk extensions are ignored
        if CHUNK_SIZE_RE.fullmatch(size_text) is None:
            raise ApiError("bad_request", "malformed chunk size", close=True)
        size = int(size_text, 16)
        if size == 0:
            break
        total += size
        if total > limit:
            raise ApiError(
                "message_too_large", f"the body may be at most {limit} bytes", close=True
            )
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise ApiError("bad_request", "malformed chunk", close=True)
    for _ in range(MAX_HEADERS):  # the trailer section, dropped
        if not await _read_line(reader):
            return b"".join(parts)
    raise ApiError("bad_request", "too many trailer fields", close=True)


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        return (await reader.readuntil(b"\r\n"))[:-2]
    except asyncio.LimitOverrunError:
        raise ApiError("bad_request", "a chunk line is too long", close=True) from None


def _format_addr(sockname: Any) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    return host == "::1" or host.startswith("127.")
