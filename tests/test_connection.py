"""connection.py: the websockets adapter, over real sockets on loopback.

The gateway runs in-process (``running_gateway``), so a test reads its books
(``ServerState``, ``Admission``, the metrics object) directly while raw
clients (:mod:`wire`) do what a good client never does: flood pings without
reading, never answer a close frame, end lines with a bare LF. Only
:func:`~rtgateway.connection.disconnect_of` is tested without a socket, on
websockets' own sans-I/O protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import types
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import RunningGateway, running_gateway
from recording import ManualLoop, RecordingConnection
from support import eventually
from websockets.protocol import OPEN
from websockets.server import ServerProtocol
from wire import OP_CLOSE, OP_PING, OP_TEXT, RawConnection, close_payload, encode_frame

from rtgateway.connection import disconnect_of
from rtgateway.errors import (
    ABORTED,
    CLIENT_CLOSE,
    MESSAGE_TOO_LARGE,
    PING_TIMEOUT,
    SLOW_CONSUMER,
    Disconnect,
)
from rtgateway.metrics import Metrics
from rtgateway.outbox import Flusher, Outbox

_opened: list[RawConnection] = []


@contextlib.asynccontextmanager
async def gateway(**changes: Any) -> AsyncIterator[RunningGateway]:
    """The in-process gateway; raw clients still open at the end are reset first."""
    async with running_gateway(**{"drain_timeout_s": 1.0, **changes}) as gw:
        try:
            yield gw
        finally:
            while _opened:
                _opened.pop().abort()


async def raw(port: int, path: str = "/ws", **kwargs: Any) -> RawConnection:
    conn = await RawConnection.open(port, path, **kwargs)
    _opened.append(conn)
    return conn


async def connected(port: int) -> RawConnection:
    conn = await RawConnection.connect(port)
    _opened.append(conn)
    return conn


# The write-buffer guard: pongs websockets queues without any limit.


async def test_a_client_flooding_pings_unread_is_aborted_past_the_write_buffer_limit() -> None:
    """Its transport's buffer passes max_write_buffer_bytes: reset, counted write_buffer."""
    async with gateway(
        outbox_max_bytes=16 * 1024, max_message_bytes=16 * 1024, socket_sndbuf_bytes=4096
    ) as gw:
        limit = gw.gateway.state.limits.max_write_buffer_bytes
        flooder = await raw(gw.port, "/ws/echo", rcvbuf=4096)
        pings = encode_frame(OP_PING, b"p" * 125) * 160  # 160 pongs of 127 bytes each
        with pytest.raises(ConnectionError):
            for _ in range(10 * limit // len(pings)):
                await asyncio.wait_for(flooder.send(pings), 10)
        await eventually(lambda: gw.metrics.disconnects["write_buffer"] == 1)
        assert gw.metrics.connections_current == 0
        assert gw.gateway.state.outboxes == set()


# The close deadline: a peer that never answers a close frame, nor closes TCP.


async def test_a_peer_silent_after_the_gateways_close_frame_is_aborted_at_the_close_timeout() -> (
    None
):
    """Closed 1008 by the rate limit, then silence: the TCP connection is reset, not held."""
    async with gateway(
        close_timeout_s=0.3, ping_interval_s=0, rate_limit_burst=1, rate_limit_max_rejected=0
    ) as gw:
        conn = await raw(gw.port)
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
    """websockets sets the deadline when it fails the connection; the guard enforces it."""
    async with gateway(max_message_bytes=1024, close_timeout_s=0.3, ping_interval_s=0) as gw:
        conn = await raw(gw.port, "/ws/echo")
        await conn.send_frame(OP_TEXT, b"x" * 1025)
        code, _, _ = await conn.recv_close()
        assert code == 1009
        assert await conn.wait_eof(timeout=10) == b""
        await eventually(lambda: gw.metrics.disconnects["message_too_large"] == 1)


# Bare LF in a request head: 400 at once, counted.


BARE_LF = {
    "every_line": b"GET /ws HTTP/1.1\nHost: x\nUpgrade: websocket\n\n",
    "one_line_among_crlf": b"GET /healthz HTTP/1.1\r\nHost: x\nAccept: */*\r\n\r\n",
    "the_empty_line": b"GET /healthz HTTP/1.1\r\nHost: x\r\n\n",
}


@pytest.mark.parametrize("case", list(BARE_LF))
async def test_a_request_head_with_a_bare_lf_gets_400_at_once(case: str) -> None:
    """Refused before websockets reads it, with the gateway's Server header, as bad_request."""
    async with gateway() as gw:
        conn = await connected(gw.port)
        await conn.send(BARE_LF[case])
        response = await conn.wait_eof(timeout=5)
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), response[:100]
        assert b"\r\nServer: rtgateway/" in head
        assert body == b"lines must end with CRLF\n"
        await eventually(lambda: gw.metrics.handshake_rejections["bad_request"] == 1)


async def test_a_crlf_split_across_two_reads_is_not_a_bare_lf() -> None:
    """The CR ends one read and the LF starts the next: still a well-formed head."""
    async with gateway() as gw:
        conn = await connected(gw.port)
        await conn.send(b"GET /healthz HTTP/1.1\r")
        # The gateway has read the first part (the socket is no longer silent).
        await eventually(lambda: gw.gateway.state.admission.talking, what="the first read")
        await conn.send(b"\nHost: x\r\nConnection: close\r\n\r\n")
        response = await conn.wait_eof(timeout=5)
        assert response.startswith(b"HTTP/1.1 200 "), response[:100]
        assert gw.metrics.handshake_rejections["bad_request"] == 0


# Admission's books, kept by the connection from accept to close.


async def test_admission_counts_a_socket_from_accept_to_handshake_to_close() -> None:
    """Pending while silent, then talking, then a counted WebSocket; nothing left after."""
    async with gateway() as gw:
        state = gw.gateway.state
        admission = state.admission
        conn = await connected(gw.port)
        await eventually(lambda: admission.pending == 1, what="the socket pending")
        assert len(admission.silent) == 1 and len(state.sockets) == 1
        await conn.send(b"GET /ws HTTP/1.1\r\n")
        await eventually(lambda: admission.talking, what="the socket talking")
        await conn.send(
            b"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert (await conn.reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
        assert (await conn.recv_json())["op"] == "hello"
        assert admission.pending == 0
        assert admission.connections == {"127.0.0.1": 1}
        conn.abort()
        await eventually(lambda: not state.sockets, what="the socket forgotten")
        assert admission.connections == {} and admission.by_address == {}
        assert gw.metrics.disconnects["aborted"] == 1


async def test_a_socket_silent_past_the_first_byte_deadline_is_dropped_and_forgotten() -> None:
    """first_byte_timeout: counted, aborted, and no longer pending in the books."""
    async with gateway(first_byte_timeout_s=0.2) as gw:
        state = gw.gateway.state
        conn = await connected(gw.port)
        assert await conn.wait_eof(timeout=10) == b""
        assert gw.metrics.handshake_rejections["first_byte_timeout"] == 1
        assert state.admission.pending == 0
        await eventually(lambda: not state.sockets, what="the socket forgotten")


async def test_the_send_buffer_is_set_on_every_accepted_socket() -> None:
    """socket_sndbuf_bytes bounds the kernel's share of a slow consumer's backlog."""
    async with gateway(socket_sndbuf_bytes=8192) as gw:
        await raw(gw.port)
        [conn] = gw.gateway.state.sockets
        sock = conn.transport.get_extra_info("socket")  # type: ignore[attr-defined]
        # Linux doubles the value for its own bookkeeping (socket(7)).
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 8192


async def test_a_paused_transport_gets_its_queued_frames_once_the_client_reads_again() -> None:
    """resume_writing() flushes the outbox: what waited while paused is delivered in order."""
    async with gateway(socket_sndbuf_bytes=4096, publish_requires_join=False) as gw:
        member = await raw(gw.port, rcvbuf=4096)
        await member.recv_json()  # hello
        await member.send_json({"op": "join", "room": "r", "id": 1})
        await member.recv_json()  # ack
        [outbox] = gw.gateway.state.outboxes
        publisher = await raw(gw.port)
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


def protocol(sent: tuple[int, str] | None = None, received: int | None = None) -> Any:
    """A connection's stand-in holding websockets' sans-I/O protocol, closed as told."""
    proto = ServerProtocol(state=OPEN)
    if received is not None:
        proto.receive_data(encode_frame(OP_CLOSE, close_payload(received)))
    if sent is not None and proto.state is OPEN:
        proto.send_close(*sent)
    return types.SimpleNamespace(protocol=proto)


@pytest.mark.parametrize(
    ("conn", "box", "expected"),
    [
        (protocol(sent=(1009, "")), outbox(SLOW_CONSUMER), SLOW_CONSUMER),
        (protocol(sent=(1009, "frame too big")), outbox(), MESSAGE_TOO_LARGE),
        (protocol(sent=(1011, "keepalive ping timeout")), outbox(), PING_TIMEOUT),
        (protocol(received=1000), outbox(), CLIENT_CLOSE),
        (protocol(sent=(1011, "internal error")), outbox(), ABORTED),
        (protocol(), outbox(), ABORTED),
    ],
    ids=["gateway_reason_wins", "1009", "ping_timeout", "client_close", "other_1011", "nothing"],
)
def test_disconnect_of_names_why_a_connection_ended(
    conn: Any, box: Outbox, expected: Disconnect
) -> None:
    """The gateway's own reason first, then what websockets sent, then what it received."""
    assert disconnect_of(conn, box) is expected
