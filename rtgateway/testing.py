"""Run the gateway as a subprocess: the one launcher for tests, benchmarks and load runs.

:class:`GatewayProcess` starts ``python -m rtgateway`` (or another command
that logs the same way) on a port the kernel chooses (``RTG_ADDR=127.0.0.1:0``
unless told otherwise), reads its output on a thread, and is ready once the
readiness event says where it listens: ``gateway_listening``, or for the
supervisor (``RTG_WORKERS`` above 1) ``supervisor_ready``, which also names
its workers' pids. tests/, bench/ (bench.py, soak.py, c100k.py), k6/smoke.py
and scripts/conformance.py start their servers with it; :func:`cpu_seconds`
and :func:`rss_bytes` read what such a process costs from ``/proc``, and
:func:`free_port` finds a port for a server that must be told one.

Standard library only, so scripts outside the test suite use it too. It
decides nothing about what is measured: of the gateway's settings it sets
only the address, the publish API (off) and the log format (JSON).
"""

from __future__ import annotations

import json
import os
import random
import resource
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Self

__all__ = [
    "GatewayProcess",
    "cpu_seconds",
    "cpu_times",
    "free_port",
    "parse_log_line",
    "rss_bytes",
]

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# Where a wildcard listener is reached from this host.
LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


class GatewayProcess:
    """A server subprocess, its log lines collected, ready once it says where it listens.

    ``env`` is added to this process's environment (after the defaults
    ``RTG_ADDR=127.0.0.1:0``, ``RTG_API_ADDR=`` and ``RTG_LOG_FORMAT=json``);
    ``args`` follow ``command``, which is ``python -m rtgateway`` unless given
    (a wrapper script, or a baseline server that logs a readiness event of its
    own). ``ready_event`` is the event to wait for: ``supervisor_ready`` for a
    supervisor; a worker started alone, with ``RTG_WORKERS`` set, says
    ``gateway_listening``. ``cwd`` is the checkout unless given: ``python -m``
    imports ``rtgateway`` from its working directory first. ``nofile`` sets
    the open-files limit (soft and hard) and ``cpus`` the CPUs it may run on,
    both before it starts, so its children inherit them. ``max_lines`` keeps
    only the newest lines in :attr:`lines` (positions in it then shift); a
    subclass that needs every line overrides :meth:`on_line`.
    """

    # The log event that says the process serves, with ``addresses``.
    ready_event = "gateway_listening"

    def __init__(
        self,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        *,
        command: list[str] | None = None,
        cwd: str | Path | None = None,
        nofile: int | None = None,
        cpus: set[int] | None = None,
        ready_event: str | None = None,
        max_lines: int | None = None,
    ):
        self.env = {
            **os.environ,
            "RTG_ADDR": "127.0.0.1:0",
            "RTG_API_ADDR": "",
            "RTG_LOG_FORMAT": "json",
        }
        self.env.update(env or {})
        self.command = command or [sys.executable, "-m", "rtgateway"]
        self.args = args or []
        self.cwd = Path(cwd) if cwd is not None else ROOT
        self.nofile = nofile
        self.cpus = cpus
        if ready_event is not None:
            self.ready_event = ready_event
        self.max_lines = max_lines
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        # Filled in from the readiness event.
        self.ready: dict[str, Any] | None = None
        self.addresses: list[str] = []
        self.host = ""
        self.port: int | None = None
        self.pids: list[int] = []  # the processes that serve: the workers, or this one
        self._settled = threading.Event()  # ready, or its output ended first
        self._reader: threading.Thread | None = None

    # Lifecycle.

    def start(self, timeout: float = 20.0) -> Self:
        """Start it and wait for the readiness event; kill it and raise past ``timeout``."""
        self.proc = subprocess.Popen(
            [*self.command, *self.args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            cwd=self.cwd,
            preexec_fn=self._limit if self.nofile is not None or self.cpus else None,
        )
        self._reader = threading.Thread(target=self._read, name="gateway-log", daemon=True)
        self._reader.start()
        self._settled.wait(timeout)
        if self.ready is None:
            exited = self.proc.poll()
            self.kill()
            why = f"exited with {exited}" if exited is not None else f"not ready in {timeout:g} s"
            what = shlex.join([Path(self.command[0]).name, *self.command[1:]])
            raise RuntimeError(
                f"{what} {why}, no {self.ready_event} event:\n" + "\n".join(self.lines[-50:])
            )
        return self

    def _limit(self) -> None:
        # In the child, between fork and exec.
        if self.nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))
        if self.cpus:
            os.sched_setaffinity(0, self.cpus)

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:
                line = raw.rstrip("\n")
                event = parse_log_line(line)
                self.on_line(line, event)
                self.lines.append(line)
                if self.max_lines is not None and len(self.lines) > self.max_lines:
                    del self.lines[0]
                if self.ready is None and event.get("event") == self.ready_event:
                    self._on_ready(event)
        finally:
            self.proc.stdout.close()  # else a ResourceWarning once collected
            self._settled.set()

    def _on_ready(self, event: dict[str, Any]) -> None:
        assert self.proc is not None
        self.addresses = [str(a) for a in event.get("addresses", [])]
        host, _, port = self.addresses[0].rpartition(":")
        host = host.strip("[]")
        self.host = LOOPBACK.get(host, host)
        self.port = int(port)
        self.pids = [int(pid) for pid in event.get("pids", [])] or [self.proc.pid]
        self.ready = event
        self._settled.set()

    def on_line(self, line: str, event: dict[str, Any]) -> None:
        """Called on the reader thread for every line, ``event`` its JSON ({} if none)."""

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return rc

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (the drain), then wait; kill past ``timeout``. The exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> Self:
        # ``with GatewayProcess(...).start() as gw`` must not start a second one.
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    # What it says and what it costs.

    @property
    def authority(self) -> str:
        """``host:port`` as a URL needs it (an IPv6 host in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.authority}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.authority}"

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for e in map(parse_log_line, list(self.lines)) if e]

    def tracebacks(self) -> list[str]:
        """Log lines that carry an exception."""
        return [line for line in self.lines if "Traceback" in line or '"exception"' in line]

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of :attr:`pids` so far."""
        return sum(cpu_seconds(pid) for pid in self.pids)


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port in 20000-32767, for a server that must be told one.

    Below the ephemeral range (32768-60999), where a client socket could take
    it meanwhile: a gateway restarted on its port, a daemon without port 0.
    """
    for _ in range(200):
        port = random.randint(20000, 32767)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


def parse_log_line(line: str) -> dict[str, Any]:
    """One JSON log line as a dict; {} for anything else."""
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` from /proc/PID/stat; zeros once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0.0
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid``; 0 once it is gone."""
    return sum(cpu_times(pid))


def rss_bytes(pid: int) -> int:
    """Resident bytes of ``pid`` from /proc/PID/statm; 0 once it is gone."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
    except OSError:
        return 0
