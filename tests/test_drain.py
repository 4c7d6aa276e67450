"""The drain, end to end: SIGTERM to a gateway subprocess with clients connected.

Every connection gets 1012 with its own reconnect delay, clients that never
answer are aborted at the drain timeout, and sockets without a handshake do
not hold it up. (The signals themselves are test_main.py's; sd_notify is
test_notify.py's.)
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import time

from httpc import request
from support import GatewayProcess
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


async def test_sigterm_with_100_connections_closes_all_1012_and_exits_0() -> None:
    """SIGTERM, 100 clients: /healthz 503, each client 1012 with its own delay, exit 0."""
    env = {"RTG_DRAIN_WINDOW_S": "2", "RTG_DRAIN_TIMEOUT_S": "10"}
    with GatewayProcess(env) as gw:
        assert gw.port is not None
        clients = [await connect(gw.ws_url + "/ws") for _ in range(100)]
        for ws in clients:
            await ws.recv()  # hello

        async def wait_close(ws: object) -> tuple[int | None, str]:
            try:
                while True:
                    await ws.recv()  # type: ignore[attr-defined]
            except ConnectionClosed as exc:
                assert exc.rcvd is not None
                return exc.rcvd.code, exc.rcvd.reason

        waiters = [asyncio.create_task(wait_close(ws)) for ws in clients]
        started = time.monotonic()
        gw.signal(signal.SIGTERM)

        # While the drain runs, health says so and new handshakes are refused.
        health = []
        while not all(w.done() for w in waiters):
            try:
                health.append((await request(gw.port, "/healthz"))[0])
            except OSError:
                break
            await asyncio.sleep(0.1)
        assert 503 in health

        closes = await asyncio.gather(*waiters)
        assert all(code == 1012 for code, _ in closes)
        delays = [
            int(re.fullmatch(r"service restart; retry_after_ms=(\d+)", r)[1]) for _, r in closes
        ]  # type: ignore[index]
        # After the rest of the 2 s window, 1 s, plus up to max(1 s, 2 s) of jitter.
        assert all(1000 <= d <= 2000 + 1000 + 2000 for d in delays)
        assert len(set(delays)) > 1  # each client gets its own delay
        rc = await asyncio.to_thread(gw.wait, 15)
        assert rc == 0
        assert time.monotonic() - started < 10 + 5
        events = [e["event"] for e in gw.events]
        assert "drain_started" in events and "drain_finished" in events
        finished = next(e for e in gw.events if e["event"] == "drain_finished")
        assert finished["closed"] == 100 and finished["aborted"] == 0


async def test_drain_aborts_clients_that_never_answer_after_the_timeout() -> None:
    """A client that never answers the close frame is aborted at the drain timeout, and counted."""
    env = {"RTG_DRAIN_WINDOW_S": "0.1", "RTG_DRAIN_TIMEOUT_S": "1", "RTG_CLOSE_TIMEOUT_S": "30"}
    with GatewayProcess(env) as gw:
        assert gw.port is not None
        # A client that stops reading never answers the close frame.
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await reader.readuntil(b"\r\n\r\n")
        gw.signal(signal.SIGTERM)
        rc = await asyncio.to_thread(gw.wait, 10)
        assert rc == 0
        finished = next(e for e in gw.events if e["event"] == "drain_finished")
        assert finished["aborted"] == 1
        assert any(e["event"] == "drain_aborted" for e in gw.events)
        writer.close()


def test_drain_does_not_wait_for_sockets_that_never_sent_a_handshake() -> None:
    """A socket without a handshake does not hold up the drain."""
    # Browsers open spare connections and send nothing on them.
    env = {"RTG_DRAIN_WINDOW_S": "0.1", "RTG_OPEN_TIMEOUT_S": "120", "RTG_DRAIN_TIMEOUT_S": "60"}
    with GatewayProcess(env) as gw:
        idle = socket.create_connection(("127.0.0.1", gw.port))
        gw.signal(signal.SIGTERM)
        # Well inside both the open timeout and the drain timeout.
        assert gw.wait(30) == 0
        idle.close()
