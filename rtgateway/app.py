"""Wiring and lifecycle: start, serve until a shutdown trigger fires, drain, stop.

:class:`Gateway` builds the parts (metrics, hub, broker) and, at start, the
:class:`~rtgateway.state.Context` and :class:`~rtgateway.state.ServerState`
that every connection, route and the API are given; nothing below this module
holds the gateway. Only ``__main__`` (and tests) import it.

:meth:`Gateway.serve` runs until the awaitable it is given returns (the CLI
passes an event set by SIGTERM, SIGINT or SIGHUP; tests pass their own). Each
part that starts registers how it stops on one ``AsyncExitStack``, so a start
that fails half-way (the API's port is taken, say) stops what had started, in
reverse order; :meth:`Gateway.stop` is idempotent. Stopping, in order:

1. stop admitting: ``/healthz`` answers 503, handshakes get 503, systemd is
   told ``STOPPING=1``;
2. close open connections with 1012 in paced batches over
   ``drain_window_s``, each with its own reconnect delay, so a fleet does not
   come back in one burst;
3. wait for the sessions until ``drain_timeout_s``, then abort the rest and
   the sockets that never finished a handshake, and log how many;
4. stop the parts in reverse order of their start: the worker socket, the
   broker, the background tasks (logged with how many were cancelled), the
   publish API, the listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import platform
import random
import resource
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from websockets.version import version as websockets_version

from . import __version__
from . import namespaces as namespaces_
from .admission import Admission
from .api import ApiServer
from .config import Config
from .connection import GatewayConnection, Listener
from .errors import DRAIN
from .http import load_static
from .log import get_logger
from .metrics import Metrics
from .moderation import Moderator
from .namespaces import Namespaces
from .notify import Notifier, watchdog_interval
from .outbox import Flusher
from .rooms import Hub
from .state import Context, Limits, ServerState
from .worker import HostMetrics, WorkerInfo, WorkerSocket

if TYPE_CHECKING:
    from .broker import RedisBroker
    from .cluster import ClusterBroker

__all__ = ["Gateway", "raise_nofile_limit"]

LAG_SAMPLE_INTERVAL_S = 0.25
STATUS_INTERVAL_S = 2.0
DRAIN_TICK_S = 0.05
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
        namespaces: Namespaces | None = None,
    ) -> None:
        self.config = config
        self.worker = worker  # None: a single-process gateway
        self.log = get_logger()
        # The rules of RTG_ROOMS_FILE (read here unless __main__ did: ConfigError).
        self.namespaces = namespaces or namespaces_.from_config(config)
        # This process's token: the first part of its connections' ids, and
        # its control channel's name with a broker (moderation.py).
        self.node = secrets.token_urlsafe(6)
        self.metrics = Metrics(version=__version__, websockets_version=websockets_version)
        self.broker: RedisBroker | ClusterBroker | None = None
        if config.broker_url:
            from .broker import RedisBroker  # only deployments with Redis import redis
            from .cluster import SCHEME, ClusterBroker

            kind = ClusterBroker if config.broker_url.startswith(SCHEME + "://") else RedisBroker
            self.broker = kind(
                config.broker_url,
                self.metrics,
                self.log,
                timeout_s=config.broker_timeout_s,
                room_ttl_s=config.broker_room_ttl_s,
                node=self.node,
            )
            self.metrics.broker_state(connected=False)
        self.hub = Hub(
            self.metrics,
            self.broker,
            join_timeout_s=config.broker_timeout_s,
            namespaces=self.namespaces,
        )
        self.notifier = notifier or Notifier()
        self.server_name = f"rtgateway/{__version__}"
        self.last_tick = time.monotonic()  # the event loop's heartbeat, for the supervisor
        self.ready = asyncio.Event()
        self.addresses: list[str] = []
        # Made by start():
        self.ctx: Context | None = None
        self.state: ServerState | None = None
        self.listener: Listener | None = None
        self.api: ApiServer | None = None
        self.tasks: set[asyncio.Task[None]] = set()  # the background loops
        self.cancelled = 0  # how many of them the stop cancelled
        self._stack = contextlib.AsyncExitStack()
        self._stopping: asyncio.Task[None] | None = None

    async def serve(self, shutdown_trigger: Callable[[], Awaitable[Any]]) -> None:
        """Start, run until ``shutdown_trigger()`` returns, then drain and stop."""
        try:
            await self.start()
            await shutdown_trigger()
        finally:
            await self.stop()

    # Startup.

    def _limits(self, admission: Admission[Any]) -> Limits:
        soft, hard = raise_nofile_limit()
        # Descriptors kept back for the listener, logs, scrapes and 503 answers.
        reserve = max(64, soft // 50)
        derived = max(16, soft - reserve)
        wanted = self.config.max_connections or derived
        if wanted > derived:
            self.log.warning(
                "max_connections_clamped", wanted=wanted, max_connections=derived, nofile=soft
            )
        max_connections = min(wanted, derived)
        # Pending handshakes: as many as the connections it may hold (a
        # reconnect storm into an empty gateway; each finishes in a round
        # trip), at most MAX_DERIVED_PENDING (~15 KiB each, so ~60 MiB). On a
        # full gateway the descriptor cap below evicts them sooner.
        admission.max_pending = self.config.max_pending_handshakes or max(
            16, reserve // 2, min(MAX_DERIVED_PENDING, max_connections)
        )
        limits = Limits(
            max_connections=max_connections,
            # Accepted sockets, of any kind, before a new one is closed at once
            # (fd_limit): the descriptors less half the reserve, whatever
            # RTG_MAX_CONNECTIONS says, so that sockets that never finish a
            # handshake are bounded by their own budget, not by this one.
            max_sockets=derived + reserve // 2,
        )
        self.log.info(
            "limits",
            nofile_soft=soft,
            nofile_hard=hard,
            max_connections=limits.max_connections,
            max_sockets=limits.max_sockets,
            max_pending_handshakes=admission.max_pending,
        )
        return limits

    def _context(self, loop: asyncio.AbstractEventLoop, state: ServerState) -> Context:
        config = self.config
        default = self.namespaces.default
        return Context(
            config=config,
            metrics=self.metrics,
            hub=self.hub,
            flusher=Flusher(loop),
            log=self.log,
            clock=loop.time,
            server_name=self.server_name,
            hello_limits={
                "max_message_bytes": config.max_message_bytes,
                "max_rooms_per_connection": config.max_rooms_per_connection,
                "rate_limit_msgs_per_s": config.rate_limit_msgs_per_s,
                "rate_limit_burst": config.rate_limit_burst,
                "rate_limit_bytes_per_s": config.rate_limit_bytes_per_s,
                "outbox_max_messages": config.outbox_max_messages,
                "outbox_max_bytes": config.outbox_max_bytes,
                # The default namespace's (a join's ack gives its room's).
                "slow_consumer_policy": default.policy,
                "slow_consumer_policies": list(default.policies),
                "ping_interval_s": config.ping_interval_s,
            },
            # Which worker answered, in a multi-process gateway.
            hello_extra={} if self.worker is None else {"worker": self.worker.index},
            static=load_static() if config.demo else {},
            node=self.node,
            moderator=Moderator(self.node, state.sessions, state.session_of, self.hub, self.broker),
        )

    async def start(self) -> None:
        """Start every part; each registers how it stops (see :meth:`stop`)."""
        config = self.config
        loop = asyncio.get_running_loop()
        self.log.info(
            "gateway_starting",
            version=__version__,
            python=platform.python_version(),
            websockets=websockets_version,
            loop=type(loop).__module__,
            config=config.as_log_fields(),
            node=self.node,
            namespaces=list(self.namespaces.names),
        )
        admission: Admission[GatewayConnection] = Admission(
            max_pending=config.max_pending_handshakes,  # 0: derived in _limits()
            max_pending_per_address=config.max_pending_handshakes_per_address,
            max_connections_per_address=config.max_connections_per_address,
        )
        state = self.state = ServerState(self._limits(admission), admission)
        ctx = self.ctx = self._context(loop, state)
        self.metrics.live = state
        await self._serve_websockets(ctx, state)
        api_addresses: list[str] = []
        # One publish API per host: worker 0 serves it (publications reach
        # every worker through the broker).
        if config.api_addr and (self.worker is None or self.worker.index == 0):
            self.api = ApiServer(ctx, state)
            await self.api.start()
            self._stack.push_async_callback(self.api.stop)
            api_addresses = self.api.addresses
        self._start_background(ctx)
        if self.broker is not None:
            await self._connect_broker(self.broker, ctx)
        if self.worker is not None:
            await self._serve_worker_socket(self.worker)
        self.notifier.notify("READY=1", f"STATUS=serving 0 connections on {config.addr}")
        self.log.info("gateway_listening", addresses=self.addresses, api_addresses=api_addresses)
        self.ready.set()

    async def _serve_websockets(self, ctx: Context, state: ServerState) -> None:
        # Our own connection (connection.py) on the loop's server: no
        # compression (memory per connection, and decompression bombs), no
        # subprotocol, limits and deadlines from the config.
        host, port = ctx.config.host_port
        listener = self.listener = Listener(ctx, state)
        self._stack.push_async_callback(self._close_listener, listener)
        await listener.start(
            host or None,
            port,
            backlog=ctx.config.backlog,
            # Workers share the port; the kernel spreads connections over them.
            reuse_port=ctx.config.workers > 1,
        )
        self.addresses = [_format_addr(s.getsockname()) for s in listener.sockets]

    async def _close_listener(self, listener: Listener) -> None:
        if not await listener.close(timeout_s=2.0):
            self.log.warning("listener_close_timeout")

    async def _connect_broker(self, broker: RedisBroker | ClusterBroker, ctx: Context) -> None:
        broker.flusher = ctx.flusher  # deliveries are paced like publications
        task = asyncio.create_task(broker.run())

        async def stop_broker() -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await broker.close()

        self._stack.push_async_callback(stop_broker)
        # Give Redis a moment so that the first publishes do not fail; the
        # gateway serves without it (publishes get ``unavailable``) if not.
        try:
            await asyncio.wait_for(broker.up.wait(), BROKER_START_WAIT_S)
        except TimeoutError:
            self.log.warning("broker_unavailable_at_start", url=self.config.broker_url)

    async def _serve_worker_socket(self, worker: WorkerInfo) -> None:
        worker_socket = WorkerSocket(
            worker.socket_path(),
            self.metrics.render,
            lambda: time.monotonic() - self.last_tick,
        )
        await worker_socket.start()
        self._stack.push_async_callback(worker_socket.stop)
        self.metrics.render_hook = HostMetrics(worker, self.metrics.render).render

    # Background loops: each tick is guarded, so a bug is logged, not fatal.

    def _start_background(self, ctx: Context) -> None:
        self._every("loop_lag", LAG_SAMPLE_INTERVAL_S, self._sample_loop_lag)
        self._every("status", STATUS_INTERVAL_S, self._report_status)
        if self.config.stats_interval_s:
            self._every("stats", self.config.stats_interval_s, self._log_stats)
        interval = watchdog_interval()
        if interval is not None and self.notifier.enabled:
            self.notifier.notify("WATCHDOG=1")
            self._every("watchdog", interval, lambda late: self.notifier.notify("WATCHDOG=1"))
        self._stack.push_async_callback(self._cancel_background)

    def _every(self, name: str, interval_s: float, tick: Callable[[float], None]) -> None:
        task = asyncio.create_task(self._loop(name, interval_s, tick))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _loop(self, name: str, interval_s: float, tick: Callable[[float], None]) -> None:
        """Call ``tick(late_s)`` every ``interval_s``; a failing tick is logged, the loop goes on.

        (websockets' ``keepalive()`` has the same guard.)
        """
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(interval_s)
            try:
                tick(max(0.0, loop.time() - before - interval_s))
            except Exception:
                self.log.exception("background_task_failed", task=name)

    async def _cancel_background(self) -> None:
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.cancelled = len(tasks)

    def _sample_loop_lag(self, late_s: float) -> None:
        self.last_tick = time.monotonic()
        self.metrics.loop_lag.observe(late_s)

    def _report_status(self, late_s: float) -> None:
        if self.state is not None and not self.state.draining:
            m = self.metrics
            self.notifier.notify(
                f"STATUS=serving {m.connections_current} connections, {m.rooms_current} rooms"
            )

    def _log_stats(self, late_s: float) -> None:
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
            dropped=m.dropped_total,
            outbox_queued_bytes=self.state.queued_bytes if self.state else 0,
        )

    # Shutdown.

    async def stop(self) -> None:
        """Drain and stop; a second call waits for the first to finish."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        closed = aborted = 0
        if self.state is not None and self.listener is not None:
            closed, aborted = await self._drain(self.state, self.listener)
        # 4. The parts, in reverse order of their start.
        await self._stack.aclose()
        self.log.info(
            "drain_finished",
            duration_s=round(loop.time() - started, 3),
            closed=closed,
            aborted=aborted,
            background_tasks_cancelled=self.cancelled,
        )

    async def _drain(self, state: ServerState, listener: Listener) -> tuple[int, int]:
        """Steps 1-3: stop admitting, close with 1012, wait, abort the rest."""
        loop = asyncio.get_running_loop()
        config = self.config
        deadline = loop.time() + config.drain_timeout_s

        # 1. Stop admitting new work (the publish API answers 503 from now on).
        state.draining = True
        count = len(state.outboxes)
        self.notifier.notify("STOPPING=1", f"STATUS=draining {count} connections")
        self.log.info(
            "drain_started",
            connections=count,
            window_s=config.drain_window_s,
            timeout_s=config.drain_timeout_s,
        )

        # 2. Close with 1012 in paced batches.
        await self._close_paced(state, config.drain_window_s)

        # 3. Wait for the WebSocket sessions, then abort the stragglers, and
        # sockets that never finished a handshake (browsers open spare ones):
        # nothing else would end them before the open timeout.
        if state.outboxes:
            state.sessions_done.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    state.sessions_done.wait(), timeout=max(0.0, deadline - loop.time())
                )
        aborted = len(state.outboxes)
        for outbox in list(state.outboxes):
            outbox.disconnect = outbox.disconnect or DRAIN
        for sock in list(state.sockets):
            sock.abort()
        if aborted:
            self.log.warning("drain_aborted", connections=aborted)
        # Publications still waiting for the broker: answered (or failed)
        # before the broker stops.
        pending = {t for t in listener.tasks if not t.done()}
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        return count, aborted

    async def _close_paced(self, state: ServerState, window_s: float) -> None:
        outboxes = list(state.outboxes)
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
                outbox.close(DRAIN, f"{DRAIN.reason}; retry_after_ms={delay}")


def _format_addr(sockname: Any) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
