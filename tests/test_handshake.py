"""handshake.py: an accepted socket until its upgrade, over real sockets on loopback.

The gateway runs in-process (``running_gateway``), so a test reads its books
(``ServerState``, ``Admission``, the metrics object) and the connection
object itself, while raw clients (:mod:`wire`) do what a good client never
does: stay silent, trickle a request head, end lines with a bare LF.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
from conftest import RunningGateway, raw_gateway
from support import eventually
from websockets.protocol import Protocol as SansIO
from wire import RawConnection

from rtgateway.connection import GatewayConnection


def the_connection(gw: RunningGateway) -> GatewayConnection:
    [conn] = gw.gateway.state.sockets
    assert isinstance(conn, GatewayConnection)
    return conn


# Bare LF in a request head: 400 at once, counted.


BARE_LF = {
    "every_line": b"GET /ws HTTP/1.1\nHost: x\nUpgrade: websocket\n\n",
    "one_line_among_crlf": b"GET /healthz HTTP/1.1\r\nHost: x\nAccept: */*\r\n\r\n",
    "the_empty_line": b"GET /healthz HTTP/1.1\r\nHost: x\r\n\n",
}


@pytest.mark.parametrize("case", list(BARE_LF))
async def test_a_request_head_with_a_bare_lf_gets_400_at_once(case: str) -> None:
    """Refused before websockets reads it, with the gateway's Server header, as bad_request."""
    async with raw_gateway() as gw:
        conn = await RawConnection.connect(gw.port)
        await conn.send(BARE_LF[case])
        response = await conn.wait_eof(timeout=5)
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), response[:100]
        assert b"\r\nServer: rtgateway/" in head
        assert body == b"lines must end with CRLF\n"
        await eventually(lambda: gw.metrics.handshake_rejections["bad_request"] == 1)


async def test_a_crlf_split_across_two_reads_is_not_a_bare_lf() -> None:
    """The CR ends one read and the LF starts the next: still a well-formed head."""
    async with raw_gateway() as gw:
        conn = await RawConnection.connect(gw.port)
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
    async with raw_gateway() as gw:
        state = gw.gateway.state
        admission = state.admission
        conn = await RawConnection.connect(gw.port)
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
    async with raw_gateway(first_byte_timeout_s=0.2) as gw:
        state = gw.gateway.state
        conn = await RawConnection.connect(gw.port)
        assert await conn.wait_eof(timeout=10) == b""
        assert gw.metrics.handshake_rejections["first_byte_timeout"] == 1
        assert state.admission.pending == 0
        await eventually(lambda: not state.sockets, what="the socket forgotten")


async def test_the_send_buffer_is_set_on_every_accepted_socket() -> None:
    """socket_sndbuf_bytes bounds the kernel's share of a slow consumer's backlog."""
    async with raw_gateway(socket_sndbuf_bytes=8192) as gw:
        await RawConnection.open(gw.port)
        [conn] = gw.gateway.state.sockets
        sock = conn.transport.get_extra_info("socket")  # type: ignore[attr-defined]
        # Linux doubles the value for its own bookkeeping (socket(7)).
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 8192


# The open timeout, counted from the accept.


async def test_a_request_head_that_never_ends_is_dropped_at_the_open_timeout() -> None:
    """A head trickled and never finished: dropped at open_timeout, counted timeout."""
    async with raw_gateway(open_timeout_s=0.3, first_byte_timeout_s=0.2) as gw:
        conn = await RawConnection.connect(gw.port)
        await conn.send(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        assert await conn.wait_eof(timeout=10) == b""
        assert gw.metrics.handshake_rejections["timeout"] == 1
        assert gw.metrics.handshake_rejections["first_byte_timeout"] == 0
        await eventually(lambda: not gw.gateway.state.sockets, what="the socket forgotten")


# After the upgrade: the request is not kept.


async def test_the_upgrade_restarts_the_parser_so_the_request_is_not_kept() -> None:
    """websockets' handshake parser holds the request; after the 101 only the frame parser runs."""
    async with raw_gateway() as gw:
        member = await RawConnection.open(gw.port)
        assert (await member.recv_json())["op"] == "hello"
        conn = the_connection(gw)
        parser: Any = conn.protocol.parser
        assert parser.gi_code is SansIO.parse.__code__
        assert parser.gi_yieldfrom is not None  # waiting for the next frame's first byte
        assert "request" not in parser.gi_frame.f_locals
