"""A worker of a multi-process gateway: its identity and its private socket.

Under ``RTG_WORKERS=N`` the supervisor starts N gateways, telling each its
index and a private directory through the environment (:data:`INDEX_ENV`,
:data:`DIR_ENV`). Each worker listens on ``DIR/worker-INDEX.sock``, served by
a thread so that it answers even while the worker's own event loop is busy
fetching from a sibling. One request per connection, one line:

- ``metrics``: this process's own Prometheus text;
- ``ping``: ``ok AGE`` where AGE is how many seconds ago the worker's event
  loop last ran its heartbeat (the supervisor's readiness and liveness check).

``/metrics`` on any worker fetches its siblings' text over these sockets and
merges it with its own (:func:`merge`), adding a ``worker`` label to every
series: one scrape covers the whole host. A sibling that does not answer in
:data:`FETCH_TIMEOUT_S` is left out and shows as
``rtgateway_worker_scrape_up{worker="i"} 0``.

This module must not know about connections or rooms.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import prometheus_client
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["DIR_ENV", "INDEX_ENV", "WorkerInfo", "WorkerSocket", "fetch", "merge"]

INDEX_ENV = "RTG_WORKER_INDEX"
DIR_ENV = "RTG_WORKER_DIR"
ADDR_ENV = "RTG_WORKER_ADDR"
FETCH_TIMEOUT_S = 0.5
MAX_REPLY_BYTES = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    index: int
    count: int
    directory: str

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], count: int) -> WorkerInfo | None:
        """The worker this process is, or None when it is not a supervisor's worker."""
        index = environ.get(INDEX_ENV)
        directory = environ.get(DIR_ENV)
        if index is None or not directory:
            return None
        return cls(int(index), count, directory)

    def socket_path(self, index: int | None = None) -> str:
        return socket_path(self.directory, self.index if index is None else index)


def socket_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"worker-{index}.sock")


class WorkerSocket:
    """The worker's private unix socket, answered from a thread."""

    def __init__(
        self, path: str, render: Callable[[], bytes], heartbeat_age: Callable[[], float]
    ) -> None:
        self.path = path
        self.render = render
        self.heartbeat_age = heartbeat_age
        self.server: socketserver.UnixStreamServer | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        # A worker killed with SIGKILL leaves its socket file behind.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        owner = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                request = self.rfile.readline(64).strip()
                if request == b"metrics":
                    self.wfile.write(owner.render())
                elif request == b"ping":
                    self.wfile.write(f"ok {owner.heartbeat_age():.3f}\n".encode())

        self.server = socketserver.UnixStreamServer(self.path, Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="worker-socket", daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.server = None


def fetch(path: str, request: bytes, timeout: float = FETCH_TIMEOUT_S) -> bytes:
    """One request on a worker's socket; raises OSError (timeouts included)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(request + b"\n")
        chunks: list[bytes] = []
        size = 0
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REPLY_BYTES:
                raise OSError("reply too large")
        return b"".join(chunks)


def render_host(info: WorkerInfo, local: bytes) -> bytes:
    """This worker's metrics and its siblings', merged, each series labelled by worker."""
    texts: dict[int, bytes | None] = {}
    for index in range(info.count):
        if index == info.index:
            texts[index] = local
            continue
        path = info.socket_path(index)
        try:
            texts[index] = fetch(path, b"metrics") if Path(path).exists() else None
        except OSError:
            texts[index] = None
    return merge(texts)


def merge(texts: Mapping[int, bytes | None]) -> bytes:
    """Prometheus texts by worker index -> one text with a ``worker`` label.

    ``None`` marks a worker that did not answer.
    """
    families: dict[str, Metric] = {}
    up = GaugeMetricFamily(
        "rtgateway_worker_scrape_up",
        "1 when the worker answered this scrape (its series are present).",
        labels=["worker"],
    )
    for index, text in sorted(texts.items()):
        up.add_metric([str(index)], 0 if text is None else 1)
        if text is None:
            continue
        for family in text_string_to_metric_families(text.decode()):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            for sample in family.samples:
                merged.samples.append(
                    sample._replace(labels={**sample.labels, "worker": str(index)})
                )
    registry = CollectorRegistry()
    registry.register(_Static([up, *families.values()]))
    return prometheus_client.generate_latest(registry)


class _Static(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families
