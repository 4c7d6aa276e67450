"""Three clients in one room: every message, same order, consecutive seq."""

from __future__ import annotations

import asyncio

from conftest import RunningGateway

from rtgateway.client import Client


async def test_three_clients_in_lobby_see_every_message_in_one_order(
    gateway: RunningGateway,
) -> None:
    """Three clients publishing at once in one room all see every message in one order."""
    clients = [await Client.open(gateway.ws_url) for _ in range(3)]
    for c in clients:
        await c.join("lobby")

    async def publish_all(c: Client, n: int) -> None:
        for i in range(n):
            await c.publish("lobby", {"from": c.conn_id, "i": i})

    await asyncio.gather(*(publish_all(c, 20) for c in clients))
    seen = []
    for c in clients:
        got = [await c.next_message(5) for _ in range(60)]
        seen.append([(m["seq"], m["data"]["from"], m["data"]["i"]) for m in got])
    assert [s for s, _, _ in seen[0]] == list(range(1, 61))
    assert seen[0] == seen[1] == seen[2]
    for c in clients:
        await c.close()
