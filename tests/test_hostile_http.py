"""Hostile HTTP on both listeners: every malformed request gets a 4xx, none a 500 or a traceback.

The gateway runs as a subprocess (its log is what these tests read) with the
publish API on and a bearer token set. Requests are bytes written by hand:
two ``Origin`` or ``Host`` headers, a target that is not UTF-8, numbers of
5000 digits, bare-LF line endings, lengths padded with zeros. Each answer is
read up to the end of its head; what a row promises about the log (no
traceback, no header value, no token, no body) is checked on the lines the
gateway wrote while the test ran.

The log's own defence is tested here too: a repeated warning is written a
bounded number of times, and ``rtgateway_log_events_total`` keeps the real
count. The repeated error comes from a fault injected into a gateway
subprocess (a ``sitecustomize`` that makes every join fail), since no
request from the network is supposed to cause one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hardening_support import ascrape, metric, tracebacks
from support import GatewayProcess, http_get
from wire import RawConnection

TOKEN = "tok-" + os.urandom(12).hex()
# Values that must never reach the log, whatever the request does.
SECRET_HEADER = "hdr-" + os.urandom(8).hex()
SECRET_BODY = "body-" + os.urandom(8).hex()
REJECTIONS = "rtgateway_handshake_rejections_total"
UPGRADE = (
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)
AUTH = b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
ANSWER_TIMEOUT_S = 5.0  # far below every header timeout (10 s): an answer, not a 408


class Gateway:
    def __init__(self, proc: GatewayProcess) -> None:
        self.proc = proc
        listening = next(e for e in proc.events if e.get("event") == "gateway_listening")
        self.ws_port = proc.port or 0
        self.api_port = int(listening["api_addresses"][0].rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def gw() -> Iterator[Gateway]:
    env = {
        "RTG_API_ADDR": "127.0.0.1:0",
        "RTG_API_TOKEN": TOKEN,
        "RTG_STATS_INTERVAL_S": "0",
        "RTG_ALLOWED_ORIGINS": "http://app.example",
    }
    with GatewayProcess(env) as proc:
        yield Gateway(proc)


@contextlib.contextmanager
def clean_log(proc: GatewayProcess) -> Iterator[list[str]]:
    """The lines logged inside the block; none may carry a traceback or a secret."""
    start = len(proc.lines)
    lines: list[str] = []
    yield lines
    # A scrape is answered after everything sent before it was handled; the
    # reader thread then has the lines.
    http_get(proc.url + "/healthz")
    lines += proc.lines[start:]
    bad = tracebacks(lines)
    assert not bad, "exceptions in the gateway log:\n" + "\n".join(bad[:3])
    for secret in (TOKEN, SECRET_HEADER, SECRET_BODY):
        leaked = [line for line in lines if secret in line]
        assert not leaked, f"{secret[:4]}… reached the log:\n" + "\n".join(leaked[:3])


async def answer(port: int, data: bytes, timeout: float = ANSWER_TIMEOUT_S) -> int | None:
    """Send ``data`` on a fresh connection: the status of the answer, None if closed unanswered."""
    conn = await RawConnection.connect(port)
    try:
        with contextlib.suppress(ConnectionError):
            await conn.send(data)
        async with asyncio.timeout(timeout):
            try:
                head = await conn.reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
        return int(head.split(b" ", 2)[1])
    finally:
        conn.abort()


# Item 3: a target that is not UTF-8, with the token, a header and a body in the request.


async def test_api_target_that_is_not_utf8_gets_400_and_nothing_of_it_reaches_the_log(
    gw: Gateway,
) -> None:
    """An API target that is not UTF-8 gets 400, and nothing of the request reaches the log."""
    request = (
        b"POST /api/rooms/\xff\xfe\xc3 HTTP/1.1\r\nHost: x\r\n"
        + AUTH
        + b"X-Note: "
        + SECRET_HEADER.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(SECRET_BODY)
        + SECRET_BODY.encode()
    )
    with clean_log(gw.proc) as lines:
        statuses = [await answer(gw.api_port, request) for _ in range(50)]
    assert statuses == [400] * 50
    assert len(lines) < 5, lines[:5]


# Item 4: two Origin headers; a 5000-digit limit.


async def test_two_origin_headers_on_ws_get_400_counted_and_no_traceback(gw: Gateway) -> None:
    """Two Origin headers on /ws get 400, counted, without a traceback."""
    before = metric(await ascrape(gw.proc.url), REJECTIONS, "bad_request")
    request = (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nOrigin: http://app.example\r\n"
        b"Origin: http://evil.example\r\n" + UPGRADE + b"\r\n"
    )
    with clean_log(gw.proc) as lines:
        statuses = [await answer(gw.ws_port, request) for _ in range(50)]
    assert statuses == [400] * 50
    assert len(lines) < 5, lines[:5]
    assert metric(await ascrape(gw.proc.url), REJECTIONS, "bad_request") == before + 50


async def test_rooms_limit_of_5000_digits_gets_400_and_no_traceback(gw: Gateway) -> None:
    """/api/rooms?limit= with 5000 digits gets 400, without a traceback."""
    request = b"GET /api/rooms?limit=" + b"9" * 5000 + b" HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n"
    with clean_log(gw.proc):
        assert await answer(gw.api_port, request) == 400


# Item 6: Content-Length with leading zeros; bare LF; /ws without Host.


async def test_content_length_with_leading_zeros_is_read_as_its_value(gw: Gateway) -> None:
    """A Content-Length with leading zeros is read as its value."""
    body = b'{"room": "zeros", "data": 1}'
    for width in (2, 19, 40):
        length = str(len(body)).zfill(width).encode()
        request = (
            b"POST /api/publish HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Type: application/json"
            b"\r\nContent-Length: " + length + b"\r\n\r\n" + body
        )
        assert await answer(gw.api_port, request) == 200, width


@pytest.mark.parametrize("listener", ["api", "ws"])
async def test_bare_lf_line_endings_are_refused_at_once_with_400(
    gw: Gateway, listener: str
) -> None:
    """Bare-LF line endings, even one among CRLFs, get 400 at once on either port."""
    port = gw.api_port if listener == "api" else gw.ws_port
    path = b"/api/info" if listener == "api" else b"/healthz"
    requests = [
        b"GET " + path + b" HTTP/1.1\nHost: x\n" + AUTH.replace(b"\r\n", b"\n") + b"\n",
        # Mixed: one bare LF among CRLFs, as a request-smuggling probe would send.
        b"GET " + path + b" HTTP/1.1\r\nHost: x\nX-A: 1\r\n" + AUTH + b"\r\n",
    ]
    with clean_log(gw.proc):
        for request in requests:
            assert await answer(port, request) == 400


async def test_ws_without_host_or_with_two_is_refused_with_400(gw: Gateway) -> None:
    """A handshake without Host, or with two, gets 400, counted."""
    before = metric(await ascrape(gw.proc.url), REJECTIONS, "bad_request")
    with clean_log(gw.proc):
        assert await answer(gw.ws_port, b"GET /ws HTTP/1.1\r\n" + UPGRADE + b"\r\n") == 400
        two = b"GET /ws HTTP/1.1\r\nHost: a\r\nHost: b\r\n" + UPGRADE + b"\r\n"
        assert await answer(gw.ws_port, two) == 400
    assert metric(await ascrape(gw.proc.url), REJECTIONS, "bad_request") == before + 2


# The sweep: many malformed variants on each listener.

WS_SWEEP: dict[str, bytes] = {
    "two_origins": b"GET /ws HTTP/1.1\r\nHost: x\r\nOrigin: a\r\nOrigin: b\r\n" + UPGRADE,
    "two_origins_on_echo": b"GET /ws/echo HTTP/1.1\r\nHost: x\r\nOrigin: a\r\nOrigin: b\r\n"
    + UPGRADE,
    "two_hosts_on_healthz": b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n",
    "no_host_on_metrics": b"GET /metrics HTTP/1.1\r\n",
    "two_keys": b"GET /ws HTTP/1.1\r\nHost: x\r\n" + UPGRADE + b"Sec-WebSocket-Key: AAAA\r\n",
    "two_versions": b"GET /ws HTTP/1.1\r\nHost: x\r\n" + UPGRADE + b"Sec-WebSocket-Version: 8\r\n",
    "two_upgrades": b"GET /ws HTTP/1.1\r\nHost: x\r\n" + UPGRADE + b"Upgrade: h2c\r\n",
    "bad_key": b"GET /ws HTTP/1.1\r\nHost: x\r\n"
    + UPGRADE.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"!"),
    "origin_not_ascii": b"GET /ws HTTP/1.1\r\nHost: x\r\nOrigin: http://\xff\xfe\r\n" + UPGRADE,
    "path_not_ascii": b"GET /ws/\xff HTTP/1.1\r\nHost: x\r\n" + UPGRADE,
    "path_percent_ff": b"GET /ws%ff HTTP/1.1\r\nHost: x\r\n" + UPGRADE,
    "absolute_target": b"GET http://x/ws HTTP/1.1\r\nHost: x\r\n" + UPGRADE,
    "asterisk_target": b"OPTIONS * HTTP/1.1\r\nHost: x\r\n",
    "connect": b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n",
    "http_2": b"GET /ws HTTP/2.0\r\nHost: x\r\n" + UPGRADE,
    "lowercase_method": b"get /ws HTTP/1.1\r\nHost: x\r\n" + UPGRADE,
    "header_without_colon": b"GET /ws HTTP/1.1\r\nHost: x\r\nNoColon\r\n" + UPGRADE,
    "space_before_colon": b"GET /ws HTTP/1.1\r\nHost : x\r\n" + UPGRADE,
    "obs_fold": b"GET /ws HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n 2\r\n" + UPGRADE,
    "nul_in_header": b"GET /ws HTTP/1.1\r\nHost: x\r\nX-A: \x00\r\n" + UPGRADE,
    "bare_cr": b"GET /ws HTTP/1.1\r\nHost: x\rX-A: 1\r\n" + UPGRADE,
    "chunked_body": b"GET /ws HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n" + UPGRADE,
    "length_body": b"GET /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n"
    + UPGRADE,
    "extension_garbage": b"GET /ws HTTP/1.1\r\nHost: x\r\n"
    + UPGRADE
    + b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits=99;;,\r\n",
    "subprotocol_garbage": b"GET /ws HTTP/1.1\r\nHost: x\r\n"
    + UPGRADE
    + b"Sec-WebSocket-Protocol: ,,\xff\r\n",
    "query_5000_digits": b"GET /ws?limit=" + b"9" * 5000 + b" HTTP/1.1\r\nHost: x\r\n" + UPGRADE,
    "only_crlf": b"\r\n" * 8,
}

# Odd but well-formed: an upgrade is a correct answer to these.
# (websockets offers no extension, so it reads no Sec-WebSocket-Extensions.)
LEGAL_UPGRADES = {"query_5000_digits", "extension_garbage"}

API_SWEEP: dict[str, bytes] = {
    "target_not_utf8": b"GET /api/rooms/\xff HTTP/1.1\r\nHost: x\r\n" + AUTH,
    "room_percent_ff": b"GET /api/rooms/%ff%c0%80 HTTP/1.1\r\nHost: x\r\n" + AUTH,
    "limit_5000_digits": b"GET /api/rooms?limit="
    + b"9" * 5000
    + b" HTTP/1.1\r\nHost: x\r\n"
    + AUTH,
    "limit_negative": b"GET /api/rooms?limit=-1 HTTP/1.1\r\nHost: x\r\n" + AUTH,
    "limit_unicode_digits": b"GET /api/rooms?limit=%D9%A3 HTTP/1.1\r\nHost: x\r\n" + AUTH,
    "cursor_not_utf8": b"GET /api/rooms?cursor=%ff HTTP/1.1\r\nHost: x\r\n" + AUTH,
    "query_not_utf8": b"GET /api/rooms?\xff=1 HTTP/1.1\r\nHost: x\r\n" + AUTH,
    "query_many_fields": b"GET /api/rooms?"
    + b"&".join([b"a=1"] * 500)
    + b" HTTP/1.1\r\nHost: x\r\n"
    + AUTH,
    "two_hosts": b"GET /api/info HTTP/1.1\r\nHost: a\r\nHost: b\r\n" + AUTH,
    "no_host": b"GET /api/info HTTP/1.1\r\n" + AUTH,
    "two_tokens": b"GET /api/info HTTP/1.1\r\nHost: x\r\n" + AUTH + AUTH,
    "token_of_high_bytes": b"GET /api/info HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\r\n",
    "length_plus": b"POST /api/publish HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Length: +5\r\n",
    "length_list": b"POST /api/publish HTTP/1.1\r\nHost: x\r\n"
    + AUTH
    + b"Content-Length: 5, 5\r\n",
    "length_unicode_digits": b"POST /api/publish HTTP/1.1\r\nHost: x\r\n"
    + AUTH
    + "Content-Length: \u0663\r\n".encode(),
    "length_5000_digits": b"POST /api/publish HTTP/1.1\r\nHost: x\r\n"
    + AUTH
    + b"Content-Type: application/json\r\nContent-Length: "
    + b"9" * 5000
    + b"\r\n",
    "chunk_size_9_digits": b"POST /api/publish HTTP/1.1\r\nHost: x\r\n"
    + AUTH
    + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n123456789\r\n",
    "coding_twice": b"POST /api/publish HTTP/1.1\r\nHost: x\r\n"
    + AUTH
    + b"Content-Type: application/json\r\nTransfer-Encoding: chunked, chunked\r\n",
    "json_1e999": b"POST /api/publish HTTP/1.1\r\nHost: x\r\n"
    + AUTH
    + b'Content-Type: application/json\r\nContent-Length: 27\r\n\r\n{"room": "r", "data": 1e999}',
    "method_token_weird": b"G%T /api/info HTTP/1.1\r\nHost: x\r\n" + AUTH,
    "http_2": b"GET /api/info HTTP/2.0\r\nHost: x\r\n" + AUTH,
    "bare_cr": b"GET /api/info HTTP/1.1\r\nHost: x\rX: 1\r\n" + AUTH,
    "nul_in_header": b"GET /api/info HTTP/1.1\r\nHost: x\r\nX: \x00\r\n" + AUTH,
    "content_type_not_latin1": b"POST /api/publish HTTP/1.1\r\nHost: x\r\n"
    + AUTH
    + b"Content-Type: application/\xff\r\nContent-Length: 2\r\n\r\n{}",
    "only_crlf": b"\r\n" * 8,
}


def _terminate(request: bytes) -> bytes:
    return request if request.endswith(b"\r\n\r\n") or b"\r\n\r\n" in request else request + b"\r\n"


@pytest.mark.parametrize(
    ("listener", "case"), [*(("ws", c) for c in WS_SWEEP), *(("api", c) for c in API_SWEEP)]
)
async def test_hostile_request_gets_no_500_and_no_traceback(
    gw: Gateway, listener: str, case: str
) -> None:
    """Each request of the sweep gets no 500, no traceback, and no upgrade unless legal."""
    port, request = (
        (gw.ws_port, WS_SWEEP[case]) if listener == "ws" else (gw.api_port, API_SWEEP[case])
    )
    with clean_log(gw.proc):
        status = await answer(port, _terminate(request))
        assert status is None or 400 <= status < 500 or status in (101, 200), status
        if listener == "ws" and case not in LEGAL_UPGRADES:
            assert status != 101, "a malformed request was upgraded"
    status, body, _ = await asyncio.to_thread(http_get, gw.proc.url + "/healthz")
    assert (status, body) == (200, "ok")


# The log's defence: a repeated error is written a bounded number of times.

FAULT = """
import rtgateway.session as session

def join(self, msg):
    raise RuntimeError("injected fault " + msg.room)

session.Session.join = join
"""


@pytest.fixture
def faulty_gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    (tmp_path / "sitecustomize.py").write_text(FAULT)
    env = {
        "PYTHONPATH": str(tmp_path),
        "RTG_STATS_INTERVAL_S": "0",
        "RTG_RATE_LIMIT_MSGS_PER_S": "100000",
        "RTG_RATE_LIMIT_BURST": "100000",
    }
    with GatewayProcess(env) as proc:
        yield proc


async def test_a_repeated_error_is_logged_a_bounded_number_of_times_and_counted(
    faulty_gateway: GatewayProcess,
) -> None:
    """400 identical errors: a bounded number of lines, all counted, no locals logged."""
    proc = faulty_gateway
    assert proc.port is not None
    joins = 400
    start = len(proc.lines)
    conn = await RawConnection.open(proc.port, "/ws")
    assert (await conn.recv_json())["op"] == "hello"
    for i in range(joins):
        await conn.send_json({"op": "join", "room": f"r{i}", "id": i})
        reply = await conn.recv_json()
        assert (reply["op"], reply["code"], reply["id"]) == ("error", "internal", i), reply
    conn.abort()
    samples = await ascrape(proc.url)
    # The real count, every one of them.
    assert metric(samples, "rtgateway_log_events_total", "error") >= joins
    suppressed = metric(samples, "rtgateway_log_events_suppressed_total", "error")
    events = [json.loads(line) for line in proc.lines[start:] if line.startswith("{")]
    failed = [e for e in events if e.get("event") == "message_failed"]
    # A handful written, the rest counted, not written.
    assert 1 <= len(failed) <= 20, len(failed)
    assert suppressed == joins - len(failed)
    # Tracebacks carry frames and no local variables.
    frames: list[dict[str, Any]] = [f for e in failed for x in e["exception"] for f in x["frames"]]
    assert frames and not any("locals" in f for f in frames)
