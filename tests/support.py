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
import os
import random
import re
import shutil
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rtgateway.testing import GatewayProcess

__all__ = [
    "IN_CI",
    "ROOT",
    "GatewayProcess",
    "free_port",
    "http_get",
    "require",
    "require_root",
    "require_tool",
    "sample_sum",
    "wait_until",
]

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


def sample_sum(text: str, name: str, labels: str = "") -> float:
    """The sum of ``name``'s samples in Prometheus ``text`` that carry ``labels``.

    ``labels`` is a selector's inside, ``'{policy="drop_oldest"}'``: samples
    with more labels (``namespace``, ``worker``) count too, as a
    ``sum(name{...})`` would.
    """
    wanted = dict(re.findall(r'(\w+)="([^"]*)"', labels))
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and wanted.items() <= sample.labels.items()
    )


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


@contextlib.contextmanager
def gateway_process(env: dict[str, str] | None = None) -> Iterator[GatewayProcess]:
    with GatewayProcess(env) as gw:
        yield gw
