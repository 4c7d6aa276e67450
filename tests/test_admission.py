"""Sockets that have not finished a handshake cannot take the gateway's health down.

The attack from issue 17: with ``RTG_MAX_CONNECTIONS=50`` the gateway used to
accept 250 sockets of any kind; 260 TCP sockets that never send a byte made
``/healthz`` and every new client get a reset until the open timeout (10 s),
and reopening them kept it so. Here the attacker opens its silent sockets
from a second loopback address (127.0.0.2) or from the probe's own, and the
probes must be answered (``/healthz``, ``/metrics``, a new WebSocket client),
well before any timeout. The per-address limits and the evictions are counted
by reason in ``rtgateway_handshake_rejections_total``.

The gateway runs as a subprocess; every socket is real, on 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest
from hardening_support import ascrape, metric, tracebacks
from support import GatewayProcess
from wire import HandshakeRefused, RawConnection, handshake_request

from rtgateway.admission import Admission, address_key

REJECTIONS = "rtgateway_handshake_rejections_total"
SILENT = 260
PROBE_TIMEOUT_S = 5.0  # half the open timeout: an answer, not a timeout


async def silent_sockets(count: int, source: str, port: int) -> list[socket.socket]:
    """``count`` TCP connections from ``source`` that never send a byte."""
    loop = asyncio.get_running_loop()
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((source, 0))
        await loop.sock_connect(sock, ("127.0.0.1", port))
        socks.append(sock)
    return socks


async def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Whether the gateway closes ``sock`` (FIN or reset) within ``timeout``."""
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.sock_recv(sock, 1), timeout) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def eventually_metric(
    base_url: str, name: str, value: float, *, below: bool = False, timeout: float = 10.0
) -> None:
    """Poll ``name`` until it reaches ``value`` (from below, or from above with ``below``)."""
    async with asyncio.timeout(timeout):
        while True:
            got = metric(await ascrape(base_url), name)
            if (got <= value) if below else (got >= value):
                return
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def flood(count: int, source: str, port: int) -> AsyncIterator[list[socket.socket]]:
    socks = await silent_sockets(count, source, port)
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


async def http_status(port: int, path: str) -> int:
    """GET ``path`` on a fresh connection from 127.0.0.1: the status, or raise if reset."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1])
    finally:
        writer.close()


async def assert_answered(port: int) -> None:
    """Health, metrics and a new WebSocket client all get through."""
    assert await http_status(port, "/healthz") == 200
    assert await http_status(port, "/metrics") == 200
    client = await RawConnection.open(port, "/ws", timeout=PROBE_TIMEOUT_S)
    try:
        assert (await client.recv_json(PROBE_TIMEOUT_S))["op"] == "hello"
    finally:
        client.abort()


def gateway(**env: str) -> GatewayProcess:
    return GatewayProcess({"RTG_MAX_CONNECTIONS": "50", "RTG_STATS_INTERVAL_S": "0", **env})


@pytest.mark.parametrize("source", ["127.0.0.2", "127.0.0.1"])
async def test_silent_sockets_leave_health_metrics_and_new_clients_answered(source: str) -> None:
    """260 silent sockets: /healthz, /metrics and a new client are still answered."""
    with gateway() as gw:
        assert gw.port is not None
        async with flood(SILENT, source, gw.port):
            await assert_answered(gw.port)
            samples = await ascrape(gw.url)
        # From one address, at most 64 wait at once: each one past that
        # evicted the oldest silent socket of the same address.
        assert metric(samples, REJECTIONS, "address_pending_limit") >= SILENT - 64
        assert metric(samples, REJECTIONS, "fd_limit") == 0
        assert not tracebacks(gw.lines)


async def test_past_the_pending_budget_a_new_socket_evicts_the_oldest_silent_one() -> None:
    """Past the process's pending budget each new socket evicts the oldest silent one."""
    # No per-address budget: 260 silent sockets fill the process's (100).
    env = {"RTG_MAX_PENDING_HANDSHAKES": "100", "RTG_MAX_PENDING_HANDSHAKES_PER_ADDRESS": "0"}
    with gateway(**env) as gw:
        assert gw.port is not None
        async with flood(SILENT, "127.0.0.2", gw.port) as socks:
            await assert_answered(gw.port)
            samples = await ascrape(gw.url)
            assert metric(samples, REJECTIONS, "pending_evicted") >= SILENT - 100
            assert metric(samples, "rtgateway_pending_handshakes_current") <= 100
            # The oldest went first: the first socket was closed, the last one is held.
            assert await closed_by_peer(socks[0])
            assert not await closed_by_peer(socks[-1], timeout=0.2)


async def test_a_gateway_full_of_websockets_and_flooded_still_answers_health_and_metrics() -> None:
    """At the connection limit and flooded: health and metrics answered, a new client gets 503."""
    with gateway() as gw:
        assert gw.port is not None
        clients = [await RawConnection.open(gw.port, "/ws") for _ in range(50)]
        try:
            async with flood(SILENT, "127.0.0.2", gw.port):
                assert await http_status(gw.port, "/healthz") == 200
                assert await http_status(gw.port, "/metrics") == 200
                # A new client is told it is full, not reset.
                with pytest.raises(HandshakeRefused) as refused:
                    await RawConnection.open(gw.port, "/ws", timeout=PROBE_TIMEOUT_S)
                assert refused.value.status == 503
        finally:
            for client in clients:
                client.abort()


async def test_a_socket_that_sends_nothing_is_closed_at_the_first_byte_deadline() -> None:
    """Silent past RTG_FIRST_BYTE_TIMEOUT_S: closed and counted; a trickling head is kept."""
    with gateway(RTG_FIRST_BYTE_TIMEOUT_S="0.3", RTG_OPEN_TIMEOUT_S="30") as gw:
        assert gw.port is not None
        async with flood(1, "127.0.0.1", gw.port) as [silent]:
            # A request head that comes slowly is not silent: it keeps its socket.
            trickle = await RawConnection.connect(gw.port)
            await trickle.send(handshake_request("/ws")[:10])
            assert await closed_by_peer(silent, timeout=10)
            samples = await ascrape(gw.url)
            assert metric(samples, REJECTIONS, "first_byte_timeout") == 1
            assert metric(samples, "rtgateway_pending_handshakes_current") == 1
            trickle.abort()
        assert not tracebacks(gw.lines)


async def test_connections_past_the_per_address_limit_get_503_and_other_addresses_get_in() -> None:
    """One address past its limit gets 503 with Retry-After; others get in; it may return later."""
    with gateway(RTG_MAX_CONNECTIONS_PER_ADDRESS="3") as gw:
        assert gw.port is not None
        loop = asyncio.get_running_loop()

        async def open_from(source: str) -> RawConnection:
            sock = socket.socket()
            sock.setblocking(False)
            sock.bind((source, 0))
            await loop.sock_connect(sock, ("127.0.0.1", gw.port or 0))
            reader, writer = await asyncio.open_connection(sock=sock)
            conn = RawConnection(reader, writer)
            await conn.send(handshake_request("/ws"))
            response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), PROBE_TIMEOUT_S)
            status = int(response.split(b" ", 2)[1])
            if status != 101:
                conn.abort()
                raise HandshakeRefused(status, response)
            return conn

        held = [await open_from("127.0.0.2") for _ in range(3)]
        with pytest.raises(HandshakeRefused) as refused:
            await open_from("127.0.0.2")
        assert refused.value.status == 503
        assert b"Retry-After: " in refused.value.response
        other = await open_from("127.0.0.3")
        # Not a WebSocket: health checks from that address are answered.
        samples = await ascrape(gw.url)
        assert metric(samples, REJECTIONS, "address_limit") == 1
        # One leaves; once the gateway has seen it go, the address may connect again.
        held.pop().abort()
        await eventually_metric(gw.url, "rtgateway_connections_current", 3, below=True)
        held.append(await open_from("127.0.0.2"))
        for conn in [*held, other]:
            conn.abort()


# The books, unit by unit.


def test_address_key_groups_ipv6_by_its_64_and_unmaps_ipv4() -> None:
    """Limits count IPv4 as is, IPv4-mapped IPv6 as IPv4, and IPv6 by its /64."""
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert (
        address_key("2001:db8:1:2::1")
        == address_key("2001:db8:1:2:ffff::9")
        == ("2001:db8:1:2::/64")
    )
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("fe80::1%eth0") == "fe80::/64"


class Sock:
    def __init__(self, address: str) -> None:
        self.address = address
        self.spoke = False


def test_eviction_takes_the_oldest_silent_socket_of_the_address_first() -> None:
    """The oldest socket of the address that has not spoken goes first; done() is idempotent."""
    books: Admission[Sock] = Admission(
        max_pending=10, max_pending_per_address=3, max_connections_per_address=0
    )
    a1, a2, a3, b1 = Sock("a"), Sock("a"), Sock("a"), Sock("b")
    for sock in (a1, a2, a3, b1):
        assert books.admit(sock) is None
    a1.spoke = True
    books.spoke(a1)
    a4 = Sock("a")
    # a1 is older but has spoken; a2 is the oldest silent socket of "a".
    assert books.admit(a4) == (a2, "address_pending_limit")
    assert books.pending == 4
    books.done(a1)
    books.done(a1)  # idempotent
    assert books.pending == 3
    assert not books.at_connection_limit("a")
