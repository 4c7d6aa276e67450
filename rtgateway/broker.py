r"""Publications between processes and hosts through Redis pub/sub.

:class:`RedisBroker` is the :class:`~rtgateway.rooms.Broker` for more than one
process. A publication is numbered and published in one atomic step on the
Redis server (:data:`PUBLISH_SCRIPT`: ``INCR`` the room's counter, then
``PUBLISH`` a payload that carries ``seq``, ``ts`` and the data), so every
process, on every host, receives the same publications in the same order with
consecutive ``seq``. No process delivers its own publications directly: all of
them, local members included, get the copy that comes back from Redis, which
is what keeps one order for everyone.

Two connections per process, each with one job:

- **Subscriptions** (:meth:`RedisBroker.run`). A process subscribes to a
  room's channel when the room gets its first local member and unsubscribes
  when it loses its last one. What is subscribed is what Redis *confirmed*:
  every ``SUBSCRIBE``/``UNSUBSCRIBE`` is counted per room until its reply
  comes back, in order, on the same connection, so a room reopened while its
  unsubscribe is in flight is subscribed again, whatever else opens or closes
  meanwhile. A room is *live* (:meth:`~rtgateway.rooms.Hub.room_live`) once
  its subscribe is confirmed with nothing else in flight: only then are its
  joins acknowledged. A PING every second keeps a silent connection honest: a
  Redis that answers nothing for 3 s (hung, or cut off) counts as lost; time
  this process's own event loop spent too busy to read does not count.
- **Publications** (:class:`~rtgateway.publisher.Publisher`). Script calls wait in one queue and
  leave in the order they came, pipelined: one write and one round trip for
  everything that waits, on one connection that is checked before each use
  and replaced when stale (a restarted Redis closes it). A call never sent
  fails with :exc:`~rtgateway.rooms.BrokerUnavailable` ("not published": safe
  to retry); a call sent but not answered within the timeout fails with
  :exc:`~rtgateway.rooms.BrokerOutcomeUnknown` (Redis may still run it).

``seq`` never goes backwards for a member. Counters live in Redis with a
lifetime (``RTG_BROKER_ROOM_TTL_S``) that every publication renews, and that
each process renews for the rooms it has members in: a counter disappears
only once no host has had members for that long. When a counter is lost
anyway (Redis restarted empty, an eviction, a failover), each process puts it
back above the highest ``seq`` its members saw (:data:`RESTORE_SCRIPT`, on
every reconnect before subscribing, and whenever a publication arrives with a
``seq`` at or below that), and adds what was numbered in the meantime, so that
those numbers show as a gap; publications numbered below are dropped
(``rtgateway_broker_stale_total``). Publications made while a process was cut
off are not replayed: its members see the gap in ``seq``.

**Requests between processes** (the backend's moderation,
:class:`~rtgateway.moderation.Control`) ride the same two connections. Each
process subscribes, before any room, to a control channel of its own,
``rtg:ctl:<node>`` (*node*: the token that starts its connections' ids). A
request for one connection is ``PUBLISH``\ed to its node's control channel; a
request about a room (its connections) to the room's own channel, marked by
a leading ``?`` (publications start with their ``seq``), so that exactly the
processes with members there receive it. ``PUBLISH`` returns how many
processes received it: that many answers are awaited, each ``PUBLISH``\ed to
the asker's control channel, for at most the broker timeout (0: nobody holds
the connection, or nobody has members in the room).

While Redis is down, publishes and joins of new rooms get ``unavailable`` at
once, connections keep being served, and :meth:`RedisBroker.run` reconnects
with jittered exponential backoff, restores the counters and subscribes to
every local room again.

This module must not know about connections or sockets; it talks to the hub
only through :class:`~rtgateway.rooms.RoomEvents`.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .control import REQUEST_MARK, Requests
from .errors import BrokerOutcomeUnknown, BrokerStalled, BrokerUnavailable
from .moderation import Answers
from .publisher import Publisher, Script

if TYPE_CHECKING:
    from .metrics import Metrics
    from .outbox import Flusher
    from .rooms import RoomEvents

__all__ = ["CONTROL_SCRIPT", "PUBLISH_SCRIPT", "RESTORE_SCRIPT", "RedisBroker", "parse_redis_url"]

# KEYS[1] the room's seq counter, KEYS[2] its channel; ARGV: the highest seq
# this process has delivered in the room (its floor), ts, data, key lifetime.
# A counter found at or below the floor was lost (see RESTORE_SCRIPT).
PUBLISH_SCRIPT = """
local seq = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[1])
if seq <= floor then
  seq = floor + seq
  redis.call('SET', KEYS[1], seq)
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', KEYS[2], seq .. ' ' .. ARGV[2] .. ' ' .. ARGV[3])
return seq
"""

# KEYS[1] the room's seq counter; ARGV: the floor, the key lifetime. A counter
# below the floor was lost and maybe counted afresh since: put it back above
# the floor by what was counted, so that those publications show as a gap.
RESTORE_SCRIPT = """
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
local floor = tonumber(ARGV[1])
if seq < floor then
  seq = floor + seq
  redis.call('SET', KEYS[1], seq)
end
if seq > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return seq
"""

# KEYS[1] a channel; ARGV[1] a request or an answer between processes. Returns
# how many subscribers received it (a script, so that it queues and pipelines
# with the publications).
CONTROL_SCRIPT = "return redis.call('PUBLISH', KEYS[1], ARGV[1])"

PUBLISH = Script(PUBLISH_SCRIPT)
RESTORE = Script(RESTORE_SCRIPT)
CONTROL = Script(CONTROL_SCRIPT)

SEQ_KEY = "rtg:seq:"
CHANNEL = "rtg:room:"
CONTROL_CHANNEL = "rtg:ctl:"  # + a node: the channel only that process subscribes to
CONNECT_TIMEOUT_S = 1.0
KEEPALIVE_INTERVAL_S = 1.0  # PING the subscription connection when it was this quiet
KEEPALIVE_TIMEOUT_S = 3.0  # nothing at all from Redis for this long: the connection is lost
KEEPALIVE_LATE_S = 0.5  # a keepalive tick later than this: the loop was busy, not Redis silent
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0
CHANNELS_PER_COMMAND = 1000


def parse_redis_url(url: str) -> tuple[str, int, int]:
    """``redis://host:port[/db]`` -> (host, port, db); raises ValueError."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError("redis://HOST:PORT[/DB]")
    try:
        port = parts.port or 6379
        db = int(parts.path.strip("/") or "0")
    except ValueError:
        raise ValueError("redis://HOST:PORT[/DB] with a numeric port and db") from None
    if db < 0:
        raise ValueError("redis://HOST:PORT[/DB] with a db >= 0")
    return parts.hostname, port, db


class RedisBroker:
    """Numbers publications in Redis and delivers what Redis sends back."""

    # What a node of a Redis Cluster changes (cluster.py): names, verbs, script.
    publish_script = PUBLISH
    control_script = CONTROL
    subscribe_verbs = ("SUBSCRIBE", "UNSUBSCRIBE")
    reply_kinds = (b"message", b"subscribe", b"unsubscribe")

    @staticmethod
    def control_channel_of(node: str) -> str:
        return CONTROL_CHANNEL + node

    def seq_key(self, room: str) -> str:
        return SEQ_KEY + room

    def channel(self, room: str) -> str:
        return CHANNEL + room

    def room_of(self, channel: bytes) -> str:
        return channel[len(CHANNEL) :].decode("ascii")

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
        self.hub: RoomEvents  # the hub attaches itself (Hub.__init__)
        # Answers requests from other processes (the moderator serves itself).
        self.node = node or "-"
        self.control_channel = self.control_channel_of(self.node)
        # Paces deliveries that fill outboxes (outbox.py); set once the loop runs.
        self.flusher: Flusher | None = None
        self.url = url
        self.metrics = metrics
        self.log = log
        self.timeout_s = timeout_s
        self.room_ttl_s = max(1, math.ceil(room_ttl_s))
        host, port, db = parse_redis_url(url)
        # Retries are ours: a command is never sent twice behind our back.
        connection = functools.partial(
            Connection,
            host=host,
            port=port,
            db=db,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            # RESP2: pub/sub messages are replies on the connection, not pushes
            # that redis-py 8's default RESP3 hands to a callback.
            protocol=2,
        )
        self.connect_subscriber = functools.partial(connection, socket_timeout=None)
        self.publisher = Publisher(
            functools.partial(connection, socket_timeout=timeout_s),
            (self.publish_script, RESTORE, self.control_script),
            timeout_s,
            self._failed,
        )
        self.requests = Requests(
            self.node, self.control_channel_of, self._send, timeout_s, metrics=metrics, log=log
        )
        self.connected = False
        self.up = asyncio.Event()  # set while connected
        self.wanted: set[str] = set()  # rooms with local members or joiners
        # What this subscription connection has, as Redis confirmed it:
        self.sent: dict[str, bool] = {}  # the last command sent per room: True = subscribe
        self.inflight: dict[str, int] = {}  # commands per room whose reply has not come
        self.live: set[str] = set()  # confirmed subscribed, nothing in flight
        self.dirty: set[str] = set()  # rooms whose wanted state changed since the last sync
        self.changed = asyncio.Event()
        # Rooms wanted when this connection was made, not confirmed yet.
        self.starting: set[str] = set()
        self.started = asyncio.Event()
        self.restoring: set[str] = set()
        self.last_seen = 0.0  # loop time of the last reply on the subscription connection

    # The Broker protocol.

    def attach(self, events: RoomEvents) -> None:
        self.hub = events

    @property
    def available(self) -> bool:
        return self.connected

    def submit(
        self, room: str, floor: int, ts_ms: int, data: bytes, started: float
    ) -> Awaitable[int]:
        if not self.connected:
            raise BrokerUnavailable("redis is not connected")
        args = (floor, ts_ms, data, self.room_ttl_s)
        keys = (self.seq_key(room), self.channel(room))
        return self.publisher.call(self.publish_script, keys, args)

    def room_opened(self, room: str) -> bool:
        self.wanted.add(room)
        if room in self.live and self.sent.get(room) and not self.inflight.get(room):
            return True  # closed and reopened before the unsubscribe left
        self._mark(room)
        return False

    def room_closed(self, room: str) -> None:
        self.wanted.discard(room)
        self._mark(room)
        self._start_confirmed(room)

    def _mark(self, room: str) -> None:
        self.dirty.add(room)
        self.changed.set()

    # The moderation's Control protocol: requests between processes (control.py).

    def serve(self, answer: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.requests.answer = answer

    async def ask_node(self, node: str, request: dict[str, Any]) -> Answers:
        return await self._ask(self.control_channel_of(node), b"", request)

    async def ask_room(self, room: str, request: dict[str, Any]) -> Answers:
        return await self._ask(self.channel(room), REQUEST_MARK, request)

    async def _ask(self, channel: str, mark: bytes, request: dict[str, Any]) -> Answers:
        if not self.connected:
            raise BrokerUnavailable("redis is not connected")
        return await self.requests.ask(channel, mark, request)

    def _send(self, channel: str, payload: bytes, internal: bool) -> asyncio.Future[Any]:
        """PUBLISH through the publisher's queue; the future gets the receivers' count."""
        return self.publisher.call(self.control_script, (channel,), (payload,), internal=internal)

    # The connection: subscriptions, delivery, reconnection.

    async def run(self) -> None:
        """Keep a subscribed connection to Redis, and the publisher, until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.publisher.run())
            group.create_task(self._stay_connected())

    async def _stay_connected(self) -> None:
        failures = 0
        while True:
            try:
                await self._session(reconnecting=failures > 0)
            except* (
                RedisError,
                OSError,
                TimeoutError,
                BrokerStalled,
                BrokerUnavailable,
                BrokerOutcomeUnknown,
            ) as group:
                exc = group.exceptions[0]
                self.metrics.broker_error(1)
                if self.connected or failures == 0:
                    self.log.warning("broker_disconnected", url=self.url, error=_describe(exc))
            except* Exception:
                # A bug must not end publishing for good: log it, start over.
                self.metrics.broker_error(1)
                self.log.exception("broker_failed", url=self.url)
            finally:
                self._set_connected(False)
            failures += 1
            delay = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** min(failures, 10))
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _session(self, reconnecting: bool) -> None:
        """One subscription connection, from connecting to losing it."""
        conn = self.connect_subscriber()
        try:
            await conn.connect()  # type: ignore[no-untyped-call]
            # A new connection may be a new Redis: no old connection is trusted.
            self.publisher.reset()
            await self._restore(self.wanted)
            await self._subscribe_control(conn)
            self.last_seen = asyncio.get_running_loop().time()
            self.dirty |= self.wanted
            self.starting = set(self.wanted)
            self.started.clear()
            self._start_confirmed(None)
            self.changed.set()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._read(conn))
                tasks.create_task(self._sync(conn))
                tasks.create_task(self._keepalive(conn))
                # Connected means subscribed to every local room again.
                async with asyncio.timeout(max(self.timeout_s, CONNECT_TIMEOUT_S) * 2):
                    await self.started.wait()
                if reconnecting:
                    self.metrics.broker_reconnected()
                self._set_connected(True)
                self.log.info("broker_connected", url=self.url, rooms=len(self.wanted))
                tasks.create_task(self._refresh())
        finally:
            await conn.disconnect(nowait=True)

    async def _subscribe_control(self, conn: Connection) -> None:
        """Subscribe to this process's control channel, before any room: confirmed here."""
        await conn.send_command(self.subscribe_verbs[0], self.control_channel, check_health=False)
        async with asyncio.timeout(max(self.timeout_s, CONNECT_TIMEOUT_S)):
            reply = await conn.read_response()
        if not (isinstance(reply, list) and reply[:1] == [self.reply_kinds[1]]):
            raise BrokerUnavailable("redis did not confirm the control subscription")

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        self.metrics.broker_state(connected)
        if connected:
            self.up.set()
            return
        self.up.clear()
        self.sent.clear()
        self.inflight.clear()
        self.live.clear()
        self.dirty.clear()
        self.starting.clear()
        # Rooms confirmed while connecting count as not live either.
        self.hub.broker_down()

    async def _sync(self, conn: Connection) -> None:
        """Send what the local rooms need: one write per loop iteration of changes."""
        while True:
            await self.changed.wait()
            self.changed.clear()
            subscribe: list[str] = []
            unsubscribe: list[str] = []
            for room in self.dirty:
                wanted = room in self.wanted
                if wanted != self.sent.get(room, False):
                    (subscribe if wanted else unsubscribe).append(room)
                    self.sent[room] = wanted
                    self.inflight[room] = self.inflight.get(room, 0) + 1
            self.dirty.clear()
            if not subscribe and not unsubscribe:
                continue
            self.live.difference_update(unsubscribe)
            commands = [
                command
                for verb, rooms in zip(self.subscribe_verbs, (subscribe, unsubscribe), strict=True)
                for command in self.commands(verb, rooms)
            ]
            await conn.send_packed_command(conn.pack_commands(commands), check_health=False)

    def commands(self, verb: str, rooms: list[str]) -> Iterator[tuple[str, ...]]:
        """``verb`` for ``rooms``, in commands of at most CHANNELS_PER_COMMAND channels."""
        for i in range(0, len(rooms), CHANNELS_PER_COMMAND):
            yield (verb, *map(self.channel, rooms[i : i + CHANNELS_PER_COMMAND]))

    def _confirmed(self, room: str, subscribed: bool) -> None:
        """Redis answered one (un)subscribe for ``room``."""
        left = self.inflight.get(room, 1) - 1
        if left > 0:
            self.inflight[room] = left
            if not subscribed:
                self.live.discard(room)
            return
        self.inflight.pop(room, None)
        if self.sent.get(room):
            self.live.add(room)
            self.hub.room_live(room)
        else:
            self.live.discard(room)
            self.sent.pop(room, None)
        self._start_confirmed(room)

    def _start_confirmed(self, room: str | None) -> None:
        if room is not None:
            self.starting.discard(room)
        if not self.starting:
            self.started.set()

    async def _read(self, conn: Connection) -> None:
        loop = asyncio.get_running_loop()
        message, subscribed, unsubscribed = self.reply_kinds
        control = self.control_channel.encode()
        while True:
            reply = await conn.read_response()
            self.last_seen = loop.time()
            if not isinstance(reply, list) or len(reply) < 3:
                continue  # PONG
            kind, channel = reply[0], reply[1]
            if kind == message:
                payload = reply[2]
                if channel == control:
                    self.requests.received(payload)
                elif payload[:1] == REQUEST_MARK:
                    self.requests.request(payload[1:])
                else:
                    self._deliver(self.room_of(channel), payload)
                # Messages already read are handed over without yielding: a
                # burst of heavy ones is spread over loop iterations.
                if self.flusher is not None and self.flusher.heavy:
                    await self.flusher.relieve()
            elif kind == subscribed:
                self._confirmed(self.room_of(channel), True)
            elif kind == unsubscribed and channel is not None:
                self._confirmed(self.room_of(channel), False)

    async def _keepalive(self, conn: Connection) -> None:
        loop = asyncio.get_running_loop()
        silent = 0.0  # time Redis had to answer while this loop was responsive
        heard = self.last_seen
        while True:
            before = loop.time()
            await asyncio.sleep(KEEPALIVE_INTERVAL_S)
            now = loop.time()
            if self.last_seen != heard:
                heard, silent = self.last_seen, 0.0
            elif now - before < KEEPALIVE_INTERVAL_S + KEEPALIVE_LATE_S:
                silent += now - before
            # (A tick this late means this event loop was too busy to read
            # Redis's answers: that time is not Redis's silence.)
            if silent >= KEEPALIVE_TIMEOUT_S:
                raise BrokerStalled(f"no answer from redis for {silent:.1f} s")
            if now - self.last_seen >= KEEPALIVE_INTERVAL_S:
                await conn.send_command("PING", check_health=False)

    async def _refresh(self) -> None:
        """Keep the counters of rooms with local members from expiring."""
        while True:
            await asyncio.sleep(self.room_ttl_s / 3)
            for room in self.wanted:
                self._restore_soon(room)

    def _deliver(self, room: str, payload: bytes) -> None:
        started = time.perf_counter()
        try:
            seq_text, ts_text, data = payload.split(b" ", 2)
            seq, ts_ms = int(seq_text), int(ts_text)
        except ValueError:
            self.metrics.broker_error(1)
            self.log.warning("broker_bad_payload", room=room, size=len(payload))
            return
        if seq <= self.hub.seq(room):
            # Numbered by a counter that was lost: delivering it would send
            # ``seq`` backwards. Put the counter back; what is dropped shows
            # as a gap.
            self.metrics.broker_stale_dropped()
            self._restore_soon(room)
            return
        self.hub.deliver(room, seq, ts_ms, data, started)

    async def _restore(self, rooms: Iterable[str]) -> None:
        """Put every counter back above what local members saw; raise if Redis would not."""
        calls = [self._restore_call(room) for room in rooms if self.hub.seq(room)]
        if calls:
            await asyncio.gather(*calls)

    def _restore_soon(self, room: str) -> None:
        if room in self.restoring or not self.hub.seq(room):
            return
        self.restoring.add(room)
        future = self._restore_call(room)
        future.add_done_callback(_consume)
        future.add_done_callback(lambda _: self.restoring.discard(room))

    def _restore_call(self, room: str) -> asyncio.Future[Any]:
        args = (self.hub.seq(room), self.room_ttl_s)
        return self.publisher.call(RESTORE, (self.seq_key(room),), args, internal=True)

    def _failed(self, exc: BaseException, count: int, sent: bool) -> None:
        """The publisher failed ``count`` calls: one log line, the count in /metrics."""
        self.metrics.broker_error(count)
        expected = isinstance(exc, (RedisError, OSError, TimeoutError))
        self.log.warning(
            "broker_publish_failed",
            error=_describe(exc),
            publications=count,
            outcome="unknown" if sent else "not_published",
            exc_info=None if expected else exc,
        )

    async def close(self) -> None:
        self._set_connected(False)


def _consume(future: asyncio.Future[Any]) -> None:
    # A call nobody awaits (a restore): its failure is already counted.
    if not future.cancelled():
        future.exception()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
