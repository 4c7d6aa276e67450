"""The publish API (rtgateway/api.py) over real sockets, next to real WebSocket members.

HTTP is spoken by hand on asyncio streams so that the tests control every byte:
keep-alive, pipelining, chunked bodies, slow and oversized requests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_CONFIG, running_gateway
from support import GatewayProcess, http_get

from rtgateway.api import MAX_BATCH_ITEMS, ApiServer
from rtgateway.app import Gateway
from rtgateway.client import Client
from rtgateway.errors import BrokerOutcomeUnknown, BrokerUnavailable
from rtgateway.protocol import MESSAGE_ENVELOPE_BYTES

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 5.0
JSON = {"Content-Type": "application/json"}


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json", self.headers
        return json.loads(self.body)

    @property
    def code(self) -> str:
        return str(self.json()["error"]["code"])


class Http:
    """One HTTP/1.1 connection to the API."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Http:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def send_request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        self.send_request(method, path, body, headers)
        return await self.read_reply(head_only=method == "HEAD")

    async def read_reply(self, head_only: bool = False) -> Reply:
        async with asyncio.timeout(TIMEOUT):
            head = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in filter(None, lines):
                name, _, value = line.partition(":")
                headers[name.lower()] = value.strip()
            length = 0 if head_only else int(headers.get("content-length", "0"))
            body = await self.reader.readexactly(length)
        return Reply(int(status_line.split()[1]), headers, body)

    async def closed_by_server(self) -> bool:
        """Whether the server closes the connection (EOF) within the timeout; ours closes too."""
        try:
            async with asyncio.timeout(TIMEOUT):
                try:
                    return await self.reader.read() == b""
                except ConnectionResetError:
                    return True
        finally:
            await self.close()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):  # a reset from the server is a close too
            await self.writer.wait_closed()


def api_port(gw: Any) -> int:
    return int(gw.gateway.api.addresses[0].rsplit(":", 1)[1])


async def call(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> Reply:
    """One request on a fresh connection; ``body`` is sent as JSON."""
    conn = await Http.open(port)
    try:
        if body is not None:
            raw = json.dumps(body).encode()
            headers = {**JSON, **(headers or {})}
        return await conn.request(method, path, raw, headers)
    finally:
        await conn.close()


def publish_body(room: str, data: Any) -> bytes:
    return json.dumps({"room": room, "data": data}).encode()


# Publishing reaches members like a client's publish.


async def test_api_publishes_reach_member_in_order_with_client_publishes() -> None:
    """API and client publications share one sequence and reach members in order."""
    async with running_gateway() as gw:
        port = api_port(gw)
        async with (
            Client.connect(gw.ws_url) as member,
            Client.connect(gw.ws_url) as publisher,
        ):
            await member.join("lobby")
            await publisher.join("lobby")
            conn = await Http.open(port)
            seqs = [await publisher.publish("lobby", {"n": 1})]
            reply = await conn.request(
                "POST", "/api/publish", publish_body("lobby", {"n": 2}), JSON
            )
            assert reply.status == 200
            seqs.append(reply.json()["seq"])
            seqs.append(await publisher.publish("lobby", {"n": 3}))
            batch = [{"room": "lobby", "data": {"n": 4}}, {"room": "lobby", "data": {"n": 5}}]
            reply = await conn.request(
                "POST", "/api/publish/batch", json.dumps(batch).encode(), JSON
            )
            assert reply.status == 200
            seqs += [result["seq"] for result in reply.json()]
            seqs.append(await publisher.publish("lobby", {"n": 6}))
            await conn.close()

            assert seqs == [1, 2, 3, 4, 5, 6]
            received = [await member.next_message(TIMEOUT) for _ in range(6)]
            assert [m["data"]["n"] for m in received] == [1, 2, 3, 4, 5, 6]
            assert [m["seq"] for m in received] == seqs
            assert all(m["room"] == "lobby" and m["op"] == "message" for m in received)


async def test_publish_to_a_room_without_members_returns_seq_zero() -> None:
    """A publication nobody can see is accepted and numbered 0."""
    async with running_gateway() as gw:
        reply = await call(api_port(gw), "POST", "/api/publish", {"room": "empty", "data": 1})
        assert (reply.status, reply.json()) == (200, {"seq": 0})


async def test_batch_keeps_order_per_room_and_answers_one_result_each() -> None:
    """A batch answers one result per item and keeps each room's order."""
    async with (
        running_gateway() as gw,
        Client.connect(gw.ws_url) as a,
        Client.connect(gw.ws_url) as b,
    ):
        await a.join("a")
        await b.join("b")
        batch = [{"room": room, "data": i} for i, room in enumerate("abab")]
        batch.append({"room": "nobody", "data": "x"})
        reply = await call(api_port(gw), "POST", "/api/publish/batch", batch)
        assert reply.status == 200
        assert reply.json() == [{"seq": 1}, {"seq": 1}, {"seq": 2}, {"seq": 2}, {"seq": 0}]
        assert [(await a.next_message(TIMEOUT))["data"] for _ in range(2)] == [0, 2]
        assert [(await b.next_message(TIMEOUT))["data"] for _ in range(2)] == [1, 3]


async def test_batch_with_one_invalid_publication_publishes_nothing() -> None:
    """One invalid item refuses the whole batch with its index; nothing is published."""
    async with running_gateway() as gw, Client.connect(gw.ws_url) as member:
        await member.join("lobby")
        batch = [{"room": "lobby", "data": 1}, {"room": "bad room", "data": 2}]
        reply = await call(api_port(gw), "POST", "/api/publish/batch", batch)
        assert reply.status == 400
        assert reply.json()["error"]["code"] == "invalid_room"
        assert reply.json()["error"]["index"] == 1
        # Nothing was published: the next publication is seq 1.
        reply = await call(api_port(gw), "POST", "/api/publish", {"room": "lobby", "data": 3})
        assert reply.json() == {"seq": 1}
        assert (await member.next_message(TIMEOUT))["data"] == 3


async def test_batch_over_the_item_limit_is_refused() -> None:
    """A batch with more than MAX_BATCH_ITEMS items gets 400 bad_message."""
    async with running_gateway() as gw:
        batch = [{"room": "r", "data": i} for i in range(MAX_BATCH_ITEMS + 1)]
        reply = await call(api_port(gw), "POST", "/api/publish/batch", batch)
        assert (reply.status, reply.code) == (400, "bad_message")


class FailingBroker:
    """A broker whose publications all fail with ``error``, as Redis when down or stalled."""

    available = True

    def __init__(self, error: type[Exception]) -> None:
        self.error = error

    def attach(self, events: object) -> None:
        pass

    def submit(
        self, room: str, floor: int, ts_ms: int, data: bytes, started: float
    ) -> asyncio.Future[int]:
        failed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        failed.set_exception(self.error())
        return failed

    def room_opened(self, room: str) -> bool:
        return True

    def room_closed(self, room: str) -> None:
        pass


async def test_broker_unavailable_answers_503_unavailable() -> None:
    """Broker unavailable: 503 with Retry-After; in a batch, the item's error."""
    async with running_gateway() as gw:
        gw.gateway.hub.broker = FailingBroker(BrokerUnavailable)
        port = api_port(gw)
        reply = await call(port, "POST", "/api/publish", {"room": "lobby", "data": 1})
        assert (reply.status, reply.code) == (503, "unavailable")
        assert int(reply.headers["retry-after"]) >= 1
        reply = await call(port, "POST", "/api/publish/batch", [{"room": "lobby", "data": 1}])
        assert reply.status == 200
        assert reply.json()[0]["error"]["code"] == "unavailable"


async def test_broker_outcome_unknown_answers_504_outcome_unknown() -> None:
    """Outcome unknown: 504 without Retry-After; in a batch, each item's error."""
    async with running_gateway() as gw:
        gw.gateway.hub.broker = FailingBroker(BrokerOutcomeUnknown)
        port = api_port(gw)
        reply = await call(port, "POST", "/api/publish", {"room": "lobby", "data": 1})
        assert (reply.status, reply.code) == (504, "outcome_unknown")
        assert "retry-after" not in reply.headers
        batch = [{"room": "lobby", "data": 1}, {"room": "other", "data": 2}]
        reply = await call(port, "POST", "/api/publish/batch", batch)
        assert reply.status == 200
        assert [r["error"]["code"] for r in reply.json()] == ["outcome_unknown"] * 2


# Reading.


async def test_rooms_are_listed_by_name_a_page_at_a_time() -> None:
    """/api/rooms lists rooms in name order with member counts, a page and a cursor at a time."""
    async with running_gateway() as gw:
        port = api_port(gw)
        async with Client.connect(gw.ws_url) as one, Client.connect(gw.ws_url) as two:
            for room in ("delta", "alpha", "charlie", "bravo", "echo"):
                await one.join(room)
            await two.join("charlie")
            seen: list[tuple[str, int]] = []
            cursor = None
            pages = 0
            while True:
                path = "/api/rooms?limit=2" + (f"&cursor={cursor}" if cursor else "")
                page = (await call(port, "GET", path)).json()
                pages += 1
                seen += [(r["room"], r["members"]) for r in page["rooms"]]
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            assert pages == 3
            assert seen == [("alpha", 1), ("bravo", 1), ("charlie", 2), ("delta", 1), ("echo", 1)]
            everything = (await call(port, "GET", "/api/rooms")).json()
            assert everything == {
                "rooms": [{"room": r, "members": m} for r, m in seen],
                "next_cursor": None,
            }


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=1001", "limit=x", "limit=", "limit=1&limit=2", "cursor=a%20b", "cursor="],
)
async def test_rooms_rejects_bad_query_parameters(query: str) -> None:
    """A bad limit or cursor in /api/rooms gets 400 bad_request."""
    async with running_gateway() as gw:
        reply = await call(api_port(gw), "GET", f"/api/rooms?{query}")
        assert (reply.status, reply.code) == (400, "bad_request")


async def test_room_reports_its_members_and_zero_for_an_empty_room() -> None:
    """/api/rooms/{room} counts members, 0 for an empty room, 400 for a bad name."""
    async with running_gateway() as gw:
        port = api_port(gw)
        async with Client.connect(gw.ws_url) as one, Client.connect(gw.ws_url) as two:
            await one.join("lobby")
            await two.join("lobby")
            reply = await call(port, "GET", "/api/rooms/lobby")
            assert reply.json() == {"room": "lobby", "members": 2}
            reply = await call(port, "GET", "/api/rooms/nobody.here")
            assert reply.json() == {"room": "nobody.here", "members": 0}
            for bad in ("a%2Fb", "a%20b", "%ff", "x" * 129):
                reply = await call(port, "GET", f"/api/rooms/{bad}")
                assert (reply.status, reply.code) == (400, "invalid_room"), bad


async def test_info_reports_version_connections_rooms_and_draining() -> None:
    """/api/info reports the server, its version, connections, rooms and draining."""
    async with running_gateway() as gw, Client.connect(gw.ws_url) as member:
        await member.join("lobby")
        info = (await call(api_port(gw), "GET", "/api/info")).json()
        assert info == {
            "server": gw.gateway.server_name,
            "version": gw.gateway.server_name.split("/")[1],
            "connections": 1,
            "rooms": 1,
            "draining": False,
        }


async def test_head_answers_headers_without_a_body() -> None:
    """HEAD gets the headers and no body, and the connection stays in step."""
    async with running_gateway() as gw:
        conn = await Http.open(api_port(gw))
        reply = await conn.request("HEAD", "/api/info")
        assert reply.status == 200 and reply.body == b""
        assert int(reply.headers["content-length"]) > 0
        # The connection is still in step: the next answer is the next request's.
        reply = await conn.request("GET", "/api/rooms/x")
        assert reply.json() == {"room": "x", "members": 0}
        await conn.close()


async def test_openapi_document_is_served_and_the_packaged_copy_matches_docs() -> None:
    """/api/openapi.yaml serves docs/api.yaml, whose packaged copy is identical."""
    docs = (ROOT / "docs" / "api.yaml").read_bytes()
    assert (ROOT / "rtgateway" / "static" / "api.yaml").read_bytes() == docs
    async with running_gateway() as gw:
        reply = await call(api_port(gw), "GET", "/api/openapi.yaml")
        assert reply.status == 200
        assert reply.headers["content-type"] == "application/yaml"
        assert reply.body == docs


# The bearer token.


async def test_token_is_required_on_every_route_when_set() -> None:
    """With a token set, every route answers 401 without it and serves with it."""
    async with running_gateway(api_token="s3cret-token") as gw:
        port = api_port(gw)
        good = {"Authorization": "Bearer s3cret-token"}
        for method, path, body in [
            ("POST", "/api/publish", {"room": "r", "data": 1}),
            ("POST", "/api/publish/batch", []),
            ("GET", "/api/rooms", None),
            ("GET", "/api/rooms/r", None),
            ("GET", "/api/info", None),
            ("GET", "/api/openapi.yaml", None),
            ("GET", "/nowhere", None),
        ]:
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": "Basic czNjcmV0LXRva2Vu"},
                {"Authorization": "Bearer s3cret-token-and-more"},
                {"Authorization": "s3cret-token"},
            ):
                reply = await call(port, method, path, body, headers)
                assert (reply.status, reply.code) == (401, "unauthorized"), (path, headers)
                assert reply.headers["www-authenticate"].startswith("Bearer")
            reply = await call(port, method, path, body, good)
            assert reply.status == (404 if path == "/nowhere" else 200), path
        reply = await call(port, "GET", "/api/info", None, {"Authorization": "bearer s3cret-token"})
        assert reply.status == 200  # the scheme is case-insensitive (RFC 9110 §11.1)


async def test_no_token_is_needed_when_none_is_set() -> None:
    """Without a token set, requests are served whatever Authorization they carry."""
    async with running_gateway(api_token="") as gw:
        reply = await call(api_port(gw), "GET", "/api/info", None, {"Authorization": "Bearer x"})
        assert reply.status == 200


def test_token_is_not_logged_and_env_settings_reach_the_api() -> None:
    """RTG_API_* reach the API of a subprocess and the token never appears in its log."""
    token = "tok-" + base64.urlsafe_b64encode(os.urandom(12)).decode()
    env = {"RTG_API_ADDR": "127.0.0.1:0", "RTG_API_TOKEN": token}
    with GatewayProcess(env) as proc:
        listening = next(e for e in proc.events if e.get("event") == "gateway_listening")
        api = listening["api_addresses"][0]
        status, body, _ = http_get(f"http://{api}/api/info")
        assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized"
        starting = next(e for e in proc.events if e.get("event") == "gateway_starting")
        assert starting["config"]["api_addr"] == "127.0.0.1:0"
        assert token not in starting["config"]["api_token"]
    assert not any(token in line for line in proc.lines)


def test_config_masks_the_token_in_log_fields() -> None:
    """The configuration as logged masks a set token and leaves an empty one empty."""
    assert TEST_CONFIG.replace(api_token="hunter2").as_log_fields()["api_token"] != "hunter2"
    assert TEST_CONFIG.replace(api_token="").as_log_fields()["api_token"] == ""


# Errors: same codes as the room protocol, proper statuses.

BIG = 65536  # RTG_MAX_MESSAGE_BYTES in TEST_CONFIG


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "bad_json"),
        (b'{"room": "r", "data": NaN}', 400, "bad_json"),
        (b'{"room": "r", "data": Infinity}', 400, "bad_json"),
        (b'{"room": "r", "data": 1e999}', 400, "bad_json"),
        (b'{"room": "r", "data": [-1e999]}', 400, "bad_json"),
        (b'{"room": "r", "data": "\xff"}', 400, "bad_json"),  # not UTF-8
        (b"[" * 100_000 + b"]" * 100_000, 413, "message_too_large"),
        (b"[" * 30_000 + b"]" * 30_000, 400, "bad_json"),  # nested too deeply
        (b"", 400, "bad_json"),
        (b'"just a string"', 400, "bad_message"),
        (b'{"data": 1}', 400, "bad_message"),
        (b'{"room": 7, "data": 1}', 400, "bad_message"),
        (b'{"room": "r"}', 400, "bad_message"),
        (b'{"room": "r", "data": "\\ud800"}', 400, "bad_message"),  # a lone surrogate
        (b'{"room": "r", "data": {"\\udfff": 1}}', 400, "bad_message"),
        (b'{"room": "no spaces", "data": 1}', 400, "invalid_room"),
        (b'{"room": "", "data": 1}', 400, "invalid_room"),
        (b'{"room": "\\ud800", "data": 1}', 400, "invalid_room"),
        (publish_body("r", "x" * (BIG - 80)), 413, "message_too_large"),  # members' limit
    ],
)
async def test_publish_refuses_what_the_room_protocol_refuses(
    body: bytes, status: int, code: str
) -> None:
    """The API refuses the data and rooms the room protocol refuses, with the same codes."""
    async with running_gateway() as gw:
        reply = await call(api_port(gw), "POST", "/api/publish", raw=body, headers=JSON)
        assert (reply.status, reply.code) == (status, code)


async def test_the_largest_message_members_can_take_is_accepted_and_one_more_byte_is_not() -> None:
    """The largest publication members can take is published; one byte more gets 413."""
    # The JSON string "x" * n is n + 2 bytes; the message to members adds the room and an envelope.
    largest = BIG - MESSAGE_ENVELOPE_BYTES - len("r") - 2
    async with running_gateway() as gw:
        port = api_port(gw)
        async with Client.connect(gw.ws_url, max_size=BIG) as member:
            await member.join("r")
            body = publish_body("r", "x" * (largest + 1))
            reply = await call(port, "POST", "/api/publish", raw=body, headers=JSON)
            assert (reply.status, reply.code) == (413, "message_too_large")
            body = publish_body("r", "x" * largest)
            reply = await call(port, "POST", "/api/publish", raw=body, headers=JSON)
            assert (reply.status, reply.json()) == (200, {"seq": 1})
            # A member that holds the gateway's own size limit receives it.
            assert (await member.next_message(TIMEOUT))["data"] == "x" * largest


POST_JSON = b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        pytest.param(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 404, "not_found", id="no-route"),
        pytest.param(
            b"GET /api/rooms/a/b HTTP/1.1\r\nHost: x\r\n\r\n", 404, "not_found", id="room-subpath"
        ),
        pytest.param(
            b"DELETE /api/info HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed", id="delete"
        ),
        pytest.param(
            b"GET /api/publish HTTP/1.1\r\nHost: x\r\n\r\n",
            405,
            "method_not_allowed",
            id="get-post",
        ),
        pytest.param(b"garbage\r\n\r\n", 400, "bad_request", id="garbage"),
        pytest.param(
            b"GET /api/info HTTP/2.0\r\nHost: x\r\n\r\n", 400, "bad_request", id="http-2.0"
        ),
        pytest.param(
            b"GET http://x/api/info HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request", id="absolute"
        ),
        pytest.param(b"GET /api/info HTTP/1.1\r\n\r\n", 400, "bad_request", id="no-host"),
        pytest.param(
            b"GET /api/info HTTP/1.1\r\nHost : x\r\n\r\n", 400, "bad_request", id="space-colon"
        ),
        pytest.param(
            b"GET /api/info HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            400,
            "bad_request",
            id="obs-fold",
        ),
        pytest.param(
            b"GET /api/info HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            400,
            "bad_request",
            id="two-hosts",
        ),
        pytest.param(
            POST_JSON + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
            "bad_request",
            id="length-and-chunked",
        ),
        pytest.param(
            POST_JSON + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n",
            400,
            "bad_request",
            id="two-lengths",
        ),
        pytest.param(
            POST_JSON + b"Content-Length: -1\r\n\r\n", 400, "bad_request", id="negative-length"
        ),
        pytest.param(
            POST_JSON + b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n",
            413,
            "message_too_large",
            id="5000-digit-length",
        ),
        pytest.param(
            POST_JSON + b"Transfer-Encoding: gzip\r\n\r\n", 400, "bad_request", id="gzip-coding"
        ),
        pytest.param(
            POST_JSON + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
            400,
            "bad_request",
            id="bad-chunk-size",
        ),
        pytest.param(
            b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 2\r\n\r\n{}",
            415,
            "unsupported_media_type",
            id="text-plain",
        ),
        pytest.param(
            b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
            415,
            "unsupported_media_type",
            id="no-content-type",
        ),
        pytest.param(
            b"GET /api/info HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
            431,
            "bad_request",
            id="head-too-large",
        ),
        pytest.param(
            b"GET /api/info HTTP/1.1\r\nHost: x\r\n" + b"X-Many: 1\r\n" * 100 + b"\r\n",
            431,
            "bad_request",
            id="too-many-headers",
        ),
    ],
)
async def test_malformed_or_misrouted_requests_get_a_json_error(
    request_bytes: bytes, status: int, code: str
) -> None:
    """Malformed or misrouted requests get their status with a JSON error body."""
    async with running_gateway() as gw:
        conn = await Http.open(api_port(gw))
        conn.send(request_bytes)
        reply = await conn.read_reply()
        assert (reply.status, reply.code) == (status, code)
        if status == 405:
            assert reply.headers["allow"] in ("GET, HEAD", "POST")
        await conn.close()


async def test_body_over_the_limit_is_refused_from_content_length_before_it_is_sent() -> None:
    """A Content-Length past the limit gets 413 and a close before any body is sent."""
    async with running_gateway() as gw:
        conn = await Http.open(api_port(gw))
        # Only the head: the answer must not wait for a body that never comes.
        conn.send(
            b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (BIG + 1)
        )
        reply = await conn.read_reply()
        assert (reply.status, reply.code) == (413, "message_too_large")
        assert reply.headers["connection"] == "close"
        assert await conn.closed_by_server()


async def test_chunked_body_is_accepted() -> None:
    """A chunked body with extensions and trailers is read, and keep-alive continues."""
    async with running_gateway() as gw:
        body = publish_body("r", {"chunked": True})
        chunks = [body[:7], body[7:20], body[20:]]
        wire = (
            b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\nX-T: 1\r\n\r\n"
        )
        conn = await Http.open(api_port(gw))
        conn.send(
            b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + wire
        )
        reply = await conn.read_reply()
        assert (reply.status, reply.json()) == (200, {"seq": 0})
        # Keep-alive still works after a chunked body.
        reply = await conn.request("GET", "/api/info")
        assert reply.status == 200
        await conn.close()


async def test_chunked_body_is_cut_at_the_limit_while_it_streams() -> None:
    """A chunked body past the limit gets 413 and a close while it is still streaming."""
    async with running_gateway() as gw:
        conn = await Http.open(api_port(gw))
        conn.send(
            b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 16384
        # Send just past the limit and no final chunk: the answer comes anyway.
        for _ in range(BIG // len(chunk) + 1):
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        reply = await conn.read_reply()
        assert (reply.status, reply.code) == (413, "message_too_large")
        assert await conn.closed_by_server()


async def test_expect_100_continue_gets_an_interim_response() -> None:
    """Expect: 100-continue gets the interim 100 before the body is sent."""
    async with running_gateway() as gw:
        body = publish_body("r", 1)
        conn = await Http.open(api_port(gw))
        conn.send(
            b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        interim = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        conn.send(body)
        reply = await conn.read_reply()
        assert reply.status == 200
        await conn.close()


async def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    """Pipelined requests on one connection are answered in order, kept alive."""
    async with running_gateway() as gw, Client.connect(gw.ws_url) as member:
        await member.join("p")
        conn = await Http.open(api_port(gw))
        for i in range(5):
            conn.send_request("POST", "/api/publish", publish_body("p", i), JSON)
        conn.send_request("GET", "/api/rooms/p")
        replies = [await conn.read_reply() for _ in range(6)]
        assert [r.json() for r in replies[:5]] == [{"seq": i} for i in range(1, 6)]
        assert replies[5].json() == {"room": "p", "members": 1}
        assert all(r.headers["connection"] == "keep-alive" for r in replies)
        await conn.close()


async def test_connection_close_and_http10_end_the_connection() -> None:
    """Connection: close and HTTP/1.0 get their answer, then the server closes."""
    async with running_gateway() as gw:
        port = api_port(gw)
        conn = await Http.open(port)
        reply = await conn.request("GET", "/api/info", headers={"Connection": "close"})
        assert reply.status == 200 and reply.headers["connection"] == "close"
        assert await conn.closed_by_server()
        conn = await Http.open(port)
        conn.send(b"GET /api/info HTTP/1.0\r\n\r\n")
        reply = await conn.read_reply()
        assert reply.status == 200 and reply.headers["connection"] == "close"
        assert await conn.closed_by_server()


# Deadlines and limits (an ApiServer of the test's own, with short deadlines).


async def own_api(gw: Any, **limits: Any) -> tuple[ApiServer, int]:
    api = ApiServer(gw.gateway.ctx, gw.gateway.state, addr="127.0.0.1:0", **limits)
    await api.start()
    return api, int(api.addresses[0].rsplit(":", 1)[1])


async def test_a_slow_request_head_gets_408_and_is_closed() -> None:
    """A request head not finished within the header timeout gets 408 and a close."""
    async with running_gateway(api_addr="") as gw:
        api, port = await own_api(gw, header_timeout_s=0.3)
        try:
            conn = await Http.open(port)
            conn.send(b"GET /api/info HTTP/1.1\r\nHost: x\r\n")  # and never the end
            reply = await conn.read_reply()
            assert (reply.status, reply.code) == (408, "request_timeout")
            assert await conn.closed_by_server()
        finally:
            await api.stop()


async def test_a_slow_body_gets_408_and_is_closed() -> None:
    """A body not finished within the body timeout gets 408 and a close."""
    async with running_gateway(api_addr="") as gw:
        api, port = await own_api(gw, body_timeout_s=0.3)
        try:
            conn = await Http.open(port)
            conn.send(
                b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{"
            )
            reply = await conn.read_reply()
            assert (reply.status, reply.code) == (408, "request_timeout")
            assert await conn.closed_by_server()
        finally:
            await api.stop()


async def test_idle_connections_are_closed_quietly() -> None:
    """A connection idle past its timeout, before or after a request, is closed quietly."""
    async with running_gateway(api_addr="") as gw:
        api, port = await own_api(gw, header_timeout_s=0.3, idle_timeout_s=0.3)
        try:
            silent = await Http.open(port)  # never sends a request
            assert await silent.closed_by_server()
            conn = await Http.open(port)
            assert (await conn.request("GET", "/api/info")).status == 200
            assert await conn.closed_by_server()  # idle after one request
        finally:
            await api.stop()


async def test_connections_past_the_limit_get_503() -> None:
    """Past the API's connection limit: 503 and a close; a freed slot serves again."""
    async with running_gateway(api_addr="") as gw:
        api, port = await own_api(gw, max_connections=2)
        try:
            held = [await Http.open(port) for _ in range(2)]
            for conn in held:  # answered, so surely accepted and counted
                assert (await conn.request("GET", "/api/info")).status == 200
            extra = await Http.open(port)
            extra.send_request("GET", "/api/info")
            reply = await extra.read_reply()
            assert (reply.status, reply.code) == (503, "unavailable")
            assert int(reply.headers["retry-after"]) >= 1
            assert await extra.closed_by_server()
            await held[0].close()

            async def admitted() -> bool:
                again = await Http.open(port)
                reply = await again.request("GET", "/api/info")
                await again.close()
                return reply.status == 200

            await eventually(admitted)  # a freed slot is usable again
            await held[1].close()
        finally:
            await api.stop()


async def test_stopping_closes_idle_keep_alive_connections() -> None:
    """Stopping the API closes idle keep-alive connections at once and stops listening."""
    async with running_gateway(api_addr="") as gw:
        api, port = await own_api(gw)
        conn = await Http.open(port)
        assert (await conn.request("GET", "/api/info")).headers["connection"] == "keep-alive"
        await api.stop()  # does not wait out the idle timeout
        assert await conn.closed_by_server()
        assert api.connections == 0
        with pytest.raises(OSError):
            await Http.open(port)


# Draining and metrics.


async def raw_websocket_member(port: int, room: str) -> asyncio.StreamWriter:
    """A WebSocket client that joins ``room`` and then never answers a close frame."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    payload = json.dumps({"op": "join", "room": room, "id": 1}).encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    writer.write(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    for expected in ("hello", "ack"):  # short unmasked text frames (RFC 6455 §5.2)
        _, length = await reader.readexactly(2)
        if length == 126:
            length = int.from_bytes(await reader.readexactly(2), "big")
        assert json.loads(await reader.readexactly(length))["op"] == expected
    return writer


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Wait for a state the gateway offers no event for."""
    for _ in range(int(TIMEOUT / 0.01)):
        if await check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {check}")


async def test_while_draining_publishing_answers_503_and_info_says_so() -> None:
    """While the gateway drains, publishing answers 503 draining and /api/info says so."""
    gateway = Gateway(TEST_CONFIG.replace(close_timeout_s=2.0))
    stop = asyncio.Event()
    serving = asyncio.create_task(gateway.serve(stop.wait))
    await gateway.ready.wait()
    assert gateway.api is not None
    port = int(gateway.api.addresses[0].rsplit(":", 1)[1])
    ws_port = int(gateway.addresses[0].rsplit(":", 1)[1])
    stuck = await raw_websocket_member(ws_port, "lobby")
    try:
        stop.set()

        async def draining() -> bool:
            return bool((await call(port, "GET", "/api/info")).json()["draining"])

        # The stuck member keeps the drain going for close_timeout_s; the API is still there.
        await eventually(draining)
        reply = await call(port, "POST", "/api/publish", {"room": "lobby", "data": 1})
        assert (reply.status, reply.code) == (503, "draining")
        assert int(reply.headers["retry-after"]) >= 1
        assert reply.headers["connection"] == "close"
        reply = await call(port, "POST", "/api/publish/batch", [])
        assert (reply.status, reply.code) == (503, "draining")
    finally:
        stop.set()
        stuck.close()
        await serving
    # The API stops with the gateway: nothing listens there any more.
    with pytest.raises(OSError):
        await Http.open(port)


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name + ("{" + wanted + "}" if labels else "")) + r" (\S+)"
    match = re.search("^" + pattern + "$", text, re.M)
    assert match, f"{name} {labels} not in /metrics"
    return float(match.group(1))


async def test_metrics_count_requests_by_route_template_and_status() -> None:
    """API requests are counted by route template and status, never by room name."""
    async with running_gateway() as gw:
        port = api_port(gw)
        for room in ("a", "b", "c"):
            await call(port, "GET", f"/api/rooms/{room}")
        await call(port, "POST", "/api/publish", {"room": "a", "data": 1})
        await call(port, "POST", "/api/publish", {"room": "bad room", "data": 1})
        await call(port, "GET", "/somewhere/else")
        status, text, _ = await asyncio.to_thread(http_get, gw.url + "/metrics")
        assert status == 200
        requests = "rtgateway_api_requests_total"
        assert metric(text, requests, endpoint="/api/rooms/{room}", status="200") == 3
        assert metric(text, requests, endpoint="/api/publish", status="200") == 1
        assert metric(text, requests, endpoint="/api/publish", status="400") == 1
        assert metric(text, requests, endpoint="other", status="404") == 1
        assert 'room="a"' not in text and "/api/rooms/a" not in text
        seconds = "rtgateway_api_request_seconds_count"
        assert metric(text, seconds, endpoint="/api/rooms/{room}") == 3
        assert metric(text, seconds, endpoint="/api/info") == 0
