"""publisher.py: script calls pipelined on one connection to a real ``redis-server``.

What each failure means is what the broker tells its clients: never sent is
``BrokerUnavailable`` (retrying cannot duplicate it), sent and not answered
in time is ``BrokerOutcomeUnknown``; ``NOSCRIPT`` is no failure at all. Redis
is stopped, frozen (SIGSTOP) and has its scripts flushed under the publisher.
The only instrument is a connection class that counts the script calls in
each pipelined write; it is redis-py's own connection on a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redisserver import RedisServer
from support import eventually

from rtgateway import publisher as publisher_module
from rtgateway.errors import BrokerOutcomeUnknown, BrokerUnavailable
from rtgateway.publisher import MAX_BATCH, Publisher, Script

pytestmark = [pytest.mark.system, pytest.mark.timeout(60)]

APPEND = Script("return redis.call('RPUSH', KEYS[1], ARGV[1])")
REFUSE = Script("return redis.error_reply('ERR refused by the script')")


class CountingConnection(Connection):
    """redis-py's connection, counting the script calls in each write it sends."""

    writes: list[int]

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        data = b"".join(command) if isinstance(command, list) else command
        if b"EVALSHA" in data:
            self.writes.append(data.count(b"EVALSHA"))
        await super().send_packed_command(command, check_health)


class Harness:
    """A publisher on a real Redis, the failures it reported, and the writes it made."""

    def __init__(self, redis: RedisServer, timeout_s: float = 1.0) -> None:
        self.redis = redis
        self.errors: list[tuple[str, int, bool]] = []  # (error type, calls, sent)
        self.writes: list[int] = []
        self.publisher = Publisher(self._connect, (APPEND, REFUSE), timeout_s, self._failed)

    def _connect(self) -> Connection:
        conn = CountingConnection(
            host="127.0.0.1",
            port=self.redis.port,
            socket_connect_timeout=1.0,
            socket_timeout=self.publisher.timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            protocol=2,
        )
        conn.writes = self.writes
        return conn

    def _failed(self, exc: BaseException, calls: int, sent: bool) -> None:
        self.errors.append((type(exc).__name__, calls, sent))

    def append(self, key: str, value: Any) -> asyncio.Future[Any]:
        return self.publisher.call(APPEND, [key], [value])

    def items(self, key: str) -> list[bytes]:
        return list(self.redis.command("LRANGE", key, 0, -1))


@contextlib.asynccontextmanager
async def running(harness: Harness) -> AsyncIterator[Harness]:
    """The publisher's sender task, cancelled (and its connection closed) at the end."""
    task = asyncio.create_task(harness.publisher.run())
    try:
        yield harness
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_calls_are_answered_in_the_order_they_came(redis_server: RedisServer) -> None:
    """300 calls in flight at once: replies in order, and Redis ran them in that order."""
    async with running(Harness(redis_server)) as h:
        replies = await asyncio.gather(*(h.append("order", n) for n in range(300)))
    assert replies == list(range(1, 301))
    assert h.items("order") == [str(n).encode() for n in range(300)]
    assert h.errors == []


async def test_calls_waiting_together_leave_in_one_write_of_at_most_max_batch(
    redis_server: RedisServer,
) -> None:
    """600 calls queued before the sender runs: two pipelined writes, 512 and 88."""
    h = Harness(redis_server)
    futures = [h.append("batched", n) for n in range(MAX_BATCH + 88)]
    async with running(h):
        await asyncio.gather(*futures)
    assert h.writes == [MAX_BATCH, 88]
    assert len(h.items("batched")) == MAX_BATCH + 88


async def test_after_script_flush_a_call_runs_once_after_the_scripts_are_loaded_again(
    redis_server: RedisServer,
) -> None:
    """NOSCRIPT means not run: the call goes again, is answered, and is no failure."""
    async with running(Harness(redis_server)) as h:
        assert await h.append("flushed", "first") == 1
        redis_server.command("SCRIPT", "FLUSH")
        assert await h.append("flushed", "second") == 2
    assert h.items("flushed") == [b"first", b"second"]
    assert h.errors == []


async def test_a_script_redis_refuses_fails_alone_as_unavailable(
    redis_server: RedisServer,
) -> None:
    """An error reply in the middle of a pipeline costs that call; the others are answered."""
    async with running(Harness(redis_server)) as h:
        first = h.append("mixed", "a")
        refused = h.publisher.call(REFUSE, ["mixed"], [])
        last = h.append("mixed", "b")
        results = await asyncio.gather(first, refused, last, return_exceptions=True)
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], BrokerUnavailable)
    assert h.errors == [("ResponseError", 1, False)]


async def test_a_frozen_redis_gives_outcome_unknown_and_publishing_resumes_after(
    redis_server: RedisServer,
) -> None:
    """Sent, never answered within the timeout: Redis may still run it, so 'unknown'."""
    async with running(Harness(redis_server, timeout_s=0.5)) as h:
        assert await h.append("frozen", "before") == 1
        redis_server.freeze()
        try:
            with pytest.raises(BrokerOutcomeUnknown):
                await h.append("frozen", "during")
        finally:
            redis_server.thaw()
        assert h.errors == [("TimeoutError", 1, True)]
        assert await h.append("frozen", "after") >= 2  # a new connection; "during" may have run


async def test_a_stopped_redis_gives_unavailable_and_a_restarted_one_is_used_again(
    redis_server: RedisServer,
) -> None:
    """The stale connection is noticed before use: nothing sent, so 'not published'."""
    async with running(Harness(redis_server)) as h:
        assert await h.append("stopped", "before") == 1
        redis_server.stop()
        with pytest.raises(BrokerUnavailable):
            await h.append("stopped", "during")
        assert [sent for _, _, sent in h.errors] == [False]
        redis_server.start()  # the same port, empty
        assert await h.append("stopped", "after") == 1
    assert h.items("stopped") == [b"after"]


async def test_a_call_that_waited_past_its_deadline_is_never_sent(
    redis_server: RedisServer,
) -> None:
    """Queued longer than the timeout (Redis was unreachable meanwhile): refused, not run."""
    h = Harness(redis_server, timeout_s=0.05)
    late = h.append("late", "x")
    # Time must pass: the call's own deadline is what is tested.
    await asyncio.sleep(0.1)
    async with running(h):
        with pytest.raises(BrokerUnavailable):
            await late
        assert await h.append("late", "y") == 1
    assert h.items("late") == [b"y"]
    assert h.errors == [("TimeoutError", 1, False)]


async def test_past_max_queued_a_call_is_refused_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Publications beyond the queue's bound get BrokerUnavailable synchronously."""
    monkeypatch.setattr(publisher_module, "MAX_QUEUED", 2)
    publisher = Publisher(Connection, (APPEND,), 1.0, lambda *args: None)
    publisher.call(APPEND, ["k"], [1])
    publisher.call(APPEND, ["k"], [2])
    with pytest.raises(BrokerUnavailable):
        publisher.call(APPEND, ["k"], [3])
    publisher.call(APPEND, ["k"], [4], internal=True)  # the broker's own calls are never refused
    assert len(publisher.queue) == 3


async def test_stopping_the_publisher_fails_what_still_waits_as_unavailable(
    redis_server: RedisServer,
) -> None:
    """Calls never sent when the sender stops are 'not published', and the connection closes."""
    h = Harness(redis_server)
    async with running(h):
        assert await h.append("stop", "sent") == 1
        waiting = [h.append("stop", n) for n in range(3)]
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, BrokerUnavailable) for r in results), results
    assert h.publisher.conn is None or not h.publisher.conn.is_connected
    assert h.items("stop") == [b"sent"]


def test_a_scripts_sha_is_the_sha1_of_its_source() -> None:
    """EVALSHA names a script by the hash Redis computes on SCRIPT LOAD."""
    assert Script("return 1").sha == "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"


async def test_a_call_in_flight_when_the_publisher_stops_is_answered_outcome_unknown(
    redis_server: RedisServer,
) -> None:
    """Sent to a frozen Redis, then the sender stops: the caller is told 'unknown', not left."""
    h = Harness(redis_server, timeout_s=30)
    async with running(h):
        assert await h.append("inflight", "before") == 1
        redis_server.freeze()
        try:
            in_flight = h.append("inflight", "sent")
            await eventually(lambda: h.publisher.sending, what="the call sent")
        finally:
            redis_server.thaw()
    with pytest.raises(BrokerOutcomeUnknown):
        await asyncio.wait_for(in_flight, 5)
