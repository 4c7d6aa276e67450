"""notify.py: sd_notify on a real AF_UNIX datagram socket, and the watchdog's interval.

What a real systemd makes of these messages is ``test_systemd.py``'s (the
appliance in a container); here the socket is the test's own.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import GatewayProcess

from rtgateway.notify import Notifier, watchdog_interval


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """A bound datagram socket, as systemd's NOTIFY_SOCKET is."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(10)
    try:
        yield sock
    finally:
        sock.close()


def test_lines_sent_together_arrive_as_one_datagram(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """READY=1 and its STATUS= are one message, newline-separated, as sd_notify(3) wants."""
    path = notify_socket.getsockname()
    monkeypatch.setenv("NOTIFY_SOCKET", path)  # sdnotify reads the address from os.environ
    notifier = Notifier({"NOTIFY_SOCKET": path})
    try:
        assert notifier.enabled
        notifier.notify("READY=1", "STATUS=serving 0 connections")
        notifier.notify("WATCHDOG=1")
        assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving 0 connections"
        assert notify_socket.recv(4096) == b"WATCHDOG=1"
    finally:
        # sdnotify never closes the socket it opened (see the report on notify.py).
        assert notifier._notifier is not None
        notifier._notifier.socket.close()


def test_nothing_is_sent_without_notify_socket() -> None:
    """Outside systemd the notifier is off, and notify() is a no-op that never raises."""
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.notify("READY=1")


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "2000000"}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": ""}, None),
    ],
)
def test_the_watchdog_is_fed_at_half_its_timeout_and_only_when_meant_for_this_process(
    environ: dict[str, str], interval: float | None
) -> None:
    """WATCHDOG_PID naming another process (a parent's) means: not ours to feed."""
    assert watchdog_interval(environ) == interval


def test_the_gateway_says_ready_feeds_the_watchdog_then_says_stopping(
    notify_socket: socket.socket,
) -> None:
    """A gateway subprocess: READY=1 once with its STATUS, WATCHDOG=1 repeatedly, STOPPING=1."""
    env = {
        "NOTIFY_SOCKET": notify_socket.getsockname(),
        "WATCHDOG_USEC": "400000",
        "RTG_DRAIN_WINDOW_S": "0.1",
    }
    with GatewayProcess(env) as gw:
        messages: list[str] = []

        def until(prefix: str) -> str:
            while True:
                msg = notify_socket.recv(4096).decode()
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
