"""The cluster's addresses and slot map: the seed list, slots of rooms, CLUSTER SLOTS."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from rtgateway.clustermap import node_name, parse_cluster_url, parse_slots, room_slot


def test_cluster_url_gives_its_seed_nodes() -> None:
    """``redis+cluster://`` lists seed nodes; IPv6 in brackets; anything else is refused."""
    assert parse_cluster_url("redis+cluster://a:7000,127.0.0.1:7001,[::1]:7002") == [
        ("a", 7000),
        ("127.0.0.1", 7001),
        ("::1", 7002),
    ]
    for bad in ("redis://a:1", "redis+cluster://", "redis+cluster://a", "redis+cluster://a:0"):
        with pytest.raises(ValueError, match="redis\\+cluster://HOST:PORT"):
            parse_cluster_url(bad)


def test_a_rooms_counter_and_channel_hash_to_its_names_slot() -> None:
    """The hash tag is the room: counter, channel and name share one slot."""
    for room in ("a", "news:eu", "chat:42", "x" * 128):
        slot = room_slot(room)
        assert key_slot(b"rtg:seq:{" + room.encode() + b"}") == slot
        assert key_slot(b"rtg:room:{" + room.encode() + b"}") == slot
        assert 0 <= slot < 16384


def test_cluster_slots_gives_each_range_its_master_and_skips_unknown_ones() -> None:
    """A range whose master has no address (failing over) is left unserved."""
    reply = [
        [0, 5460, [b"127.0.0.1", 7000, b"id0"], [b"127.0.0.1", 7003, b"id3"]],
        [5461, 10922, [b"", 7001, b"id1"]],
        [10923, 16383, ["::1", 7002, "id2"]],
    ]
    assert parse_slots(reply) == [(0, 5460, ("127.0.0.1", 7000)), (10923, 16383, ("::1", 7002))]
    assert parse_slots(None) == []


def test_a_node_is_named_host_colon_port_with_ipv6_in_brackets() -> None:
    """The metrics' node label: 127.0.0.1:7000, [::1]:7002."""
    assert node_name(("127.0.0.1", 7000)) == "127.0.0.1:7000"
    assert node_name(("::1", 7002)) == "[::1]:7002"
