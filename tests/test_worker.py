"""A worker's private socket and the host-wide ``/metrics`` it renders.

The gateway runs as a real subprocess told that it is worker 0 of 2; worker 1
is a unix socket this test holds, which can be made to accept a request and
never answer (a stopped sibling), so what the worker does while it waits is
observable: its event loop keeps serving, and concurrent scrapes share one
round of fetches.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from redisserver import RedisServer
from support import GatewayProcess, http_get, wait_until

from rtgateway.testing import parse_log_line
from rtgateway.worker import fetch, merge

pytestmark = [pytest.mark.system, pytest.mark.timeout(60)]


class SilentSibling:
    """A worker socket that accepts and reads requests but never answers."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(64)
        self.requests: list[bytes] = []
        self.held: list[socket.socket] = []
        self.asked = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)  # held open, never answered
            self.requests.append(conn.recv(64))
            self.asked.set()

    def hung_up(self, index: int = 0) -> bool:
        """Whether the worker has closed the ``index``-th connection (its FIN is here)."""
        try:
            return self.held[index].recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@contextlib.contextmanager
def worker_zero(redis: RedisServer, directory: Path) -> Iterator[GatewayProcess]:
    env = {
        "RTG_WORKERS": "2",
        "RTG_WORKER_INDEX": "0",
        "RTG_WORKER_DIR": str(directory),
        "RTG_BROKER_URL": redis.url,
        "RTG_STATS_INTERVAL_S": "0",
    }
    with GatewayProcess(env) as gw:
        yield gw


def test_a_silent_sibling_never_stalls_the_scraped_workers_loop(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """While /metrics waits for a stopped sibling, the worker answers a WebSocket ping."""
    sibling = SilentSibling(str(tmp_path / "worker-1.sock"))
    try:
        with worker_zero(redis_server, tmp_path) as gw:
            assert gw.port is not None
            ws = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
            ws.sendall(
                b"GET /ws/echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            assert ws.recv(4096).startswith(b"HTTP/1.1 101")
            scraped: list[tuple[int, str]] = []
            scrape = threading.Thread(
                target=lambda: scraped.append(http_get(gw.url + "/metrics", timeout=10)[:2])
            )
            scrape.start()
            assert sibling.asked.wait(10), "the worker never asked its sibling"
            # The worker is waiting for its sibling now: its loop must still run.
            ws.sendall(bytes((0x89, 0x80)) + b"\0\0\0\0")  # a masked, empty ping
            pong = ws.recv(2)
            # A worker that blocked on the sibling gives up on it (closes it)
            # before anything else: its FIN would be here before the pong.
            answered_while_waiting = not sibling.hung_up()
            scrape.join(10)
            assert pong == bytes((0x8A, 0x00))
            assert answered_while_waiting, "the pong waited for the sibling"
            status, body = scraped[0]
            assert status == 200
            assert 'rtgateway_worker_scrape_up{worker="1"} 0.0' in body
            assert 'rtgateway_worker_scrape_up{worker="0"} 1.0' in body
            assert 'rtgateway_connections_current{worker="0"} 1.0' in body
            ws.close()
    finally:
        sibling.close()


def test_concurrent_scrapes_share_one_round_of_fetches(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Four scrapers at once cost the sibling one request, and all four get the text."""
    sibling = SilentSibling(str(tmp_path / "worker-1.sock"))
    try:
        with worker_zero(redis_server, tmp_path) as gw:
            results: list[int] = []
            first = threading.Thread(
                target=lambda: results.append(http_get(gw.url + "/metrics", timeout=10)[0])
            )
            first.start()
            assert sibling.asked.wait(10)
            others = [
                threading.Thread(
                    target=lambda: results.append(http_get(gw.url + "/metrics", timeout=10)[0])
                )
                for _ in range(3)
            ]
            for thread in others:
                thread.start()
            for thread in (first, *others):
                thread.join(10)
            assert results == [200] * 4
            assert sibling.requests == [b"metrics\n"]
    finally:
        sibling.close()


def test_clients_of_the_worker_socket_that_hang_up_leave_only_json_in_the_log(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Siblings that ask and reset at once, or send nothing: no traceback, no plain text."""
    with worker_zero(redis_server, tmp_path) as gw:
        path = str(tmp_path / "worker-0.sock")
        wait_until(lambda: os.path.exists(path), 10, what="the worker socket")
        for n in range(20):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(path)
                if n % 2:
                    sock.sendall(b"metrics\n")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The worker still answers its socket and its port.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            sock.sendall(b"ping\n")
            assert sock.recv(64).startswith(b"ok ")
        assert http_get(gw.url + "/healthz")[0] == 200
        assert gw.stop() == 0
        not_json = [line for line in gw.lines if line and not parse_log_line(line)]
        assert not_json == []
        assert gw.tracebacks() == []


async def test_fetch_reads_a_siblings_whole_reply(tmp_path: Path) -> None:
    """The async fetch gets everything a sibling writes before closing."""
    import asyncio

    payload = b"x" * (3 << 20)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readline() == b"metrics\n"
        writer.write(payload)
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(answer, str(tmp_path / "s.sock"))
    async with server:
        assert await fetch(str(tmp_path / "s.sock"), b"metrics") == payload


def test_merge_labels_every_series_by_worker_and_marks_the_silent_ones() -> None:
    """merge() labels every series by worker, keeps one TYPE line, and marks silent workers 0."""
    text = b'# HELP a_total A.\n# TYPE a_total counter\na_total{k="v"} 3.0\n'
    merged = merge({0: text, 1: None, 2: text}).decode()
    assert 'a_total{k="v",worker="0"} 3.0' in merged
    assert 'a_total{k="v",worker="2"} 3.0' in merged
    assert 'rtgateway_worker_scrape_up{worker="1"} 0.0' in merged
    assert merged.count("# TYPE a_total counter") == 1
