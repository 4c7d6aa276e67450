"""Publications through a Redis Cluster: sharded pub/sub, one connection pair per master.

:class:`ClusterBroker` is the :class:`~rtgateway.rooms.Broker` for
``RTG_BROKER_URL=redis+cluster://HOST:PORT[,HOST:PORT...]``. Redis Cluster does
the sharding; this module only follows it. A room's counter
(``rtg:seq:{room}``) and its channel (``rtg:room:{room}``) share a hash tag,
hence a slot, hence a master: numbering stays one atomic script per
publication (``INCR`` then ``SPUBLISH``, :data:`SHARDED_PUBLISH_SCRIPT`), and
every member still sees one order with consecutive ``seq``.

Each master that holds a slot of a local room gets a :class:`NodeBroker`: the
single-Redis broker of ``broker.py`` (confirmed subscriptions, pipelined
publisher, counter floors, keepalive, reconnection) speaking ``SSUBSCRIBE`` /
``SPUBLISH`` to that one node. A room lives on the node that owns its slot
in the cluster's own map (``CLUSTER SLOTS``), which this module reads again:

- every :data:`REFRESH_INTERVAL_S` while all is well;
- every :data:`TROUBLE_INTERVAL_S` while a master is unreachable, a reply
  said ``MOVED``/``ASK``/``CLUSTERDOWN``/``TRYAGAIN``, or a node dropped a
  subscription on its own (``sunsubscribe`` when its slot moved away).

A room whose slot changed master leaves the old node's broker without a
command being sent there (the old node may be dead, and would answer
``MOVED`` anyway), stops being live, and is subscribed on the new master,
whose broker first puts its counter back above the highest ``seq`` seen here
(the floor): a counter increment lost with a dead master (replication is
asynchronous) cannot send ``seq`` backwards. Rooms of the other masters are
untouched by one node's failure.

What a failover means for a publication: sent to the dying master and not
answered, ``outcome_unknown``; submitted while its master is known down or
its slot unowned, ``unavailable`` at once; answered ``MOVED`` (resharding),
``unavailable`` (Redis did not run it).

This module must not know about connections to clients; it talks to the hub
through :class:`~rtgateway.rooms.RoomEvents` and one more verb,
``room_down``.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, cast

from redis.asyncio.connection import Connection
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    RedisError,
    TryAgainError,
)

from .broker import CONNECT_TIMEOUT_S, RedisBroker
from .clustermap import SCHEME, Address, node_name, parse_cluster_url, parse_slots, room_slot
from .control import REQUEST_MARK, Requests
from .errors import BrokerUnavailable
from .moderation import Answers
from .publisher import Script
from .rooms import RoomEvents

if TYPE_CHECKING:
    from .metrics import Metrics
    from .outbox import Flusher

__all__ = [
    "SCHEME",
    "SHARDED_PUBLISH_SCRIPT",
    "ClusterBroker",
    "NodeBroker",
    "parse_cluster_url",
    "room_slot",
]

REFRESH_INTERVAL_S = 5.0
TROUBLE_INTERVAL_S = 0.2
SEQ_KEY = "rtg:seq:{"
CHANNEL = "rtg:room:{"
CONTROL_CHANNEL = "rtg:ctl:{"  # + node + "}": one process's requests and answers

# PUBLISH_SCRIPT of broker.py with SPUBLISH: KEYS[2], the channel, is in the
# counter's slot (one hash tag), so the script runs on one shard.
SHARDED_PUBLISH_SCRIPT = """
local seq = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[1])
if seq <= floor then
  seq = floor + seq
  redis.call('SET', KEYS[1], seq)
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('SPUBLISH', KEYS[2], seq .. ' ' .. ARGV[2] .. ' ' .. ARGV[3])
return seq
"""
SHARDED_PUBLISH = Script(SHARDED_PUBLISH_SCRIPT)
# broker.CONTROL_SCRIPT with SPUBLISH: KEYS[1] a room's or a process's channel.
SHARDED_CONTROL = Script("return redis.call('SPUBLISH', KEYS[1], ARGV[1])")

# Replies that say the cluster's map changed: the command did not run.
MAP_CHANGED = (AskError, ClusterDownError, TryAgainError)


class ClusterEvents(RoomEvents, Protocol):
    """What the cluster needs of the hub beyond :class:`~rtgateway.rooms.RoomEvents`."""

    def room_down(self, name: str) -> None:
        """``name``'s publications stopped reaching this process (its master changed)."""


class _NodeCounters:
    """A node broker's metrics: the gateway's totals, and the node's own series."""

    def __init__(self, metrics: Metrics, node: str, changed: Any) -> None:
        self.metrics = metrics
        self.node = node
        self.changed = changed  # called when the node's connection state changes
        self.retired = False  # the node left the map: its series are gone

    def broker_state(self, connected: bool) -> None:
        if not self.retired:
            self.metrics.broker_node_state(self.node, connected)
            self.changed()

    def broker_error(self, count: int = 1) -> None:
        self.metrics.broker_error(count)
        if not self.retired:
            self.metrics.broker_node_error(self.node, count)

    def broker_reconnected(self) -> None:
        self.metrics.broker_reconnected()
        if not self.retired:
            self.metrics.broker_node_reconnected(self.node)

    def broker_stale_dropped(self) -> None:
        self.metrics.broker_stale_dropped()


class NodeBroker(RedisBroker):
    """The broker of one cluster master: sharded pub/sub, hash-tagged keys."""

    publish_script = SHARDED_PUBLISH
    control_script = SHARDED_CONTROL
    subscribe_verbs = ("SSUBSCRIBE", "SUNSUBSCRIBE")
    reply_kinds = (b"smessage", b"ssubscribe", b"sunsubscribe")
    control_channel_of = staticmethod(lambda node: CONTROL_CHANNEL + node + "}")

    def __init__(self, cluster: ClusterBroker, address: Address, counters: Any) -> None:
        super().__init__(
            "redis://" + node_name(address),
            counters,
            cluster.log.bind(node=node_name(address)),
            timeout_s=cluster.timeout_s,
            room_ttl_s=cluster.room_ttl_s,
            node=cluster.node,
        )
        self.cluster = cluster
        self.address = address
        self.counters = counters
        # One process, one set of requests in flight, whichever node carries them.
        self.requests = cluster.requests
        self._control = self.control_channel.encode()

    def seq_key(self, room: str) -> str:
        return SEQ_KEY + room + "}"

    def channel(self, room: str) -> str:
        return self.control_channel if room == self.cluster.control_room else CHANNEL + room + "}"

    def room_of(self, channel: bytes) -> str:
        if channel == self._control:  # its (un)subscribe confirmations
            return self.cluster.control_room
        return channel[len(CHANNEL) : -1].decode("ascii")

    async def _subscribe_control(self, conn: Connection) -> None:
        """Not here: the control channel follows the map as a room (ClusterBroker)."""

    def room_opened(self, room: str) -> bool:
        if self.connected and room not in self.live:
            # Moved here from another master: its counter may be behind.
            self._restore_soon(room)
        return super().room_opened(room)

    def commands(self, verb: str, rooms: list[str]) -> Iterator[tuple[str, ...]]:
        # SSUBSCRIBE and SUNSUBSCRIBE take channels of one slot only.
        by_slot: dict[int, list[str]] = {}
        for room in rooms:
            by_slot.setdefault(room_slot(room), []).append(room)
        for same_slot in by_slot.values():
            yield from super().commands(verb, same_slot)

    def forget(self, room: str) -> None:
        """``room`` moved to another node: drop it here without a command."""
        self.wanted.discard(room)
        for state in (self.sent, self.inflight):
            state.pop(room, None)
        for rooms in (self.live, self.dirty, self.restoring):
            rooms.discard(room)
        self._start_confirmed(room)

    def _confirmed(self, room: str, subscribed: bool) -> None:
        if not subscribed and not self.inflight.get(room) and self.sent.get(room):
            # Unasked: the node gave the slot away (resharding, failover).
            self.live.discard(room)
            self.sent.pop(room, None)
            self.cluster.room_lost(self, room)
            return
        super()._confirmed(room, subscribed)

    def _failed(self, exc: BaseException, count: int, sent: bool) -> None:
        super()._failed(exc, count, sent)
        if isinstance(exc, MAP_CHANGED):
            self.cluster.kick()


class _NodeEvents:
    """What one node's broker tells the hub, filtered by who owns the room now."""

    def __init__(self, cluster: ClusterBroker, address: Address) -> None:
        self.cluster = cluster
        self.address = address

    def seq(self, name: str) -> int:
        return self.cluster.hub.seq(name)

    def deliver(self, name: str, seq: int, ts_ms: int, data: bytes, started: float) -> int:
        return self.cluster.hub.deliver(name, seq, ts_ms, data, started)

    def room_live(self, name: str) -> None:
        if self.cluster.owner.get(name) == self.address:
            self.cluster.hub.room_live(name)

    def broker_down(self) -> None:
        self.cluster.node_down(self.address)


class ClusterBroker:
    """Rooms on the masters of a Redis Cluster, following its slot map."""

    def __init__(
        self,
        url: str,
        metrics: Metrics,
        log: Any,
        *,
        timeout_s: float = 1.0,
        room_ttl_s: float = 600.0,
        node: str = "",
    ) -> None:
        self.hub: ClusterEvents  # the hub attaches itself (Hub.__init__)
        self.node = node or "-"
        # This process's control channel (moderation, control.py) is a sharded
        # channel too. The node brokers keep it as a room no client can name
        # (NUL; its slot is the channel's), so that it follows the map.
        self.control_room = "\x00{" + self.node + "}"
        self.requests = Requests(
            self.node,
            NodeBroker.control_channel_of,
            self._send,
            timeout_s,
            metrics=metrics,
            log=log,
        )
        self.url = url
        self.seeds = parse_cluster_url(url)
        self.metrics = metrics
        self.log = log
        self.timeout_s = timeout_s
        self.room_ttl_s = room_ttl_s
        self._flusher: Flusher | None = None
        self.wanted: set[str] = {self.control_room}
        self.owner: dict[str, Address] = {}  # room -> the master it is subscribed on
        self.nodes: dict[Address, NodeBroker] = {}
        self.tasks: dict[Address, asyncio.Task[None]] = {}
        self.group: asyncio.TaskGroup | None = None
        # The map: slot range starts, their ends and masters, sorted.
        self.starts: list[int] = []
        self.ranges: list[tuple[int, int, Address]] = []
        self.known: list[Address] = list(self.seeds)  # nodes to ask for the map
        self.mapped = False
        self.up = asyncio.Event()  # set while every master is connected
        self.trouble = asyncio.Event()  # read the map again soon

    # The Broker protocol.

    def attach(self, events: RoomEvents) -> None:
        self.hub = cast("ClusterEvents", events)  # the Hub has room_down

    @property
    def flusher(self) -> Flusher | None:
        return self._flusher

    @flusher.setter
    def flusher(self, flusher: Flusher | None) -> None:
        self._flusher = flusher
        for node in self.nodes.values():
            node.flusher = flusher

    @property
    def available(self) -> bool:
        return self.mapped and any(node.connected for node in self.nodes.values())

    def submit(
        self, room: str, floor: int, ts_ms: int, data: bytes, started: float
    ) -> Awaitable[int]:
        node = self.nodes.get(self.owner.get(room) or self._master(room) or ("", 0))
        if node is None:
            raise BrokerUnavailable("no redis cluster node serves this room")
        return node.submit(room, floor, ts_ms, data, started)

    def room_opened(self, room: str) -> bool:
        self.wanted.add(room)
        address = self._master(room)
        node = self.nodes.get(address) if address else None
        if address is None or node is None:
            return False  # live once the map gives it a master
        self.owner[room] = address
        return node.room_opened(room)

    def room_closed(self, room: str) -> None:
        self.wanted.discard(room)
        address = self.owner.pop(room, None)
        node = self.nodes.get(address) if address else None
        if node is not None:
            node.room_closed(room)

    async def close(self) -> None:
        self.metrics.broker_state(False)
        self.up.clear()
        self.hub.broker_down()

    # The moderation's Control protocol, on sharded channels.

    def serve(self, answer: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.requests.answer = answer

    async def ask_node(self, node: str, request: dict[str, Any]) -> Answers:
        return await self._ask(NodeBroker.control_channel_of(node), b"", request)

    async def ask_room(self, room: str, request: dict[str, Any]) -> Answers:
        return await self._ask(CHANNEL + room + "}", REQUEST_MARK, request)

    async def _ask(self, channel: str, mark: bytes, request: dict[str, Any]) -> Answers:
        if not self.available:
            raise BrokerUnavailable("redis is not connected")
        return await self.requests.ask(channel, mark, request)

    def _send(self, channel: str, payload: bytes, internal: bool) -> asyncio.Future[Any]:
        """SPUBLISH on the master of ``channel``'s slot; the future gets the receivers' count."""
        address = self._master_of(key_slot(channel.encode()))
        node = self.nodes.get(address) if address else None
        if node is None or not node.connected:
            future = asyncio.get_running_loop().create_future()
            future.set_exception(BrokerUnavailable("no redis cluster node serves this channel"))
            return future
        return node.publisher.call(SHARDED_CONTROL, (channel,), (payload,), internal=internal)

    # What the node brokers tell the cluster.

    def kick(self) -> None:
        self.trouble.set()

    def node_down(self, address: Address) -> None:
        """A master's connection was lost: its rooms are not live; the map may have changed."""
        for room in [r for r, a in self.owner.items() if a == address]:
            self.hub.room_down(room)
        self.kick()

    def room_lost(self, node: NodeBroker, room: str) -> None:
        """A node dropped ``room``'s subscription on its own: its slot moved."""
        self.log.info("broker_room_moved", node=node_name(node.address))
        if self.owner.get(room) == node.address:
            node.forget(room)
            del self.owner[room]
            self.hub.room_down(room)
        self.kick()

    def _state_changed(self) -> None:
        healthy = self.mapped and all(node.connected for node in self.nodes.values())
        self.metrics.broker_state(healthy)
        if healthy:
            self.up.set()
        else:
            self.up.clear()
            self.kick()

    # Following the map.

    async def run(self) -> None:
        """Follow the cluster's map and keep a broker per master, until cancelled."""
        try:
            async with asyncio.TaskGroup() as group:
                self.group = group
                await self._follow()
        finally:
            self.group = None

    async def _follow(self) -> None:
        failures = 0
        while True:
            self.trouble.clear()
            try:
                ranges = await self._read_map()
            except (RedisError, OSError, TimeoutError, ValueError) as exc:
                self.metrics.broker_error(1)
                if failures == 0:
                    self.log.warning("broker_cluster_map_failed", error=_describe(exc))
                failures += 1
            else:
                failures = 0
                try:
                    self._apply(ranges)
                except Exception:
                    # A bug must not end following the map: log it, read it again.
                    self.metrics.broker_error(1)
                    self.log.exception("broker_cluster_failed")
            healthy = self.mapped and all(node.connected for node in self.nodes.values())
            interval = REFRESH_INTERVAL_S if healthy else TROUBLE_INTERVAL_S
            try:
                async with asyncio.timeout(interval):
                    await self.trouble.wait()
            except TimeoutError:
                pass
            if self.trouble.is_set():
                # A burst of troubles (every room of a dead node) is one read.
                await asyncio.sleep(TROUBLE_INTERVAL_S / 4)

    async def _read_map(self) -> list[tuple[int, int, Address]]:
        """``CLUSTER SLOTS`` from the first node that answers."""
        error: Exception = OSError("no cluster node to ask")
        for address in self.known:
            conn = Connection(
                host=address[0],
                port=address[1],
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                socket_timeout=self.timeout_s,
                protocol=2,
            )
            try:
                await conn.connect()  # type: ignore[no-untyped-call]
                await conn.send_command("CLUSTER", "SLOTS", check_health=False)
                reply = await conn.read_response()
            except (RedisError, OSError, TimeoutError) as exc:
                error = exc
                continue
            finally:
                await conn.disconnect(nowait=True)
            ranges = parse_slots(reply)
            if ranges:
                return ranges
            error = ValueError(f"{node_name(address)} serves no slot")
        raise error

    def _apply(self, ranges: list[tuple[int, int, Address]]) -> None:
        ranges.sort()
        self.ranges = ranges
        self.starts = [start for start, _, _ in ranges]
        masters = {address for _, _, address in ranges}
        # Ask the masters first next time, then the seeds (a new cluster).
        self.known = sorted(masters) + [s for s in self.seeds if s not in masters]
        first = not self.mapped
        self.mapped = True
        for address in sorted(masters - self.nodes.keys()):
            self._add_node(address)
        for room in list(self.wanted):
            self._place(room)
        for address in list(self.nodes.keys() - masters):
            self._remove_node(address)
        if first:
            self.log.info("broker_cluster_mapped", masters=len(masters))
        self._state_changed()

    def _place(self, room: str) -> None:
        """Subscribe ``room`` on the master that owns its slot now."""
        address = self._master(room)
        old = self.owner.get(room)
        if address == old or room not in self.wanted:
            return
        if old is not None:
            del self.owner[room]
            if old in self.nodes:
                self.nodes[old].forget(room)
            self.hub.room_down(room)
            if room not in self.wanted:  # its joiners failed: it closed
                return
        node = self.nodes.get(address) if address else None
        if address is None or node is None:
            return
        self.owner[room] = address
        if node.room_opened(room):
            self.hub.room_live(room)

    def _master(self, room: str) -> Address | None:
        return self._master_of(room_slot(room))

    def _master_of(self, slot: int) -> Address | None:
        index = bisect.bisect_right(self.starts, slot) - 1
        if index < 0:
            return None
        start, end, address = self.ranges[index]
        return address if start <= slot <= end else None

    def _add_node(self, address: Address) -> None:
        assert self.group is not None
        counters = _NodeCounters(self.metrics, node_name(address), self._state_changed)
        node = NodeBroker(self, address, counters)
        node.attach(_NodeEvents(self, address))
        node.flusher = self._flusher
        self.nodes[address] = node
        self.metrics.broker_node_state(node_name(address), False)
        self.tasks[address] = self.group.create_task(node.run())
        self.log.info("broker_node_added", node=node_name(address))

    def _remove_node(self, address: Address) -> None:
        node = self.nodes.pop(address)
        for room in [r for r, a in self.owner.items() if a == address]:
            del self.owner[room]
        node.counters.retired = True
        self.metrics.broker_node_forget(node_name(address))
        self.tasks.pop(address).cancel()
        self.log.info("broker_node_removed", node=node_name(address))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
