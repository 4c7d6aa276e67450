"""A real ``redis-server`` for the tests that need one: a free port, no persistence.

:class:`RedisServer` can be stopped, restarted empty, frozen (SIGSTOP) and
thawed; :func:`redis_server` is the fixture. ``redis-cli``-style commands go
through redis-py's synchronous client, a real client on a real socket.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from support import free_port, require_tool, wait_until

__all__ = ["RedisServer", "redis_server"]

NO_PERSISTENCE = ("--save", "", "--appendonly", "no")


class RedisServer:
    """``redis-server`` on a free port, without persistence; can be stopped and restarted."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", *NO_PERSISTENCE],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.answers, 10, what="redis-server answering PING")

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen server cannot act on SIGTERM
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def restart_empty(self) -> None:
        """Stop and start again on the same port: every key is gone."""
        self.stop()
        self.start()

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def command(self, *args: Any) -> Any:
        """One command on a fresh connection of redis-py's synchronous client."""
        with redis.Redis(port=self.port, socket_timeout=5) as client:
            return client.execute_command(*args)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(require_tool("redis-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
