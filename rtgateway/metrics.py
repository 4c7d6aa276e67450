"""Every metric the gateway exports, in one object with verb methods.

Hot-path figures (messages, bytes, deliveries, frames per write) are plain
integers bumped without locks — the gateway is one thread — and turned into
Prometheus families only when ``/metrics`` is scraped. What the server's state
already knows (draining, the connection limit, pending handshakes, bytes
waiting in outboxes) is not counted twice: it is read from :class:`Live` at
scrape time. Labels come from small fixed sets (the disconnects of
``errors.py``, the rejection reasons, the error codes, the API's routes, the
room namespaces the operator declared), never from a room name or a client.
Counts by namespace are lists indexed by ``namespaces.Rules.index``, so the
hot path adds to a list slot.

The rest of the gateway only calls the verbs; no module writes a field.
"""

from __future__ import annotations

import asyncio
import bisect
import platform
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

import prometheus_client
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from . import log
from .errors import DISCONNECT_REASONS, Disconnect
from .protocol import ERROR_CODES

__all__ = [
    "DISCONNECT_REASONS",
    "HANDSHAKE_REJECTIONS",
    "MAX_BROKER_NODES",
    "Histogram",
    "Live",
    "Metrics",
]

HANDSHAKE_REJECTIONS = (
    "connection_limit",
    "draining",
    "origin",
    "not_found",
    "method",
    "bad_request",
    "timeout",
    "fd_limit",
    "first_byte_timeout",
    "pending_evicted",
    "address_pending_limit",
    "address_limit",
)
DROP_POLICIES = ("drop_oldest", "drop_newest")
MAX_BROKER_NODES = 64  # Redis Cluster masters with their own series

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FANOUT_BUCKETS = (1, 2, 5, 10, 50, 100, 500, 1000, 5000, 10000, 20000, 50000)
FLUSH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    """A cumulative histogram with fixed buckets, cheap to observe."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs, as Prometheus wants them."""
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append((_le(bound), running))
        return buckets

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        return HistogramMetricFamily(name, doc, buckets=self.buckets(), sum_value=self.sum)


def _le(bound: float) -> str:
    if bound == float("inf"):
        return "+Inf"
    return repr(float(bound))


class Live(Protocol):
    """What the server's state tells the metrics at scrape time (``state.ServerState``)."""

    @property
    def draining(self) -> bool: ...

    @property
    def max_connections(self) -> int: ...

    @property
    def pending_handshakes(self) -> int: ...

    @property
    def queued_bytes(self) -> int: ...


class Metrics:
    """The gateway's metrics; ``registry`` is what ``/metrics`` renders."""

    def __init__(self, *, version: str, websockets_version: str) -> None:
        self.version = version
        self.websockets_version = websockets_version
        self.connections_current = 0
        self.connections_total = 0
        self.disconnects = dict.fromkeys(DISCONNECT_REASONS, 0)
        self.handshake_rejections = dict.fromkeys(HANDSHAKE_REJECTIONS, 0)
        self.messages_received = 0
        self.received_bytes = 0
        self.messages_sent = 0
        self.sent_bytes = 0
        self.protocol_errors = dict.fromkeys(ERROR_CODES, 0)
        # By namespace (the ``namespace`` label): see namespaces_declared().
        self.namespaces: tuple[str, ...] = ()
        self.rooms_by_namespace: list[int] = []
        self.members_by_namespace: list[int] = []
        self.publishes_by_namespace: list[int] = []
        self.deliveries_by_namespace: list[int] = []
        self.dropped: dict[str, list[int]] = {}
        self.namespaces_declared(("default",))
        self.rate_limited = 0
        self.live: Live | None = None  # the server's state, once it runs
        self.fanout = Histogram(FANOUT_BUCKETS)
        self.publish_seconds = Histogram(LATENCY_BUCKETS)
        self.flush_frames = Histogram(FLUSH_BUCKETS)
        self.loop_lag = Histogram(LAG_BUCKETS)
        self.started = time.time()
        # The broker between processes (Redis): None when there is none.
        self.broker_connected: bool | None = None
        self.broker_reconnects = 0
        self.broker_errors = 0
        self.broker_stale = 0
        # Per Redis Cluster master (cluster.py): [connected, errors, reconnects]
        # by "host:port"; at most MAX_BROKER_NODES, the rest under "other".
        self.broker_nodes: dict[str, list[int]] = {}
        # The publish API's requests, by route template and status; its routes
        # are known once it starts (None: no API in this process).
        self.api_endpoints: tuple[str, ...] | None = None
        self.api_requests: dict[tuple[str, str], int] = {}
        self.api_seconds: dict[str, Histogram] = {}
        # Set on a worker of a multi-process gateway: renders the whole host
        # (this worker and its siblings) for /metrics, instead of this process.
        self.render_hook: Callable[[], Awaitable[bytes]] | None = None

        self.registry = CollectorRegistry(auto_describe=True)
        prometheus_client.ProcessCollector(registry=self.registry)
        prometheus_client.PlatformCollector(registry=self.registry)
        prometheus_client.GCCollector(registry=self.registry)
        self.registry.register(_Collector(self))

    # Verbs used by the rest of the gateway.

    def namespaces_declared(self, names: Sequence[str]) -> None:
        """The ``namespace`` label's values, by index (the hub's rules, at start)."""
        self.namespaces = tuple(names)
        size = len(self.namespaces)
        self.rooms_by_namespace = [0] * size
        self.members_by_namespace = [0] * size
        self.publishes_by_namespace = [0] * size
        self.deliveries_by_namespace = [0] * size
        self.dropped = {policy: [0] * size for policy in DROP_POLICIES}

    def connection_opened(self) -> None:
        self.connections_current += 1
        self.connections_total += 1

    def connection_closed(self, disconnect: Disconnect) -> None:
        self.connections_current -= 1
        self.disconnects[disconnect.label] += 1

    def handshake_rejected(self, reason: str) -> None:
        self.handshake_rejections[reason] += 1

    def received(self, nbytes: int) -> None:
        self.messages_received += 1
        self.received_bytes += nbytes

    def sent(self, frames: int, nbytes: int) -> None:
        self.messages_sent += frames
        self.sent_bytes += nbytes

    def protocol_error(self, code: str) -> None:
        self.protocol_errors[code] += 1

    def rate_limit_refused(self) -> None:
        self.rate_limited += 1

    def message_dropped(self, policy: str, namespace: int = 0) -> None:
        self.dropped[policy][namespace] += 1

    def room_opened(self, namespace: int = 0) -> None:
        self.rooms_by_namespace[namespace] += 1

    def room_closed(self, namespace: int = 0) -> None:
        self.rooms_by_namespace[namespace] -= 1

    def member_joined(self, namespace: int = 0) -> None:
        self.members_by_namespace[namespace] += 1

    def member_left(self, namespace: int = 0) -> None:
        self.members_by_namespace[namespace] -= 1

    def published(self, recipients: int, seconds: float, namespace: int = 0) -> None:
        self.publishes_by_namespace[namespace] += 1
        self.deliveries_by_namespace[namespace] += recipients
        self.fanout.observe(recipients)
        self.publish_seconds.observe(seconds)

    # Totals over the namespaces (the stats line, tests).

    @property
    def rooms_current(self) -> int:
        return sum(self.rooms_by_namespace)

    @property
    def room_members_current(self) -> int:
        return sum(self.members_by_namespace)

    @property
    def publishes(self) -> int:
        return sum(self.publishes_by_namespace)

    @property
    def deliveries(self) -> int:
        return sum(self.deliveries_by_namespace)

    @property
    def dropped_total(self) -> int:
        return sum(sum(counts) for counts in self.dropped.values())

    def broker_state(self, connected: bool) -> None:
        """There is a broker, and it is (not) connected."""
        self.broker_connected = connected

    def broker_error(self, count: int = 1) -> None:
        self.broker_errors += count

    def broker_reconnected(self) -> None:
        self.broker_reconnects += 1

    def broker_stale_dropped(self) -> None:
        self.broker_stale += 1

    def _broker_node(self, node: str) -> list[int]:
        stats = self.broker_nodes.get(node)
        if stats is None:
            if len(self.broker_nodes) >= MAX_BROKER_NODES:
                node = "other"
            stats = self.broker_nodes.setdefault(node, [0, 0, 0])
        return stats

    def broker_node_state(self, node: str, connected: bool) -> None:
        """A cluster master ``node`` (host:port) is (not) connected."""
        self._broker_node(node)[0] = int(connected)

    def broker_node_error(self, node: str, count: int) -> None:
        self._broker_node(node)[1] += count

    def broker_node_reconnected(self, node: str) -> None:
        self._broker_node(node)[2] += 1

    def broker_node_forget(self, node: str) -> None:
        """``node`` is no longer a master of the cluster: its series end."""
        self.broker_nodes.pop(node, None)

    def api_started(self, endpoints: Sequence[str]) -> None:
        """The publish API serves these route templates (the ``endpoint`` label)."""
        self.api_endpoints = tuple(endpoints)
        for endpoint in endpoints:
            self.api_seconds.setdefault(endpoint, Histogram(LATENCY_BUCKETS))

    def api_stopped(self) -> None:
        self.api_endpoints = None

    def api_request(self, endpoint: str, status: int, seconds: float) -> None:
        key = (endpoint, str(status))
        self.api_requests[key] = self.api_requests.get(key, 0) + 1
        self.api_seconds[endpoint].observe(seconds)

    def render(self) -> bytes:
        """This process's metrics as Prometheus text (see ``render_hook`` for the host's)."""
        return prometheus_client.generate_latest(self.registry)

    def collect(self) -> Iterable[Metric]:
        p = "rtgateway_"

        def counter(name: str, doc: str, value: float) -> Metric:
            return CounterMetricFamily(p + name, doc, value=value)

        def gauge(name: str, doc: str, value: float) -> Metric:
            return GaugeMetricFamily(p + name, doc, value=value)

        def labelled(name: str, doc: str, label: str, values: dict[str, int]) -> Metric:
            family = CounterMetricFamily(p + name, doc, labels=[label])
            for key, value in values.items():
                family.add_metric([key], value)
            return family

        namespaces = self.namespaces

        def by_namespace(
            family: CounterMetricFamily | GaugeMetricFamily, values: Sequence[int], *first: str
        ) -> Metric:
            for namespace, value in zip(namespaces, values, strict=True):
                family.add_metric([*first, namespace], value)
            return family

        live = self.live
        info = GaugeMetricFamily(
            p + "build_info",
            "Build information; the value is 1.",
            labels=["version", "python", "websockets"],
        )
        info.add_metric([self.version, platform.python_version(), self.websockets_version], 1)
        yield info
        yield gauge("connections_current", "Open WebSocket connections.", self.connections_current)
        yield gauge(
            "connections_max",
            "Connections accepted before handshakes get 503.",
            live.max_connections if live else 0,
        )
        yield counter("connections", "WebSocket connections opened.", self.connections_total)
        yield gauge(
            "pending_handshakes_current",
            "Sockets accepted that have not finished a handshake yet.",
            live.pending_handshakes if live else 0,
        )
        yield labelled(
            "disconnects", "WebSocket connections closed, by reason.", "reason", self.disconnects
        )
        yield labelled(
            "handshake_rejections",
            "Opening handshakes refused or abandoned, by reason.",
            "reason",
            self.handshake_rejections,
        )
        yield counter("messages_received", "WebSocket messages received.", self.messages_received)
        yield counter("received_bytes", "Payload bytes received.", self.received_bytes)
        yield counter("messages_sent", "WebSocket frames sent by the outboxes.", self.messages_sent)
        yield counter("sent_bytes", "Bytes written by the outboxes.", self.sent_bytes)
        ns = ["namespace"]
        yield by_namespace(
            GaugeMetricFamily(p + "rooms_current", "Rooms with at least one member.", labels=ns),
            self.rooms_by_namespace,
        )
        yield by_namespace(
            GaugeMetricFamily(
                p + "room_members_current", "Room memberships (connection, room).", labels=ns
            ),
            self.members_by_namespace,
        )
        yield by_namespace(
            CounterMetricFamily(p + "publishes", "Publications fanned out.", labels=ns),
            self.publishes_by_namespace,
        )
        yield by_namespace(
            CounterMetricFamily(
                p + "deliveries", "Publication frames handed to member outboxes.", labels=ns
            ),
            self.deliveries_by_namespace,
        )
        yield labelled(
            "protocol_errors",
            "Error replies sent to clients, by code.",
            "code",
            self.protocol_errors,
        )
        dropped = CounterMetricFamily(
            p + "messages_dropped",
            "Frames dropped by a slow-consumer drop policy.",
            labels=["policy", "namespace"],
        )
        for policy, counts in self.dropped.items():
            by_namespace(dropped, counts, policy)
        yield dropped
        yield counter(
            "rate_limited", "Client messages refused by the rate limit.", self.rate_limited
        )
        yield gauge(
            "outbox_queued_bytes",
            "Bytes waiting in outboxes, all connections.",
            live.queued_bytes if live else 0,
        )
        yield gauge(
            "draining",
            "1 while the gateway drains for shutdown.",
            int(bool(live and live.draining)),
        )
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:  # scraped from outside the event loop (tests)
            pass
        else:
            yield gauge("tasks_current", "asyncio tasks alive in the gateway's event loop.", tasks)
        if self.broker_connected is not None:
            yield gauge(
                "broker_connected",
                "1 while the connection to the broker (Redis) is up.",
                int(self.broker_connected),
            )
            yield counter(
                "broker_reconnects",
                "Connections to the broker made again after losing it.",
                self.broker_reconnects,
            )
            yield counter(
                "broker_errors",
                "Broker failures: lost connections, failed publishes, bad payloads.",
                self.broker_errors,
            )
            yield counter(
                "broker_stale",
                "Publications dropped because a lost Redis counter numbered them below what "
                "members had seen; members see them as a gap.",
                self.broker_stale,
            )
        if self.broker_nodes:
            yield from self._broker_node_families()
        yield labelled(
            "log_events",
            "Log events at warning level or above, by level, every one of them.",
            "level",
            log.EVENTS,
        )
        yield labelled(
            "log_events_suppressed",
            "Repeated log events at warning level or above that were counted, not written.",
            "level",
            log.SUPPRESSED,
        )
        yield self.fanout.family(p + "fanout_recipients", "Recipients per publication.")
        yield self.publish_seconds.family(
            p + "publish_seconds",
            "From a publication being read to its frame handed to every member.",
        )
        yield self.flush_frames.family(p + "outbox_flush_frames", "Frames per socket write.")
        yield self.loop_lag.family(
            p + "event_loop_lag_seconds", "How late the event loop ran a timer."
        )
        if self.api_endpoints is not None:
            yield from self._api_families()

    def _broker_node_families(self) -> Iterable[Metric]:
        p = "rtgateway_broker_node_"
        connected = GaugeMetricFamily(
            p + "connected", "1 while this Redis Cluster master is connected.", labels=["node"]
        )
        errors = CounterMetricFamily(
            p + "errors", "Broker failures on this Redis Cluster master.", labels=["node"]
        )
        reconnects = CounterMetricFamily(
            p + "reconnects", "Connections to this cluster master made again.", labels=["node"]
        )
        for node, (up, failed, again) in sorted(self.broker_nodes.items()):
            connected.add_metric([node], up)
            errors.add_metric([node], failed)
            reconnects.add_metric([node], again)
        yield from (connected, errors, reconnects)

    def _api_families(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "rtgateway_api_requests",
            "Publish API requests answered, by route template and HTTP status.",
            labels=["endpoint", "status"],
        )
        for (endpoint, status), count in sorted(self.api_requests.items()):
            requests.add_metric([endpoint, status], count)
        yield requests
        seconds = HistogramMetricFamily(
            "rtgateway_api_request_seconds",
            "From a request's head being read to its response being written.",
            labels=["endpoint"],
        )
        for endpoint in self.api_endpoints or ():
            histogram = self.api_seconds[endpoint]
            seconds.add_metric([endpoint], histogram.buckets(), histogram.sum)
        yield seconds


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics.collect()
