"""Helpers shared by the test modules: real processes, real sockets, no mocks.

- :func:`require` skips a test whose real dependency is missing, except under
  ``CI=true``, where a missing dependency is a failure (CI skips nothing).
- :class:`GatewayProcess` runs ``python -m rtgateway`` as a subprocess on a
  port the kernel chose and reads the bound address back from the JSON log.
- :func:`free_port` picks a port outside the ephemeral range for daemons
  (Prometheus, Redis, containers) that cannot be told to bind port 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: object, why: str) -> None:
    """Skip when ``condition`` is false; fail instead under ``CI=true``."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true and a test dependency is missing: {why}", pytrace=False)
    pytest.skip(why)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    require(path, f"needs {name} on PATH (run `make test` as root to install it)")
    assert path is not None
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port in 20000-32767: below the ephemeral range (32768-60999)."""
    for _ in range(200):
        port = random.randint(20000, 32767)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str, dict[str, str]]:
    """GET ``url``; return (status, body, headers) without raising on 4xx/5xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def wait_until(predicate: Any, timeout: float, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


class GatewayProcess:
    """``python -m rtgateway`` in a subprocess, its JSON log lines collected.

    The gateway binds ``127.0.0.1:0`` unless ``RTG_ADDR`` is given; the bound
    address is read from the ``gateway_listening`` log event.
    """

    def __init__(
        self,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        *,
        nofile: int | None = None,
    ):
        self.env = {
            **os.environ,
            "RTG_ADDR": "127.0.0.1:0",
            "RTG_API_ADDR": "",
            "RTG_LOG_FORMAT": "json",
        }
        self.env.update(env or {})
        self.args = args or []
        self.nofile = nofile  # the open-files limit (soft and hard) to start it with
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self.port: int | None = None
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 20.0) -> GatewayProcess:
        nofile = self.nofile

        def limit_nofile() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rtgateway", *self.args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            preexec_fn=limit_nofile if nofile is not None else None,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._listening.wait(timeout):
            self.kill()
            raise AssertionError("gateway did not start:\n" + "\n".join(self.lines[-50:]))
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if self.port is None:
                event = _parse(line)
                if event.get("event") == "gateway_listening":
                    self.port = int(event["addresses"][0].rsplit(":", 1)[1])
                    self._listening.set()

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for e in map(_parse, list(self.lines)) if e]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def _parse(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@contextlib.contextmanager
def gateway_process(env: dict[str, str] | None = None) -> Iterator[GatewayProcess]:
    with GatewayProcess(env) as gw:
        yield gw
