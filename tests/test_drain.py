"""M1: graceful drain on SIGTERM, and sd_notify on a real AF_UNIX socket."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
from pathlib import Path

from httpc import request
from support import GatewayProcess
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


async def test_sigterm_with_100_connections_closes_all_1012_and_exits_0() -> None:
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
    # Browsers open spare connections and send nothing on them.
    env = {"RTG_DRAIN_WINDOW_S": "0.1", "RTG_OPEN_TIMEOUT_S": "120", "RTG_DRAIN_TIMEOUT_S": "60"}
    with GatewayProcess(env) as gw:
        idle = socket.create_connection(("127.0.0.1", gw.port))
        gw.signal(signal.SIGTERM)
        # Well inside both the open timeout and the drain timeout.
        assert gw.wait(30) == 0
        idle.close()


def test_second_signal_exits_at_once() -> None:
    env = {"RTG_DRAIN_WINDOW_S": "5", "RTG_DRAIN_TIMEOUT_S": "20"}
    with GatewayProcess(env) as gw:
        # One open client keeps the drain busy for its whole window.
        sock = socket.create_connection(("127.0.0.1", gw.port))
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        sock.recv(4096)
        gw.signal(signal.SIGTERM)
        time.sleep(0.3)
        gw.signal(signal.SIGTERM)
        assert gw.wait(5) == 1
        assert any(e["event"] == "second_signal_exit" for e in gw.events)
        sock.close()


def test_sd_notify_ready_status_watchdog_then_stopping(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000", "RTG_DRAIN_WINDOW_S": "0.1"}
    with GatewayProcess(env) as gw:
        messages: list[str] = []

        def until(prefix: str) -> str:
            while True:
                msg = sock.recv(4096).decode()
                messages.append(msg)
                if msg.startswith(prefix) or f"\n{prefix}" in msg:
                    return msg

        ready = until("READY=1")
        assert "STATUS=serving 0 connections" in ready
        until("WATCHDOG=1")
        until("WATCHDOG=1")  # fed repeatedly, from the event loop
        gw.signal(signal.SIGTERM)
        stopping = until("STOPPING=1")
        assert "STATUS=draining" in stopping
        assert gw.wait(10) == 0
        # READY came first and only once.
        assert [m for m in messages if "READY=1" in m] == [ready]
    sock.close()


def test_nothing_is_sent_without_notify_socket() -> None:
    from rtgateway.notify import Notifier, watchdog_interval

    notifier = Notifier({})
    assert not notifier.enabled
    notifier.notify("READY=1")  # a no-op, must not raise
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None


# SIGHUP: the appliance has nothing to reload; a hangup (a closed terminal,
# `systemctl kill -s HUP`) drains like SIGTERM.


async def test_sighup_drains_like_sigterm_and_exits_0() -> None:
    env = {"RTG_DRAIN_WINDOW_S": "0.2", "RTG_DRAIN_TIMEOUT_S": "5"}
    with GatewayProcess(env) as gw:
        async with connect(gw.ws_url + "/ws") as ws:
            await ws.recv()  # hello
            gw.signal(signal.SIGHUP)
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            except ConnectionClosed as exc:
                assert exc.rcvd is not None, "no close frame"
                assert exc.rcvd.code == 1012
        assert await asyncio.to_thread(gw.wait, 15) == 0
        events = [e for e in gw.events if e.get("event") == "shutdown_signal"]
        assert [e["signal"] for e in events] == ["SIGHUP"]
        assert any(e.get("event") == "drain_finished" for e in gw.events)


class SupervisorProcess(GatewayProcess):
    ready_event = "supervisor_ready"


async def test_sighup_to_the_supervisor_and_its_workers_drains_and_removes_the_runtime_dir(
    tmp_path: Path,
) -> None:
    env = {
        "RTG_WORKERS": "2",
        # Nothing listens there: the workers serve without a broker, which
        # this test does not need.
        "RTG_BROKER_URL": "redis://127.0.0.1:1",
        "RTG_DRAIN_WINDOW_S": "0.2",
        "RTG_DRAIN_TIMEOUT_S": "5",
        "RUNTIME_DIRECTORY": str(tmp_path),
    }
    with SupervisorProcess(env) as sup:
        assert sup.proc is not None
        [runtime_dir] = os.listdir(tmp_path)
        workers = [e["pid"] for e in sup.events if e.get("event") == "worker_started"]
        async with connect(sup.ws_url + "/ws") as ws:
            await ws.recv()  # hello
            # What `systemctl kill -s HUP` does: every process of the unit at once.
            for pid in (sup.proc.pid, *workers):
                os.kill(pid, signal.SIGHUP)
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            except ConnectionClosed as exc:
                assert exc.rcvd is not None, "no close frame"
                assert exc.rcvd.code == 1012
        assert await asyncio.to_thread(sup.wait, 30) == 0
        exits = [e for e in sup.events if e.get("event") == "worker_exited"]
        assert sorted(e["returncode"] for e in exits) == [0, 0], exits
        assert os.listdir(tmp_path) == [], f"{runtime_dir} left behind"
