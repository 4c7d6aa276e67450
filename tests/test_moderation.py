"""Moderation from the backend over real sockets: disconnect, remove from a room, list a room.

The publish API's moderation routes against the gateway in-process (one
worker, no Redis), then with two workers and a real Redis, where the API is
served by worker 0 and the connection may be on worker 1, and with two single
gateways ("hosts") on one Redis, where it is on the other host. Hostile
requests (huge or injected conn_ids, rooms, limits, cursors) against the
gateway as a subprocess: their codes, their counters, and a clean log.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import RunningGateway, running_gateway
from hardening_support import tracebacks
from redisserver import RedisServer
from rules_support import Peer, api, peers_on_each_worker, two_workers, write_rules
from support import GatewayProcess, free_port, http_get, sample_sum

from rtgateway.errors import KICK_CODES


def api_port(gw: RunningGateway) -> int:
    assert gw.gateway.api is not None
    return int(gw.gateway.api.addresses[0].rsplit(":", 1)[1])


async def disconnect(port: int, conn_id: str, **fields: object) -> tuple[int, object]:
    return await api(port, "POST", "/api/disconnect", {"conn_id": conn_id, **fields})


async def remove(port: int, conn_id: str, room: str, **fields: object) -> tuple[int, object]:
    return await api(port, "POST", "/api/remove", {"conn_id": conn_id, "room": room, **fields})


async def listing(port: int, room: str, query: str = "") -> tuple[int, dict[str, object]]:
    status, body = await api(port, "GET", f"/api/rooms/{room}/connections{query}")
    return status, body


def code_of(body: object) -> str:
    assert isinstance(body, dict), body
    return str(body["error"]["code"])


@pytest.fixture(autouse=True)
async def close_peers() -> AsyncIterator[None]:
    """Peers a test left open are closed before its event loop is."""
    yield
    await Peer.close_all()


# One process.


async def test_disconnect_closes_the_connection_with_the_backends_code_and_reason() -> None:
    """The backend's code and reason reach the client, counted as kicked; the room goes on."""
    async with running_gateway() as gw:
        port = api_port(gw)
        target, bystander = await Peer.connect(gw.ws_url), await Peer.connect(gw.ws_url)
        await target.join("lobby")
        await bystander.join("lobby")
        assert target.conn_id.count(".") == 1  # <node>.<token>
        assert target.conn_id.split(".")[0] == bystander.conn_id.split(".")[0]
        status, body = await disconnect(port, target.conn_id, code=4001, reason="spam")
        assert (status, body) == (200, {"conn_id": target.conn_id, "code": 4001, "reason": "spam"})
        assert await target.closed() == (4001, "spam")
        # Counted, and gone: a second disconnect finds nothing.
        await asyncio.to_thread(_wait_kicked, gw, 1)
        status, body = await disconnect(port, target.conn_id)
        assert status == 404 and code_of(body) == "unknown_connection"
        await bystander.settled()
        assert (await bystander.publish("lobby", "still here"))["op"] == "ack"


def _wait_kicked(gw: RunningGateway, count: int) -> None:
    from support import wait_until

    wait_until(lambda: gw.metrics.disconnects["kicked"] == count, 10, what="kicked counted")
    _, text, _ = http_get(gw.url + "/metrics")
    assert sample_sum(text, "rtgateway_disconnects_total", '{reason="kicked"}') == count


async def test_disconnect_defaults_to_4000_without_a_reason() -> None:
    """A disconnect that names no code closes with 4000 and an empty reason."""
    async with running_gateway() as gw:
        target = await Peer.connect(gw.ws_url)
        status, body = await disconnect(api_port(gw), target.conn_id)
        assert (status, body) == (200, {"conn_id": target.conn_id, "code": 4000, "reason": ""})
        assert await target.closed() == (4000, "")


@pytest.mark.parametrize(
    "fields",
    [
        {"code": 3999},
        {"code": 4008},  # the gateway's slow consumer
        {"code": 4500},  # kept for the gateway
        {"code": 1000},
        {"code": True},
        {"code": "4001"},
        {"reason": "x" * 124},
        {"reason": "é" * 62},  # 124 bytes of UTF-8
        {"reason": 5},
    ],
)
async def test_disconnect_refuses_codes_and_reasons_outside_the_documented_range(
    fields: dict[str, object],
) -> None:
    """A code outside 4000-4499 (or 4008), or a reason past 123 bytes, is 400 and closes nothing."""
    async with running_gateway() as gw:
        target = await Peer.connect(gw.ws_url)
        status, body = await disconnect(api_port(gw), target.conn_id, **fields)
        assert status == 400 and code_of(body) == "bad_message", body
        await target.settled()  # still open


async def test_disconnect_accepts_the_whole_documented_range() -> None:
    """Both ends of the code range and a reason of exactly 123 bytes reach the client as sent."""
    assert KICK_CODES[0] == 4000 and KICK_CODES[-1] == 4499 and 4008 not in KICK_CODES
    async with running_gateway() as gw:
        for code, reason in ((4499, "é" * 61), (4009, "x" * 123)):
            target = await Peer.connect(gw.ws_url)
            status, _ = await disconnect(api_port(gw), target.conn_id, code=code, reason=reason)
            assert status == 200
            assert await target.closed() == (code, reason)


async def test_disconnect_of_an_unknown_or_malformed_conn_id() -> None:
    """An unknown conn_id is 404 unknown_connection; a malformed one, or a body without it, 400."""
    async with running_gateway() as gw:
        port = api_port(gw)
        status, body = await disconnect(port, "nosuchnode.nosuchconn")
        assert status == 404 and code_of(body) == "unknown_connection"
        for bad in ("no-dot", "a.b.c", "a b.c", "", "x" * 40 + ".y"):
            status, body = await disconnect(port, bad)
            assert status == 400 and code_of(body) == "bad_message", bad
        status, body = await api(port, "POST", "/api/disconnect", {"code": 4000})
        assert status == 400 and code_of(body) == "bad_message"
        status, body = await api(port, "POST", "/api/disconnect", ["x.y"])
        assert status == 400 and code_of(body) == "bad_message"


async def test_remove_takes_a_member_out_of_a_room_and_tells_it() -> None:
    """A removed member is told, gets no more of the room's publications, may join again."""
    async with running_gateway() as gw:
        port = api_port(gw)
        target, other = await Peer.connect(gw.ws_url), await Peer.connect(gw.ws_url)
        for room in ("lobby", "other"):
            await target.join(room)
            await other.join(room)
        status, body = await remove(port, target.conn_id, "lobby", reason="off topic")
        assert (status, body) == (200, {"conn_id": target.conn_id, "room": "lobby"})
        assert await target.push("removed") == {
            "op": "removed",
            "room": "lobby",
            "reason": "off topic",
        }
        await api(port, "POST", "/api/publish", {"room": "lobby", "data": "after"})
        await api(port, "POST", "/api/publish", {"room": "other", "data": "still"})
        assert (await other.message())["data"] == "after"
        assert (await target.message())["data"] == "still"  # lobby's never came
        assert (await target.request("leave", room="lobby"))["code"] == "not_joined"
        status, body = await remove(port, target.conn_id, "lobby")
        assert status == 404 and code_of(body) == "not_joined"
        # Without a reason, the push has none; a removed client may join again.
        assert (await remove(port, target.conn_id, "other"))[0] == 200
        assert await target.push("removed") == {"op": "removed", "room": "other"}
        assert (await target.join("lobby"))["op"] == "ack"


async def test_remove_refusals() -> None:
    """An unknown connection is 404, a bad room name 400 invalid_room, a missing room 400."""
    async with running_gateway(rooms_file="") as gw:
        port = api_port(gw)
        peer = await Peer.connect(gw.ws_url)
        status, body = await remove(port, "gone.gone", "lobby")
        assert status == 404 and code_of(body) == "unknown_connection"
        status, body = await remove(port, peer.conn_id, "bad room")
        assert status == 400 and code_of(body) == "invalid_room"
        status, body = await api(port, "POST", "/api/remove", {"conn_id": peer.conn_id})
        assert status == 400 and code_of(body) == "bad_message"


async def test_remove_in_a_refused_namespace_is_unknown_namespace(tmp_path: Path) -> None:
    """A removal from a room of a refused namespace is 404 unknown_namespace."""
    rules = write_rules(tmp_path, 'undeclared_namespaces = "refuse"\n')
    async with running_gateway(rooms_file=rules) as gw:
        peer = await Peer.connect(gw.ws_url)
        status, body = await remove(api_port(gw), peer.conn_id, "x:1")
        assert status == 404 and code_of(body) == "unknown_namespace"


async def test_connections_of_a_room_a_page_at_a_time_in_conn_id_order() -> None:
    """A room's members come in conn_id order a page at a time; bad limits and cursors are 400."""
    async with running_gateway() as gw:
        port = api_port(gw)
        peers = [await Peer.connect(gw.ws_url) for _ in range(5)]
        for peer in peers:
            await peer.join("lobby")
        stranger = await Peer.connect(gw.ws_url)  # not in the room
        await stranger.join("elsewhere")
        pages: list[dict[str, object]] = []
        query = "?limit=2"
        while True:
            status, body = await listing(port, "lobby", query)
            assert status == 200, body
            pages.append(body)
            if body["next_cursor"] is None:
                break
            query = f"?limit=2&cursor={body['next_cursor']}"
        assert [len(p["connections"]) for p in pages] == [2, 2, 1]  # type: ignore[arg-type]
        listed = [c for p in pages for c in p["connections"]]  # type: ignore[attr-defined]
        assert [c["conn_id"] for c in listed] == sorted(p.conn_id for p in peers)
        assert all(isinstance(c["joined_at"], int) and c["joined_at"] > 1.6e12 for c in listed)
        assert pages[0]["room"] == "lobby"
        status, body = await listing(port, "empty")
        assert (status, body) == (200, {"room": "empty", "connections": [], "next_cursor": None})
        for query in ("?limit=0", "?limit=1001", "?cursor=bad", "?cursor=a.b&cursor=a.c"):
            status, body = await listing(port, "lobby", query)
            assert status == 400 and code_of(body) == "bad_request", query
        status, body = await listing(port, "bad%20room")
        assert status == 400 and code_of(body) == "invalid_room"
        status, _ = await api(port, "HEAD", "/api/rooms/lobby/connections")
        assert status == 200


# Hostile input to the moderation routes, against the gateway as a subprocess
# (its real log lines, as an operator's journal gets them).

HOSTILE = 'x\n{"event":"injected","log_level":"critical"}\r\n\x1b[2J'
HOSTILE_PATH = "x%0A%7B%22event%22%3A%22injected%22%7D%1B%5B2J"


@pytest.mark.timeout(60)
async def test_hostile_moderation_requests_get_their_codes_counted_and_never_reach_the_log(
    tmp_path: Path,
) -> None:
    """Huge or hostile conn_ids, rooms, limits, cursors: 4xx codes, counted, no trace in the log."""
    port = free_port()
    env = {"RTG_API_ADDR": f"127.0.0.1:{port}", "RTG_ROOMS_FILE": write_rules(tmp_path, "")}
    with GatewayProcess(env) as gw:
        peer = await Peer.connect(gw.ws_url + "/ws")
        await peer.join("lobby")
        cases: list[tuple[str, str, object, int, str]] = [
            ("POST", "/api/disconnect", {"conn_id": "x." + "y" * 60_000}, 400, "bad_message"),
            ("POST", "/api/disconnect", {"conn_id": "x." + "y" * 70_000}, 413, "message_too_large"),
            ("POST", "/api/disconnect", {"conn_id": HOSTILE}, 400, "bad_message"),
            (
                "POST",
                "/api/disconnect",
                b'{"conn_id": "a.b", "code": 1' + b"0" * 5000 + b"}",
                400,
                "bad_json",
            ),
            (
                "POST",
                "/api/disconnect",
                {"conn_id": peer.conn_id, "reason": HOSTILE * 9},
                400,
                "bad_message",
            ),
            (
                "POST",
                "/api/remove",
                {"conn_id": peer.conn_id, "room": HOSTILE},
                400,
                "invalid_room",
            ),
            (
                "POST",
                "/api/remove",
                {"conn_id": peer.conn_id, "room": "r" * 60_000},
                400,
                "invalid_room",
            ),
            ("POST", "/api/remove", {"conn_id": [HOSTILE], "room": "lobby"}, 400, "bad_message"),
            ("GET", f"/api/rooms/{HOSTILE_PATH}/connections", None, 400, "invalid_room"),
            ("GET", "/api/rooms/" + "r" * 4000 + "/connections", None, 400, "invalid_room"),
            ("GET", "/api/rooms/lobby/connections?limit=" + "9" * 5000, None, 400, "bad_request"),
            ("GET", "/api/rooms/lobby/connections?limit=-1", None, 400, "bad_request"),
            (
                "GET",
                f"/api/rooms/lobby/connections?cursor={HOSTILE_PATH}",
                None,
                400,
                "bad_request",
            ),
            ("GET", "/api/rooms/lobby/connections/more", None, 404, "not_found"),
        ]
        for method, path, body, status, code in cases:
            got, answer = await api(port, method, path, body)
            assert (got, code_of(answer)) == (status, code), (path, str(body)[:80])
            assert "injected" not in json.dumps(answer), answer  # not echoed either
        # Still serving the peer, which was never touched.
        await peer.settled()
        assert (await peer.publish("lobby", "still here"))["op"] == "ack"
        _, text, _ = await asyncio.to_thread(http_get, gw.url + "/metrics")
        api_requests = "rtgateway_api_requests_total"
        assert sample_sum(text, api_requests, '{endpoint="/api/disconnect",status="400"}') == 4
        assert sample_sum(text, api_requests, '{endpoint="/api/disconnect",status="413"}') == 1
        assert sample_sum(text, api_requests, '{endpoint="/api/remove",status="400"}') == 3
        connections = '{endpoint="/api/rooms/{room}/connections",status="400"}'
        assert sample_sum(text, api_requests, connections) == 5
        await peer.close()
    assert not tracebacks(gw.lines), tracebacks(gw.lines)[:3]
    assert [line for line in gw.lines if "injected" in line or "\x1b" in line] == []
    assert "yyyyyyyyyy" not in "".join(gw.lines) and "rrrrrrrrrr" not in "".join(gw.lines)


# Two workers and Redis: the API on worker 0 reaches connections on worker 1.


@pytest.mark.system
@pytest.mark.timeout(120)
async def test_moderation_reaches_the_worker_that_holds_the_connection(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two workers, Redis: listing, removal, disconnect reach either worker; no Redis: 503/504."""
    async with two_workers(redis_server, write_rules(tmp_path, "")) as gw:
        port = gw.api_port
        (a0, b0), (a1, b1) = await peers_on_each_worker(gw.ws_url + "/ws", per_worker=2)
        assert a0.conn_id.split(".")[0] != a1.conn_id.split(".")[0]  # one node per worker
        for peer in (a0, b0, a1, b1):
            await peer.join("lobby")
        # The listing asks both workers and merges their members in conn_id order.
        everyone = sorted(p.conn_id for p in (a0, b0, a1, b1))
        status, first = await listing(port, "lobby", "?limit=3")
        assert status == 200, first
        assert [c["conn_id"] for c in first["connections"]] == everyone[:3]  # type: ignore[attr-defined]
        assert first["next_cursor"] == everyone[2]
        status, rest = await listing(port, "lobby", f"?limit=3&cursor={everyone[2]}")
        assert [c["conn_id"] for c in rest["connections"]] == everyone[3:]  # type: ignore[attr-defined]
        assert rest["next_cursor"] is None
        status, body = await listing(port, "nobody-here")
        assert (status, body["connections"]) == (200, [])
        # Remove from the room on worker 1, then on worker 0 (served here).
        for target in (a1, a0):
            status, body = await remove(port, target.conn_id, "lobby", reason="bye")
            assert status == 200, body
            assert (await target.push("removed"))["reason"] == "bye"
            status, body = await remove(port, target.conn_id, "lobby")
            assert status == 404 and code_of(body) == "not_joined"
        status, listed = await listing(port, "lobby")
        assert [c["conn_id"] for c in listed["connections"]] == sorted([b0.conn_id, b1.conn_id])  # type: ignore[attr-defined]
        # Disconnect on worker 1 and on worker 0.
        for target in (b1, b0):
            status, body = await disconnect(port, target.conn_id, code=4003, reason="kicked")
            assert status == 200, body
            assert await target.closed() == (4003, "kicked")
            status, body = await disconnect(port, target.conn_id)
            assert status == 404 and code_of(body) == "unknown_connection"
        # A node nobody is: no subscriber got it.
        status, body = await disconnect(port, "nonode.x")
        assert status == 404 and code_of(body) == "unknown_connection"
        # Without Redis nothing can reach worker 1: unavailable, never a hang.
        redis_server.stop()
        status, body = await disconnect(port, a1.conn_id)
        assert status in (503, 504) and code_of(body) in ("unavailable", "outcome_unknown")
        status, body = await listing(port, "lobby")
        assert status in (503, 504) and code_of(body) in ("unavailable", "outcome_unknown")
        # A connection of worker 0 is still moderated (no broker needed).
        status, body = await disconnect(port, a0.conn_id, code=4004)
        assert status == 200, body
        assert (await a0.closed())[0] == 4004


@pytest.mark.system
@pytest.mark.timeout(60)
async def test_moderation_reaches_a_connection_on_another_host(redis_server: RedisServer) -> None:
    """Two gateways on one Redis: one's API lists, removes and kicks a connection of the other."""
    async with (
        running_gateway(broker_url=redis_server.url) as one,
        running_gateway(broker_url=redis_server.url) as two,
    ):
        here, there = await Peer.connect(one.ws_url), await Peer.connect(two.ws_url)
        for peer in (here, there):
            await peer.join("shared")
        port = api_port(one)
        status, body = await listing(port, "shared")
        assert status == 200, body
        ids = [c["conn_id"] for c in body["connections"]]  # type: ignore[attr-defined]
        assert ids == sorted([here.conn_id, there.conn_id])
        status, _ = await remove(port, there.conn_id, "shared")
        assert status == 200
        assert (await there.push("removed"))["room"] == "shared"
        status, _ = await disconnect(port, there.conn_id, code=4100, reason="elsewhere")
        assert status == 200
        assert await there.closed() == (4100, "elsewhere")
        await asyncio.to_thread(_wait_kicked, two, 1)
        await here.close()
