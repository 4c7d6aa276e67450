"""The Redis broker under churn and faults: nothing acknowledged is lost, ``seq`` never lies.

Two in-process gateways ("two hosts") share a real ``redis-server``; clients
are real WebSocket clients on loopback. Redis is stopped, restarted empty,
flushed and frozen (SIGSTOP) in the middle of a run. What every test checks
is the promise a member relies on:

- a join is acknowledged once its worker's subscription is confirmed, so every
  publication made after the ack reaches the member, from any host;
- ``unavailable`` means *not published*: a retry cannot duplicate it;
  ``outcome_unknown`` is the answer when Redis took the publication but did
  not confirm it in time;
- ``seq`` never goes backwards for a member, and a gap is a real loss;
- a healthy Redis means working publishes, however many are in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import RunningGateway, running_gateway
from redisserver import RedisServer
from support import wait_until

from rtgateway.client import Client, ServerError

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

SEQ_KEY = "rtg:seq:"
CHANNEL = "rtg:room:"


@contextlib.asynccontextmanager
async def two_hosts(
    redis: RedisServer, **changes: Any
) -> AsyncIterator[tuple[RunningGateway, RunningGateway]]:
    """Two gateways on one Redis, as two hosts would be; publishing needs no join."""
    settings = {
        "broker_url": redis.url,
        "publish_requires_join": False,
        # Publishers here send hundreds of messages in a burst.
        "rate_limit_msgs_per_s": 10_000.0,
        "rate_limit_burst": 10_000,
        **changes,
    }
    async with running_gateway(**settings) as one, running_gateway(**settings) as two:
        assert one.metrics.broker_connected and two.metrics.broker_connected
        yield one, two


async def restart_empty(redis: RedisServer, *gateways: RunningGateway) -> None:
    """Restart Redis without its data; wait until every gateway has reconnected."""
    before = [gw.metrics.broker_reconnects for gw in gateways]
    redis.restart_empty()
    await asyncio.to_thread(
        wait_until,
        lambda: all(
            gw.metrics.broker_connected and gw.metrics.broker_reconnects > n
            for gw, n in zip(gateways, before, strict=True)
        ),
        30,
        what="every gateway reconnected to the restarted redis",
    )


async def connected_again(*gateways: RunningGateway) -> None:
    """Wait until every gateway is connected to Redis again (after a restart)."""
    await asyncio.to_thread(
        wait_until,
        lambda: all(gw.metrics.broker_connected for gw in gateways),
        30,
        what="every gateway connected to redis",
    )


async def disconnected(gateway: RunningGateway) -> None:
    """Wait until the gateway has noticed that Redis is gone."""
    await asyncio.to_thread(
        wait_until, lambda: not gateway.metrics.broker_connected, 20, what="redis noticed gone"
    )


async def messages_until(client: Client, data: Any, timeout: float = 10) -> list[dict[str, Any]]:
    """Messages up to and including the first one carrying ``data``."""
    seen = []
    async with asyncio.timeout(timeout):
        while True:
            message = await client.next_message()
            seen.append(message)
            if message["data"] == data:
                return seen


async def drain_messages(client: Client, quiet_s: float = 0.3) -> list[dict[str, Any]]:
    """Whatever messages arrive until none has come for ``quiet_s``."""
    seen = []
    while True:
        try:
            seen.append(await client.next_message(timeout=quiet_s))
        except TimeoutError:
            return seen


def numsub(redis: RedisServer, rooms: list[str]) -> dict[str, int]:
    reply = redis.command("PUBSUB", "NUMSUB", *(CHANNEL + room for room in rooms))
    pairs = zip(reply[::2], reply[1::2], strict=True)
    return {channel.decode()[len(CHANNEL) :]: int(count) for channel, count in pairs}


# 1. Subscription state follows what Redis really subscribed.


async def test_concurrent_joins_of_fresh_rooms_are_all_subscribed(
    redis_server: RedisServer,
) -> None:
    """300 clients join 300 new rooms over half a second, each then publishes: none is lost."""
    async with two_hosts(redis_server) as (one, two):
        rooms = [f"fresh-{i}" for i in range(300)]
        members = await asyncio.gather(*(Client.open(one.ws_url) for _ in rooms))
        rng = random.Random(16)

        async def join_and_publish(member: Client, room: str) -> None:
            # Joins keep arriving while the gateway's subscriptions are in flight: spreading
            # them over half a second is the point, not a wait for something.
            await asyncio.sleep(rng.uniform(0, 0.5))
            await member.join(room)
            assert await member.publish(room, "own") == 1
            message = await member.next_message(timeout=10)
            assert (message["room"], message["data"]) == (room, "own")

        await asyncio.gather(*(join_and_publish(m, r) for m, r in zip(members, rooms, strict=True)))
        # Redis agrees with the gateway: one subscription per room (host one).
        counts = numsub(redis_server, rooms)
        assert sorted(room for room, n in counts.items() if n != 1) == []
        # Every room receives from the other host too.
        publisher = await Client.open(two.ws_url)
        for room in rooms:
            assert await publisher.publish(room, room) == 2
        for member, room in zip(members, rooms, strict=True):
            message = await member.next_message(timeout=10)
            assert (message["room"], message["seq"], message["data"]) == (room, 2, room)
        for client in (*members, publisher):
            await client.close()


async def test_leaving_and_rejoining_in_a_loop_keeps_the_room_subscribed(
    redis_server: RedisServer,
) -> None:
    """Each rejoin, acknowledged, receives the next publication from the other host."""
    async with two_hosts(redis_server) as (one, two):
        member = await Client.open(one.ws_url)
        publisher = await Client.open(two.ws_url)
        for n in range(100):
            await member.join("churn")
            await publisher.publish("churn", n)
            message = await member.next_message(timeout=10)
            assert message["data"] == n, (n, message)
            await member.leave("churn")
        await asyncio.to_thread(
            wait_until, lambda: numsub(redis_server, ["churn"]) == {"churn": 0}, 5
        )
        await member.close()
        await publisher.close()


# 2. A join is acknowledged once the subscription is live.


async def test_a_publication_right_after_the_join_ack_reaches_the_new_member(
    redis_server: RedisServer,
) -> None:
    """Joined on one host, published on the other at once: 50 fresh rooms, none missed."""
    async with two_hosts(redis_server) as (one, two):
        member = await Client.open(two.ws_url)
        publisher = await Client.open(one.ws_url)
        for n in range(50):
            room = f"new-{n}"
            ack = await member.join(room)
            assert ack["members"] == 1
            await publisher.publish(room, n)
            message = await member.next_message(timeout=10)
            assert (message["room"], message["data"]) == (room, n)
        await member.close()
        await publisher.close()


async def test_a_join_redis_cannot_confirm_gets_unavailable(redis_server: RedisServer) -> None:
    """Redis down: the join is refused with ``unavailable`` and the client is not a member."""
    async with running_gateway(broker_url=redis_server.url) as gw:
        client = await Client.open(gw.ws_url)
        redis_server.stop()
        await disconnected(gw)
        with pytest.raises(ServerError) as refused:
            await client.join("nowhere")
        assert refused.value.code == "unavailable"
        assert gw.gateway.hub.members("nowhere") == 0
        with pytest.raises(ServerError) as not_joined:
            await client.leave("nowhere")
        assert not_joined.value.code == "not_joined"
        await client.close()


# 3. "unavailable" means not published.


async def test_a_publish_redis_took_but_did_not_confirm_is_outcome_unknown(
    redis_server: RedisServer,
) -> None:
    """Redis frozen for 3 s: no publication answered ``unavailable`` is ever delivered."""
    async with two_hosts(redis_server) as (one, two):
        member = await Client.open(one.ws_url)
        await member.join("stall")
        publishers = await asyncio.gather(*(Client.open(one.ws_url) for _ in range(5)))
        await publishers[0].publish("stall", "before")
        assert (await member.next_message(timeout=10))["data"] == "before"
        answers: dict[str, str] = {}

        async def publish(publisher: Client, data: str) -> None:
            try:
                await publisher.publish("stall", data)
            except ServerError as exc:
                answers[data] = exc.code
            else:
                answers[data] = "ack"

        redis_server.freeze()
        started = time.monotonic()
        try:
            # Five publishers at once: all sent to Redis before it answers.
            await asyncio.gather(*(publish(p, f"frozen-{n}") for n, p in enumerate(publishers)))
            # The stall itself: Redis stays frozen for 3 s in all.
            await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - started)))
        finally:
            redis_server.thaw()
        await connected_again(one, two)
        await publishers[0].publish("stall", "after")
        seen = [m["data"] for m in await messages_until(member, "after")]
        delivered_but_refused = [d for d in seen if answers.get(d) == "unavailable"]
        assert delivered_but_refused == [], answers
        # Sent to Redis and not confirmed in time: the outcome is not known.
        assert answers == dict.fromkeys(answers, "outcome_unknown"), answers
        for client in (member, *publishers):
            await client.close()


async def test_a_publish_while_redis_is_known_down_is_unavailable_and_never_delivered(
    redis_server: RedisServer,
) -> None:
    """Redis stopped: ``unavailable`` at once; after the restart it is not published late."""
    async with two_hosts(redis_server) as (one, two):
        member = await Client.open(one.ws_url)
        await member.join("down")
        redis_server.stop()
        await disconnected(one)
        with pytest.raises(ServerError) as refused:
            await member.publish("down", "refused")
        assert refused.value.code == "unavailable"
        redis_server.start()
        await connected_again(one, two)
        assert await member.publish("down", "after") == 1
        assert [m["data"] for m in await messages_until(member, "after")] == ["after"]
        await member.close()


# 4. seq never goes backwards.


async def test_seq_continues_after_redis_restarts_empty(redis_server: RedisServer) -> None:
    """A host without members publishes after the restart: members see 9, not 1."""
    async with two_hosts(redis_server) as (one, two):
        member = await Client.open(one.ws_url)
        await member.join("counted")
        for n in range(8):
            await member.publish("counted", n)
        assert [m["seq"] for m in await messages_until(member, 7)] == list(range(1, 9))
        await restart_empty(redis_server, one, two)
        outsider = await Client.open(two.ws_url)  # no member of "counted" on host two
        assert await outsider.publish("counted", "after") == 9
        message = await member.next_message(timeout=10)
        assert (message["seq"], message["data"]) == (9, "after")
        await member.close()
        await outsider.close()


async def test_a_counter_lost_under_a_live_subscription_shows_as_a_gap(
    redis_server: RedisServer,
) -> None:
    """FLUSHALL (eviction, failover) while subscribed: dropped, never delivered backwards."""
    async with two_hosts(redis_server) as (one, two):
        member = await Client.open(one.ws_url)
        await member.join("flushed")
        for n in range(8):
            await member.publish("flushed", n)
        assert [m["seq"] for m in await messages_until(member, 7)] == list(range(1, 9))
        redis_server.command("FLUSHALL")
        outsider = await Client.open(two.ws_url)
        for n in range(3):
            await outsider.publish("flushed", f"lost-{n}")
        # The member's host drops what was numbered afresh and puts the counter
        # back past what its members saw, counting what it dropped.
        async with asyncio.timeout(10):
            while True:
                seq = await outsider.publish("flushed", "probe")
                if seq > 8:
                    break
        seen = await messages_until(member, "probe")
        seqs = [m["seq"] for m in seen]
        assert all(s > 8 for s in seqs), seqs
        assert seqs == sorted(seqs)
        dropped = one.metrics.broker_stale
        assert dropped >= 1
        assert seqs[-1] - 8 - len(seqs) == dropped  # every missing seq was dropped
        await member.close()
        await outsider.close()


# 5. A healthy Redis means working publishes.


async def test_publishes_work_at_once_after_redis_recovers(redis_server: RedisServer) -> None:
    """Right after the reconnect, 20 concurrent publishes from 20 members all succeed."""
    async with two_hosts(redis_server) as (one, two):
        clients = await asyncio.gather(*(Client.open(one.ws_url) for _ in range(20)))
        await asyncio.gather(*(c.join("recovered") for c in clients))
        await clients[0].publish("recovered", "warm")
        await restart_empty(redis_server, one, two)
        # Time passing is the condition: the report said two seconds after the reconnect.
        await asyncio.sleep(2)
        seqs = await asyncio.gather(*(c.publish("recovered", n) for n, c in enumerate(clients)))
        assert sorted(seqs) == list(range(seqs and min(seqs), min(seqs) + 20))
        for client in clients:
            await client.close()


async def test_hundreds_of_publishes_in_flight_on_one_gateway_all_succeed(
    redis_server: RedisServer,
) -> None:
    """300 publishes at once on one host, healthy Redis: 300 acks, 300 deliveries."""
    async with two_hosts(redis_server) as (one, two):
        member = await Client.open(two.ws_url)
        await member.join("busy")
        publishers = await asyncio.gather(*(Client.open(one.ws_url) for _ in range(300)))
        seqs = await asyncio.gather(*(p.publish("busy", n) for n, p in enumerate(publishers)))
        assert sorted(seqs) == list(range(1, 301))
        got = [await member.next_message(timeout=10) for _ in range(300)]
        assert [m["seq"] for m in got] == list(range(1, 301))
        for client in (member, *publishers):
            await client.close()


# 6. Redis memory is bounded.


async def test_room_counters_live_while_members_do_then_expire(redis_server: RedisServer) -> None:
    """Counters of rooms with members are kept; the others expire after the room TTL."""
    async with two_hosts(redis_server, broker_room_ttl_s=2.0) as (one, two):
        member = await Client.open(one.ws_url)
        await member.join("kept")
        await member.publish("kept", "first")
        outsider = await Client.open(two.ws_url)
        await outsider.publish("empty", "nobody here")  # numbered: members may be elsewhere
        ttl = redis_server.command("TTL", SEQ_KEY + "empty")
        assert 0 < ttl <= 2
        await asyncio.to_thread(
            wait_until, lambda: not redis_server.command("EXISTS", SEQ_KEY + "empty"), 10
        )
        # Three lifetimes later the occupied room still counts on (time passing is the point).
        await asyncio.sleep(6)
        assert await member.publish("kept", "second") == 2
        await member.leave("kept")
        await asyncio.to_thread(
            wait_until, lambda: not redis_server.command("EXISTS", SEQ_KEY + "kept"), 10
        )
        await member.close()
        await outsider.close()
