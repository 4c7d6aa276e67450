"""__main__.py: the command line, its exit statuses and its signals, as a real subprocess.

The CLI is the only place that exits: 0 after a drain, 1 when the gateway
cannot run (a port taken) or on a second signal, 2 for a bad setting. Every
shutdown signal (SIGTERM, SIGINT, SIGHUP) starts the same drain.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from support import ROOT, GatewayProcess, wait_until
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from rtgateway import __version__
from rtgateway.config import SETTINGS, env_name, flag_name

HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rtgateway", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


def drain_started(gw: GatewayProcess) -> bool:
    return any(e.get("event") == "drain_started" for e in gw.events)


# Exit statuses and the help.


def test_cli_invalid_value_exits_2_with_one_line() -> None:
    """A bad RTG_* value: status 2, one line on stderr naming the setting."""
    result = cli(env={"RTG_ADDR": "nope"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("rtgateway: error: RTG_ADDR: expected")


def test_an_unknown_rtg_variable_is_refused_with_the_nearest_name() -> None:
    """A misspelt setting stops the gateway instead of being ignored."""
    result = cli(env={"RTG_MAX_CONECTIONS": "5"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "rtgateway: error: RTG_MAX_CONECTIONS: no such setting; did you mean RTG_MAX_CONNECTIONS?"
    ]


def test_a_bad_flag_is_named_as_the_flag() -> None:
    """The error names what the operator typed: the flag, not its variable."""
    result = cli("--max-connections", "x")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "rtgateway: error: --max-connections: expected an integer >= 0, got 'x'"
    )


def test_cli_help_lists_every_setting_with_its_default() -> None:
    """--help exits 0 and names each setting as a flag and as its RTG_* variable."""
    result = cli("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for setting in SETTINGS:
        assert flag_name(setting.name) in text
        assert env_name(setting.name) in text


def test_cli_version() -> None:
    """--version prints the package's version and exits 0."""
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"rtgateway {__version__}"


def test_a_port_already_taken_exits_1_with_the_error_logged() -> None:
    """The gateway cannot run: status 1 and a gateway_failed line naming the address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        result = cli(env={"RTG_ADDR": addr, "RTG_API_ADDR": "", "RTG_LOG_FORMAT": "json"})
    assert result.returncode == 1
    assert '"event": "gateway_failed"' in result.stdout
    assert addr in result.stdout


# Signals: each one drains; a second one exits at once.


async def test_sighup_drains_like_sigterm_and_exits_0() -> None:
    """A hangup (a closed terminal, systemctl kill -s HUP) is a drain: 1012, then status 0."""
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


def test_sigint_drains_and_exits_0() -> None:
    """^C in a terminal drains as SIGTERM does."""
    with GatewayProcess({"RTG_DRAIN_WINDOW_S": "0.1"}) as gw:
        gw.signal(signal.SIGINT)
        assert gw.wait(15) == 0
        assert [e["signal"] for e in gw.events if e.get("event") == "shutdown_signal"] == ["SIGINT"]


def test_second_signal_exits_at_once() -> None:
    """During a drain a second signal ends the process with status 1, logged."""
    env = {"RTG_DRAIN_WINDOW_S": "5", "RTG_DRAIN_TIMEOUT_S": "20"}
    with GatewayProcess(env) as gw:
        # One open client keeps the drain busy for its whole window.
        sock = socket.create_connection(("127.0.0.1", gw.port or 0))
        sock.sendall(HANDSHAKE)
        sock.recv(4096)
        gw.signal(signal.SIGTERM)
        wait_until(lambda: drain_started(gw), 10, what="the drain started")
        gw.signal(signal.SIGTERM)
        assert gw.wait(5) == 1
        assert any(e["event"] == "second_signal_exit" for e in gw.events)
        sock.close()


def test_a_worker_ignores_a_second_signal_and_finishes_its_drain(tmp_path: Path) -> None:
    """Under a supervisor, escalation is the supervisor's: the worker drains and exits 0."""
    env = {
        "RTG_WORKERS": "2",
        "RTG_WORKER_INDEX": "0",
        "RTG_WORKER_DIR": str(tmp_path),
        # Nothing listens there: the worker serves without a broker, which is not tested here.
        "RTG_BROKER_URL": "redis://127.0.0.1:1",
        "RTG_DRAIN_WINDOW_S": "1",
        "RTG_DRAIN_TIMEOUT_S": "10",
    }
    with GatewayProcess(env) as gw:
        sock = socket.create_connection(("127.0.0.1", gw.port or 0))
        sock.sendall(HANDSHAKE)
        sock.recv(4096)
        gw.signal(signal.SIGTERM)
        wait_until(lambda: drain_started(gw), 10, what="the drain started")
        gw.signal(signal.SIGTERM)
        assert gw.wait(20) == 0
        assert not any(e.get("event") == "second_signal_exit" for e in gw.events)
        sock.close()
