"""The bad-input table (docs/hardening.md): one test per row, on loopback.

Rows that promise "no traceback in the log" run the gateway as a subprocess
(:class:`support.GatewayProcess`) and read its JSON log; the rest run it
in-process (``running_gateway``) and read its metrics object directly. Hostile
bytes go out through :mod:`wire`, which builds frames no good client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import websockets
from conftest import raw_gateway
from hardening_support import (
    ascrape,
    metric,
    rss_bytes,
    scrape,
    tls_client_hello,
    tracebacks,
)
from support import GatewayProcess, eventually, http_get, wait_until
from websockets.exceptions import InvalidStatus
from wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    HandshakeRefused,
    RawConnection,
    close_payload,
    encode_frame,
    handshake_request,
    http_exchange,
)

from rtgateway.client import Client

DISCONNECTS = "rtgateway_disconnects_total"
REJECTIONS = "rtgateway_handshake_rejections_total"


# Helpers.


async def eventually_metric(
    base_url: str, name: str, labels: tuple[str, ...], at_least: float, timeout: float = 10.0
) -> float:
    deadline = time.monotonic() + timeout
    while True:
        value = metric(await ascrape(base_url), name, *labels)
        if value >= at_least:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} stayed at {value}, wanted >= {at_least}")
        await asyncio.sleep(0.05)


async def joined(port: int, room: str, **kwargs: Any) -> RawConnection:
    """A raw member of ``room``: hello read, join acknowledged."""
    conn = await RawConnection.open(port, "/ws", **kwargs)
    hello = await conn.recv_json()
    assert hello["op"] == "hello", hello
    await conn.send_json({"op": "join", "room": room, "id": "join"})
    ack = await conn.recv_json()
    assert ack["op"] == "ack" and ack["id"] == "join", ack
    return conn


async def assert_alive(conn: RawConnection, id: str = "alive") -> None:
    """The connection still answers: a protocol ping gets its pong."""
    await conn.send_json({"op": "ping", "id": id})
    reply = await conn.recv_json()
    while reply["op"] == "message":  # publications may be on their way
        reply = await conn.recv_json()
    assert reply == {"op": "pong", "id": id}, reply


async def messages_of(conn: RawConnection, count: int, timeout: float = 10.0) -> list[Any]:
    """The next ``count`` publications this member receives (other frames skipped)."""
    got = []
    while len(got) < count:
        msg = await conn.recv_json(timeout)
        if msg.get("op") == "message":
            got.append(msg)
    return got


async def answer_close(conn: RawConnection, code: int | None) -> None:
    """What a well-behaved client does after the server's close frame: echo it, close TCP."""
    with contextlib.suppress(ConnectionError):
        await conn.send_frame(OP_CLOSE, close_payload(code))
    await conn.close()


async def log_caught_up(proc: GatewayProcess) -> None:
    """Wait until every line the gateway wrote so far has been read from its pipe.

    The gateway writes its lines in order: once a marker connection's own
    ``connection_closed`` line (debug level) is read, every earlier one is.
    """
    assert proc.port is not None
    marker = await RawConnection.open(proc.port, "/ws/echo")
    await marker.send_frame(OP_CLOSE, close_payload(1000))
    await marker.wait_eof()
    await marker.close()
    port = marker.writer.get_extra_info("sockname")[1]

    def marker_closed() -> bool:
        return any(
            e.get("event") == "connection_closed" and e.get("peer") == f"127.0.0.1:{port}"
            for e in proc.events
        )

    await asyncio.to_thread(wait_until, marker_closed, 10, what="the marker's closing line")


@contextlib.asynccontextmanager
async def no_new_tracebacks(proc: GatewayProcess) -> AsyncIterator[None]:
    start = len(proc.lines)
    yield
    await log_caught_up(proc)
    bad = tracebacks(proc.lines[start:])
    assert not bad, "exceptions in the gateway log:\n" + "\n".join(bad[:5])


@pytest.fixture(scope="module")
def proc() -> Iterator[GatewayProcess]:
    """One gateway subprocess for the rows that read the log; a 1 s open timeout."""
    # Debug level: connection_closed lines are what log_caught_up() waits for.
    env = {"RTG_OPEN_TIMEOUT_S": "1", "RTG_STATS_INTERVAL_S": "0", "RTG_LOG_LEVEL": "debug"}
    with GatewayProcess(env) as gw:
        yield gw
        assert not tracebacks(gw.lines), "\n".join(tracebacks(gw.lines)[:5])


# Row: handshake sent one byte at a time (slowloris).


async def test_slowloris_handshake_is_dropped_at_the_open_timeout_and_counted(
    proc: GatewayProcess,
) -> None:
    """A handshake sent a byte at a time is dropped at the open timeout and counted."""
    assert proc.port is not None
    before = metric(await ascrape(proc.url), REJECTIONS, "timeout")
    request = handshake_request("/ws")
    async with no_new_tracebacks(proc):
        conn = await RawConnection.connect(proc.port)
        eof = asyncio.ensure_future(conn.wait_eof(timeout=30))
        sent = 0
        try:
            for byte in request:
                if eof.done():
                    break
                await conn.send(bytes([byte]))
                sent += 1
                # The trickle is the attack: ~9 s for the request, against a 1 s timeout.
                await asyncio.sleep(0.05)
            response = await eof
        finally:
            conn.abort()
        assert sent < len(request), "the gateway waited for the whole trickled handshake"
        assert b" 101 " not in response
        await eventually_metric(proc.url, REJECTIONS, ("timeout",), before + 1)


# Row: oversized request line or too many headers; POST or HTTP/1.0 on /ws;
# garbage or a TLS hello on the plain port.

KEY_HEADERS = (
    b"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)
BAD_REQUESTS = {
    "request_line_over_8k": (b"GET /ws?" + b"a" * 10_000 + b" HTTP/1.1\r\n" + KEY_HEADERS, {414}),
    "header_over_8k": (
        b"GET /ws HTTP/1.1\r\nX-Big: " + b"a" * 10_000 + b"\r\n" + KEY_HEADERS,
        {431},
    ),
    "200_headers": (
        b"GET /ws HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + KEY_HEADERS,
        {431},
    ),
    "post_on_ws": (b"POST /ws HTTP/1.1\r\nContent-Length: 0\r\n" + KEY_HEADERS, {405}),
    "http_1_0_on_ws": (b"GET /ws HTTP/1.0\r\n" + KEY_HEADERS, {400}),
    "no_upgrade_headers": (b"GET /ws HTTP/1.1\r\nHost: x\r\n", {400, 426}),
    "bad_websocket_version": (
        b"GET /ws HTTP/1.1\r\n" + KEY_HEADERS.replace(b"Version: 13", b"Version: 8"),
        {400, 426},
    ),
    "garbage": (b"\x00\x01\x02\xff garbage \x7f\r\n", None),
    "binary_noise": (bytes(range(256)) * 8, None),
    "tls_client_hello": (tls_client_hello(), None),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_malformed_request_gets_4xx_or_close_without_traceback(
    proc: GatewayProcess, case: str
) -> None:
    """Each malformed request gets its 4xx or a close, is counted, and leaves no traceback."""
    assert proc.port is not None
    head, statuses = BAD_REQUESTS[case]
    data = head + b"\r\n" if statuses is not None else head
    rejected_before = sum(
        v for (name, _), v in (await ascrape(proc.url)).items() if name == REJECTIONS
    )
    async with no_new_tracebacks(proc):
        response = await http_exchange(proc.port, data, timeout=15)
        if statuses is None:
            # Not HTTP at all: a 400 or a plain close, never an upgrade.
            assert response == b"" or response.startswith(b"HTTP/1.1 400 "), response[:100]
        else:
            status = int(response.split(b" ", 2)[1])
            assert status in statuses, response[:200]
        # Counted (bad_request, method or timeout), and the gateway still serves.
        await eventually(
            lambda: (
                sum(v for (name, _), v in scrape(proc.url).items() if name == REJECTIONS)
                == rejected_before + 1
            ),
            what="a handshake rejection counted",
        )
        status, body, _ = await asyncio.to_thread(http_get, proc.url + "/healthz")
        assert (status, body) == (200, "ok")


# Row: foreign Origin when origins are configured.


async def test_foreign_origin_is_refused_with_403_when_origins_are_configured() -> None:
    """A foreign Origin gets 403; a listed origin and no Origin get in."""
    async with raw_gateway(allowed_origins=("https://app.example",)) as gw:
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(gw.ws_url, origin="https://evil.example")  # type: ignore[arg-type]
        assert refused.value.response.status_code == 403
        assert gw.metrics.handshake_rejections["origin"] == 1
        # The configured origin, and a client that sends none (not a browser), get in.
        async with Client.connect(gw.ws_url, origin="https://app.example") as ok:
            assert (await ok.ping())["op"] == "pong"
        async with Client.connect(gw.ws_url) as no_origin:
            assert (await no_origin.ping())["op"] == "pong"
        assert gw.metrics.handshake_rejections["origin"] == 1


# Row: message over the size limit.


@pytest.mark.parametrize("path", ["/ws", "/ws/echo"])
async def test_message_over_the_size_limit_is_closed_1009(path: str) -> None:
    """A message over RTG_MAX_MESSAGE_BYTES closes the connection 1009, counted."""
    async with raw_gateway(max_message_bytes=4096) as gw:
        conn = await RawConnection.open(gw.port, path)
        await conn.send_frame(OP_TEXT, b"x" * 4097)
        code, _, _ = await conn.recv_close()
        assert code == 1009
        await answer_close(conn, code)
        await eventually(lambda: gw.metrics.disconnects["message_too_large"] == 1)


async def test_frame_declaring_2_to_the_62_bytes_is_closed_1009_without_waiting() -> None:
    """A frame header declaring 2^62 bytes is closed 1009 before any payload arrives."""
    async with raw_gateway() as gw:
        conn = await RawConnection.open(gw.port, "/ws/echo")
        # The header alone: the gateway must refuse before any payload arrives.
        await conn.send(encode_frame(OP_BINARY, b"", length=2**62)[:10] + b"\x00\x00\x00\x00")
        code, _, _ = await conn.recv_close()
        assert code == 1009


# Row: fragment flood; invalid UTF-8; unmasked frame; reserved bits; unknown opcode.

FRAME_VIOLATIONS: dict[str, tuple[list[bytes], int, str]] = {
    # 5000 one-byte fragments: more than websockets reassembles (4096).
    "fragment_flood": (
        [encode_frame(OP_TEXT, b"a", fin=False)]
        + [encode_frame(OP_CONT, b"a", fin=False)] * 4999
        + [encode_frame(OP_CONT, b"a")],
        1009,
        "message_too_large",
    ),
    "fragments_past_the_size_limit": (
        [encode_frame(OP_TEXT, b"a" * 1024, fin=False)]
        + [encode_frame(OP_CONT, b"a" * 1024, fin=False)] * 8
        + [encode_frame(OP_CONT, b"a")],
        1009,
        "message_too_large",
    ),
    "invalid_utf8": (
        [encode_frame(OP_TEXT, b'{"op":"ping","x":"\xc3\x28"}')],
        1007,
        "protocol_error",
    ),
    "invalid_utf8_across_fragments": (
        [encode_frame(OP_TEXT, b"ok \xf0\x9f", fin=False), encode_frame(OP_CONT, b"\x28 no")],
        1007,
        "protocol_error",
    ),
    "surrogate_encoded_in_utf8": ([encode_frame(OP_TEXT, b"\xed\xa0\x80")], 1007, "protocol_error"),
    "unmasked_frame": (
        [encode_frame(OP_TEXT, b'{"op":"ping"}', mask=False)],
        1002,
        "protocol_error",
    ),
    "reserved_bit_1": ([encode_frame(OP_TEXT, b'{"op":"ping"}', rsv=4)], 1002, "protocol_error"),
    "reserved_bits_3": ([encode_frame(OP_TEXT, b'{"op":"ping"}', rsv=7)], 1002, "protocol_error"),
    "unknown_data_opcode_3": ([encode_frame(0x3, b"x")], 1002, "protocol_error"),
    "unknown_control_opcode_11": ([encode_frame(0xB, b"x")], 1002, "protocol_error"),
    "continuation_without_start": ([encode_frame(OP_CONT, b"x")], 1002, "protocol_error"),
    "new_message_inside_a_fragmented_one": (
        [encode_frame(OP_TEXT, b"a", fin=False), encode_frame(OP_TEXT, b"b")],
        1002,
        "protocol_error",
    ),
    "fragmented_ping": ([encode_frame(OP_PING, b"x", fin=False)], 1002, "protocol_error"),
    "ping_payload_over_125": ([encode_frame(OP_PING, b"x" * 126)], 1002, "protocol_error"),
    "close_code_1005_on_the_wire": (
        [encode_frame(OP_CLOSE, close_payload(1005))],
        1002,
        "protocol_error",
    ),
    "close_code_999": ([encode_frame(OP_CLOSE, close_payload(999))], 1002, "protocol_error"),
    "close_payload_of_one_byte": ([encode_frame(OP_CLOSE, b"\x03")], 1002, "protocol_error"),
    "close_reason_invalid_utf8": (
        [encode_frame(OP_CLOSE, close_payload(1000, b"\xff\xfe"))],
        1007,
        "protocol_error",
    ),
}


@pytest.mark.parametrize("case", list(FRAME_VIOLATIONS))
async def test_frame_violation_is_closed_with_the_rfc_code(case: str) -> None:
    """Each frame violation closes with RFC 6455's code; other members are untouched."""
    frames, expected_code, reason = FRAME_VIOLATIONS[case]
    async with raw_gateway(max_message_bytes=4096) as gw:
        member = await joined(gw.port, "room")
        conn = await joined(gw.port, "room")
        await conn.send(b"".join(frames))
        code, _, _ = await conn.recv_close()
        assert code == expected_code
        await answer_close(conn, code)
        await eventually(lambda: gw.metrics.disconnects[reason] == 1, what=reason)
        # Everyone else is untouched.
        await assert_alive(member)


# Row: binary frame on /ws.


async def test_binary_frame_on_ws_gets_bad_message_and_others_are_unaffected() -> None:
    """A binary frame on /ws gets bad_message; the connection and the room work on."""
    async with raw_gateway() as gw:
        other = await joined(gw.port, "room")
        sender = await joined(gw.port, "room")
        await sender.send_frame(OP_BINARY, b'{"op":"publish","room":"room","data":1}')
        error = await sender.recv_json()
        assert error["op"] == "error" and error["code"] == "bad_message", error
        await assert_alive(sender)
        await sender.send_json({"op": "publish", "room": "room", "data": "after", "id": 1})
        for member in (other, sender):
            [msg] = await messages_of(member, 1)
            assert msg["data"] == "after"
        assert gw.metrics.connections_current == 2


# Row: invalid JSON, wrong types, unknown op, room name too long or with bad characters.

BAD_MESSAGES: dict[str, tuple[str, str]] = {
    "truncated_json": ('{"op":"join","room":', "bad_json"),
    "not_json": ("hello", "bad_json"),
    "trailing_garbage": ('{"op":"ping"} x', "bad_json"),
    "json_array": ('["join","lobby"]', "bad_message"),
    "json_string": ('"ping"', "bad_message"),
    "op_not_a_string": ('{"op":5}', "bad_message"),
    "op_missing": ('{"room":"lobby"}', "bad_message"),
    "room_not_a_string": ('{"op":"join","room":["lobby"]}', "bad_message"),
    "room_missing": ('{"op":"join"}', "bad_message"),
    "data_missing": ('{"op":"publish","room":"room"}', "bad_message"),
    "id_boolean": ('{"op":"ping","id":true}', "bad_message"),
    "id_object": ('{"op":"ping","id":{}}', "bad_message"),
    "id_past_2_to_the_53": ('{"op":"ping","id":9007199254740993}', "bad_message"),
    "id_too_long": ('{"op":"ping","id":"' + "i" * 65 + '"}', "bad_message"),
    "policy_unknown": ('{"op":"join","room":"r","policy":"ignore"}', "bad_message"),
    "unknown_op": ('{"op":"subscribe","room":"lobby"}', "unknown_op"),
    "room_129_chars": ('{"op":"join","room":"' + "r" * 129 + '"}', "invalid_room"),
    "room_empty": ('{"op":"join","room":""}', "invalid_room"),
    "room_with_space": ('{"op":"join","room":"a b"}', "invalid_room"),
    "room_with_slash": ('{"op":"join","room":"a/b"}', "invalid_room"),
    "room_non_ascii": ('{"op":"join","room":"caf\\u00e9"}', "invalid_room"),
    "room_with_nul": ('{"op":"join","room":"a\\u0000"}', "invalid_room"),
    "leave_not_joined": ('{"op":"leave","room":"elsewhere"}', "not_joined"),
    "publish_not_joined": ('{"op":"publish","room":"elsewhere","data":1}', "not_joined"),
}


async def test_every_bad_message_gets_its_error_code_and_the_connection_stays() -> None:
    """Every bad message, one after another on one connection, gets its code; it stays open."""
    async with raw_gateway() as gw:
        conn = await joined(gw.port, "room")
        for case, (text, code) in BAD_MESSAGES.items():
            await conn.send_frame(OP_TEXT, text.encode())
            reply = await conn.recv_json()
            assert reply["op"] == "error" and reply["code"] == code, (case, reply)
            await assert_alive(conn, id=case)
        assert gw.metrics.connections_current == 1
        assert sum(gw.metrics.disconnects.values()) == 0


@pytest.mark.parametrize("case", list(BAD_MESSAGES))
async def test_bad_message_row(case: str) -> None:
    """One test per input, so that a failure names it."""
    text, code = BAD_MESSAGES[case]
    async with raw_gateway() as gw:
        conn = await joined(gw.port, "room")
        await conn.send_frame(OP_TEXT, text.encode())
        reply = await conn.recv_json()
        assert reply["op"] == "error" and reply["code"] == code, reply
        assert set(reply) <= {"op", "code", "message", "id"}
        await assert_alive(conn)


async def test_new_room_past_the_process_cap_gets_room_limit_and_existing_rooms_work() -> None:
    """Past RTG_MAX_ROOMS a new room gets room_limit; existing rooms still work."""
    async with raw_gateway(max_rooms=3) as gw:
        first = await joined(gw.port, "a")
        for room in ("b", "c"):
            await first.send_json({"op": "join", "room": room, "id": room})
            assert (await first.recv_json())["op"] == "ack"
        other = await joined(gw.port, "a")  # an existing room: no new room needed
        await other.send_json({"op": "join", "room": "d", "id": "d"})
        reply = await other.recv_json()
        assert (reply["op"], reply["code"], reply["id"]) == ("error", "room_limit", "d"), reply
        assert gw.metrics.protocol_errors["room_limit"] == 1
        await assert_alive(other)
        assert len(gw.gateway.hub.rooms) == 3
        # A room that empties frees its place.
        await first.send_json({"op": "leave", "room": "c", "id": "leave"})
        assert (await first.recv_json())["op"] == "ack"
        await other.send_json({"op": "join", "room": "d", "id": "again"})
        assert (await other.recv_json())["op"] == "ack"


async def test_too_many_rooms_gets_too_many_rooms_and_the_connection_stays() -> None:
    """Joining past RTG_MAX_ROOMS_PER_CONNECTION gets too_many_rooms; the connection stays."""
    async with raw_gateway(max_rooms_per_connection=2) as gw:
        conn = await joined(gw.port, "a")
        await conn.send_json({"op": "join", "room": "b", "id": 2})
        assert (await conn.recv_json())["op"] == "ack"
        await conn.send_json({"op": "join", "room": "c", "id": 3})
        reply = await conn.recv_json()
        assert (reply["code"], reply["id"]) == ("too_many_rooms", 3), reply
        await assert_alive(conn)


# Row: /ws/echo under the connection's rate limits.


@pytest.mark.parametrize("limit", ["messages", "bytes"])
async def test_echo_flood_gets_rate_limited_errors_then_close_1008(limit: str) -> None:
    """A flood on /ws/echo gets rate_limited errors instead of echoes, then close 1008."""
    async with raw_gateway(
        rate_limit_msgs_per_s=5,
        rate_limit_burst=5,
        rate_limit_bytes_per_s=64 * 1024,
        max_message_bytes=16 * 1024,
        rate_limit_max_rejected=10,
    ) as gw:
        bystander = await joined(gw.port, "room")
        flooder = await RawConnection.open(gw.port, "/ws/echo")
        # 100 small messages, or 10 of 16 KiB each: both far past a limit.
        payloads = [b"m%d" % i for i in range(100)] if limit == "messages" else [b"b" * 16_000] * 30
        await flooder.send(b"".join(encode_frame(OP_BINARY, p) for p in payloads))
        code, reason, before_close = await flooder.recv_close()
        echoed = [f for f in before_close if f.opcode == OP_BINARY]
        errors = [f.json() for f in before_close if f.opcode == OP_TEXT]
        assert echoed and all(f.payload in payloads for f in echoed)
        assert len(echoed) < len(payloads)
        assert errors and all(e["code"] == "rate_limited" for e in errors), errors[:3]
        assert all(e["retry_after_ms"] >= 1 for e in errors)
        assert (code, reason) == (1008, "rate limit exceeded")
        await answer_close(flooder, code)
        await eventually(lambda: gw.metrics.disconnects["rate_limited"] == 1)
        assert gw.metrics.rate_limited >= len(errors)
        await assert_alive(bystander)


# Row: lone surrogate, deep nesting, 5000-digit integer, NaN in data.

POISON_DATA: dict[str, tuple[str, set[str]]] = {
    "lone_high_surrogate": ('"\\ud800"', {"bad_message"}),
    "lone_low_surrogate": ('"x\\udc00y"', {"bad_message"}),
    "surrogates_reversed": ('"\\udc00\\ud800"', {"bad_message"}),
    "surrogate_in_a_key": ('{"\\ud83d": 1}', {"bad_message"}),
    "surrogate_deep_inside": ('[1,{"a":[{"b":"\\udfff"}]}]', {"bad_message"}),
    "nesting_20000_deep": ("[" * 20_000 + "]" * 20_000, {"bad_json", "bad_message"}),
    "objects_10000_deep": ('{"a":' * 10_000 + "1" + "}" * 10_000, {"bad_json", "bad_message"}),
    "integer_5000_digits": ("9" * 5000, {"bad_json"}),
    "negative_integer_5000_digits": ("-" + "9" * 5000, {"bad_json"}),
    "nan": ("NaN", {"bad_json"}),
    "infinity": ("Infinity", {"bad_json"}),
    "minus_infinity_nested": ('{"x":[-Infinity]}', {"bad_json"}),
    "float_overflow": ("1e999", {"bad_json"}),
    "negative_float_overflow_nested": ('{"x":[-1e999]}', {"bad_json"}),
}


@pytest.mark.parametrize("case", list(POISON_DATA))
async def test_poisoned_data_is_refused_to_the_sender_and_the_room_keeps_working(
    case: str,
) -> None:
    """Poisoned data is refused to the sender, reaches nobody, and the room goes on at seq 1."""
    data, codes = POISON_DATA[case]
    async with raw_gateway() as gw:
        members = [await joined(gw.port, "room") for _ in range(3)]
        attacker = await joined(gw.port, "room")
        text = '{"op":"publish","room":"room","id":"poison","data":' + data + "}"
        await attacker.send_frame(OP_TEXT, text.encode())
        reply = await attacker.recv_json()
        assert reply["op"] == "error" and reply["code"] in codes, reply
        # The publication reached nobody; the next one reaches everyone, the
        # attacker included, with the next sequence number.
        await members[0].send_json({"op": "publish", "room": "room", "data": "ok", "id": 1})
        for member in [*members, attacker]:
            [msg] = await messages_of(member, 1)
            assert (msg["seq"], msg["data"]) == (1, "ok"), msg
        await assert_alive(attacker)
        assert gw.metrics.connections_current == 4
        assert sum(gw.metrics.disconnects.values()) == 0


async def test_deepest_nesting_the_gateway_accepts_is_readable_by_the_python_client() -> None:
    """Whatever nesting depth gets through, a member's JSON parser must cope with it."""
    async with (
        raw_gateway() as gw,
        Client.connect(gw.ws_url) as member,
    ):
        await member.join("room")
        sender = await joined(gw.port, "room")
        accepted = 0
        for depth in (10, 100, 200, 400, 600, 800, 900, 950, 1000, 2000):
            data = "[" * depth + "]" * depth
            text = f'{{"op":"publish","room":"room","id":{depth},"data":{data}}}'
            await sender.send_frame(OP_TEXT, text.encode())
            reply = await sender.recv_json()
            while reply["op"] == "message":  # the sender is a member too
                reply = await sender.recv_json()
            if reply["op"] == "error":
                assert reply["code"] in ("bad_json", "bad_message"), reply
                break
            accepted = depth
            msg = await member.next_message(5)
            assert msg["seq"] >= 1
        assert accepted >= 100
        assert not member._reader.done(), "the member's reader died on deep nesting"


# Row: half a frame then a reset.


@pytest.mark.parametrize("path", ["/ws", "/ws/echo"])
async def test_half_a_frame_then_reset_ends_the_handler_counted_as_aborted(
    proc: GatewayProcess, path: str
) -> None:
    """Half a frame then a reset ends the handler, counted as aborted, without a traceback."""
    assert proc.port is not None
    before = metric(await ascrape(proc.url), DISCONNECTS, "aborted")
    async with no_new_tracebacks(proc):
        conn = await RawConnection.open(proc.port, path)
        frame = encode_frame(OP_TEXT, b'{"op":"ping","id":1}' * 10)
        await conn.send(frame[: len(frame) // 2])
        # The half frame is in the gateway's receive queue (loopback delivers on send): once
        # the gateway has answered a later handshake, its loop has read the half frame too.
        probe = await RawConnection.open(proc.port, "/ws/echo")
        probe.abort()
        conn.abort()
        await eventually_metric(proc.url, DISCONNECTS, ("aborted",), before + 2)
        samples = await ascrape(proc.url)
        assert metric(samples, "rtgateway_connections_current") == 0


# Row: ping flood from a client that never reads.


async def test_ping_flood_from_a_non_reader_is_cut_off_with_a_bounded_buffer() -> None:
    """A non-reader's ping flood is cut off (write_buffer), RSS bounded, others served."""
    env = {"RTG_STATS_INTERVAL_S": "0"}
    with GatewayProcess(env) as gw:
        assert gw.port is not None and gw.proc is not None
        baseline = rss_bytes(gw.proc.pid)
        member = await joined(gw.port, "room")
        flooder = await RawConnection.open(gw.port, "/ws/echo", rcvbuf=4096)
        ping = encode_frame(OP_PING, b"p" * 125)
        cut_off = False
        # 40 MiB of pongs, were they all answered: far past any sane buffer.
        for _ in range(2000):
            try:
                await asyncio.wait_for(flooder.send(ping * 160), 10)
            except (ConnectionResetError, BrokenPipeError, TimeoutError):
                cut_off = True
                break
        flooder.abort()
        assert cut_off, "the gateway kept reading pings it could not answer"
        await eventually_metric(gw.url, DISCONNECTS, ("write_buffer",), 1)
        grown = rss_bytes(gw.proc.pid) - baseline
        assert grown < 64 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB"
        await assert_alive(member)
        assert not tracebacks(gw.lines)


# Row: a client that never reads, in a busy room.

WINDOW = 32


async def test_non_reader_in_a_busy_room_gets_the_slow_consumer_policy_and_others_get_all() -> None:
    """A non-reader in a busy room is closed 4008; every other member gets every publication."""
    n = 1000
    async with raw_gateway(
        outbox_max_messages=64,
        rate_limit_msgs_per_s=1e6,
        rate_limit_burst=10**6,
        rate_limit_bytes_per_s=0,
    ) as gw:
        healthy = [await joined(gw.port, "busy") for _ in range(4)]
        stalled = await joined(gw.port, "busy", rcvbuf=4096)  # joins, then never reads
        publisher = await joined(gw.port, "busy")
        pad = "x" * 8000

        readers_list = [*healthy, publisher]
        progress = [0] * len(readers_list)

        async def read_all(k: int) -> list[int]:
            seqs = []
            while len(seqs) < n:
                msg = await readers_list[k].recv_json(timeout=30)
                if msg.get("op") == "message":
                    seqs.append(msg["seq"])
                    progress[k] = len(seqs)
            return seqs

        readers = [asyncio.ensure_future(read_all(k)) for k in range(len(readers_list))]
        for i in range(n):
            # Healthy members keep up by definition: the publisher never runs
            # more than a window ahead of the slowest of them (they are all read
            # by this one process, which parses slower than the gateway sends).
            while i - min(progress) > WINDOW:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
            await publisher.send_json({"op": "publish", "room": "busy", "data": [i, pad]})
        seqs = await asyncio.gather(*readers)
        for got in seqs:
            assert got == list(range(1, n + 1))
        await eventually(lambda: gw.metrics.disconnects["slow_consumer"] == 1)
        stalled.abort()
        assert gw.metrics.connections_current == 5


# Row: publish flood.


async def test_publish_flood_gets_rate_limit_errors_then_close_1008() -> None:
    """A publish flood gets rate_limited errors with retry_after_ms, then close 1008."""
    async with raw_gateway(
        rate_limit_msgs_per_s=5, rate_limit_burst=5, rate_limit_max_rejected=10
    ) as gw:
        bystander = await joined(gw.port, "room")
        flooder = await joined(gw.port, "room")
        frames = b"".join(
            encode_frame(
                OP_TEXT, json.dumps({"op": "publish", "room": "room", "data": i, "id": i}).encode()
            )
            for i in range(100)
        )
        await flooder.send(frames)
        code, reason, before_close = await flooder.recv_close()
        replies = [f.json() for f in before_close if f.opcode == OP_TEXT]
        limited = [r for r in replies if r.get("code") == "rate_limited"]
        assert limited, replies[:5]
        assert all(r["retry_after_ms"] >= 1 for r in limited)
        assert code == 1008, (code, reason)
        await answer_close(flooder, code)
        await eventually(lambda: gw.metrics.disconnects["rate_limited"] == 1)
        assert gw.metrics.disconnects["rate_limited"] == 1
        await assert_alive(bystander)


# Row: more connections than the limit; file descriptors exhausted.


async def test_connections_past_the_limit_get_503_quietly_and_service_recovers() -> None:
    """Past RTG_MAX_CONNECTIONS: 503 and Retry-After, no line each; room again once some leave."""
    with GatewayProcess({"RTG_MAX_CONNECTIONS": "5", "RTG_STATS_INTERVAL_S": "0"}) as gw:
        assert gw.port is not None
        lines_before = len(gw.lines)
        clients = [await Client.open(gw.ws_url + "/ws") for _ in range(5)]
        refused = 0
        for _ in range(50):
            with pytest.raises(HandshakeRefused) as exc:
                await RawConnection.open(gw.port, "/ws")
            assert exc.value.status == 503
            assert b"Retry-After: " in exc.value.response
            refused += 1
        samples = await ascrape(gw.url)
        assert metric(samples, REJECTIONS, "connection_limit") == refused
        # No log line per refusal.
        assert len(gw.lines) - lines_before < 10, gw.lines[lines_before:]
        for c in clients[:2]:
            await c.close()
        await eventually_metric(gw.url, "rtgateway_disconnects_total", ("client_close",), 2)
        async with Client.connect(gw.ws_url + "/ws") as late:
            assert (await late.join("room"))["op"] == "ack"
        for c in clients[2:]:
            await c.close()
        assert not tracebacks(gw.lines)


async def test_file_descriptor_exhaustion_is_refused_quietly_and_service_recovers() -> None:
    """At the open-files limit: 503 or a close, never EMFILE, quietly; then recovery."""
    # 128 descriptors: the gateway derives 64 connections and 96 sockets from it.
    with GatewayProcess({"RTG_STATS_INTERVAL_S": "0"}, nofile=128) as gw:
        assert gw.port is not None
        lines_before = len(gw.lines)
        held: list[RawConnection] = []
        outcomes: dict[str, int] = {}

        async def attempt() -> None:
            try:
                conn = await RawConnection.open(gw.port or 0, "/ws", timeout=5)
            except HandshakeRefused as exc:
                key = str(exc.status)
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                key = "closed"
            else:
                held.append(conn)
                key = "101"
            outcomes[key] = outcomes.get(key, 0) + 1

        await asyncio.gather(*(attempt() for _ in range(200)))
        samples = await ascrape(gw.url)
        assert 32 <= outcomes.get("101", 0) <= 64, outcomes
        assert set(outcomes) <= {"101", "503", "closed"}, outcomes
        # Past the connection limit: 503. Past the sockets kept for answering
        # 503, or past the pending-handshake budgets: closed at once (fd_limit,
        # or the oldest pending socket evicted), never EMFILE.
        # (How many get the 503 and how many are evicted first depends on how
        # the accepts and the reads interleave.)
        assert outcomes.get("503", 0) == metric(samples, REJECTIONS, "connection_limit")
        dropped = sum(
            metric(samples, REJECTIONS, reason)
            for reason in ("fd_limit", "pending_evicted", "address_pending_limit")
        )
        assert dropped >= outcomes.get("closed", 0)
        # Past the limit, quiet: a handful of lines, not one per refusal.
        assert len(gw.lines) - lines_before < 20, gw.lines[lines_before:][:20]
        status, _, _ = await asyncio.to_thread(http_get, gw.url + "/healthz")
        assert status in (200, 503)  # a 503 here only if every spare descriptor is in use
        for conn in held:
            conn.abort()
        await eventually_metric(
            gw.url, "rtgateway_disconnects_total", ("aborted",), outcomes.get("101", 0)
        )
        # Recovered: new clients get in.
        async with Client.connect(gw.ws_url + "/ws") as late:
            assert (await late.join("room"))["op"] == "ack"
        status, body, _ = await asyncio.to_thread(http_get, gw.url + "/healthz")
        assert (status, body) == (200, "ok")
        assert not tracebacks(gw.lines)


# Row: a peer that never closes TCP after the closing handshake.

LINGERING: dict[str, bytes] = {
    "after_1009": encode_frame(OP_TEXT, b"x" * 4097),
    "after_1002": encode_frame(OP_TEXT, b"{}", mask=False),
    "after_its_own_close": encode_frame(OP_CLOSE, close_payload(1000)),
}


@pytest.mark.parametrize("case", list(LINGERING))
async def test_peer_that_never_closes_tcp_is_dropped_after_the_close_timeout(case: str) -> None:
    """A peer that never closes TCP after the closing handshake is dropped at the close timeout."""
    async with raw_gateway(max_message_bytes=4096, ping_interval_s=0, close_timeout_s=0.3) as gw:
        conn = await RawConnection.open(gw.port, "/ws/echo")
        await conn.send(LINGERING[case])
        code, _, _ = await conn.recv_close()
        assert code in (1000, 1002, 1009)
        # Then silence: no close frame back, no FIN.
        await eventually(lambda: gw.metrics.connections_current == 0, timeout=2)


# Row: a dead peer.


async def test_dead_peer_is_closed_after_the_ping_timeout() -> None:
    """A peer that answers no ping is closed 1011 at the ping timeout and leaves its rooms."""
    async with raw_gateway(ping_interval_s=0.2, ping_timeout_s=0.3, close_timeout_s=0.5) as gw:
        member = await joined(gw.port, "room")
        # Joined, then silent: it answers no ping (a raw socket never pongs by itself).
        await eventually(lambda: gw.metrics.disconnects["ping_timeout"] == 1, timeout=15)
        code, reason, frames = await member.recv_close()
        assert any(f.opcode == OP_PING for f in frames)
        assert code == 1011 and "keepalive" in reason, (code, reason)
        assert gw.metrics.connections_current == 0
        assert gw.metrics.room_members_current == 0


async def test_live_peer_survives_many_ping_intervals() -> None:
    """A peer that answers pings survives many ping intervals."""
    async with raw_gateway(ping_interval_s=0.1, ping_timeout_s=0.3) as gw:
        async with Client.connect(gw.ws_url) as client:
            await client.join("room")
            # Time passing is the condition: ten pings, each answered by the websockets client.
            await asyncio.sleep(1.0)
            assert (await client.ping())["op"] == "pong"
        assert gw.metrics.disconnects["ping_timeout"] == 0


# Row: SIGTERM during a broadcast.


async def test_sigterm_during_a_broadcast_drains_and_no_member_gets_a_partial_frame() -> None:
    """SIGTERM mid-broadcast: whole frames, no seq gap, then 1012 and a clean close; exit 0."""
    env = {
        "RTG_DRAIN_WINDOW_S": "0.5",
        "RTG_DRAIN_TIMEOUT_S": "10",
        "RTG_RATE_LIMIT_MSGS_PER_S": "100000",
        "RTG_RATE_LIMIT_BURST": "100000",
        "RTG_RATE_LIMIT_BYTES_PER_S": "0",
        "RTG_PUBLISH_REQUIRES_JOIN": "false",
        # The publisher is reset mid-flood; its handler may only notice at the close timeout.
        "RTG_CLOSE_TIMEOUT_S": "1",
        "RTG_STATS_INTERVAL_S": "0",
    }
    with GatewayProcess(env) as gw:
        assert gw.port is not None
        members = [await joined(gw.port, "live") for _ in range(20)]
        # Not a member (RTG_PUBLISH_REQUIRES_JOIN=false): it never has to read.
        publisher = await RawConnection.open(gw.port)
        started = asyncio.Event()
        progress = [0] * len(members)

        async def read_to_the_end(k: int) -> tuple[int | None, str, list[int], bytes]:
            conn = members[k]
            seqs: list[int] = []
            while True:
                frame = await conn.recv_frame(timeout=30)
                if frame is None:
                    return None, "", seqs, bytes(conn.frames.buffer)
                if frame.opcode == OP_CLOSE:
                    code, reason = frame.payload[:2], frame.payload[2:].decode()
                    await conn.send_frame(OP_CLOSE, frame.payload[:2])
                    rest = await conn.wait_eof()
                    assert rest == b"", rest
                    return int.from_bytes(code, "big"), reason, seqs, bytes(conn.frames.buffer)
                msg = frame.json()
                if msg["op"] == "message":
                    seqs.append(msg["seq"])
                    progress[k] = len(seqs)
                    if len(seqs) == 50:
                        started.set()

        async def publish_until_closed() -> None:
            data = "y" * 4000
            with contextlib.suppress(ConnectionError):
                for i in range(100_000):
                    while i - min(progress) > 100:  # noqa: ASYNC110 (see WINDOW)
                        await asyncio.sleep(0.001)
                    await publisher.send_json({"op": "publish", "room": "live", "data": [i, data]})

        readers = [asyncio.ensure_future(read_to_the_end(k)) for k in range(len(members))]
        flood = asyncio.ensure_future(publish_until_closed())
        await asyncio.wait_for(started.wait(), 20)
        gw.signal(signal.SIGTERM)
        results = await asyncio.gather(*readers)
        flood.cancel()
        publisher.abort()
        assert await asyncio.to_thread(gw.wait, 20) == 0
        for code, reason, seqs, leftover in results:
            assert leftover == b"", "a member was left with a partial frame"
            assert code == 1012, (code, reason)
            assert "retry_after_ms=" in reason
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a gap in the sequence"
        events = [e.get("event") for e in gw.events]
        assert "drain_finished" in events
        assert not tracebacks(gw.lines)
