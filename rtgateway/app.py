"""Wiring and lifecycle: start, serve until a shutdown trigger fires, drain, stop.

:meth:`Gateway.serve` runs until the awaitable it is given returns (the CLI
passes an event set by SIGTERM, SIGINT or SIGHUP; tests pass their own), then
drains:

1. stop admitting: ``/healthz`` answers 503, handshakes get 503, systemd is
   told ``STOPPING=1``;
2. close open connections with 1012 in paced batches over
   ``drain_window_s``, each with its own reconnect delay, so a fleet does not
   come back in one burst;
3. wait for the handlers until ``drain_timeout_s``, then abort the rest and
   log how many;
4. close the listener and cancel the background tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import platform
import random
import resource
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import Server, serve
from websockets.version import version as websockets_version

from . import __version__
from .admission import Admission
from .api import ApiServer
from .config import Config
from .connection import SERVICE_RESTART, GatewayConnection, serve_connection
from .http import load_static, process_request, process_response
from .log import get_logger
from .metrics import Metrics
from .outbox import Flusher, Outbox
from .rooms import Hub
from .systemd import Notifier, watchdog_interval
from .worker import HostMetrics, WorkerInfo, WorkerSocket

if TYPE_CHECKING:
    from .broker import RedisBroker

__all__ = ["Gateway", "raise_nofile_limit"]

LAG_SAMPLE_INTERVAL_S = 0.25
STATUS_INTERVAL_S = 2.0
DRAIN_TICK_S = 0.05
WRITE_LIMIT_BYTES = 64 * 1024
BROKER_START_WAIT_S = 2.0
MAX_DERIVED_PENDING = 4096


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard limit; return (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard


class Gateway:
    """One gateway process: the listener, the rooms, the connections, the metrics."""

    def __init__(
        self,
        config: Config,
        *,
        notifier: Notifier | None = None,
        worker: WorkerInfo | None = None,
    ) -> None:
        self.config = config
        self.worker = worker  # None: a single-process gateway
        self.log = get_logger()
        self.metrics = Metrics(version=__version__, websockets_version=websockets_version)
        self.hub = Hub(self.metrics, join_timeout_s=config.broker_timeout_s)
        self.broker: RedisBroker | None = None
        if config.broker_url:
            from .broker import RedisBroker  # only deployments with Redis import redis

            self.broker = RedisBroker(
                self.hub,
                config.broker_url,
                self.metrics,
                self.log,
                timeout_s=config.broker_timeout_s,
                room_ttl_s=config.broker_room_ttl_s,
            )
            self.hub.broker = self.broker
            self.metrics.broker_connected = False
        self.worker_socket: WorkerSocket | None = None
        self.last_tick = time.monotonic()  # the event loop's heartbeat, for the supervisor
        self.notifier = notifier or Notifier()
        self.static = load_static() if config.demo else {}
        self.server_name = f"rtgateway/{__version__}"
        self.outboxes: set[Outbox] = set()  # one per open WebSocket
        self.sessions_done = asyncio.Event()  # set whenever outboxes becomes empty
        self.connections: set[GatewayConnection] = set()  # every accepted socket
        self.admission: Admission[GatewayConnection] = Admission(
            max_pending=config.max_pending_handshakes,  # 0: derived in _limits()
            max_pending_per_address=config.max_pending_handshakes_per_address,
            max_connections_per_address=config.max_connections_per_address,
        )
        self.metrics.pending_hook = lambda: self.admission.pending
        self.draining = False
        self.ready = asyncio.Event()
        self.addresses: list[str] = []
        self.server: Server | None = None
        self.api: ApiServer | None = None
        self.flusher: Flusher
        self.tasks: set[asyncio.Task[None]] = set()
        self.max_connections = 0
        self.max_sockets = 0
        self.max_write_buffer_bytes = config.outbox_max_bytes + WRITE_LIMIT_BYTES + 64 * 1024
        self.hello_limits = {
            "max_message_bytes": config.max_message_bytes,
            "max_rooms_per_connection": config.max_rooms_per_connection,
            "rate_limit_msgs_per_s": config.rate_limit_msgs_per_s,
            "rate_limit_burst": config.rate_limit_burst,
            "rate_limit_bytes_per_s": config.rate_limit_bytes_per_s,
            "outbox_max_messages": config.outbox_max_messages,
            "outbox_max_bytes": config.outbox_max_bytes,
            "slow_consumer_policy": config.slow_consumer_policy,
            "slow_consumer_policies": list(config.slow_consumer_policies),
            "ping_interval_s": config.ping_interval_s,
        }
        # Fields the hello carries besides the limits: which worker answered.
        self.hello_extra: dict[str, Any] = {} if worker is None else {"worker": worker.index}

    async def serve(self, shutdown_trigger: Callable[[], Awaitable[Any]]) -> None:
        """Start, run until ``shutdown_trigger()`` returns, then drain and stop."""
        await self.start()
        try:
            await shutdown_trigger()
        finally:
            await self.stop()

    # Startup.

    def _limits(self) -> None:
        soft, hard = raise_nofile_limit()
        # Descriptors kept back for the listener, logs, scrapes and 503 answers.
        reserve = max(64, soft // 50)
        derived = max(16, soft - reserve)
        wanted = self.config.max_connections or derived
        if wanted > derived:
            self.log.warning(
                "max_connections_clamped", wanted=wanted, max_connections=derived, nofile=soft
            )
        self.max_connections = min(wanted, derived)
        # Accepted sockets, of any kind, before a new one is closed at once
        # (fd_limit): the descriptors less half the reserve, whatever
        # RTG_MAX_CONNECTIONS says, so that sockets that never finish a
        # handshake are bounded by their own budget, not by this one.
        self.max_sockets = derived + reserve // 2
        # Pending handshakes: as many as the connections it may hold (a
        # reconnect storm into an empty gateway; each finishes in a round
        # trip), at most MAX_DERIVED_PENDING (~15 KiB each, so ~60 MiB). On a
        # full gateway the descriptor cap above evicts them sooner.
        self.admission.max_pending = self.config.max_pending_handshakes or max(
            16, reserve // 2, min(MAX_DERIVED_PENDING, self.max_connections)
        )
        self.metrics.max_connections = self.max_connections
        self.log.info(
            "limits",
            nofile_soft=soft,
            nofile_hard=hard,
            max_connections=self.max_connections,
            max_sockets=self.max_sockets,
            max_pending_handshakes=self.admission.max_pending,
        )

    async def start(self) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        self.log.info(
            "gateway_starting",
            version=__version__,
            python=platform.python_version(),
            websockets=websockets_version,
            loop=type(loop).__module__,
            config=config.as_log_fields(),
        )
        self._limits()
        self.flusher = Flusher(loop)
        if self.broker is not None:
            self.broker.flusher = self.flusher
        host, port = config.host_port
        connection_class = type("BoundGatewayConnection", (GatewayConnection,), {"gateway": self})
        ping_interval = config.ping_interval_s or None
        self.server = await serve(
            functools.partial(serve_connection, self),
            host or None,
            port,
            create_connection=connection_class,
            process_request=functools.partial(process_request, self),
            process_response=functools.partial(process_response, self),
            server_header=self.server_name,
            compression=None,  # memory per connection, and decompression bombs
            max_size=config.max_message_bytes,
            max_queue=16,
            write_limit=WRITE_LIMIT_BYTES,
            ping_interval=ping_interval,
            ping_timeout=config.ping_timeout_s or None,
            open_timeout=config.open_timeout_s,
            close_timeout=config.close_timeout_s,
            backlog=config.backlog,
            # Workers share the port; the kernel spreads connections over them.
            reuse_port=config.workers > 1,
        )
        self.addresses = [_format_addr(s.getsockname()) for s in self.server.sockets]
        api_addresses: list[str] = []
        # One publish API per host: worker 0 serves it (publications reach
        # every worker through the broker).
        if config.api_addr and (self.worker is None or self.worker.index == 0):
            self.api = ApiServer(self)
            await self.api.start()
            api_addresses = self.api.addresses
        for coro in self._background():
            self._spawn(coro)
        if self.broker is not None:
            await self._connect_broker()
        if self.worker is not None:
            await self._serve_worker_socket(self.worker)
        self.notifier.notify("READY=1", f"STATUS=serving 0 connections on {config.addr}")
        self.log.info("gateway_listening", addresses=self.addresses, api_addresses=api_addresses)
        self.ready.set()

    async def _connect_broker(self) -> None:
        assert self.broker is not None
        self._spawn(self.broker.run())
        # Give Redis a moment so that the first publishes do not fail; the
        # gateway serves without it (publishes get ``unavailable``) if not.
        try:
            await asyncio.wait_for(self.broker.up.wait(), BROKER_START_WAIT_S)
        except TimeoutError:
            self.log.warning("broker_unavailable_at_start", url=self.config.broker_url)

    async def _serve_worker_socket(self, worker: WorkerInfo) -> None:
        self.worker_socket = WorkerSocket(
            worker.socket_path(),
            self.metrics.render,
            lambda: time.monotonic() - self.last_tick,
        )
        await self.worker_socket.start()
        self.metrics.render_hook = HostMetrics(worker, self.metrics.render).render

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _background(self) -> list[Any]:
        coros = [self._sample_loop_lag(), self._report_status()]
        if self.config.stats_interval_s:
            coros.append(self._log_stats(self.config.stats_interval_s))
        interval = watchdog_interval()
        if interval is not None and self.notifier.enabled:
            coros.append(self.notifier.watchdog(interval))
        return coros

    async def _sample_loop_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(LAG_SAMPLE_INTERVAL_S)
            self.last_tick = time.monotonic()
            self.metrics.loop_lag.observe(max(0.0, loop.time() - before - LAG_SAMPLE_INTERVAL_S))

    async def _report_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            if not self.draining:
                m = self.metrics
                self.notifier.notify(
                    f"STATUS=serving {m.connections_current} connections, {m.rooms_current} rooms"
                )

    async def _log_stats(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            m = self.metrics
            self.log.info(
                "stats",
                connections=m.connections_current,
                rooms=m.rooms_current,
                memberships=m.room_members_current,
                messages_received=m.messages_received,
                messages_sent=m.messages_sent,
                publishes=m.publishes,
                deliveries=m.deliveries,
                dropped=sum(m.dropped.values()),
                outbox_queued_bytes=m.outbox_queued_bytes,
            )

    # Shutdown.

    async def stop(self) -> None:
        if self.server is None:
            return
        loop = asyncio.get_running_loop()
        config = self.config
        started = loop.time()
        deadline = started + config.drain_timeout_s

        # 1. Stop admitting new work (the publish API answers 503 from now on).
        self.draining = True
        self.metrics.draining = True
        count = len(self.outboxes)
        self.notifier.notify("STOPPING=1", f"STATUS=draining {count} connections")
        self.log.info(
            "drain_started",
            connections=count,
            window_s=config.drain_window_s,
            timeout_s=config.drain_timeout_s,
        )

        # 2. Close with 1012 in paced batches.
        await self._close_paced(config.drain_window_s)

        # 3. Wait for the WebSocket sessions, then abort the stragglers, and
        # sockets that never finished a handshake (browsers open spare ones):
        # nothing else would end them before the open timeout.
        if self.outboxes:
            self.sessions_done.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.sessions_done.wait(), timeout=max(0.0, deadline - loop.time())
                )
        aborted = len(self.outboxes)
        for outbox in list(self.outboxes):
            outbox.close_reason = outbox.close_reason or "drain"
        for conn in list(self.connections):
            conn.transport.abort()
        if aborted:
            self.log.warning("drain_aborted", connections=aborted)
        pending = {t for t in self.server.handler_tasks if not t.done()}
        if pending:
            await asyncio.wait(pending, timeout=2.0)

        # 4. Close the listeners and stop the background tasks.
        if self.api is not None:
            await self.api.stop()
        self.server.close(close_connections=False)
        try:
            await asyncio.wait_for(self.server.wait_closed(), timeout=2.0)
        except TimeoutError:
            self.log.warning("listener_close_timeout")
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.broker is not None:
            await self.broker.close()
        if self.worker_socket is not None:
            await self.worker_socket.stop()
        self.log.info(
            "drain_finished",
            duration_s=round(loop.time() - started, 3),
            closed=count,
            aborted=aborted,
            background_tasks_cancelled=len(tasks),
        )

    async def _close_paced(self, window_s: float) -> None:
        outboxes = list(self.outboxes)
        if not outboxes:
            return
        loop = asyncio.get_running_loop()
        batches = max(1, int(window_s / DRAIN_TICK_S))
        size = math.ceil(len(outboxes) / batches)
        window_ms = round(window_s * 1000)
        base = self.config.reconnect_delay_ms
        spread = max(base, window_ms)
        end = loop.time() + window_s
        for start in range(0, len(outboxes), size):
            if start:
                await asyncio.sleep(DRAIN_TICK_S)
            # Come back once this process has gone (the rest of the window,
            # then the base delay), spread as widely as the closes were.
            remaining_ms = max(0, round((end - loop.time()) * 1000))
            for outbox in outboxes[start : start + size]:
                delay = remaining_ms + base + random.randint(0, spread)
                outbox.close(SERVICE_RESTART, f"service restart; retry_after_ms={delay}", "drain")


def _format_addr(sockname: Any) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
