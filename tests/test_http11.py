"""The HTTP/1.1 server (rtgateway/http11.py) over real loopback sockets, with a recording handler.

No gateway here: an :class:`HttpServer` answers through :class:`Recorder`, which
reads each body (up to a limit the test sets), remembers the request and
answers it in JSON. Requests are bytes written by hand, so every byte is the
test's: keep-alive and pipelining, chunked bodies, ``Expect: 100-continue``,
the heads that h11 would read more leniently than we do, and the limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from rtgateway.http11 import (
    MAX_EMPTY_LINES,
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    BodyReader,
    HttpError,
    HttpServer,
    Request,
    Response,
)

TIMEOUT = 5.0  # far below the default deadlines (10 s): an answer, not a timeout
LIMIT = 1000  # the body limit the recorder reads with


class Log:
    """Stands in for the bound structlog logger; keeps what was logged."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def exception(self, event: str, **fields: Any) -> None:
        self.events.append(("exception", event, fields))

    def warning(self, event: str, **fields: Any) -> None:
        self.events.append(("warning", event, fields))


class Recorder:
    """A handler that reads every body and answers with what it saw."""

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self.seen: list[tuple[Request, bytes]] = []
        self.observed: list[tuple[str | None, int]] = []
        self.draining = False
        self.fail: Exception | None = None  # raised before the body is read

    async def handle(self, request: Request, read_body: BodyReader, started: float) -> Response:
        request.endpoint = request.path
        if self.fail is not None:
            raise self.fail
        body = await read_body(self.limit)
        self.seen.append((request, body))
        answer = {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "version": request.version,
            "body": body.decode("latin-1"),
        }
        return Response.json(200, answer)

    def error_response(self, error: HttpError) -> Response:
        body = {"error": error.message}
        return Response.json(error.status, body, error.headers, close=error.close)

    def observe(self, request: Request | None, status: int, seconds: float) -> None:
        assert seconds >= 0
        self.observed.append((request and request.endpoint, status))

    def keep_alive(self) -> bool:
        return not self.draining


class Served:
    def __init__(self, server: HttpServer, recorder: Recorder, log: Log) -> None:
        self.server = server
        self.recorder = recorder
        self.log = log
        self.port = int(server.addresses[0].rsplit(":", 1)[1])
        self.clients: list[Client] = []

    async def connect(self) -> Client:
        client = Client(*await asyncio.open_connection("127.0.0.1", self.port))
        self.clients.append(client)
        return client


@contextlib.asynccontextmanager
async def serving(recorder: Recorder | None = None, **options: Any) -> AsyncIterator[Served]:
    recorder = recorder or Recorder()
    log = Log()
    server = HttpServer(recorder, name="Test", log=log, server_name="test/1", **options)
    await server.start("127.0.0.1", 0, backlog=16)
    served = Served(server, recorder, log)
    try:
        yield served
    finally:
        for client in served.clients:
            client.close()  # which ends the server's linger after an error
        await server.stop()
    assert not log.events, log.events


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def head(self) -> bytes:
        async with asyncio.timeout(TIMEOUT):
            return await self.reader.readuntil(b"\r\n\r\n")

    async def reply(self, head_only: bool = False) -> Reply:
        status_line, *lines = (await self.head()).decode("latin-1").split("\r\n")
        headers = {}
        for line in filter(None, lines):
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
        length = 0 if head_only else int(headers["content-length"])
        async with asyncio.timeout(TIMEOUT):
            body = await self.reader.readexactly(length)
        return Reply(int(status_line.split(" ")[1]), headers, body)

    async def closed(self) -> bool:
        """Whether the server closes the connection (EOF, nothing more) within the timeout."""
        async with asyncio.timeout(TIMEOUT):
            try:
                return await self.reader.read() == b""
            except ConnectionResetError:
                return True

    def close(self) -> None:
        self.writer.close()


def get(path: str = "/", headers: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"GET %s HTTP/%s\r\nHost: x\r\n%s\r\n" % (path.encode(), version, headers)


def post(body: bytes, path: str = "/", headers: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s" % (
        path.encode(),
        len(body),
        headers,
        body,
    )


def chunked(*chunks: bytes, trailer: bytes = b"") -> bytes:
    wire = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks)
    return wire + b"0\r\n" + trailer + b"\r\n"


POST_CHUNKED = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


# Keep-alive and pipelining.


async def test_keep_alive_serves_requests_one_after_another_on_one_connection() -> None:
    """Three requests in turn on one keep-alive connection each get their own answer."""
    async with serving() as served:
        client = await served.connect()
        for i in range(3):
            await client.send(post(b"body %d" % i, f"/n/{i}"))
            reply = await client.reply()
            assert (reply.status, reply.json()["body"]) == (200, f"body {i}")
            assert reply.headers["connection"] == "keep-alive"
        assert [r.path for r, _ in served.recorder.seen] == ["/n/0", "/n/1", "/n/2"]
        assert served.recorder.observed == [("/n/0", 200), ("/n/1", 200), ("/n/2", 200)]


async def test_response_carries_the_standard_fields_and_its_length() -> None:
    """Every answer has Server, Content-Type, Content-Length, Cache-Control, nosniff and Date."""
    async with serving() as served:
        client = await served.connect()
        await client.send(get("/a?b=c"))
        reply = await client.reply()
    assert reply.json() == {
        "method": "GET",
        "path": "/a",
        "query": "b=c",
        "version": "1.1",
        "body": "",
    }
    assert reply.headers["server"] == "test/1"
    assert reply.headers["content-type"] == "application/json"
    assert int(reply.headers["content-length"]) == len(reply.body)
    assert reply.headers["cache-control"] == "no-store"
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.headers["date"].endswith(" GMT")


async def test_pipelined_requests_of_every_framing_are_answered_in_order() -> None:
    """Requests pipelined in one write, with every body framing, are answered in order."""
    async with serving() as served:
        client = await served.connect()
        wire = (
            get("/1")
            + post(b"two", "/2")
            + POST_CHUNKED.replace(b"POST /", b"POST /3")
            + chunked(b"th", b"ree")
            + get("/4")
            + post(b"", "/5")
        )
        await client.send(wire)  # in one write: the server holds what follows each request
        replies = [await client.reply() for _ in range(5)]
    assert [(r.json()["path"], r.json()["body"]) for r in replies] == [
        ("/1", ""),
        ("/2", "two"),
        ("/3", "three"),
        ("/4", ""),
        ("/5", ""),
    ]
    assert all(r.headers["connection"] == "keep-alive" for r in replies)


async def test_request_sent_one_byte_at_a_time_is_read_whole() -> None:
    """A request that arrives one byte per write is read whole."""
    async with serving() as served:
        client = await served.connect()
        for byte in post(b"slowly", "/trickle"):
            await client.send(bytes([byte]))
        reply = await client.reply()
    assert (reply.json()["path"], reply.json()["body"]) == ("/trickle", "slowly")


async def test_empty_lines_before_a_request_line_are_skipped_up_to_a_few() -> None:
    """A few empty lines before a request are skipped; one more is a 400 and a close."""
    async with serving() as served:
        client = await served.connect()
        await client.send(b"\r\n" * MAX_EMPTY_LINES + get("/after"))
        assert (await client.reply()).json()["path"] == "/after"
        await client.send(b"\r\n" * (MAX_EMPTY_LINES + 1) + get("/too-many"))
        reply = await client.reply()
        assert (reply.status, reply.headers["connection"]) == (400, "close")
        assert await client.closed()
        assert [r.path for r, _ in served.recorder.seen] == ["/after"]


async def test_http10_and_connection_close_get_one_request_per_connection() -> None:
    """HTTP/1.0 and Connection: close get one answer, then the connection closes."""
    async with serving() as served:
        for wire in (get("/old", version=b"1.0"), get("/bye", b"Connection: close\r\n")):
            client = await served.connect()
            await client.send(wire + get("/never"))
            reply = await client.reply()
            assert (reply.status, reply.headers["connection"]) == (200, "close")
            assert await client.closed()
        assert [r.path for r, _ in served.recorder.seen] == ["/old", "/bye"]
        assert served.recorder.seen[0][0].version == "1.0"


async def test_while_the_handler_drains_answers_say_close_and_the_connection_closes() -> None:
    """While the server drains, an answer says Connection: close and the connection ends."""
    async with serving() as served:
        served.recorder.draining = True
        client = await served.connect()
        await client.send(get("/last"))
        reply = await client.reply()
        assert (reply.status, reply.headers["connection"]) == (200, "close")
        assert await client.closed()


async def test_an_upgrade_request_is_answered_as_any_other_and_keeps_the_connection() -> None:
    """An Upgrade request is answered as plain HTTP and the connection stays usable."""
    async with serving() as served:
        client = await served.connect()
        await client.send(get("/up", b"Upgrade: h2c\r\nConnection: Upgrade\r\n") + get("/next"))
        replies = [await client.reply() for _ in range(2)]
    assert [r.json()["path"] for r in replies] == ["/up", "/next"]


async def test_head_gets_the_length_of_a_get_and_no_body_and_the_connection_stays_in_step() -> None:
    """HEAD gets a GET's Content-Length without a body, and the next answer is in step."""
    async with serving() as served:
        client = await served.connect()
        await client.send(get("/x").replace(b"GET", b"HEAD", 1) + get("/y"))
        head = await client.reply(head_only=True)
        assert head.status == 200 and head.body == b""
        assert int(head.headers["content-length"]) > 0
        assert (await client.reply()).json()["path"] == "/y"


# Bodies.


async def test_chunked_body_with_extensions_and_trailers_is_assembled() -> None:
    """A chunked body with chunk extensions and trailers is assembled into its bytes."""
    async with serving() as served:
        client = await served.connect()
        body = b"0123456789abcdef"
        wire = b"".join(
            b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in (body[:3], body[3:11], body[11:])
        )
        await client.send(POST_CHUNKED + wire + b"0\r\nX-Trailer: 1\r\n\r\n" + get("/after"))
        assert (await client.reply()).json()["body"] == body.decode()
        assert (await client.reply()).json()["path"] == "/after"


async def test_expect_100_continue_gets_an_interim_answer_before_the_body_is_sent() -> None:
    """Expect: 100-continue gets 100 Continue before the client sends the body."""
    async with serving() as served:
        client = await served.connect()
        await client.send(
            b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        assert await client.head() == b"HTTP/1.1 100 Continue\r\n\r\n"
        await client.send(b"hello")
        reply = await client.reply()
        assert (reply.status, reply.json()["body"]) == (200, "hello")


async def test_expect_100_continue_over_the_limit_gets_413_and_no_interim_answer() -> None:
    """Expect: 100-continue with a length over the limit gets 413, never 100 Continue."""
    async with serving() as served:
        client = await served.connect()
        await client.send(
            b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % (LIMIT + 1)
        )
        reply = await client.reply()
        assert (reply.status, reply.headers["connection"]) == (413, "close")
        assert await client.closed()


async def test_expect_100_continue_is_ignored_in_http10() -> None:
    """HTTP/1.0 has no 100 Continue: the body is read and answered directly."""
    async with serving() as served:
        client = await served.connect()
        await client.send(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi")
        reply = await client.reply()  # the answer itself, no interim one
        assert (reply.status, reply.json()["body"]) == (200, "hi")


async def test_content_length_over_the_limit_is_refused_before_the_body_is_sent() -> None:
    """A Content-Length over the limit gets 413 before any body byte, the handler never called."""
    async with serving() as served:
        client = await served.connect()
        await client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (LIMIT + 1))
        reply = await client.reply()
        assert (reply.status, reply.headers["connection"]) == (413, "close")
        assert await client.closed()
        assert served.recorder.seen == []
        assert served.recorder.observed == [("/", 413)]


@pytest.mark.parametrize("width", [3, 20, 21, 40])
async def test_content_length_with_leading_zeros_is_read_as_its_value(width: int) -> None:
    """A Content-Length with leading zeros, of any width, is read as its value."""
    async with serving() as served:
        client = await served.connect()
        length = b"5".zfill(width)
        await client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\nhello" % length)
        reply = await client.reply()
        assert (reply.status, reply.json()["body"]) == (200, "hello")


async def test_content_length_of_5000_digits_gets_413() -> None:
    """A Content-Length of 5000 digits gets 413, not a 500."""
    async with serving() as served:
        client = await served.connect()
        await client.send(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\n" % (b"9" * 5000)
        )
        assert (await client.reply()).status == 413
        assert await client.closed()


async def test_chunked_body_is_cut_at_the_limit_while_it_streams() -> None:
    """A chunked body is refused with 413 as soon as it passes the limit, mid-stream."""
    async with serving() as served:
        client = await served.connect()
        await client.send(POST_CHUNKED)
        for _ in range(LIMIT // 100 + 1):  # just past the limit, and no last chunk
            await client.send(b"64\r\n" + b"x" * 100 + b"\r\n")
        reply = await client.reply()
        assert (reply.status, reply.headers["connection"]) == (413, "close")
        assert await client.closed()
        assert served.recorder.seen == []


@pytest.mark.parametrize("size", [b"%x" % (LIMIT + 1), b"123456789"])
async def test_chunk_declaring_more_than_the_limit_is_refused_before_its_bytes(
    size: bytes,
) -> None:
    """A chunk whose declared size passes the limit gets 413 before its bytes come."""
    async with serving() as served:
        client = await served.connect()
        await client.send(POST_CHUNKED + size + b"\r\n")  # and none of its bytes
        reply = await client.reply()
        assert (reply.status, reply.headers["connection"]) == (413, "close")


@pytest.mark.parametrize(
    ("wire", "status"),
    [
        pytest.param(b"zz\r\n", 400, id="size-not-hex"),
        pytest.param(b"3\r\nabcXY", 400, id="no-crlf-after-data"),
        pytest.param(b"3;" + b"e" * (MAX_HEAD_BYTES + 10), 431, id="size-line-too-long"),
    ],
)
async def test_malformed_chunk_gets_the_status_h11_gives_it(wire: bytes, status: int) -> None:
    """A malformed chunk gets h11's status and our own error text, never h11's."""
    async with serving() as served:
        client = await served.connect()
        await client.send(POST_CHUNKED + wire)
        reply = await client.reply()
        assert (reply.status, reply.headers["connection"]) == (status, "close")
        assert "illegal" not in reply.json()["error"]  # never h11's text, which quotes bytes


async def test_a_body_left_unread_by_an_error_is_drained_before_the_close() -> None:
    """After an early error the unread body is drained, so the close is orderly, not a reset."""
    recorder = Recorder()
    recorder.fail = HttpError(404, "nothing here")
    async with serving(recorder) as served:
        client = await served.connect()
        # The answer comes before the body is read. Closing a socket with unread
        # data would send a reset, which could destroy the answer on its way
        # (RFC 9112 §9.6): the server reads and drops the body, then closes.
        body = b"x" * 1_000_000
        client.writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
        client.writer.write(body)
        reply = await client.reply()
        assert (reply.status, reply.headers["connection"]) == (404, "close")
        await client.writer.drain()
        client.writer.write_eof()
        async with asyncio.timeout(TIMEOUT):
            assert await client.reader.read() == b""  # an orderly close, not a reset


async def test_an_error_on_a_request_without_body_keeps_the_connection() -> None:
    """An error answer to a request without a body keeps the connection alive."""
    recorder = Recorder()
    recorder.fail = HttpError(404, "nothing here")
    async with serving(recorder) as served:
        client = await served.connect()
        await client.send(get("/a") + get("/b"))
        replies = [await client.reply() for _ in range(2)]
        assert [(r.status, r.headers["connection"]) for r in replies] == [(404, "keep-alive")] * 2


async def test_peer_closing_inside_a_body_ends_the_connection_quietly() -> None:
    """A peer that closes mid-body ends the connection with no answer and nothing logged."""
    async with serving() as served:
        client = await served.connect()
        await client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        client.writer.write_eof()
        assert await client.closed()  # no answer, nothing logged (checked on leaving)
        assert served.recorder.observed == []


async def test_an_unexpected_error_in_the_handler_is_a_500_logged_once() -> None:
    """A bug in the handler is a 500 and a close, logged once."""
    recorder = Recorder()
    recorder.fail = RuntimeError("bug")
    async with serving(recorder) as served:
        client = await served.connect()
        await client.send(get("/bug"))
        reply = await client.reply()
        assert (reply.status, reply.headers["connection"]) == (500, "close")
        assert await client.closed()
        assert [(level, event) for level, event, _ in served.log.events] == [
            ("exception", "test_request_failed")
        ]
        served.log.events.clear()


# Heads refused: where h11 is more lenient than we are, and where it refuses.

REFUSED = {
    "length-and-chunked": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n",
    "two-equal-lengths": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
    b"Content-Length: 3\r\n\r\nabc",
    "two-lengths": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
    "length-list": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc",
    "length-signed": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
    "length-empty": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \r\n\r\n",
    "gzip-coding": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    "chunked-twice-in-one": b"POST / HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: chunked, chunked\r\n\r\n",
    "two-codings": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n 2\r\n\r\n",
    "obs-fold-tab": b"GET / HTTP/1.1\r\nHost: x\r\n\tfolded\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    "length-space-before-colon": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length : 3\r\n\r\nabc",
    "control-character": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n",
    "delete-character": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x7fb\r\n\r\n",
    "nul": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: \x00\r\n\r\n",
    "bare-cr": b"GET / HTTP/1.1\r\nHost: x\rX-A: 1\r\n\r\n",
    "bare-lf": b"GET / HTTP/1.1\nHost: x\n\n",
    "one-bare-lf": b"GET / HTTP/1.1\r\nHost: x\nX-A: 1\r\n\r\n",
    "target-not-ascii": b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    "absolute-target": b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
    "asterisk-target": b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    "authority-target": b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n",
    "http-2.0": b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
    "http-0.9": b"GET / HTTP/0.9\r\n\r\n",
    "no-version": b"GET /\r\n\r\n",
    "no-host": b"GET / HTTP/1.1\r\n\r\n",
    "two-hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "two-authorizations": b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: a\r\n"
    b"Authorization: b\r\n\r\n",
    "two-content-types": b"GET / HTTP/1.1\r\nHost: x\r\nContent-Type: a\r\nContent-Type: b\r\n\r\n",
    "header-without-colon": b"GET / HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n",
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
}


@pytest.mark.parametrize("wire", REFUSED.values(), ids=REFUSED.keys())
async def test_request_that_could_be_read_two_ways_or_is_malformed_gets_400_and_close(
    wire: bytes,
) -> None:
    """A head that could be framed two ways, or is malformed, gets 400 and a close."""
    async with serving() as served:
        client = await served.connect()
        await client.send(wire)
        reply = await client.reply()
        assert (reply.status, reply.headers["connection"]) == (400, "close")
        assert await client.closed()
        assert served.recorder.seen == []  # the handler never saw it
        assert served.recorder.observed == [(None, 400)]


async def test_a_bare_lf_is_refused_before_the_head_ends() -> None:
    """A bare LF is refused at once, not after the header timeout."""
    # No blank line: waiting for the end of the head would take the header timeout.
    async with serving(header_timeout_s=60.0) as served:
        client = await served.connect()
        await client.send(b"GET / HTTP/1.1\nHost: x\n")
        assert (await client.reply()).status == 400


async def test_head_over_the_size_limit_gets_431() -> None:
    """A head over the size limit gets 431 and a close."""
    async with serving() as served:
        client = await served.connect()
        await client.send(get("/", b"X-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\n"))
        reply = await client.reply()
        assert (reply.status, reply.headers["connection"]) == (431, "close")
        assert await client.closed()


async def test_head_without_an_end_gets_431_once_past_the_size_limit() -> None:
    """A head that never ends gets 431 once it passes the size limit."""
    async with serving() as served:
        client = await served.connect()
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * MAX_HEAD_BYTES)
        assert (await client.reply()).status == 431


async def test_header_fields_are_counted_up_to_the_limit() -> None:
    """The maximum number of header fields is accepted; one more gets 431."""
    async with serving() as served:
        client = await served.connect()
        fields = b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_HEADERS - 1))  # and Host
        await client.send(get("/", fields))
        reply = await client.reply()
        assert reply.status == 200
        await client.send(get("/", fields + b"X-One-More: 1\r\n"))
        reply = await client.reply()
        assert (reply.status, reply.headers["connection"]) == (431, "close")


async def test_repeated_fields_are_joined_and_names_lowercased() -> None:
    """Repeated fields are joined with commas, names lowercased, obs-text read as latin-1."""
    async with serving() as served:
        client = await served.connect()
        await client.send(get("/", b"Accept: a\r\nACCEPT: b\r\nX-Odd-Bytes: \xff\r\n"))
        assert (await client.reply()).status == 200
        headers = served.recorder.seen[0][0].headers
        assert headers["accept"] == "a, b"
        assert headers["x-odd-bytes"] == "\xff"  # obs-text, as latin-1


# Deadlines.


async def test_a_slow_head_gets_408_and_is_closed() -> None:
    """A head not complete within the header timeout gets 408 and a close."""
    async with serving(header_timeout_s=0.3) as served:
        client = await served.connect()
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the end
        reply = await client.reply()
        assert (reply.status, reply.headers["connection"]) == (408, "close")
        assert await client.closed()


async def test_a_slow_body_gets_408_and_is_closed() -> None:
    """A body not complete within the body timeout gets 408 and a close."""
    async with serving(body_timeout_s=0.3) as served:
        client = await served.connect()
        await client.send(POST_CHUNKED + b"5\r\nab")
        reply = await client.reply()
        assert (reply.status, reply.headers["connection"]) == (408, "close")
        assert await client.closed()


async def test_an_idle_connection_is_closed_quietly() -> None:
    """A connection idle past the timeout, before or after a request, is closed unanswered."""
    async with serving(header_timeout_s=0.3, idle_timeout_s=0.3) as served:
        silent = await served.connect()
        assert await silent.closed()
        client = await served.connect()
        await client.send(get())
        assert (await client.reply()).status == 200
        assert await client.closed()  # idle after one request
        assert served.recorder.observed == [("/", 200)]


# The connection limit, and stopping.


async def test_a_connection_past_the_limit_gets_503_and_is_closed() -> None:
    """A connection past the limit gets 503 with Retry-After at once, then a close."""
    async with serving(max_connections=1) as served:
        held = await served.connect()
        await held.send(get())
        assert (await held.reply()).status == 200  # answered, so counted
        extra = await served.connect()
        reply = await extra.reply()  # without a request: the refusal comes first
        assert (reply.status, reply.headers["connection"]) == (503, "close")
        assert reply.json() == {"error": "too many Test connections"}
        assert 1 <= int(reply.headers["retry-after"]) <= 5
        assert await extra.closed()
        assert served.recorder.observed == [("/", 200), (None, 503)]


async def test_a_connection_past_twice_the_limit_is_dropped_unanswered() -> None:
    """Past twice the limit a connection is closed without an answer, still counted."""
    async with serving(max_connections=0) as served:
        client = await served.connect()
        assert await client.closed()
        assert served.recorder.observed == [(None, 503)]


async def test_stopping_closes_idle_connections_at_once() -> None:
    """Stopping the server closes idle keep-alive connections at once."""
    async with serving() as served:
        client = await served.connect()
        await client.send(get())
        assert (await client.reply()).headers["connection"] == "keep-alive"
        assert await served.server.stop() == (1, 0)
        assert await client.closed()
        assert served.server.connections == 0
