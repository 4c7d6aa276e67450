"""Publications between processes and hosts through Redis pub/sub.

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
- **Publications** (:class:`_Publisher`). Script calls wait in one queue and
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

While Redis is down, publishes and joins of new rooms get ``unavailable`` at
once, connections keep being served, and :meth:`RedisBroker.run` reconnects
with jittered exponential backoff, restores the counters and subscribes to
every local room again.

This module must not know about connections or sockets; it talks to the
:class:`~rtgateway.rooms.Hub` only through its methods.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import math
import random
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from .rooms import BrokerOutcomeUnknown, BrokerUnavailable

if TYPE_CHECKING:
    from .metrics import Metrics
    from .outbox import Flusher
    from .rooms import Hub

__all__ = ["PUBLISH_SCRIPT", "RESTORE_SCRIPT", "RedisBroker", "parse_redis_url"]

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

SEQ_KEY = "rtg:seq:"
CHANNEL = "rtg:room:"
CONNECT_TIMEOUT_S = 1.0
KEEPALIVE_INTERVAL_S = 1.0  # PING the subscription connection when it was this quiet
KEEPALIVE_TIMEOUT_S = 3.0  # nothing at all from Redis for this long: the connection is lost
KEEPALIVE_LATE_S = 0.5  # a keepalive tick later than this: the loop was busy, not Redis silent
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0
MAX_BATCH = 512  # script calls per pipelined write
MAX_QUEUED = 65536  # publications waiting for Redis, beyond which they are refused
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


class BrokerStalled(Exception):
    """Redis answered nothing on the subscription connection for too long."""


class _Script:
    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


PUBLISH = _Script(PUBLISH_SCRIPT)
RESTORE = _Script(RESTORE_SCRIPT)


class _Call:
    """One script call waiting for Redis; ``future`` gets the reply."""

    __slots__ = ("args", "deadline", "future", "keys", "script")

    def __init__(
        self,
        script: _Script,
        keys: Sequence[str],
        args: Sequence[Any],
        deadline: float,
        future: asyncio.Future[Any],
    ) -> None:
        self.script = script
        self.keys = keys
        self.args = args
        self.deadline = deadline
        self.future = future

    def command(self) -> tuple[Any, ...]:
        return ("EVALSHA", self.script.sha, len(self.keys), *self.keys, *self.args)

    def resolve(self, reply: Any) -> None:
        if not self.future.done():
            self.future.set_result(reply)

    def fail(self, exc: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


def _consume(future: asyncio.Future[Any]) -> None:
    # A call nobody awaits (a restore): its failure is already counted.
    if not future.cancelled():
        future.exception()


class _Publisher:
    """Script calls to Redis on one connection, pipelined in the order they came."""

    def __init__(
        self,
        connect: Callable[[], Connection],
        timeout_s: float,
        on_error: Callable[[BaseException, int, bool], None],
    ) -> None:
        self.connect = connect
        self.timeout_s = timeout_s
        self.on_error = on_error  # (error, calls failed, whether they were sent)
        self.queue: collections.deque[_Call] = collections.deque()
        self.wake = asyncio.Event()
        self.conn: Connection | None = None
        self.stale = False  # replace the connection before its next use
        self.sending: list[_Call] = []

    def call(
        self, script: _Script, keys: Sequence[str], args: Sequence[Any], *, internal: bool = False
    ) -> asyncio.Future[Any]:
        """Queue one call; the future gets its reply or a broker exception."""
        if not internal and len(self.queue) >= MAX_QUEUED:
            raise BrokerUnavailable("too many publications waiting for redis")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        deadline = loop.time() + self.timeout_s
        self.queue.append(_Call(script, keys, args, deadline, future))
        self.wake.set()
        return future

    def reset(self) -> None:
        """Redis restarted or was lost: the next call connects afresh."""
        self.stale = True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self.queue:
                    self.wake.clear()
                    await self.wake.wait()
                batch = self._take(loop.time())
                if not batch:
                    continue
                try:
                    await self._execute(batch)
                except Exception as exc:
                    # A bug costs this batch, not publishing for good.
                    for call in batch:
                        call.fail(BrokerOutcomeUnknown("the gateway failed to publish"))
                    self.on_error(exc, len(batch), True)
                    await self._drop()
        finally:
            gone = BrokerUnavailable("the gateway is stopping")
            for call in (*self.sending, *self.queue):
                call.fail(gone)
            self.queue.clear()
            if self.conn is not None:
                await self.conn.disconnect(nowait=True)

    def _take(self, now: float) -> list[_Call]:
        batch: list[_Call] = []
        expired = 0
        while self.queue and len(batch) < MAX_BATCH:
            call = self.queue.popleft()
            if call.future.done():
                continue  # its publisher went away
            if now > call.deadline:
                call.fail(BrokerUnavailable("redis was not reachable in time"))
                expired += 1
                continue
            batch.append(call)
        if expired:
            self.on_error(TimeoutError("not sent in time"), expired, False)
        return batch

    async def _execute(self, batch: list[_Call]) -> None:
        try:
            conn = await self._connection()
        except (RedisError, OSError, TimeoutError) as exc:
            for call in batch:
                call.fail(BrokerUnavailable("redis is not reachable"))
            self.on_error(exc, len(batch), False)
            return
        loop = asyncio.get_running_loop()
        self.sending = batch
        answered = 0
        again: list[_Call] = []
        try:
            commands = conn.pack_commands(call.command() for call in batch)
            await conn.send_packed_command(commands, check_health=False)
            deadline = loop.time() + self.timeout_s
            for call in batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError("redis did not answer in time")
                try:
                    reply = await conn.read_response(timeout=remaining)
                except NoScriptError:
                    again.append(call)  # not run: the scripts were flushed
                except ResponseError as exc:
                    # The script failed on the server before it published
                    # (out of memory, busy): not published.
                    call.fail(BrokerUnavailable("redis refused the publication"))
                    self.on_error(exc, 1, False)
                else:
                    if reply is None:
                        raise TimeoutError("redis did not answer in time")
                    call.resolve(reply)
                answered += 1
        except (RedisError, OSError, TimeoutError) as exc:
            unanswered = batch[answered:]
            for call in unanswered:
                call.fail(BrokerOutcomeUnknown("redis did not confirm the publication"))
            self.on_error(exc, len(unanswered), True)
            await self._drop()
        finally:
            self.sending = []
        if again:
            self.stale = True  # load the scripts again
            self.queue.extendleft(reversed(again))

    async def _connection(self) -> Connection:
        conn = self.conn
        if conn is not None and (self.stale or not conn.is_connected or await _dirty(conn)):
            await self._drop()
            conn = None
        if conn is None:
            conn = self.connect()
            try:
                await conn.connect()  # type: ignore[no-untyped-call]
                await _load_scripts(conn, (PUBLISH, RESTORE))
            except BaseException:
                await conn.disconnect(nowait=True)
                raise
            self.conn = conn
            self.stale = False
        return conn

    async def _drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.disconnect(nowait=True)


async def _dirty(conn: Connection) -> bool:
    """Whether an idle connection has something unexpected: data, or the server's FIN."""
    try:
        return bool(await conn.can_read())
    except (RedisError, OSError):
        return True


async def _load_scripts(conn: Connection, scripts: Iterable[_Script]) -> None:
    scripts = list(scripts)
    commands = conn.pack_commands(("SCRIPT", "LOAD", s.source) for s in scripts)
    await conn.send_packed_command(commands, check_health=False)
    for script in scripts:
        sha = await conn.read_response()
        if sha.decode() != script.sha:
            raise RedisError("redis hashed a script differently")


class RedisBroker:
    """Numbers publications in Redis and delivers what Redis sends back."""

    def __init__(
        self,
        hub: Hub,
        url: str,
        metrics: Metrics,
        log: Any,
        *,
        timeout_s: float = 1.0,
        room_ttl_s: float = 600.0,
        flusher: Flusher | None = None,
    ) -> None:
        self.hub = hub
        self.flusher = flusher  # paces deliveries that fill outboxes (outbox.py)
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
        self.publisher = _Publisher(
            functools.partial(connection, socket_timeout=timeout_s), timeout_s, self._failed
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

    @property
    def available(self) -> bool:
        return self.connected

    def submit(self, room: str, ts_ms: int, data: bytes, started: float) -> Awaitable[int]:
        if not self.connected:
            raise BrokerUnavailable("redis is not connected")
        floor = self.hub.seq(room)
        args = (floor, ts_ms, data, self.room_ttl_s)
        return self.publisher.call(PUBLISH, (SEQ_KEY + room, CHANNEL + room), args)

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
                self.metrics.broker_error()
                if self.connected or failures == 0:
                    self.log.warning("broker_disconnected", url=self.url, error=_describe(exc))
            except* Exception:
                # A bug must not end publishing for good: log it, start over.
                self.metrics.broker_error()
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

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        self.metrics.broker_connected = connected
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
                    (subscribe if wanted else unsubscribe).append(CHANNEL + room)
                    self.sent[room] = wanted
                    self.inflight[room] = self.inflight.get(room, 0) + 1
            self.dirty.clear()
            if not subscribe and not unsubscribe:
                continue
            self.live.difference_update(channel[len(CHANNEL) :] for channel in unsubscribe)
            commands = [
                (verb, *channels[i : i + CHANNELS_PER_COMMAND])
                for verb, channels in (("SUBSCRIBE", subscribe), ("UNSUBSCRIBE", unsubscribe))
                for i in range(0, len(channels), CHANNELS_PER_COMMAND)
            ]
            await conn.send_packed_command(conn.pack_commands(commands), check_health=False)

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
        prefix = len(CHANNEL)
        while True:
            reply = await conn.read_response()
            self.last_seen = loop.time()
            if not isinstance(reply, list) or len(reply) < 3:
                continue  # PONG
            kind, channel = reply[0], reply[1]
            if kind == b"message":
                self._deliver(channel[prefix:].decode("ascii"), reply[2])
                # Messages already read are handed over without yielding: a
                # burst of heavy ones is spread over loop iterations.
                if self.flusher is not None and self.flusher.heavy:
                    await self.flusher.relieve()
            elif kind == b"subscribe":
                self._confirmed(channel[prefix:].decode("ascii"), True)
            elif kind == b"unsubscribe" and channel is not None:
                self._confirmed(channel[prefix:].decode("ascii"), False)

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
            self.metrics.broker_error()
            self.log.warning("broker_bad_payload", room=room, size=len(payload))
            return
        if seq <= self.hub.seq(room):
            # Numbered by a counter that was lost: delivering it would send
            # ``seq`` backwards. Put the counter back; what is dropped shows
            # as a gap.
            self.metrics.broker_stale += 1
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
        return self.publisher.call(RESTORE, (SEQ_KEY + room,), args, internal=True)

    def _failed(self, exc: BaseException, count: int, sent: bool) -> None:
        """The publisher failed ``count`` calls: one log line, the count in /metrics."""
        self.metrics.broker_errors += count
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


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
