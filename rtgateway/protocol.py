"""The room protocol: parse client messages, encode server messages and frames.

Pure functions and plain data: no asyncio, no sockets, nothing from the rest
of the package but its exceptions. Everything a client can send goes through :func:`parse`, which
returns one of :class:`Join`, :class:`Leave`, :class:`Publish`, :class:`Ping`
or raises :exc:`ProtocolError` carrying an error code from :data:`ERROR_CODES`.

A publication is encoded once, to the bytes of a complete unmasked WebSocket
text frame (:func:`message_frame`), and those bytes are shared by every member
(RFC 6455 §5.1: server frames are not masked, so they are identical for all).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from collections.abc import Mapping
from typing import Any, Final

from .errors import ProtocolError

__all__ = [
    "CONN_ID_RE",
    "ERROR_CODES",
    "MAX_REASON_BYTES",
    "MESSAGE_ENVELOPE_BYTES",
    "ClientMessage",
    "Join",
    "Leave",
    "Ping",
    "ProtocolError",
    "Publish",
    "ack",
    "binary_frame",
    "encode",
    "encode_data",
    "error",
    "finite_float",
    "hello",
    "message_frame",
    "parse",
    "pong",
    "removed",
    "text_frame",
    "valid_conn_id",
    "valid_room",
]

ERROR_CODES: Final = (
    "bad_json",
    "bad_message",
    "unknown_op",
    "invalid_room",
    "not_joined",
    "too_many_rooms",
    "policy_not_allowed",
    "message_too_large",
    "rate_limited",
    "draining",
    "unavailable",
    "internal",
    "outcome_unknown",
    "room_limit",
    # Room namespaces (namespaces.py).
    "room_full",
    "publish_not_allowed",
    "join_not_allowed",
    "unknown_namespace",
)

POLICIES: Final = ("disconnect", "drop_oldest", "drop_newest")
MAX_ID_CHARS: Final = 64
# Ids are echoed to clients, many of them JavaScript: keep integers exact there.
MAX_SAFE_INTEGER: Final = 2**53 - 1
ROOM_RE: Final = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
# A connection's id: the token of the gateway process that holds it, a dot,
# and the connection's own token (both URL-safe base64).
CONN_ID_RE: Final = re.compile(r"[A-Za-z0-9_\-]{1,32}\.[A-Za-z0-9_\-]{1,32}")
MAX_REASON_BYTES: Final = 123  # a close frame's reason (RFC 6455 §5.5: 125 bytes of payload)

# Bytes a publication's message adds around its data (message_frame): the
# JSON keys, a seq and a ts of up to 20 digits each.
MESSAGE_ENVELOPE_BYTES: Final = len(b'{"op":"message","room":"","seq":,"ts":,"data":}') + 40

MessageId = int | str | None


@dataclasses.dataclass(frozen=True, slots=True)
class Join:
    room: str
    id: MessageId = None
    policy: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Leave:
    room: str
    id: MessageId = None


@dataclasses.dataclass(frozen=True, slots=True)
class Publish:
    room: str
    data: bytes  # the JSON encoding of the client's ``data``, UTF-8, compact
    id: MessageId = None


@dataclasses.dataclass(frozen=True, slots=True)
class Ping:
    id: MessageId = None


ClientMessage = Join | Leave | Publish | Ping


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def finite_float(text: str) -> float:
    """``json.loads``' ``parse_float``: a number past a double's range (1e999) is an error.

    Python reads it as infinity, which no JSON encoder can write back.
    """
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of range")
    return value


def valid_room(room: object) -> bool:
    return isinstance(room, str) and ROOM_RE.fullmatch(room) is not None


def valid_conn_id(conn_id: object) -> bool:
    return isinstance(conn_id, str) and CONN_ID_RE.fullmatch(conn_id) is not None


def _read_id(obj: dict[str, Any]) -> MessageId:
    if "id" not in obj:
        return None
    value = obj["id"]
    if isinstance(value, bool):
        raise ProtocolError("bad_message", "id must be an integer or a string")
    if isinstance(value, int):
        if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            return value
        raise ProtocolError("bad_message", "id must be an integer within ±(2**53-1)")
    if isinstance(value, str):
        if len(value) > MAX_ID_CHARS:
            raise ProtocolError("bad_message", f"id must be at most {MAX_ID_CHARS} characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError("bad_message", "id is not valid Unicode") from None
        return value
    raise ProtocolError("bad_message", "id must be an integer or a string")


def _read_room(obj: dict[str, Any], id: MessageId) -> str:
    if "room" not in obj:
        raise ProtocolError("bad_message", "room is required", id)
    room = obj["room"]
    if not isinstance(room, str):
        raise ProtocolError("bad_message", "room must be a string", id)
    if ROOM_RE.fullmatch(room) is None:
        raise ProtocolError(
            "invalid_room", "room must be 1-128 characters of A-Z a-z 0-9 _ . : -", id
        )
    return room


def encode_data(data: Any) -> bytes:
    """Encode a client's ``data`` once, compactly; refuse what cannot be sent.

    ``json.loads`` accepts lone surrogates ("\\ud800"), which cannot be encoded
    to UTF-8: they are caught here, before any member sees them.
    """
    try:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("bad_message", "data contains text that is not valid Unicode") from None
    except (ValueError, RecursionError):
        raise ProtocolError("bad_message", "data cannot be encoded as JSON") from None


def parse(text: str) -> ClientMessage:
    """Parse one client text message. Raises :exc:`ProtocolError`."""
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=finite_float)
    except RecursionError:
        raise ProtocolError("bad_json", "message is nested too deeply") from None
    except ValueError:
        # JSONDecodeError, NaN/Infinity, numbers out of range (1e999), and
        # integers past Python's 4300-digit limit.
        raise ProtocolError("bad_json", "message is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_message", "message must be a JSON object")
    id = _read_id(obj)
    op = obj.get("op")
    if not isinstance(op, str):
        raise ProtocolError("bad_message", "op must be a string", id)
    if op == "publish":
        room = _read_room(obj, id)
        if "data" not in obj:
            raise ProtocolError("bad_message", "data is required", id)
        try:
            data = encode_data(obj["data"])
        except ProtocolError as exc:
            exc.id = id
            raise
        return Publish(room, data, id)
    if op == "join":
        room = _read_room(obj, id)
        policy = obj.get("policy")
        if policy is not None and policy not in POLICIES:
            raise ProtocolError("bad_message", "policy must be one of " + ", ".join(POLICIES), id)
        return Join(room, id, policy)
    if op == "leave":
        return Leave(_read_room(obj, id), id)
    if op == "ping":
        return Ping(id)
    raise ProtocolError("unknown_op", "op must be join, leave, publish or ping", id)


# Server -> client.


def encode(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def hello(conn_id: str, server: str, limits: Mapping[str, Any], **extra: Any) -> str:
    return encode({"op": "hello", "conn_id": conn_id, "server": server, **extra, "limits": limits})


def ack(id: MessageId, **fields: Any) -> str:
    return encode({"op": "ack", "id": id, **fields})


def pong(id: MessageId) -> str:
    return encode({"op": "pong", "id": id})


def removed(room: str, reason: str) -> str:
    """The backend removed this connection from ``room`` (the publish API)."""
    obj: dict[str, Any] = {"op": "removed", "room": room}
    if reason:
        obj["reason"] = reason
    return encode(obj)


def error(code: str, message: str, id: MessageId = None, **extra: Any) -> str:
    assert code in ERROR_CODES, code
    obj: dict[str, Any] = {"op": "error", "code": code, "message": message}
    if id is not None:
        obj["id"] = id
    obj.update(extra)
    return encode(obj)


def _frame(first: int, payload: bytes) -> bytes:
    length = len(payload)
    if length < 126:
        return bytes((first, length)) + payload
    if length < 65536:
        return struct.pack("!BBH", first, 126, length) + payload
    return struct.pack("!BBQ", first, 127, length) + payload


def text_frame(payload: bytes) -> bytes:
    """A complete, final, unmasked text frame (RFC 6455 §5.2)."""
    return _frame(0x81, payload)


def binary_frame(payload: bytes) -> bytes:
    """A complete, final, unmasked binary frame (RFC 6455 §5.2)."""
    return _frame(0x82, payload)


def message_frame(room: str, seq: int, ts_ms: int, data: bytes) -> bytes:
    """The frame of one publication; ``room`` is validated ASCII, ``data`` JSON."""
    payload = b'{"op":"message","room":"%s","seq":%d,"ts":%d,"data":%s}' % (
        room.encode("ascii"),
        seq,
        ts_ms,
        data,
    )
    return text_frame(payload)
