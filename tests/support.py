"""Helpers shared by the test modules: real processes, real sockets, no mocks.

- :func:`require` skips a test whose real dependency is missing, except under
  ``CI=true``, where a missing dependency is a failure (CI skips nothing).
- :class:`GatewayProcess` runs ``python -m rtgateway`` as a subprocess on a
  port the kernel chose and reads the bound address back from the JSON log.
- :class:`SupervisorProcess` is the same for ``RTG_WORKERS`` > 1, and
  :func:`supervisor` runs one with two workers on a broker.
- :func:`wait_until` polls a condition from a thread, :func:`eventually` from
  the event loop: a wait on a state, never a sleep that hopes it is reached.
- :func:`free_port` (the launcher's) picks a port outside the ephemeral range
  for daemons (Prometheus, Redis, containers) that cannot be told to bind port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rtgateway import testing
from rtgateway.testing import free_port

__all__ = [
    "IN_CI",
    "ROOT",
    "GatewayProcess",
    "SupervisorProcess",
    "eventually",
    "free_port",
    "http_get",
    "require",
    "require_root",
    "require_tool",
    "sample_sum",
    "supervisor",
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


async def eventually(
    predicate: Any, timeout: float = 10.0, interval: float = 0.01, what: str = ""
) -> Any:
    """:func:`wait_until` on the event loop: for state an in-process gateway offers no event for.

    The loop keeps running between polls, the gateway's part of it included.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        await asyncio.sleep(interval)


GatewayProcess = testing.GatewayProcess


class SupervisorProcess(GatewayProcess):
    """``python -m rtgateway`` with ``RTG_WORKERS`` > 1: ready once ``supervisor_ready``."""

    ready_event = "supervisor_ready"

    def worker_pid(self, index: int) -> int:
        """The pid of the process in worker slot ``index`` now (the latest started)."""
        started = [
            e["pid"]
            for e in self.events
            if e.get("event") == "worker_started" and e.get("worker") == index
        ]
        return int(started[-1])

    def worker_metric(self, name: str) -> dict[int, float]:
        """``name`` by worker, from one scrape of the merged /metrics."""
        status, body, _ = http_get(self.url + "/metrics")
        assert status == 200
        values: dict[int, float] = {}
        pattern = re.compile(rf'^{name}\{{worker="(\d+)"\}} (\S+)$', re.M)
        for worker, value in pattern.findall(body):
            values[int(worker)] = float(value)
        return values


P = TypeVar("P", bound=SupervisorProcess)


@contextlib.contextmanager
def supervisor(
    broker_url: str, make: Callable[[dict[str, str]], P] = SupervisorProcess, **env: str
) -> Iterator[P]:
    """A supervisor of two workers sharing ``broker_url``, draining fast; killed at the end."""
    proc = make(
        {
            "RTG_WORKERS": "2",
            "RTG_BROKER_URL": broker_url,
            "RTG_STATS_INTERVAL_S": "0",
            "RTG_DRAIN_WINDOW_S": "0.2",
            "RTG_DRAIN_TIMEOUT_S": "5",
            **env,
        }
    )
    proc.start(timeout=30)
    try:
        yield proc
    except BaseException:
        # What the supervisor and its workers said: pytest shows it with the failure.
        print("--- supervisor and workers, last lines\n" + "\n".join(proc.lines[-60:]))
        raise
    finally:
        proc.kill()
