"""errors.py: the Disconnect table and the exception hierarchy (pure: no I/O).

Disconnects are data: every way the gateway ends a connection is one value,
counted under one label, with a close code from RFC 6455 §7.4's ranges.
"""

from __future__ import annotations

import pytest

from rtgateway import errors
from rtgateway.errors import (
    CLIENT_CLOSE,
    DISCONNECT_REASONS,
    DISCONNECTS,
    MESSAGE_TOO_LARGE,
    PING_TIMEOUT,
    PROTOCOL_ERROR,
    BrokerError,
    BrokerOutcomeUnknown,
    BrokerStalled,
    BrokerUnavailable,
    ConfigError,
    Disconnect,
    GatewayError,
    ProtocolError,
    by_close_code,
)


def test_every_disconnect_value_is_in_the_table_once() -> None:
    """Each Disconnect the module exports is one row of DISCONNECTS, and no row is missing."""
    exported = [
        value for name in errors.__all__ if isinstance(value := getattr(errors, name), Disconnect)
    ]
    assert sorted(d.label for d in exported) == sorted(d.label for d in DISCONNECTS)
    assert len(set(DISCONNECTS)) == len(DISCONNECTS)


def test_labels_are_unique_and_are_the_metrics_label_set() -> None:
    """rtgateway_disconnects_total{reason} has one label per disconnect, derived from the table."""
    labels = [d.label for d in DISCONNECTS]
    assert len(labels) == len(set(labels))
    assert tuple(labels) == DISCONNECT_REASONS
    assert all(label.isidentifier() and label.islower() for label in labels)


def test_close_codes_are_the_protocols_or_private_and_reasons_fit_a_close_frame() -> None:
    """1000-1015 (RFC 6455 §7.4.1) or 4000-4999 (private); a reason under 123 bytes; or no frame."""
    for d in DISCONNECTS:
        if d.code is None:
            assert d.reason == "", d
            continue
        assert 1000 <= d.code <= 1015 or 4000 <= d.code <= 4999, d
        assert d.code not in (1004, 1005, 1006, 1015), f"{d} may not be sent on the wire"
        assert len(d.reason.encode()) <= 123, d


def test_a_client_must_change_what_it_sends_after_1002_1008_1009() -> None:
    """reconnect says whether a well-behaved client comes back as it is."""
    told_to_change = {d.code for d in DISCONNECTS if not d.reconnect}
    assert told_to_change == {1002, 1008, 1009}
    assert all(d.reconnect for d in DISCONNECTS if d.code in (1011, 1012, 4008, None))


def test_disconnects_are_frozen_values() -> None:
    """A row of the table cannot be changed by whoever holds it."""
    with pytest.raises(AttributeError):
        CLIENT_CLOSE.label = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("code", "reason", "expected"),
    [
        (1009, "", MESSAGE_TOO_LARGE),
        (1009, "frame with 70000 bytes exceeds limit of 65536 bytes", MESSAGE_TOO_LARGE),
        (1002, "", PROTOCOL_ERROR),
        (1003, "", PROTOCOL_ERROR),
        (1007, "invalid start byte", PROTOCOL_ERROR),
        (1011, "keepalive ping timeout", PING_TIMEOUT),
        (1011, "internal error", None),
        (1000, "", None),
        (1012, "service restart", None),
        (4008, "slow consumer", None),
    ],
)
def test_by_close_code_maps_what_websockets_sent_to_its_disconnect(
    code: int, reason: str, expected: Disconnect | None
) -> None:
    """The codes websockets closes with on a client's input; the gateway's own map to None."""
    assert by_close_code(code, reason) is expected


def test_the_exception_hierarchy_has_one_base() -> None:
    """GatewayError above all; the broker's three failures under BrokerError."""
    for exc in (ConfigError, ProtocolError, BrokerError):
        assert issubclass(exc, GatewayError)
    for exc in (BrokerUnavailable, BrokerOutcomeUnknown, BrokerStalled):
        assert issubclass(exc, BrokerError)
    assert not issubclass(BrokerUnavailable, BrokerOutcomeUnknown)
    assert not issubclass(BrokerOutcomeUnknown, BrokerUnavailable)
    assert issubclass(ConfigError, ValueError)  # a bad value, for code that catches that


def test_config_error_is_one_line_naming_the_setting_and_what_it_accepts() -> None:
    """str() is what the operator reads; the fields stay for code."""
    exc = ConfigError("RTG_X", "an integer >= 0", "-1")
    assert str(exc) == "RTG_X: expected an integer >= 0, got '-1'"
    assert (exc.name, exc.accepted, exc.value) == ("RTG_X", "an integer >= 0", "-1")
    assert str(ConfigError("--x", "", "", message="--x: something else")) == "--x: something else"


def test_protocol_error_carries_the_code_a_safe_message_and_the_request_id() -> None:
    """What the client is told, and which request it answers."""
    exc = ProtocolError("invalid_room", "room names are 1-128 characters", id=7)
    assert (exc.code, exc.message, exc.id, str(exc)) == (
        "invalid_room",
        "room names are 1-128 characters",
        7,
        "room names are 1-128 characters",
    )
    assert ProtocolError("bad_json", "not JSON").id is None
