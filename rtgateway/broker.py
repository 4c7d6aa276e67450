"""Publications between processes and hosts through Redis pub/sub.

:class:`RedisBroker` is the :class:`~rtgateway.rooms.Broker` for more than one
process. A publication is numbered and published in one atomic step on the
Redis server (:data:`PUBLISH_SCRIPT`: ``INCR`` the room's counter, then
``PUBLISH`` a payload that carries ``seq``, ``ts`` and the data), so every
process, on every host, receives the same publications in the same order with
consecutive ``seq``. No process delivers its own publications directly: all of
them, local members included, get the copy that comes back from Redis, which
is what keeps one order for everyone.

A process subscribes to a room's channel when the room gets its first local
member (:meth:`RedisBroker.room_opened`) and unsubscribes when it loses its
last one. Subscription changes and reading are serialised in one task,
:meth:`RedisBroker.run`, which also owns reconnection: while Redis is down,
publishes raise :exc:`~rtgateway.rooms.BrokerUnavailable` at once (the client
gets ``unavailable``), connections keep being served, and the task reconnects
with jittered exponential backoff and subscribes to every local room again.
Publications made while a process was cut off are not replayed: its members
see a gap in ``seq``.

This module must not know about connections or sockets; it talks to the
:class:`~rtgateway.rooms.Hub` only through :meth:`Hub.deliver`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .rooms import BrokerUnavailable

if TYPE_CHECKING:
    from .metrics import Metrics
    from .rooms import Hub

__all__ = ["PUBLISH_SCRIPT", "RedisBroker", "parse_redis_url"]

# KEYS[1] the room's seq counter, KEYS[2] its channel; ARGV: the highest seq
# this process has seen in the room (a floor, so that a Redis restarted
# without persistence does not number from 1 again), ts, data, key TTL.
PUBLISH_SCRIPT = """
local seq = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[1])
if seq <= floor then
  seq = floor + 1
  redis.call('SET', KEYS[1], seq)
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', KEYS[2], seq .. ' ' .. ARGV[2] .. ' ' .. ARGV[3])
return seq
"""

SEQ_KEY = "rtg:seq:"
CHANNEL = "rtg:room:"
SEQ_TTL_S = 86400  # a room idle this long everywhere starts numbering afresh
PUBLISH_TIMEOUT_S = 1.0  # a publish that Redis does not answer in time is refused
CONNECT_TIMEOUT_S = 1.0
READ_POLL_S = 0.05  # bounds how long a subscription change waits for the reader
HEALTH_CHECK_S = 5
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0


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

    def __init__(self, hub: Hub, url: str, metrics: Metrics, log: Any) -> None:
        self.hub = hub
        self.url = url
        self.metrics = metrics
        self.log = log
        host, port, db = parse_redis_url(url)
        # Retries are ours (the run loop's backoff); the client must fail fast
        # so that a publish gets ``unavailable`` instead of hanging.
        self.client = aioredis.Redis(
            host=host,
            port=port,
            db=db,
            socket_timeout=PUBLISH_TIMEOUT_S,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=HEALTH_CHECK_S,
        )
        self.script = self.client.register_script(PUBLISH_SCRIPT)
        self.connected = False
        self.up = asyncio.Event()  # set while connected
        self.rooms: set[str] = set()  # rooms with local members: what we want
        self.subscribed: set[str] = set()  # what the current connection has
        self.confirmed: dict[str, asyncio.Event] = {}  # set once Redis confirms
        self.changed = asyncio.Event()

    # The Broker protocol.

    async def publish(self, room: str, ts_ms: int, data: bytes, started: float) -> int:
        if not self.connected:
            raise BrokerUnavailable("redis is not connected")
        # A member that joined and publishes at once must see its own
        # publication: wait until this process's subscription is confirmed.
        waiter = self.confirmed.get(room)
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                if waiter is not None and not waiter.is_set():
                    await waiter.wait()
                local = self.hub.rooms.get(room)
                floor = local.seq if local is not None else 0
                seq = await self.script(
                    keys=[SEQ_KEY + room, CHANNEL + room],
                    args=[floor, ts_ms, data, SEQ_TTL_S],
                )
        except (RedisError, OSError, TimeoutError) as exc:
            self.metrics.broker_error()
            self.log.warning("broker_publish_failed", error=_describe(exc))
            raise BrokerUnavailable("redis did not take the publication") from None
        return int(seq)

    def room_opened(self, room: str) -> None:
        self.rooms.add(room)
        # Reopened before the reader unsubscribed it: still subscribed, and
        # the event still says whether Redis confirmed it.
        self.confirmed.setdefault(room, asyncio.Event())
        self.changed.set()

    def room_closed(self, room: str) -> None:
        self.rooms.discard(room)
        self.changed.set()

    # The reader: connection, subscriptions, delivery, reconnection.

    async def run(self) -> None:
        """Keep a subscribed connection to Redis until cancelled."""
        failures = 0
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.ping()
                self.subscribed = set()
                await self._sync(pubsub)
                if failures:
                    self.metrics.broker_reconnected()
                self._set_connected(True)
                self.log.info("broker_connected", url=self.url, rooms=len(self.rooms))
                failures = 0
                await self._read(pubsub)
            except (RedisError, OSError, TimeoutError) as exc:
                self.metrics.broker_error()
                if self.connected or failures == 0:
                    self.log.warning("broker_disconnected", url=self.url, error=_describe(exc))
                self._set_connected(False)
            finally:
                await _close_quietly(pubsub)
            failures += 1
            delay = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** min(failures, 10))
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def close(self) -> None:
        self._set_connected(False)
        await self.client.aclose()

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        self.metrics.broker_connected = connected
        if connected:
            self.up.set()
        else:
            self.up.clear()
            for event in self.confirmed.values():
                event.clear()

    async def _sync(self, pubsub: Any) -> None:
        """Bring this connection's subscriptions in line with the local rooms."""
        self.changed.clear()
        wanted, have = self.rooms, self.subscribed
        added, removed = wanted - have, have - wanted
        if added:
            await pubsub.subscribe(*(CHANNEL + r for r in added))
        if removed:
            await pubsub.unsubscribe(*(CHANNEL + r for r in removed))
        self.subscribed = set(wanted)
        for room in self.confirmed.keys() - wanted:
            del self.confirmed[room]

    async def _read(self, pubsub: Any) -> None:
        prefix = len(CHANNEL)
        while True:
            if self.changed.is_set():
                await self._sync(pubsub)
            message = await pubsub.get_message(timeout=READ_POLL_S)
            if message is None:
                continue
            kind = message["type"]
            channel = message["channel"]
            if kind == "message":
                room = channel[prefix:].decode()
                self._deliver(room, message["data"])
            elif kind == "subscribe" and channel is not None:
                waiter = self.confirmed.get(channel[prefix:].decode())
                if waiter is not None:
                    waiter.set()

    def _deliver(self, room: str, payload: bytes) -> None:
        started = time.perf_counter()
        try:
            seq_text, ts_text, data = payload.split(b" ", 2)
            seq, ts_ms = int(seq_text), int(ts_text)
        except ValueError:
            self.metrics.broker_error()
            self.log.warning("broker_bad_payload", room=room, size=len(payload))
            return
        self.hub.deliver(room, seq, ts_ms, data, started)


async def _close_quietly(pubsub: Any) -> None:
    # The connection is being abandoned after an error: whatever closing it
    # raises tells us nothing new.
    with contextlib.suppress(RedisError, OSError):
        await pubsub.aclose()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
