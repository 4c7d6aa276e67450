"""M1: the endpoints on one port, the connection limit, Origin checks, metrics."""

from __future__ import annotations

import pytest
from conftest import RunningGateway, running_gateway
from httpc import request, upgrade_headers
from support import eventually
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


async def metrics_text(gw: RunningGateway) -> str:
    status, headers, body = await request(gw.port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    return body.decode()


async def test_healthz_answers_ok(gateway: RunningGateway) -> None:
    """/healthz and /readyz answer 200 ok."""
    status, _, body = await request(gateway.port, "/healthz")
    assert (status, body) == (200, b"ok")
    status, _, body = await request(gateway.port, "/readyz")
    assert (status, body) == (200, b"ok")


async def test_metrics_has_the_gateway_and_process_families(gateway: RunningGateway) -> None:
    """/metrics has the gateway's families and the process families."""
    text = await metrics_text(gateway)
    for name in (
        "rtgateway_connections_current",
        "rtgateway_connections_total",
        "rtgateway_disconnects_total",
        "rtgateway_handshake_rejections_total",
        "rtgateway_messages_received_total",
        "rtgateway_messages_sent_total",
        "rtgateway_received_bytes_total",
        "rtgateway_sent_bytes_total",
        "rtgateway_event_loop_lag_seconds_bucket",
        "rtgateway_draining",
        "rtgateway_build_info",
        "rtgateway_rooms_current",
        "rtgateway_publish_seconds_bucket",
        "process_open_fds",
        "process_max_fds",
        "process_cpu_seconds_total",
    ):
        assert name in text, name
    assert 'websockets="' in text


async def test_unknown_path_is_404_and_non_get_is_405(gateway: RunningGateway) -> None:
    """An unknown path gets 404, another method 405 with Allow; both counted."""
    status, _, _ = await request(gateway.port, "/nope")
    assert status == 404
    status, headers, _ = await request(gateway.port, "/ws", method="POST")
    assert status == 405
    assert headers["allow"] == "GET"
    status, _, _ = await request(gateway.port, "/healthz", method="DELETE")
    assert status == 405
    text = await metrics_text(gateway)
    assert 'rtgateway_handshake_rejections_total{reason="not_found"} 1.0' in text
    assert 'rtgateway_handshake_rejections_total{reason="method"} 2.0' in text


async def test_http_1_0_upgrade_is_400(gateway: RunningGateway) -> None:
    """A WebSocket upgrade over HTTP/1.0 gets 400."""
    status, _, _ = await request(gateway.port, "/ws", headers=upgrade_headers(), version="HTTP/1.0")
    assert status == 400


async def test_echo_returns_text_and_binary(gateway: RunningGateway) -> None:
    """/ws/echo returns text as text and binary as binary."""
    async with connect(gateway.echo_url) as ws:
        await ws.send("héllo")
        assert await ws.recv() == "héllo"
        await ws.send(b"\x00\xff" * 1000)
        assert await ws.recv() == b"\x00\xff" * 1000


async def test_no_compression_is_negotiated(gateway: RunningGateway) -> None:
    """permessage-deflate is never negotiated, though the client offers it."""
    async with connect(gateway.echo_url) as ws:  # the client offers permessage-deflate
        assert ws.response is not None
        assert "Sec-WebSocket-Extensions" not in ws.response.headers


async def test_connection_gauge_and_counters_follow_real_connections(
    gateway: RunningGateway,
) -> None:
    """The connection gauge and the counters follow real connections and messages."""
    clients = [await connect(gateway.echo_url) for _ in range(5)]
    text = await metrics_text(gateway)
    assert sample(text, "rtgateway_connections_current") == 5
    for ws in clients[:2]:
        await ws.close()
    await eventually(lambda: gateway.metrics.connections_current == 3, what="two closes seen")
    text = await metrics_text(gateway)
    assert sample(text, "rtgateway_connections_current") == 3
    assert sample(text, "rtgateway_connections_total") == 5
    assert 'rtgateway_disconnects_total{reason="client_close"} 2.0' in text
    for ws in clients[2:]:
        await ws.send("x")
        await ws.recv()
    text = await metrics_text(gateway)
    assert sample(text, "rtgateway_messages_received_total") == 3
    assert sample(text, "rtgateway_messages_sent_total") == 3
    for ws in clients[2:]:
        await ws.close()


async def test_past_the_connection_limit_handshakes_get_503_with_retry_after() -> None:
    """Past the connection limit: 503 with Retry-After; a freed slot serves again."""
    async with running_gateway(max_connections=3) as gw:
        clients = [await connect(gw.echo_url) for _ in range(3)]
        with pytest.raises(InvalidStatus) as info:
            await connect(gw.echo_url)
        assert info.value.response.status_code == 503
        assert int(info.value.response.headers["Retry-After"]) >= 1
        text = await metrics_text(gw)
        assert 'rtgateway_handshake_rejections_total{reason="connection_limit"} 1.0' in text
        # Health and metrics still answer at the limit.
        assert (await request(gw.port, "/healthz"))[0] == 200
        # A slot frees up when a client leaves.
        await clients[0].close()
        await eventually(lambda: gw.metrics.connections_current == 2, what="the close seen")
        async with connect(gw.echo_url) as ws:
            await ws.send("again")
            assert await ws.recv() == "again"
        for ws in clients[1:]:
            await ws.close()


async def test_foreign_origin_is_403_when_origins_are_configured() -> None:
    """With origins configured a foreign Origin gets 403, counted; a listed one gets in."""
    async with running_gateway(allowed_origins=("https://app.example",)) as gw:
        status, _, _ = await request(
            gw.port, "/ws", headers=upgrade_headers("https://evil.example")
        )
        assert status == 403
        async with connect(gw.ws_url, origin="https://app.example") as ws:  # type: ignore[arg-type]
            assert '"op":"hello"' in await ws.recv()
        text = await metrics_text(gw)
        assert 'rtgateway_handshake_rejections_total{reason="origin"} 1.0' in text


async def test_any_origin_is_accepted_when_none_are_configured(gateway: RunningGateway) -> None:
    """Without configured origins any Origin gets in."""
    async with connect(gateway.ws_url, origin="https://anything.example") as ws:  # type: ignore[arg-type]
        assert '"op":"hello"' in await ws.recv()


async def test_demo_page_and_client_module_are_served_unless_turned_off() -> None:
    """The demo page and client module are served, and 404 with RTG_DEMO=false."""
    async with running_gateway(demo=True) as gw:
        status, headers, _body = await request(gw.port, "/")
        assert status == 200 and headers["content-type"].startswith("text/html")
        status, headers, _ = await request(gw.port, "/rtgateway.js")
        assert status == 200 and headers["content-type"].startswith("text/javascript")
    async with running_gateway(demo=False) as gw:
        assert (await request(gw.port, "/"))[0] == 404
