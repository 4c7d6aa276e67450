"""Room namespaces over real sockets: each rule allows and refuses what it says.

Clients on real websockets connections and the publish API on its real
listener, against the gateway in-process (one worker), then the same rules
with two workers and a real Redis. Every refusal is checked to have done
nothing: a refused publication reaches no member and takes no ``seq``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import RunningGateway, running_gateway
from redisserver import RedisServer
from rules_support import Peer, api, peers_on_each_worker, readme_rules, two_workers, write_rules
from support import ROOT, http_get, sample_sum
from wire import RawConnection

from rtgateway.protocol import ERROR_CODES

RULES = """
undeclared_namespaces = "refuse"

[default]
publish = "clients"

[namespaces.news]
publish = "api"
policies = ["drop_oldest", "disconnect"]
policy = "drop_oldest"

[namespaces.chat]
publish = "members"
max_members = 2

[namespaces.open]
publish = "clients"

[namespaces.inbox]
join = false
publish = "clients"

[namespaces.slow]
publish = "members"
publish_rate_per_s = 0.01
publish_burst = 2
"""


def api_port(gw: RunningGateway) -> int:
    assert gw.gateway.api is not None
    return int(gw.gateway.api.addresses[0].rsplit(":", 1)[1])


@asynccontextmanager
async def gateway(
    tmp_path: Path, text: str = RULES, **changes: Any
) -> AsyncIterator[RunningGateway]:
    async with running_gateway(rooms_file=write_rules(tmp_path, text), **changes) as gw:
        yield gw


async def nothing_published(member: Peer, room: str, port: int) -> None:
    """A refused publication took no seq and reached nobody: the next one is seq 1."""
    status, body = await api(port, "POST", "/api/publish", {"room": room, "data": "marker"})
    assert (status, body) == (200, {"seq": 1})
    assert (await member.message())["data"] == "marker"


@pytest.fixture(autouse=True)
async def close_peers() -> AsyncIterator[None]:
    """Peers a test left open are closed before its event loop is."""
    yield
    await Peer.close_all()


# One worker.


async def test_api_only_namespace_refuses_client_publications(tmp_path: Path) -> None:
    """publish = api: a client's publish is publish_not_allowed, takes no seq; the API's goes."""
    async with gateway(tmp_path) as gw:
        reader, writer = await Peer.connect(gw.ws_url), await Peer.connect(gw.ws_url)
        ack = await reader.join("news:eu")
        assert ack["op"] == "ack" and ack["policy"] == "drop_oldest"
        assert ack["rules"]["publish"] == "api" and ack["rules"]["namespace"] == "news"
        assert (await writer.join("news:eu"))["op"] == "ack"
        for peer in (reader, writer):  # a member or not: refused
            reply = await peer.publish("news:eu", "deploy finished")
            assert reply["code"] == "publish_not_allowed", reply
        await nothing_published(reader, "news:eu", api_port(gw))
        assert (await writer.message())["data"] == "marker"


async def test_members_namespace_takes_members_only(tmp_path: Path) -> None:
    """publish = members: a stranger's publish is not_joined, a member's goes out, the API's too."""
    async with gateway(tmp_path) as gw:
        member, stranger = await Peer.connect(gw.ws_url), await Peer.connect(gw.ws_url)
        assert (await member.join("chat:1"))["rules"]["publish"] == "members"
        assert (await stranger.publish("chat:1", "hi"))["code"] == "not_joined"
        reply = await member.publish("chat:1", "first")
        assert reply["op"] == "ack" and reply["seq"] == 1  # the refused one took no seq
        assert (await member.message())["data"] == "first"
        status, _ = await api(api_port(gw), "POST", "/api/publish", {"room": "chat:1", "data": 2})
        assert status == 200  # the API needs no membership


async def test_clients_namespace_takes_anyone(tmp_path: Path) -> None:
    """publish = clients: a connection that never joined publishes and members get it."""
    async with gateway(tmp_path) as gw:
        member, stranger = await Peer.connect(gw.ws_url), await Peer.connect(gw.ws_url)
        await member.join("open:1")
        reply = await stranger.publish("open:1", "from outside")
        assert reply["op"] == "ack" and reply["seq"] == 1
        assert (await member.message())["data"] == "from outside"


async def test_join_false_namespace_refuses_joins_and_takes_publications(tmp_path: Path) -> None:
    """join = false: a join is join_not_allowed; clients and the API still publish (to nobody)."""
    async with gateway(tmp_path) as gw:
        peer = await Peer.connect(gw.ws_url)
        reply = await peer.join("inbox:7")
        assert reply["code"] == "join_not_allowed", reply
        assert (await peer.request("leave", room="inbox:7"))["code"] == "not_joined"
        assert (await peer.publish("inbox:7", "to the backend"))["seq"] == 0  # nobody in it
        status, body = await api(
            api_port(gw), "POST", "/api/publish", {"room": "inbox:7", "data": 1}
        )
        assert (status, body) == (200, {"seq": 0})


async def test_undeclared_namespace_is_refused_to_clients_and_to_the_api(tmp_path: Path) -> None:
    """Refused undeclared namespaces: joins, publishes, batches, room routes: unknown_namespace."""
    async with gateway(tmp_path) as gw:
        peer = await Peer.connect(gw.ws_url)
        assert (await peer.join("other:1"))["code"] == "unknown_namespace"
        assert (await peer.publish("other:1", 1))["code"] == "unknown_namespace"
        port = api_port(gw)
        status, body = await api(port, "POST", "/api/publish", {"room": "other:1", "data": 1})
        assert status == 404 and body["error"]["code"] == "unknown_namespace"
        status, body = await api(
            port,
            "POST",
            "/api/publish/batch",
            [{"room": "lobby", "data": 1}, {"room": "x:y", "data": 2}],
        )
        assert status == 404 and body["error"] == {
            **body["error"],
            "code": "unknown_namespace",
            "index": 1,
        }
        for path in ("/api/rooms/other:1", "/api/rooms/other:1/connections"):
            status, body = await api(port, "GET", path)
            assert status == 404 and body["error"]["code"] == "unknown_namespace", path
        # A room without ":" is in the default namespace, which is declared.
        assert (await peer.join("lobby"))["op"] == "ack"


async def test_undeclared_namespace_takes_the_default_rules_unless_refused(tmp_path: Path) -> None:
    """By default an undeclared namespace gets [default]'s rules, and a declared one its own."""
    text = '[default]\npublish = "api"\n[namespaces.chat]\n'
    async with gateway(tmp_path, text) as gw:
        peer = await Peer.connect(gw.ws_url)
        ack = await peer.join("other:1")
        assert ack["op"] == "ack" and ack["rules"]["namespace"] == "default"
        assert (await peer.publish("other:1", 1))["code"] == "publish_not_allowed"
        assert (await peer.publish("lobby", 1))["code"] == "publish_not_allowed"
        assert (await peer.join("chat:1"))["rules"]["publish"] == "members"


async def test_max_members_refuses_the_join_past_it_with_room_full(tmp_path: Path) -> None:
    """max_members = 2: the third join is room_full, per room, and a leave frees a place."""
    async with gateway(tmp_path) as gw:
        a, b, c = [await Peer.connect(gw.ws_url) for _ in range(3)]
        first = await a.join("chat:1")
        assert first["rules"]["max_members"] == 2
        assert first["rules"]["max_members_per"] == "process"
        assert (await b.join("chat:1"))["members"] == 2
        refused = await c.join("chat:1")
        assert refused["code"] == "room_full", refused
        assert (await c.publish("chat:1", "x"))["code"] == "not_joined"  # not a member
        assert (await c.join("chat:2"))["op"] == "ack"  # per room
        await a.request("leave", room="chat:1")
        assert (await c.join("chat:1"))["members"] == 2  # a place came free


async def test_policies_of_a_namespace_are_the_ones_a_join_may_name(tmp_path: Path) -> None:
    """A join may name only its namespace's policies and gets its default without one."""
    async with gateway(tmp_path) as gw:
        peer = await Peer.connect(gw.ws_url)
        refused = await peer.join("news:1", policy="drop_newest")
        assert refused["code"] == "policy_not_allowed", refused
        assert (await peer.join("news:1", policy="disconnect"))["policy"] == "disconnect"
        assert (await peer.join("lobby", policy="drop_newest"))["policy"] == "drop_newest"


async def test_publish_rate_of_a_namespace_is_per_connection_and_namespace(
    tmp_path: Path,
) -> None:
    """A namespace's publish rate refuses past its burst, per connection and per namespace."""
    async with gateway(tmp_path) as gw:
        a, b = await Peer.connect(gw.ws_url), await Peer.connect(gw.ws_url)
        for peer in (a, b):
            assert (await peer.join("slow:1"))["rules"]["publish_rate_per_s"] == 0.01
            await peer.join("chat:1")
        assert (await a.publish("slow:1", 1))["op"] == "ack"
        assert (await a.publish("slow:1", 2))["op"] == "ack"
        refused = await a.publish("slow:1", 3)
        assert refused["code"] == "rate_limited" and refused["retry_after_ms"] > 1000, refused
        # Another namespace, and another connection, have their own.
        assert (await a.publish("chat:1", "elsewhere"))["op"] == "ack"
        assert (await b.publish("slow:1", "b's first"))["op"] == "ack"
        seen = [await b.message() for _ in range(4)]
        assert [m["data"] for m in seen if m["room"] == "slow:1"] == [1, 2, "b's first"]


async def test_publish_rate_refusals_count_towards_the_abuse_close(tmp_path: Path) -> None:
    """Refusals of a namespace's rate count towards RTG_RATE_LIMIT_MAX_REJECTED's 1008 close."""
    async with gateway(tmp_path, rate_limit_max_rejected=3) as gw:
        peer = await Peer.connect(gw.ws_url)
        await peer.join("slow:1")
        for n in range(2):
            assert (await peer.publish("slow:1", n))["op"] == "ack"
        for n in range(3):
            assert (await peer.publish("slow:1", n))["code"] == "rate_limited"
        await peer.ws.send('{"op":"publish","room":"slow:1","data":0}')
        code, reason = await peer.closed()
        assert (code, reason) == (1008, "rate limit exceeded")


async def test_info_lists_the_namespaces(tmp_path: Path) -> None:
    """/api/info lists the namespaces in the file's order with their rules."""
    async with gateway(tmp_path) as gw:
        status, info = await api(api_port(gw), "GET", "/api/info")
        assert status == 200 and info["undeclared_namespaces"] == "refuse"
        names = [n["namespace"] for n in info["namespaces"]]
        assert names == ["default", "news", "chat", "open", "inbox", "slow"]
        chat = info["namespaces"][2]
        assert chat["max_members"] == 2 and chat["publish"] == "members"


async def test_metrics_count_by_namespace_never_by_room(tmp_path: Path) -> None:
    """Publishes, deliveries, members, drops carry a namespace label; no room name in /metrics."""
    async with gateway(tmp_path) as gw:
        a, b = await Peer.connect(gw.ws_url), await Peer.connect(gw.ws_url)
        for room in ("chat:secret-room", "news:x"):
            await a.join(room)
            await b.join(room)
        await a.publish("chat:secret-room", 1)
        await api(api_port(gw), "POST", "/api/publish", {"room": "news:x", "data": 2})
        for _ in range(2):
            await b.message()
        _, text, _ = await asyncio.to_thread(http_get, gw.url + "/metrics")
        assert "secret-room" not in text
        for name in (
            "publishes_total",
            "deliveries_total",
            "room_members_current",
            "rooms_current",
        ):
            metric = "rtgateway_" + name
            by_ns = {
                ns: sample_sum(text, metric, f'{{namespace="{ns}"}}') for ns in ("chat", "news")
            }
            assert by_ns["chat"] > 0 and by_ns["news"] > 0, (metric, by_ns)
        assert sample_sum(text, "rtgateway_deliveries_total", '{namespace="chat"}') == 2
        assert sample_sum(text, "rtgateway_room_members_current", '{namespace="news"}') == 2
        assert 'rtgateway_messages_dropped_total{namespace="slow",policy="drop_newest"} 0.0' in text
        assert sample_sum(text, "rtgateway_protocol_errors_total", '{code="room_full"}') == 0


async def test_drops_are_counted_under_the_namespace_and_policy_of_the_room(
    tmp_path: Path,
) -> None:
    """A news:* member that stops reading loses frames under news's default policy, counted so."""
    async with gateway(tmp_path, outbox_max_messages=16) as gw:
        stuck = await RawConnection.open(gw.port, rcvbuf=4096)
        assert (await stuck.recv_json())["op"] == "hello"
        await stuck.send_json({"op": "join", "room": "news:x", "id": 1})
        assert (await stuck.recv_json())["policy"] == "drop_oldest"  # news's default
        port, batch = api_port(gw), [{"room": "news:x", "data": "x" * 1000}] * 100
        for _ in range(30):
            status, _ = await api(port, "POST", "/api/publish/batch", batch)
            assert status == 200
        # A full outbox drops as the publication is enqueued: counted by now.
        _, text, _ = await asyncio.to_thread(http_get, gw.url + "/metrics")
        news = '{namespace="news",policy="drop_oldest"}'
        assert sample_sum(text, "rtgateway_messages_dropped_total", news) > 0
        assert sample_sum(text, "rtgateway_messages_dropped_total", '{namespace="default"}') == 0
        assert gw.metrics.dropped_total == sample_sum(text, "rtgateway_messages_dropped_total")
        stuck.abort()  # it would never read the drain's close


async def test_without_a_file_everything_works_as_before(tmp_path: Path) -> None:
    """Without a rules file any room may be joined and published into as before."""
    async with running_gateway(publish_requires_join=False) as gw:
        peer, other = await Peer.connect(gw.ws_url), await Peer.connect(gw.ws_url)
        assert (await other.join("news:eu"))["rules"]["publish"] == "clients"
        assert (await peer.publish("news:eu", "anyone"))["seq"] == 1
        assert (await peer.join("anything:at:all"))["op"] == "ack"


# Two workers and Redis: the same rules, wherever the connections land.


@pytest.mark.system
@pytest.mark.timeout(120)
async def test_rules_hold_on_every_worker_with_redis(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """With two workers and Redis, every rule allows and refuses the same on either worker."""
    async with two_workers(redis_server, write_rules(tmp_path, RULES)) as gw:
        ws = gw.ws_url + "/ws"
        (a, a2), (b, b2) = await peers_on_each_worker(ws, per_worker=2)
        # news: members on both workers; clients refused everywhere; the API reaches all.
        for peer in (a, b):
            assert (await peer.join("news:eu"))["rules"]["publish"] == "api"
            assert (await peer.publish("news:eu", "x"))["code"] == "publish_not_allowed"
        status, body = await api(
            gw.api_port, "POST", "/api/publish", {"room": "news:eu", "data": "m"}
        )
        assert (status, body) == (200, {"seq": 1})  # nothing was numbered before
        for peer in (a, b):
            assert (await peer.message())["data"] == "m"
        # chat: members only, across workers; max_members counted per worker.
        assert (await a.join("chat:1"))["op"] == "ack"
        assert (await b.join("chat:1"))["op"] == "ack"
        assert (await a2.join("chat:1"))["op"] == "ack"  # 2 on worker 0
        assert (await b2.join("chat:1"))["op"] == "ack"  # 2 on worker 1
        third = await Peer.connect(ws)
        while third.worker != 0:
            await third.close()
            third = await Peer.connect(ws)
        assert (await third.join("chat:1"))["code"] == "room_full"
        assert (await third.publish("chat:1", "no"))["code"] == "not_joined"
        reply = await b.publish("chat:1", "across")
        assert reply["op"] == "ack"
        assert (await a.message())["data"] == "across"
        # Undeclared, join = false, policies, rates: on either worker.
        for peer in (a, b):
            assert (await peer.join("zzz:1"))["code"] == "unknown_namespace"
            assert (await peer.join("inbox:1"))["code"] == "join_not_allowed"
            assert (await peer.join("news:2", policy="drop_newest"))["code"] == "policy_not_allowed"
            await peer.join("slow:1")
            assert [(await peer.publish("slow:1", n))["op"] for n in range(3)] == [
                "ack",
                "ack",
                "error",
            ]
        status, body = await api(gw.api_port, "POST", "/api/publish", {"room": "zzz:1", "data": 1})
        assert status == 404 and body["error"]["code"] == "unknown_namespace"
        status, info = await api(gw.api_port, "GET", "/api/info")
        assert [n["namespace"] for n in info["namespaces"]][:3] == ["default", "news", "chat"]
        for peer in (a, a2, b, b2, third):
            await peer.close()


@pytest.mark.system
@pytest.mark.timeout(120)
async def test_open_namespaces_and_default_rules_hold_across_workers_with_redis(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two workers: a stranger's publish (clients) crosses workers; undeclared gets [default]."""
    text = '[default]\npublish = "clients"\n[namespaces.open]\npublish = "clients"\n'
    async with two_workers(redis_server, write_rules(tmp_path, text)) as gw:
        (a,), (b,) = await peers_on_each_worker(gw.ws_url + "/ws")
        # publish = clients: b never joined, a on the other worker gets it.
        assert (await a.join("open:1"))["rules"]["publish"] == "clients"
        assert (await b.publish("open:1", "from worker 1"))["seq"] == 1
        assert (await a.message())["data"] == "from worker 1"
        # An undeclared namespace takes [default]'s rules on either worker.
        for peer in (a, b):
            ack = await peer.join("elsewhere:1")
            assert ack["op"] == "ack" and ack["rules"]["namespace"] == "default", ack
        assert (await a.publish("elsewhere:1", "x"))["op"] == "ack"
        assert (await b.message())["data"] == "x"


# The README's example: news:* for browsers to read, chat:* rooms of at most
# 1,000 members, nothing else open, and one connection kicked. The shipped
# deploy/rooms.toml says the same with its comments and a few keys more.


EXAMPLES = {
    "readme": readme_rules,
    "deploy/rooms.toml": lambda: (ROOT / "deploy" / "rooms.toml").read_text(),
}


@pytest.mark.parametrize("example", list(EXAMPLES))
async def test_readme_example_with_one_worker(example: str, tmp_path: Path) -> None:
    """The README's file: news read-only, chat:42 full at 1,000, listed, one kicked, room again."""
    async with gateway(tmp_path, EXAMPLES[example]()) as gw:
        port = api_port(gw)
        reader = await Peer.connect(gw.ws_url)
        ack = await reader.join("news:eu")
        assert ack["rules"]["publish"] == "api"
        assert (await reader.publish("news:eu", "fake news"))["code"] == "publish_not_allowed"
        status, body = await api(port, "POST", "/api/publish", {"room": "news:eu", "data": "real"})
        assert (status, body) == (200, {"seq": 1})
        assert (await reader.message())["data"] == "real"
        assert (await reader.join("lobby"))["code"] == "join_not_allowed"
        assert (await reader.join("other:1"))["code"] == "unknown_namespace"

        # 1,000 members in chat:42; the 1,001st is refused.
        chatters: list[Peer] = []
        for _ in range(20):
            batch = await asyncio.gather(*(Peer.connect(gw.ws_url) for _ in range(50)))
            acks = await asyncio.gather(*(p.join("chat:42") for p in batch))
            assert all(a["op"] == "ack" for a in acks), [a for a in acks if a["op"] != "ack"]
            chatters += batch
        assert acks[-1]["members"] == 1000
        assert (await reader.join("chat:42"))["code"] == "room_full"
        assert (await chatters[0].publish("chat:42", "hello"))["op"] == "ack"
        assert (await chatters[-1].message())["data"] == "hello"

        # The backend finds one connection in the room and kicks it.
        listed: list[str] = []
        query = "?limit=1000"
        while query:
            status, page = await api(port, "GET", f"/api/rooms/chat:42/connections{query}")
            assert status == 200, page
            listed += [c["conn_id"] for c in page["connections"]]
            query = f"?limit=1000&cursor={page['next_cursor']}" if page["next_cursor"] else ""
        assert listed == sorted(p.conn_id for p in chatters)
        target = chatters[500]
        status, _ = await api(
            port,
            "POST",
            "/api/disconnect",
            {"conn_id": target.conn_id, "code": 4001, "reason": "spam"},
        )
        assert status == 200
        assert await target.closed() == (4001, "spam")
        # Its place came free.
        assert (await reader.join("chat:42"))["members"] == 1000
        await asyncio.gather(*(p.close() for p in chatters if p is not target))


@pytest.mark.system
@pytest.mark.timeout(120)
@pytest.mark.parametrize("example", list(EXAMPLES))
async def test_readme_example_with_two_workers_and_redis(
    example: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The README's file with two workers and Redis: the same rules, a kick on worker 1."""
    # (max_members per worker is tested with a cap of 2 above: 1,000 on one
    # worker would take 2,000 connections here.)
    async with two_workers(redis_server, write_rules(tmp_path, EXAMPLES[example]())) as gw:
        (a,), (b,) = await peers_on_each_worker(gw.ws_url + "/ws")
        for peer in (a, b):
            assert (await peer.join("news:eu"))["rules"]["publish"] == "api"
            assert (await peer.publish("news:eu", "fake"))["code"] == "publish_not_allowed"
            assert (await peer.join("lobby"))["code"] == "join_not_allowed"
            assert (await peer.join("other:1"))["code"] == "unknown_namespace"
            assert (await peer.join("chat:42"))["rules"]["max_members"] == 1000
        status, _ = await api(gw.api_port, "POST", "/api/publish", {"room": "news:eu", "data": "r"})
        assert status == 200
        for peer in (a, b):
            assert (await peer.message())["data"] == "r"
        assert (await a.publish("chat:42", "across"))["op"] == "ack"
        assert (await b.message())["data"] == "across"
        status, page = await api(gw.api_port, "GET", "/api/rooms/chat:42/connections")
        assert [c["conn_id"] for c in page["connections"]] == sorted([a.conn_id, b.conn_id])
        # Kick the one on worker 1, from the API that worker 0 serves.
        status, _ = await api(
            gw.api_port,
            "POST",
            "/api/disconnect",
            {"conn_id": b.conn_id, "code": 4001, "reason": "spam"},
        )
        assert status == 200
        assert await b.closed() == (4001, "spam")
        await a.close()


def test_every_error_code_is_documented() -> None:
    """Each code a client or the API can get has its row in docs/protocol.md or docs/api.md."""
    protocol_doc = (ROOT / "docs" / "protocol.md").read_text()
    api_doc = (ROOT / "docs" / "api.md").read_text()
    spec = (ROOT / "docs" / "api.yaml").read_text()
    assert [c for c in ERROR_CODES if f"| `{c}` |" not in protocol_doc] == []
    for code in ("unknown_namespace", "unknown_connection", "not_joined"):
        assert f"`{code}`" in api_doc and f"- {code}" in spec, code
