"""connection.py: our asyncio protocol around websockets' sans-I/O one, on loopback.

The gateway runs in-process (``running_gateway``), so a test reads its books
(``ServerState``, the wheel, the metrics object) and the connection object
itself, while raw clients (:mod:`wire`) do what a good client never does:
flood pings without reading, never answer a close frame, send 4097
fragments. Only :func:`~rtgateway.connection.disconnect_of` is tested without
a socket, on websockets' own sans-I/O protocol fed real bytes.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from conftest import RunningGateway, raw_gateway, running_gateway
from recording import ManualLoop, RecordingConnection
from redisserver import RedisServer
from support import eventually
from websockets.protocol import OPEN
from websockets.server import ServerProtocol
from wire import (
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawConnection,
    close_payload,
    encode_frame,
    parse_close,
)

from rtgateway.connection import MAX_FRAGMENTS, GatewayConnection, disconnect_of
from rtgateway.errors import (
    ABORTED,
    CLIENT_CLOSE,
    MESSAGE_TOO_LARGE,
    PROTOCOL_ERROR,
    SLOW_CONSUMER,
    Disconnect,
)
from rtgateway.metrics import Metrics
from rtgateway.outbox import Flusher, Outbox

# Pongs leave through the outbox, and a flood of them that is never read is cut off.


async def test_a_client_flooding_pings_unread_is_reset_once_a_pong_does_not_fit() -> None:
    """Pongs wait in the outbox of a paused transport; the first that does not fit resets it."""
    async with raw_gateway(
        outbox_max_messages=64, max_message_bytes=16 * 1024, socket_sndbuf_bytes=4096
    ) as gw:
        flooder = await RawConnection.open(gw.port, "/ws/echo", rcvbuf=4096)
        pings = encode_frame(OP_PING, b"p" * 125) * 160  # 160 pongs of 127 bytes each
        with pytest.raises(ConnectionError):
            for _ in range(10_000):
                await asyncio.wait_for(flooder.send(pings), 10)
        await eventually(lambda: gw.metrics.disconnects["write_buffer"] == 1)
        assert gw.metrics.connections_current == 0
        assert gw.gateway.state.outboxes == set()


# The close deadline: a peer that never answers a close frame, nor closes TCP.


async def test_a_peer_silent_after_the_gateways_close_frame_is_aborted_at_the_close_timeout() -> (
    None
):
    """Closed 1008 by the rate limit, then silence: the TCP connection is reset, not held."""
    async with raw_gateway(
        close_timeout_s=0.3, ping_interval_s=0, rate_limit_burst=1, rate_limit_max_rejected=0
    ) as gw:
        conn = await RawConnection.open(gw.port)
        await conn.recv_json()  # hello
        ping = encode_frame(OP_TEXT, b'{"op":"ping"}')
        await conn.send(ping * 3)
        code, _, _ = await conn.recv_close()
        assert code == 1008
        # Never answered: the gateway ends the TCP connection itself.
        assert await conn.wait_eof(timeout=10) == b""
        await eventually(lambda: gw.metrics.connections_current == 0)
        assert gw.metrics.disconnects["rate_limited"] == 1


async def test_a_peer_lingering_after_a_1009_is_aborted_at_the_close_timeout() -> None:
    """The protocol fails the connection; the close frame it writes starts the close timeout."""
    async with raw_gateway(max_message_bytes=1024, close_timeout_s=0.3, ping_interval_s=0) as gw:
        conn = await RawConnection.open(gw.port, "/ws/echo")
        await conn.send_frame(OP_TEXT, b"x" * 1025)
        code, _, _ = await conn.recv_close()
        assert code == 1009
        assert await conn.wait_eof(timeout=10) == b""
        await eventually(lambda: gw.metrics.disconnects["message_too_large"] == 1)


# Flow control.


async def test_a_paused_transport_gets_its_queued_frames_once_the_client_reads_again() -> None:
    """resume_writing() flushes the outbox: what waited while paused is delivered in order."""
    async with raw_gateway(socket_sndbuf_bytes=4096, publish_requires_join=False) as gw:
        member = await RawConnection.open(gw.port, rcvbuf=4096)
        await member.recv_json()  # hello
        await member.send_json({"op": "join", "room": "r", "id": 1})
        await member.recv_json()  # ack
        [outbox] = gw.gateway.state.outboxes
        publisher = await RawConnection.open(gw.port)
        await publisher.recv_json()
        payload = "z" * 2000
        count = 0
        while not outbox.conn.paused:  # type: ignore[attr-defined]
            count += 1
            await publisher.send_json({"op": "publish", "room": "r", "data": payload, "id": count})
            await publisher.recv_json()  # its ack: the publication was fanned out
        seqs = []
        while len(seqs) < count:
            msg = await member.recv_json()
            seqs.append(msg["seq"])
        assert seqs == list(range(1, count + 1))


# Deadlines on the listener's wheel; assembly; hand-over.


def connections(gw: RunningGateway) -> list[GatewayConnection]:
    state = gw.gateway.state
    assert state is not None
    return [s for s in state.sockets if isinstance(s, GatewayConnection)]


async def member(port: int) -> RawConnection:
    conn = await RawConnection.open(port, "/ws")
    assert (await conn.recv_json())["op"] == "hello"
    await conn.send_json({"op": "join", "room": "wheel", "id": 1})
    assert (await conn.recv_json())["op"] == "ack"
    return conn


async def answer_pings(conn: RawConnection) -> None:
    """What a live client does: every ping gets its pong (RFC 6455 §5.5.2)."""
    while True:
        frame = await conn.recv_frame(timeout=30)
        if frame is None:
            return
        if frame.opcode == OP_PING:
            await conn.send_frame(OP_PONG, frame.payload)


async def test_deadlines_of_many_connections_run_on_one_wheel_and_no_task_each() -> None:
    """180 sockets, one deadline each on the wheel, no task; each deadline ends what it should."""
    async with running_gateway(
        ping_interval_s=0.2,
        ping_timeout_s=0.3,
        close_timeout_s=0.3,
        open_timeout_s=1.0,
        first_byte_timeout_s=0.5,
        max_pending_handshakes_per_address=0,
        drain_timeout_s=1.0,
    ) as gw:
        tasks_before = len(asyncio.all_tasks())
        live = [await member(gw.port) for _ in range(60)]
        dead = [await member(gw.port) for _ in range(60)]  # joined, then never read
        silent = [await RawConnection.connect(gw.port) for _ in range(30)]
        trickling = [await RawConnection.connect(gw.port) for _ in range(30)]
        for conn in trickling:
            await conn.send(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        opened = [c for c in connections(gw) if c.outbox is not None]
        assert len(opened) == 120
        # Every socket has one deadline on the listener's wheel, and the
        # gateway started no task for any of them.
        listener = gw.gateway.listener
        assert listener is not None
        assert len(listener.wheel) == len(connections(gw)) == 180
        assert len(asyncio.all_tasks()) == tasks_before
        answering = [asyncio.ensure_future(answer_pings(c)) for c in live]
        try:
            m = gw.metrics
            await eventually(lambda: m.disconnects["ping_timeout"] == 60, timeout=15)
            await eventually(lambda: m.handshake_rejections["first_byte_timeout"] == 30, timeout=15)
            await eventually(
                lambda: m.handshake_rejections["timeout"] == 30, timeout=15
            )  # the open timeout
            for conn in dead:
                code, reason, _ = await conn.recv_close()
                assert (code, reason) == (1011, "keepalive ping timeout")
            # The live ones answered several pings and are still members
            # (time must pass: several ping intervals).
            await asyncio.sleep(1.0)
            assert m.connections_current == 60 and m.room_members_current == 60
            assert len(listener.wheel) == 60
        finally:
            for task in answering:
                task.cancel()
            for conn in (*live, *dead, *silent, *trickling):
                conn.abort()


async def test_a_message_of_4096_fragments_is_assembled_and_one_more_fragment_is_1009() -> None:
    """MAX_FRAGMENTS, as websockets' assembler allows; past it, 1009 "too many fragments"."""
    async with running_gateway(drain_timeout_s=1.0) as gw:
        for count in (MAX_FRAGMENTS, MAX_FRAGMENTS + 1):
            conn = await RawConnection.open(gw.port, "/ws/echo")
            try:
                frames = [encode_frame(OP_TEXT, b"a", fin=False)]
                frames += [encode_frame(OP_CONT, b"b", fin=False) for _ in range(count - 2)]
                frames.append(encode_frame(OP_CONT, b"c"))
                await conn.send(b"".join(frames))
                frame = await conn.recv_frame()
                assert frame is not None
                if count == MAX_FRAGMENTS:
                    assert frame.opcode == OP_TEXT
                    assert frame.payload == b"a" + b"b" * (count - 2) + b"c"
                else:
                    assert parse_close(frame.payload) == (1009, "too many fragments")
            finally:
                conn.abort()
        await eventually(lambda: gw.metrics.disconnects["message_too_large"] == 1, timeout=15)


async def test_reading_pauses_while_a_publication_waits_and_replies_keep_their_order(
    redis_server: RedisServer,
) -> None:
    """A publication waits for a frozen Redis: later messages are held, the socket not read."""
    async with running_gateway(
        broker_url=redis_server.url, broker_timeout_s=10.0, drain_timeout_s=1.0
    ) as gw:
        conn = await member(gw.port)
        try:
            (gateway_side,) = [c for c in connections(gw) if c.outbox is not None]
            redis_server.freeze()
            pings = [{"op": "ping", "id": i} for i in range(2, 6)]
            batch = [{"op": "publish", "room": "wheel", "data": "x", "id": 1}, *pings]
            await conn.send(b"".join(encode_frame(OP_TEXT, _json(m)) for m in batch))
            # The publication waits for Redis: the pings are parsed but held,
            # and the socket is not read meanwhile.
            await eventually(
                lambda: gateway_side.inbox is not None and len(gateway_side.inbox) == 4, timeout=15
            )
            assert not gateway_side.transport.is_reading()  # type: ignore[attr-defined]
            await conn.send_json({"op": "ping", "id": 6})  # waits in the kernel
            await asyncio.sleep(0.3)  # time must pass to show that nothing is read
            assert len(gateway_side.inbox or ()) == 4
            redis_server.thaw()
            replies = [await conn.recv_json(timeout=15) for _ in range(7)]
            order = [(r["op"], r.get("id")) for r in replies if r["op"] != "message"]
            assert order == [("ack", 1), *(("pong", i) for i in range(2, 7))]
            await eventually(lambda: gateway_side.inbox is None, timeout=15)
            assert gateway_side.transport.is_reading()  # type: ignore[attr-defined]
        finally:
            redis_server.thaw()
            conn.abort()


def _json(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


# The parser keeps no frame of an idle connection.


async def test_the_parser_keeps_no_frame_after_a_keepalive_ping_and_its_pong() -> None:
    """A 64 KiB message stays in websockets' parser until the next ping; the pong is not kept."""
    async with running_gateway(ping_interval_s=0.3, ping_timeout_s=5.0, drain_timeout_s=1.0) as gw:
        conn = await RawConnection.open(gw.port, "/ws/echo")
        try:
            (gateway_side,) = connections(gw)
            await conn.send_frame(OP_TEXT, b"m" * 65536)
            frame = await conn.recv_frame()
            assert frame is not None and len(frame.payload) == 65536
            locals_ = gateway_side.protocol.parser.gi_frame.f_locals  # type: ignore[attr-defined]
            assert len(locals_["frame"].data) == 65536  # why the parser is restarted
            ping = await conn.recv_frame(timeout=10)
            assert ping is not None and ping.opcode == OP_PING
            assert gateway_side.awaiting_pong
            await conn.send_frame(OP_PONG, ping.payload)
            await eventually(lambda: not gateway_side.awaiting_pong, what="the pong")
            parser: Any = gateway_side.protocol.parser
            assert "frame" not in parser.gi_frame.f_locals
        finally:
            conn.abort()


# disconnect_of: why a connection ended, from the outbox and websockets' protocol.


def outbox(disconnect: Disconnect | None = None) -> Outbox:
    box = Outbox(
        RecordingConnection(),
        Flusher(ManualLoop()),  # type: ignore[arg-type]
        Metrics(version="test", websockets_version="test"),
        max_messages=1,
        max_bytes=1,
    )
    box.disconnect = disconnect
    return box


def protocol(received: bytes = b"", eof: bool = False) -> ServerProtocol:
    """websockets' sans-I/O server protocol, open, after it parsed ``received``."""
    proto = ServerProtocol(state=OPEN, max_size=1024)
    proto.receive_data(received)
    if eof:
        proto.receive_eof()
    return proto


@pytest.mark.parametrize(
    ("proto", "box", "expected"),
    [
        (protocol(encode_frame(OP_TEXT, b"x" * 2000)), outbox(SLOW_CONSUMER), SLOW_CONSUMER),
        (protocol(encode_frame(OP_TEXT, b"x" * 2000)), outbox(), MESSAGE_TOO_LARGE),
        (protocol(encode_frame(OP_TEXT, b"x", mask=False)), outbox(), PROTOCOL_ERROR),
        (protocol(encode_frame(OP_CLOSE, close_payload(1000))), outbox(), CLIENT_CLOSE),
        (protocol(eof=True), outbox(), ABORTED),
        (protocol(), outbox(), ABORTED),
    ],
    ids=["gateway_reason_wins", "1009", "1002", "client_close", "eof", "nothing"],
)
def test_disconnect_of_names_why_a_connection_ended(
    proto: ServerProtocol, box: Outbox, expected: Disconnect
) -> None:
    """The gateway's own reason first, then what the protocol stopped on, else aborted."""
    assert disconnect_of(proto, box) is expected
