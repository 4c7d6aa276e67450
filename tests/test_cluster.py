"""The Redis Cluster broker: sharded pub/sub on a real 3-master, 3-replica cluster.

Six real ``redis-server --cluster-enabled yes`` on loopback, joined by
``redis-cli --cluster create`` (:func:`redisserver.redis_cluster`). Rooms are
picked so that every shard holds some; two gateways share them. What is
checked is what a member relies on, across a master killed with SIGKILL:

- every member sees one order with consecutive ``seq`` while the cluster is
  healthy, whichever shard the room lives on;
- a master's death and its replica's promotion need no gateway restart:
  publishing resumes, subscriptions move on their own;
- ``seq`` never goes backwards for a member; what was published while a
  room had no master shows as a gap; every publication acknowledged before
  the kill, or after the gateways are subscribed on the new master, is
  delivered to every member;
- a publication in flight gets ``outcome_unknown`` or ``unavailable``, never
  a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import RunningGateway, running_gateway
from redis.crc import key_slot
from redisserver import RedisCluster
from rules_support import Peer, api
from support import GatewayProcess, eventually, http_get, wait_until

from rtgateway.client import Client, ServerError
from rtgateway.cluster import room_slot
from rtgateway.config import ConfigError, load

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

SETTINGS = {
    "publish_requires_join": "false",
    # Publishers here send hundreds of messages in a burst.
    "rate_limit_msgs_per_s": "10000",
    "rate_limit_burst": "10000",
}


def rooms_per_master(cluster: RedisCluster, per_master: int = 2) -> dict[int, list[str]]:
    """Room names whose channels hash to each master: master port -> rooms."""
    masters = cluster.masters()
    rooms: dict[int, list[str]] = {port: [] for port in masters}
    n = 0
    while any(len(names) < per_master for names in rooms.values()):
        name = f"room-{n}"
        slot = key_slot(("rtg:room:{" + name + "}").encode())
        port = next(p for p, (first, last) in masters.items() if first <= slot <= last)
        if len(rooms[port]) < per_master:
            rooms[port].append(name)
        n += 1
    return rooms


@contextlib.asynccontextmanager
async def two_gateways(cluster: RedisCluster) -> AsyncIterator[tuple[RunningGateway, ...]]:
    settings: dict[str, Any] = {
        "broker_url": cluster.url,
        "publish_requires_join": False,
        "rate_limit_msgs_per_s": 10_000.0,
        "rate_limit_burst": 10_000,
    }
    async with running_gateway(**settings) as one, running_gateway(**settings) as two:
        assert one.metrics.broker_connected and two.metrics.broker_connected
        yield one, two


def assert_consecutive(messages: list[dict[str, Any]]) -> None:
    seqs = [m["seq"] for m in messages]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs


# The URL.


def test_config_accepts_a_cluster_url_and_refuses_a_malformed_one() -> None:
    """RTG_BROKER_URL takes a cluster's seed list; a broken one is a clear error."""
    url = "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"
    assert load({"RTG_BROKER_URL": url}).broker_url == url
    with pytest.raises(ConfigError, match="RTG_BROKER_URL: expected redis://"):
        load({"RTG_BROKER_URL": "redis+cluster://127.0.0.1"})


# A healthy cluster.


async def test_rooms_on_every_shard_keep_one_order_across_two_gateways(
    redis_cluster: RedisCluster,
) -> None:
    """Members of rooms on all three masters, on two gateways: one order, consecutive seq."""
    rooms = [r for names in rooms_per_master(redis_cluster).values() for r in names]
    async with two_gateways(redis_cluster) as gateways:
        members = {
            (room, n): await Client.open(gateways[n].ws_url) for room in rooms for n in (0, 1)
        }
        for (room, _), member in members.items():
            await member.join(room)
        publishers = [await Client.open(gw.ws_url) for gw in gateways]
        # Interleaved from both gateways, without waiting for each other.
        await asyncio.gather(
            *(publishers[i % 2].publish(room, f"{room}-{i}") for i in range(20) for room in rooms)
        )
        for room in rooms:
            streams = [
                [await members[room, n].next_message(timeout=10) for _ in range(20)] for n in (0, 1)
            ]
            assert_consecutive(streams[0])
            assert streams[0] == streams[1]
            assert sorted(m["data"] for m in streams[0]) == sorted(f"{room}-{i}" for i in range(20))
        # Each room is subscribed on its own master only: sharded pub/sub.
        for port, names in rooms_per_master(redis_cluster).items():
            server = redis_cluster.server(port)
            counts = server.command("PUBSUB", "SHARDNUMSUB", *(f"rtg:room:{{{r}}}" for r in names))
            assert list(counts[1::2]) == [2] * len(names), counts
        for client in (*members.values(), *publishers):
            await client.close()


async def test_moderation_reaches_a_connection_on_the_other_gateway_through_the_cluster(
    redis_cluster: RedisCluster,
) -> None:
    """One gateway's API lists rooms on every shard, removes and kicks the other's connection."""
    rooms = [names[0] for names in rooms_per_master(redis_cluster, per_master=1).values()]
    async with two_gateways(redis_cluster) as (one, two):
        assert one.gateway.api is not None
        port = int(one.gateway.api.addresses[0].rsplit(":", 1)[1])
        here, there = await Peer.connect(one.ws_url), await Peer.connect(two.ws_url)
        try:
            for room in rooms:
                for peer in (here, there):
                    await peer.join(room)
            for room in rooms:
                status, body = await api(port, "GET", f"/api/rooms/{room}/connections")
                assert status == 200, body
                ids = [c["conn_id"] for c in body["connections"]]  # type: ignore[index]
                assert ids == sorted([here.conn_id, there.conn_id]), room
            body = {"conn_id": there.conn_id, "room": rooms[0]}
            assert (await api(port, "POST", "/api/remove", body))[0] == 200
            assert (await there.push("removed"))["room"] == rooms[0]
            body = {"conn_id": there.conn_id, "code": 4100, "reason": "elsewhere"}
            assert (await api(port, "POST", "/api/disconnect", body))[0] == 200
            assert await there.closed() == (4100, "elsewhere")
            status, body = await api(port, "GET", f"/api/rooms/{rooms[1]}/connections")
            assert status == 200 and [c["conn_id"] for c in body["connections"]] == [  # type: ignore[index]
                here.conn_id
            ]
        finally:
            await here.close()
            await there.close()


async def test_a_resharded_room_follows_its_slot_to_the_new_master(
    redis_cluster: RedisCluster,
) -> None:
    """A room's slot moved to another master: it is subscribed there, seq continues."""
    by_master = rooms_per_master(redis_cluster, per_master=1)
    (source, [room]), (target, _) = list(by_master.items())[:2]
    channel = f"rtg:room:{{{room}}}"
    async with two_gateways(redis_cluster) as gateways:
        members = [await Client.open(gw.ws_url) for gw in gateways]
        for member in members:
            await member.join(room)
        publisher = await Client.open(gateways[1].ws_url)
        for n in range(5):
            await publisher.publish(room, f"before-{n}")
        await asyncio.to_thread(redis_cluster.move_slot, room_slot(room), source, target)
        # Both gateways resubscribe on the new master by themselves.
        await asyncio.to_thread(
            wait_until,
            lambda: redis_cluster.server(target).command("PUBSUB", "SHARDNUMSUB", channel)[1] == 2,
            20,
            what="both gateways subscribed on the new master",
        )
        seqs = [await publisher.publish(room, f"after-{n}") for n in range(5)]
        for member in members:
            seen = [await member.next_message(timeout=10) for _ in range(10)]
            assert [m["data"] for m in seen] == [
                *(f"before-{n}" for n in range(5)),
                *(f"after-{n}" for n in range(5)),
            ]
            # The counter moved with the slot: no gap, no step back.
            assert_consecutive(seen)
            assert [m["seq"] for m in seen[5:]] == seqs
        assert redis_cluster.server(source).command("PUBSUB", "SHARDNUMSUB", channel)[1] == 0
        for client in (*members, publisher):
            await client.close()


# A master killed mid-run.


def scrape(gw: GatewayProcess) -> dict[str, float]:
    """The gateway's broker series, ``name{labels}`` -> value."""
    _, body, _ = http_get(f"http://{gw.host}:{gw.port}/metrics")
    series = re.findall(r"^(rtgateway_broker_\S+) (\S+)$", body, re.MULTILINE)
    return {name: float(value) for name, value in series}


def subscribed_everywhere(gw: GatewayProcess, dead: int | None = None) -> bool:
    """Every master the gateway knows is connected, and the dead one is not among them."""
    series = scrape(gw)
    nodes = [name for name in series if name.startswith("rtgateway_broker_node_connected")]
    return (
        series.get("rtgateway_broker_connected") == 1.0
        and len(nodes) == 3
        and not any(f':{dead}"' in name for name in nodes)
    )


def subscribed_again(gw: GatewayProcess, killed: int) -> None:
    """Wait until ``gw`` is subscribed on every master, the promoted one included."""
    try:
        wait_until(lambda: subscribed_everywhere(gw, killed), 30)
    except AssertionError:
        raise AssertionError(
            f"not subscribed on the new master: {scrape(gw)}\n" + "\n".join(gw.lines[-30:])
        ) from None


class Run:
    """Publishers that publish one after another in each room, recording every answer."""

    def __init__(self) -> None:
        self.phase = "before"  # "before" the kill, "during" the failover, "after" it
        self.answers: dict[str, tuple[str, str, int]] = {}  # data -> (answer, phase, seq)
        self.stop = asyncio.Event()

    async def publish(self, client: Client, room: str, tag: str) -> None:
        n = 0
        while not self.stop.is_set():
            data, phase = f"{tag}-{n}", self.phase
            n += 1
            try:
                # An answer, whatever it is, within the broker timeout: never a hang.
                async with asyncio.timeout(10):
                    seq = await client.publish(room, data)
            except ServerError as exc:
                self.answers[data] = (exc.code, phase, 0)
            else:
                # Acknowledged before the kill, or sent after the recovery.
                self.answers[data] = ("ack", self.phase if phase != "after" else phase, seq)

    def acked(self, room: str, phase: str) -> int:
        return sum(
            1
            for data, (answer, when, _) in self.answers.items()
            if data.startswith(room + "/") and answer == "ack" and when == phase
        )


async def test_killed_master_fails_over_without_losing_what_was_acknowledged(
    redis_cluster: RedisCluster,
) -> None:
    """SIGKILL a master mid-run: publishing resumes, seq never goes back, acks are delivered."""
    by_master = rooms_per_master(redis_cluster)
    rooms = [r for names in by_master.values() for r in names]
    killed = next(iter(by_master))
    env = {f"RTG_{k.upper()}": v for k, v in SETTINGS.items()}
    env |= {"RTG_BROKER_URL": redis_cluster.url, "RTG_BROKER_TIMEOUT_S": "1"}
    with GatewayProcess(env) as one, GatewayProcess(env) as two:
        gateways = (one, two)
        for gw in gateways:
            await asyncio.to_thread(wait_until, lambda g=gw: subscribed_everywhere(g), 20)
        urls = [f"ws://{gw.host}:{gw.port}/ws" for gw in gateways]
        members = {(room, n): await Client.open(urls[n]) for room in rooms for n in (0, 1)}
        for (room, _), member in members.items():
            await member.join(room)
        publishers = [await Client.open(url) for url in urls for _ in rooms]
        run = Run()
        loops = [
            asyncio.create_task(run.publish(publishers[n * len(rooms) + i], room, f"{room}/{n}"))
            for n in (0, 1)
            for i, room in enumerate(rooms)
        ]
        try:
            await eventually(lambda: all(run.acked(r, "before") >= 10 for r in rooms))
            run.phase = "during"
            redis_cluster.kill(killed)
            await asyncio.to_thread(wait_until, lambda: redis_cluster.promoted(killed), 30)
            for gw in gateways:
                await asyncio.to_thread(subscribed_again, gw, killed)
            run.phase = "after"
            await eventually(lambda: all(run.acked(r, "after") >= 10 for r in rooms))
        finally:
            run.stop.set()
            await asyncio.gather(*loops)
        # A last publication per room: once a member has it, it has all before it.
        for room in rooms:
            await publishers[0].publish(room, f"{room}/end")
        for (room, n), member in members.items():
            seen = []
            while not seen or seen[-1]["data"] != f"{room}/end":
                seen.append(await member.next_message(timeout=10))
            seqs = [m["seq"] for m in seen]
            assert seqs == sorted(set(seqs)), f"seq went backwards in {room} on gateway {n}"
            delivered = {m["data"]: m["seq"] for m in seen}
            for data, (answer, phase, seq) in run.answers.items():
                if not data.startswith(room + "/"):
                    continue
                if answer == "ack" and phase in ("before", "after"):
                    assert delivered.get(data) == seq, (room, n, data, phase)
                if answer == "unavailable":
                    assert data not in delivered, (room, n, data)  # not published means not
            if room not in by_master[killed]:
                # The other shards went on as if nothing happened: no gap.
                assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (room, seqs)
        answers = {answer for answer, _, _ in run.answers.values()}
        assert answers <= {"ack", "unavailable", "outcome_unknown"}, answers
        # The killed master's rooms had publications that could not be taken.
        assert answers & {"unavailable", "outcome_unknown"}, answers
        for client in (*members.values(), *publishers):
            await client.close()


async def test_a_hung_master_gets_answers_not_hangs_and_rejoins_as_a_replica(
    redis_cluster: RedisCluster,
) -> None:
    """A master frozen (SIGSTOP): answers in time, failover, and thawed it is a replica."""
    by_master = rooms_per_master(redis_cluster, per_master=1)
    frozen = next(iter(by_master))
    [room] = by_master[frozen]
    async with two_gateways(redis_cluster) as gateways:
        member = await Client.open(gateways[0].ws_url)
        await member.join(room)
        publisher = await Client.open(gateways[1].ws_url)
        assert await publisher.publish(room, "before") == 1
        redis_cluster.server(frozen).freeze()
        try:
            answers = []
            for n in range(3):
                try:
                    async with asyncio.timeout(10):  # a hang fails here
                        await publisher.publish(room, f"frozen-{n}")
                except ServerError as exc:
                    answers.append(exc.code)
            assert set(answers) <= {"outcome_unknown", "unavailable"} and answers, answers
            await asyncio.to_thread(wait_until, lambda: redis_cluster.promoted(frozen), 30)
            await eventually(
                lambda: all(
                    gw.metrics.broker_connected
                    and f"127.0.0.1:{frozen}" not in gw.metrics.broker_nodes
                    for gw in gateways
                ),
                30,
                what="both gateways on the promoted replica",
            )
            after = await publisher.publish(room, "after")
        finally:
            redis_cluster.server(frozen).thaw()
        seen = [m async for m in _until_data(member, "after")]
        assert seen[0]["data"] == "before"
        assert seen[-1]["seq"] == after > 1
        # Thawed, the old master learns it was replaced and follows the new one.
        await asyncio.to_thread(
            wait_until,
            lambda: redis_cluster.server(frozen).command("INFO", "replication")["role"] == "slave",
            30,
            what="the old master demoted to a replica",
        )
        assert await publisher.publish(room, "later") == after + 1
        assert (await member.next_message(timeout=10))["data"] == "later"
        assert all(len(gw.metrics.broker_nodes) == 3 for gw in gateways)
        for client in (member, publisher):
            await client.close()


async def _until_data(client: Client, data: str) -> AsyncIterator[dict[str, Any]]:
    while True:
        message = await client.next_message(timeout=10)
        yield message
        if message["data"] == data:
            return
