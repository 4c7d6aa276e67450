"""A Redis Cluster's addresses and slot map, as the cluster broker reads them (pure).

A room's counter and channel carry the room name as their hash tag, so the
room's slot is the slot of its name (:func:`room_slot`); ``CLUSTER SLOTS``
says which master serves each range of slots (:func:`parse_slots`).
"""

from __future__ import annotations

import re
from typing import Any

from redis.crc import key_slot

__all__ = ["SCHEME", "Address", "node_name", "parse_cluster_url", "parse_slots", "room_slot"]

SCHEME = "redis+cluster"

Address = tuple[str, int]

_NODE_RE = re.compile(r"(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})")


def parse_cluster_url(url: str) -> list[Address]:
    """``redis+cluster://h1:p1,h2:p2`` -> the seed nodes; raises ValueError."""
    accepted = f"{SCHEME}://HOST:PORT[,HOST:PORT...]"
    prefix = SCHEME + "://"
    if not url.startswith(prefix):
        raise ValueError(accepted)
    nodes: list[Address] = []
    for part in url[len(prefix) :].rstrip("/").split(","):
        match = _NODE_RE.fullmatch(part.strip())
        if match is None or not 0 < int(match["port"]) < 65536:
            raise ValueError(accepted)
        nodes.append((match["host"].strip("[]"), int(match["port"])))
    return nodes


def room_slot(room: str) -> int:
    """The cluster slot of a room's counter and channel (their hash tag is the room)."""
    return key_slot(room.encode())


def node_name(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_slots(reply: Any) -> list[tuple[int, int, Address]]:
    """``CLUSTER SLOTS`` -> (first slot, last slot, master address) per range."""
    ranges = []
    for entry in reply or ():
        start, end, master = int(entry[0]), int(entry[1]), entry[2]
        host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
        if host in ("", "?"):
            continue  # a master without a known address: its slots are unserved
        ranges.append((start, end, (host, int(master[1]))))
    return ranges
