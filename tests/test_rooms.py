"""M2: the room protocol over real sockets."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import RunningGateway, running_gateway
from support import eventually
from websockets.asyncio.client import connect

from rtgateway.client import Client, ServerError


async def expect_error(coro: object, code: str) -> dict[str, object]:
    with pytest.raises(ServerError) as info:
        await coro  # type: ignore[misc]
    assert info.value.code == code
    return info.value.reply


async def test_hello_carries_conn_id_server_and_limits(gateway: RunningGateway) -> None:
    """The hello carries the connection's id, the server and its limits."""
    async with Client.connect(gateway.ws_url) as c:
        assert c.hello["op"] == "hello"
        assert c.hello["server"].startswith("rtgateway/")
        assert len(c.conn_id) >= 8
        limits = c.hello["limits"]
        assert limits["max_message_bytes"] == 65536
        assert limits["max_rooms_per_connection"] == 128
        assert limits["rate_limit_msgs_per_s"] == 100


async def test_join_publish_leave_flow(gateway: RunningGateway) -> None:
    """Join, publish, leave: members, seq, ts and data as documented; a leaver gets no more."""
    async with Client.connect(gateway.ws_url) as a, Client.connect(gateway.ws_url) as b:
        assert (await a.join("lobby"))["members"] == 1
        ack = await b.join("lobby")
        assert ack == {
            "op": "ack",
            "id": ack["id"],
            "room": "lobby",
            "members": 2,
            "policy": "disconnect",
        }
        assert await b.publish("lobby", {"text": "hi"}) == 1
        for c in (a, b):
            msg = await c.next_message(5)
            assert msg["room"] == "lobby" and msg["seq"] == 1 and msg["data"] == {"text": "hi"}
            assert isinstance(msg["ts"], int) and msg["ts"] > 1_600_000_000_000
        left = await a.leave("lobby")
        assert left["room"] == "lobby" and left["members"] == 1
        assert await b.publish("lobby", "only b") == 2
        assert (await b.next_message(5))["data"] == "only b"
        assert a._messages.empty()


async def test_join_twice_is_acknowledged_and_changes_nothing(gateway: RunningGateway) -> None:
    """Joining twice is acknowledged with the first policy and delivers once."""
    async with Client.connect(gateway.ws_url) as c:
        assert (await c.join("r", policy="drop_oldest"))["members"] == 1
        again = await c.join("r", policy="drop_newest")
        assert again["members"] == 1 and again["policy"] == "drop_oldest"
        await c.publish("r", 1)
        assert (await c.next_message(5))["seq"] == 1
        await c.ping()
        assert c._messages.empty()  # delivered once, not twice
        assert gateway.metrics.room_members_current == 1


async def test_every_error_code_over_the_wire() -> None:
    """Every error code the protocol documents reaches the client over a real socket."""
    async with running_gateway(max_rooms_per_connection=2, max_message_bytes=1024) as gw:
        async with Client.connect(gw.ws_url) as c:
            ws = c.ws
            await ws.send("{not json")
            await ws.send('{"op": 5, "id": "r1"}')
            await ws.send('{"op": "dance", "id": "r2"}')
            await ws.send('{"op": "join", "room": "bad room!", "id": "r3"}')
            await ws.send(b"binary")
            await ws.send('{"op":"publish","room":"a","data":"\\ud800","id":"r4"}')
            await c.ping()  # every reply above has arrived once the pong has
            codes = [e["code"] for e in c.errors]
            assert codes == [
                "bad_json",
                "bad_message",
                "unknown_op",
                "invalid_room",
                "bad_message",
                "bad_message",
            ]
            await expect_error(c.leave("nowhere"), "not_joined")
            await expect_error(c.publish("nowhere", 1), "not_joined")
            await c.join("a")
            await c.join("b")
            await expect_error(c.join("c"), "too_many_rooms")
            await expect_error(c.publish("a", "x" * 950), "message_too_large")
            text = gw.gateway.metrics.render().decode()
            assert 'rtgateway_protocol_errors_total{code="not_joined"} 2.0' in text
            assert 'rtgateway_protocol_errors_total{code="bad_json"} 1.0' in text
    async with running_gateway(slow_consumer_policies=("disconnect",)) as gw:
        async with Client.connect(gw.ws_url) as c:
            await expect_error(c.join("a", policy="drop_oldest"), "policy_not_allowed")


async def test_internal_error_answers_internal_and_keeps_the_connection(
    gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault in the hub answers internal and the connection keeps working."""

    def broken(*args: object, **kwargs: object) -> int:
        raise RuntimeError("injected fault")

    async with Client.connect(gateway.ws_url) as c:
        await c.join("r")
        monkeypatch.setattr(gateway.gateway.hub, "submit", broken)
        await expect_error(c.publish("r", 1), "internal")
        monkeypatch.undo()
        assert await c.publish("r", 2) == 1


async def test_publish_without_join_when_allowed() -> None:
    """With publish_requires_join off an outsider publishes; an empty room numbers nothing."""
    async with running_gateway(publish_requires_join=False) as gw:
        async with Client.connect(gw.ws_url) as member, Client.connect(gw.ws_url) as outsider:
            await member.join("r")
            assert await outsider.publish("r", "from outside") == 1
            assert (await member.next_message(5))["data"] == "from outside"
            # Nobody in the room: accepted, nobody sees it, nothing is numbered.
            assert await outsider.publish("empty", 1) == 0


async def test_order_under_concurrent_publishers_is_one_gap_free_sequence(
    gateway: RunningGateway,
) -> None:
    """Five publishers at once: one gap-free sequence for all, each publisher's in order."""
    members = [await Client.open(gateway.ws_url) for _ in range(10)]
    for m in members:
        await m.join("order")

    async def publisher(c: Client) -> None:
        for i in range(50):
            await c.publish_nowait("order", [c.conn_id, i])

    await asyncio.gather(*(publisher(c) for c in members[:5]))
    views = []
    for m in members:
        msgs = [await m.next_message(10) for _ in range(250)]
        views.append([(x["seq"], tuple(x["data"])) for x in msgs])
    assert [seq for seq, _ in views[0]] == list(range(1, 251))
    assert all(v == views[0] for v in views)
    # Each publisher's own messages stay in the order it sent them.
    for c in members[:5]:
        mine = [data[1] for _, data in views[0] if data[0] == c.conn_id]
        assert mine == list(range(50))
    for m in members:
        await m.close()


async def test_rooms_are_removed_when_their_last_member_disconnects(
    gateway: RunningGateway,
) -> None:
    """Rooms go when their last member disconnects; the gauges return to 0."""
    clients = [await Client.open(gateway.ws_url) for _ in range(5)]
    for i, c in enumerate(clients):
        await c.join("shared")
        await c.join(f"own-{i}")
    assert gateway.metrics.rooms_current == 6
    assert gateway.metrics.room_members_current == 10
    for c in clients:
        await c.close()
    await eventually(lambda: gateway.metrics.rooms_current == 0, what="every room closed")
    assert gateway.metrics.room_members_current == 0
    assert gateway.gateway.hub.rooms == {}


async def test_room_of_1000_members_each_receives_every_message_once(
    gateway: RunningGateway,
) -> None:
    """In a room of 1000 members each receives every message once, in order."""
    members = []
    for _ in range(1000):
        c = await Client.open(gateway.ws_url)
        members.append(c)
    await asyncio.gather(*(m.join("big") for m in members))
    for i in range(10):
        await members[i].publish("big", i)
    for m in members:
        seqs = [(await m.next_message(20))["seq"] for _ in range(10)]
        assert seqs == list(range(1, 11))
    await members[0].ping()
    assert all(m._messages.empty() for m in members)
    assert gateway.metrics.deliveries == 10_000
    await asyncio.gather(*(m.close() for m in members))


async def test_invalid_input_never_costs_another_member_its_connection(
    gateway: RunningGateway,
) -> None:
    """A member's invalid input costs it an error, never another member's connection."""
    async with Client.connect(gateway.ws_url) as bad, Client.connect(gateway.ws_url) as good:
        await bad.join("r")
        await good.join("r")
        for payload in (
            '{"op":"publish","room":"r","data":"\\ud800"}',
            '{"op":"publish","room":"r","data":' + "[" * 20_000 + "]" * 20_000 + "}",
            '{"op":"publish","room":"r","data":' + "9" * 5000 + "}",
            '{"op":"publish","room":"r","data":NaN}',
        ):
            await bad.ws.send(payload)
        await bad.publish("r", "fine")
        msg = await good.next_message(5)
        assert msg["data"] == "fine" and msg["seq"] == 1
        assert [e["code"] for e in bad.errors] == [
            "bad_message",
            "bad_json",
            "bad_json",
            "bad_json",
        ]
        assert (await good.ping())["op"] == "pong"


async def test_joins_and_publishes_during_a_drain_get_draining() -> None:
    """Joins sent while the gateway drains get draining."""
    async with running_gateway(drain_window_s=2.0) as gw:
        clients = [await Client.open(gw.ws_url) for _ in range(60)]
        stop_task = asyncio.create_task(gw.gateway.stop())
        await eventually(lambda: gw.gateway.state.draining, what="the drain started")
        replies = await asyncio.gather(*(c.join("late") for c in clients), return_exceptions=True)
        codes = {r.code for r in replies if isinstance(r, ServerError)}
        assert codes == {"draining"}
        await stop_task


async def test_app_level_ping_gets_pong(gateway: RunningGateway) -> None:
    """A protocol ping gets its pong with its id."""
    async with connect(gateway.ws_url) as ws:
        await ws.recv()
        await ws.send('{"op":"ping","id":"p1"}')
        assert json.loads(await ws.recv()) == {"op": "pong", "id": "p1"}
