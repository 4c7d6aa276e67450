"""supervisor.py: the supervisor of RTG_WORKERS=N, by its pieces and as a real process tree.

The pieces run in this process on real sockets (the reserved port, a worker's
private socket answered by the test); the rest runs ``python -m rtgateway``
with ``RTG_WORKERS=2`` as a subprocess, with a real ``NOTIFY_SOCKET`` and a
real ``redis-server``. How the workers share rooms is ``test_scaleout.py``'s.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest
from redisserver import RedisServer
from support import ROOT, SupervisorProcess, supervisor, wait_until
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from rtgateway.config import Config
from rtgateway.notify import Notifier
from rtgateway.supervisor import STALL_AFTER_S, START_GRACE_S, Slot, Supervisor
from rtgateway.testing import parse_log_line
from rtgateway.worker import ADDR_ENV, DIR_ENV, INDEX_ENV, socket_path


def make(addr: str = "127.0.0.1:0", **environ: str) -> Supervisor:
    """A supervisor of two workers that has started nothing."""
    config = Config(addr=addr, workers=2, broker_url="redis://127.0.0.1:1")
    return Supervisor(config, ["--stats-interval-s", "0"], notifier=Notifier({}), environ=environ)


# Its pieces.


def test_port_0_becomes_one_port_held_bound_but_not_listening() -> None:
    """Every worker binds the same concrete port; the reservation itself takes no connection."""
    sup = make()
    addr = sup._reserve_addr()
    assert sup.reservation is not None
    try:
        host, port = addr.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        assert sup.reservation.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", int(port))) != 0  # refused: nobody listens
        # A worker can bind it too (SO_REUSEPORT), as each one does.
        with socket.socket() as worker:
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", int(port)))
    finally:
        sup.reservation.close()


def test_a_given_port_is_used_as_it_is() -> None:
    """Nothing to reserve when the operator chose the port."""
    sup = make("127.0.0.1:8083")
    assert sup._reserve_addr() == "127.0.0.1:8083"
    assert sup.reservation is None


def test_an_ipv6_port_0_is_reserved_and_written_in_brackets() -> None:
    """[::1]:0 becomes [::1]:PORT."""
    sup = make("[::1]:0")
    addr = sup._reserve_addr()
    assert sup.reservation is not None
    sup.reservation.close()
    assert addr.startswith("[::1]:") and int(addr.rsplit(":", 1)[1]) > 0


def test_a_workers_environment_names_it_and_keeps_systemd_away() -> None:
    """Index, directory and address set; NOTIFY_SOCKET and the watchdog's variables removed."""
    sup = make(
        NOTIFY_SOCKET="/run/systemd/notify",
        WATCHDOG_USEC="1000000",
        WATCHDOG_PID="1",
        RTG_BROKER_URL="redis://127.0.0.1:6379",
    )
    sup.directory = "/run/rtgateway-x"
    sup.addr = "127.0.0.1:9000"
    env = sup._worker_env(1)
    assert env == {
        "RTG_BROKER_URL": "redis://127.0.0.1:6379",
        INDEX_ENV: "1",
        DIR_ENV: "/run/rtgateway-x",
        ADDR_ENV: "127.0.0.1:9000",
    }


def slot(*, ready: bool, started_ago: float, ok_ago: float, dead: bool = False) -> Slot:
    now = time.monotonic()
    s = Slot(0)
    # The process only has to say whether it exited.
    s.proc = types.SimpleNamespace(returncode=1 if dead else None, pid=4242)  # type: ignore[assignment]
    s.ready = ready
    s.started = now - started_ago
    s.last_ok = now - ok_ago
    return s


RESPONSIVE = {"ready": True, "started_ago": 60, "ok_ago": 0.5}
STALLED = {"ready": True, "started_ago": 60, "ok_ago": STALL_AFTER_S + 1}


@pytest.mark.parametrize(
    ("slots", "healthy"),
    [
        ([RESPONSIVE], True),
        ([STALLED], False),
        ([{"ready": False, "started_ago": 1, "ok_ago": 99}], True),
        ([{"ready": False, "started_ago": START_GRACE_S + 1, "ok_ago": 99}], False),
        ([{"ready": False, "started_ago": 99, "ok_ago": 99, "dead": True}], True),
        ([RESPONSIVE, STALLED], False),
    ],
    ids=["responsive", "stalled", "starting", "never_ready", "dead", "one_of_two_stalled"],
)
def test_the_watchdog_is_fed_only_while_every_live_worker_is_responsive(
    slots: list[dict[str, Any]], healthy: bool
) -> None:
    """A stalled worker stops the feeding; one starting, or dead and being replaced, does not."""
    sup = make()
    sup.slots = [slot(**s) for s in slots]
    assert sup._healthy(time.monotonic()) is healthy


@pytest.mark.parametrize(
    ("reply", "ready"),
    [(b"ok 0.25", True), (b"ok 9.5", False), (b"ok soon", False), (b"busy", False), (b"", False)],
)
async def test_a_worker_is_ready_once_its_socket_says_its_loop_ran_recently(
    tmp_path: Path, reply: bytes, ready: bool
) -> None:
    """ping over the private socket: only a fresh heartbeat counts, whatever else comes back."""
    sup = make()
    sup.directory = str(tmp_path)
    asked: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.append(await reader.readline())
        writer.write(reply)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_unix_server(answer, socket_path(str(tmp_path), 0))
    async with server:
        worker = slot(ready=False, started_ago=1, ok_ago=99)
        await sup._ping(worker)
    assert asked == [b"ping\n"]
    assert worker.ready is ready
    assert (time.monotonic() - worker.last_ok < 5) is ready


async def test_a_worker_that_is_not_listening_yet_is_simply_not_ready(tmp_path: Path) -> None:
    """No socket yet (still starting): no error, no readiness."""
    sup = make()
    sup.directory = str(tmp_path)
    worker = slot(ready=False, started_ago=1, ok_ago=99)
    await sup._ping(worker)
    assert not worker.ready


# The process tree.


class NotifySocket:
    """A real ``NOTIFY_SOCKET``: what arrives on it, and from which process."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.2)
        self.received: list[tuple[float, int, str]] = []  # (monotonic, sender pid, line)
        self.closed = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        creds = struct.calcsize("iII")
        while not self.closed:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = -1
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", value[:creds])[0]
            now = time.monotonic()
            for line in data.decode().splitlines():
                self.received.append((now, pid, line))

    def lines(self, prefix: str) -> list[tuple[float, int, str]]:
        return [r for r in list(self.received) if r[2].startswith(prefix)]

    def close(self) -> None:
        self.closed = True
        self.thread.join(2)
        self.sock.close()


async def test_supervisor_alone_speaks_to_systemd(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Only the supervisor's pid notifies: READY=1 once, WATCHDOG=1 stopped by a stalled worker."""
    notify = NotifySocket(str(tmp_path / "notify"))
    try:
        env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"}
        with supervisor(redis_server.url, **env) as gw:
            assert gw.proc is not None
            await asyncio.to_thread(wait_until, lambda: notify.lines("READY=1"), 10, what="READY=1")
            events = [e.get("event") for e in gw.events]
            ready_at = events.index("supervisor_ready")
            assert events[:ready_at].count("worker_ready") == 2
            # Workers never get NOTIFY_SOCKET: everything comes from the supervisor.
            assert {pid for _, pid, _ in notify.received} == {gw.proc.pid}
            assert len(notify.lines("READY=1")) == 1

            def fed_since(moment: float) -> bool:
                return any(t > moment for t, _, _ in notify.lines("WATCHDOG=1"))

            start = time.monotonic()
            await asyncio.to_thread(wait_until, lambda: fed_since(start), 10, what="WATCHDOG=1")
            # A stalled worker stops the feeding: systemd would restart the service.
            stalled = gw.worker_pid(0)
            os.kill(stalled, signal.SIGSTOP)
            try:
                await asyncio.to_thread(
                    wait_until,
                    lambda: not fed_since(time.monotonic() - 1.5),
                    30,
                    what="the watchdog no longer fed",
                )
            finally:
                os.kill(stalled, signal.SIGCONT)
            resumed = time.monotonic()
            await asyncio.to_thread(
                wait_until, lambda: fed_since(resumed), 15, what="feeding resumed"
            )
            gw.signal(signal.SIGTERM)
            assert await asyncio.to_thread(gw.wait, 20) == 0
            assert notify.lines("STOPPING=1")
            assert {pid for _, pid, _ in notify.received} == {gw.proc.pid}
    finally:
        notify.close()


def test_supervisor_exits_1_when_workers_cannot_start(tmp_path: Path) -> None:
    """Workers that die at start-up: the supervisor gives up with status 1, never ready."""
    # Every worker process dies at interpreter start-up (a sitecustomize that
    # exits when it sees the worker index), as a missing dependency would.
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\nif os.environ.get('RTG_WORKER_INDEX'):\n    sys.exit(1)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "RTG_WORKERS": "2",
        "RTG_BROKER_URL": "redis://127.0.0.1:1",
        "RTG_ADDR": "127.0.0.1:0",
        "RTG_API_ADDR": "",
        "RTG_LOG_FORMAT": "json",
    }
    result = subprocess.run(
        [sys.executable, "-m", "rtgateway"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 1
    events = [parse_log_line(line).get("event") for line in result.stdout.splitlines()]
    assert "worker_start_failed" in events
    assert "supervisor_ready" not in events


async def test_sighup_to_the_supervisor_and_its_workers_drains_and_removes_the_runtime_dir(
    tmp_path: Path,
) -> None:
    """SIGHUP to every process of the unit: 1012, workers exit 0, the runtime dir is removed."""
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
