"""Run the gateway as a subprocess, for tests, benchmarks and conformance runs.

:class:`GatewayProcess` starts ``python -m rtgateway`` on a port the kernel
chooses (``RTG_ADDR=127.0.0.1:0`` unless told otherwise), collects its JSON
log lines, and reads the bound address back from the ``gateway_listening``
event. Standard library only, so scripts outside the test suite use it too.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = ["GatewayProcess", "parse_log_line"]

ROOT = Path(__file__).resolve().parent.parent


class GatewayProcess:
    """``python -m rtgateway`` in a subprocess, its JSON log lines collected.

    The gateway binds ``127.0.0.1:0`` unless ``RTG_ADDR`` is given; the bound
    address is read from the ``gateway_listening`` log event.
    """

    # The log event that says the process serves, with ``addresses``.
    ready_event = "gateway_listening"

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
                event = parse_log_line(line)
                if event.get("event") == self.ready_event:
                    self.port = int(event["addresses"][0].rsplit(":", 1)[1])
                    self._listening.set()

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for e in map(parse_log_line, list(self.lines)) if e]

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

    def tracebacks(self) -> list[str]:
        """Log lines that carry an exception."""
        return [line for line in self.lines if "Traceback" in line or '"exception"' in line]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def parse_log_line(line: str) -> dict[str, Any]:
    """One JSON log line as a dict; {} for anything else."""
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
