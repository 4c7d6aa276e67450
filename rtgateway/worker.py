"""A worker of a multi-process gateway: its identity and its private socket.

Under ``RTG_WORKERS=N`` the supervisor starts N gateways, telling each its
index and a private directory through the environment (:data:`INDEX_ENV`,
:data:`DIR_ENV`). Each worker listens on ``DIR/worker-INDEX.sock``, served by
its own event loop. One request per connection, one line:

- ``metrics``: this process's own Prometheus text;
- ``ping``: ``ok AGE`` where AGE is how many seconds ago the worker's event
  loop last ran its heartbeat (the supervisor's readiness and liveness check:
  a stalled loop does not answer at all).

``/metrics`` on any worker fetches its siblings' text over these sockets, all
at once and within :data:`FETCH_TIMEOUT_S` in total, and merges it with its
own (:func:`merge`, in a thread), adding a ``worker`` label to every series:
one scrape covers the whole host. The event loop never waits on a sibling:
a sibling that does not answer in time is left out and shows as
``rtgateway_worker_scrape_up{worker="i"} 0``. Scrapes that arrive while one
is being rendered share its result (:class:`HostMetrics`), so concurrent
scrapers cost one round of fetches.

This module must not know about connections or rooms.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping

import prometheus_client
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = [
    "DIR_ENV",
    "INDEX_ENV",
    "HostMetrics",
    "WorkerInfo",
    "WorkerSocket",
    "fetch",
    "merge",
]

INDEX_ENV = "RTG_WORKER_INDEX"
DIR_ENV = "RTG_WORKER_DIR"
ADDR_ENV = "RTG_WORKER_ADDR"
# What the supervisor tells its workers; not settings (config.load accepts them).
ENVIRONMENT = (INDEX_ENV, DIR_ENV, ADDR_ENV)
FETCH_TIMEOUT_S = 0.5
REQUEST_TIMEOUT_S = 1.0  # a client of the private socket that sends no request line
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
    """The worker's private unix socket, answered on the worker's event loop."""

    def __init__(
        self, path: str, render: Callable[[], bytes], heartbeat_age: Callable[[], float]
    ) -> None:
        self.path = path
        self.render = render
        self.heartbeat_age = heartbeat_age
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        # A worker killed with SIGKILL leaves its socket file behind.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.server = await asyncio.start_unix_server(self._serve, self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                request = (await reader.readline()).strip()
            if request == b"metrics":
                writer.write(self.render())
            elif request == b"ping":
                writer.write(f"ok {self.heartbeat_age():.3f}\n".encode())
            await writer.drain()
        except (OSError, TimeoutError, ValueError):
            pass  # a sibling or the supervisor gave up on us: nothing to answer
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is None:
            return
        self.server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.server = None


async def fetch(path: str, request: bytes) -> bytes:
    """One request on a worker's socket; raises OSError (and lets the caller time it out)."""
    reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
    try:
        writer.write(request + b"\n")
        await writer.drain()
        chunks: list[bytes] = []
        size = 0
        while chunk := await reader.read(1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REPLY_BYTES:
                raise OSError("reply too large")
        return b"".join(chunks)
    finally:
        writer.close()


class HostMetrics:
    """``/metrics`` of the whole host, as rendered by this worker."""

    def __init__(
        self,
        info: WorkerInfo,
        render_local: Callable[[], bytes],
        timeout_s: float = FETCH_TIMEOUT_S,
    ) -> None:
        self.info = info
        self.render_local = render_local
        self.timeout_s = timeout_s
        self.rendering: asyncio.Future[bytes] | None = None

    async def render(self) -> bytes:
        """This worker's metrics and its siblings', merged; concurrent calls share one."""
        if self.rendering is None:
            self.rendering = asyncio.ensure_future(self._render())
            self.rendering.add_done_callback(self._rendered)
        return await asyncio.shield(self.rendering)

    def _rendered(self, future: asyncio.Future[bytes]) -> None:
        self.rendering = None

    async def _render(self) -> bytes:
        texts: dict[int, bytes | None] = {self.info.index: self.render_local()}
        siblings = [i for i in range(self.info.count) if i != self.info.index]
        fetches = {
            i: asyncio.ensure_future(fetch(self.info.socket_path(i), b"metrics")) for i in siblings
        }
        if fetches:
            await asyncio.wait(fetches.values(), timeout=self.timeout_s)
        for index, task in fetches.items():
            if task.done() and task.exception() is None:
                texts[index] = task.result()
            else:
                task.cancel()
                texts[index] = None
        # Parsing and rendering a few workers' text takes milliseconds of CPU:
        # not on the event loop.
        return await asyncio.to_thread(merge, texts)


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
