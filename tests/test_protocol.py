"""The pure protocol module: parse, encode, frames; property tests; the schema."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtgateway import protocol
from rtgateway.protocol import Join, Leave, Ping, ProtocolError, Publish, parse

SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "protocol.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.text())
@settings(max_examples=500)
def test_any_text_parses_to_a_message_or_a_protocol_error(text: str) -> None:
    """Any text parses to a message or raises a ProtocolError with a documented code."""
    try:
        msg = parse(text)
    except ProtocolError as exc:
        assert exc.code in protocol.ERROR_CODES
        return
    assert isinstance(msg, Join | Leave | Publish | Ping)


@given(json_values)
@settings(max_examples=300)
def test_any_json_value_parses_to_a_message_or_a_protocol_error(value: Any) -> None:
    """Any JSON value parses to a message or raises a ProtocolError with a documented code."""
    try:
        msg = parse(json.dumps(value))
    except ProtocolError as exc:
        assert exc.code in protocol.ERROR_CODES
        return
    assert isinstance(msg, Join | Leave | Publish | Ping)


@given(
    op=st.sampled_from(["join", "leave", "publish", "ping", "nope", 7]),
    room=st.one_of(st.text(max_size=140), st.integers(), st.none()),
    id=st.one_of(st.integers(), st.text(max_size=80), st.booleans(), st.none()),
    data=json_values,
)
@settings(max_examples=500)
def test_parser_agrees_with_the_json_schema(op: Any, room: Any, id: Any, data: Any) -> None:
    """The parser accepts exactly what docs/protocol.schema.json accepts (but unencodable text)."""
    obj: dict[str, Any] = {"op": op, "data": data}
    if room is not None:
        obj["room"] = room
    if id is not None:
        obj["id"] = id
    text = json.dumps(obj)
    schema_valid = VALIDATOR.is_valid(obj)
    try:
        parse(text)
        parsed = True
    except ProtocolError:
        parsed = False
    # Lone surrogates pass the schema (it cannot say "valid Unicode") but not the parser.
    if schema_valid and not parsed:
        with pytest.raises(UnicodeEncodeError):
            text_value = json.dumps(obj, ensure_ascii=False)
            text_value.encode("utf-8")
    else:
        assert schema_valid == parsed, obj


@given(json_values)
@settings(max_examples=300)
def test_published_data_round_trips_through_the_frame(value: Any) -> None:
    """Published data comes out of the message frame as it went in."""
    try:
        msg = parse(json.dumps({"op": "publish", "room": "r", "data": value}))
    except ProtocolError as exc:
        assert exc.code == "bad_message"  # only unencodable text
        return
    assert isinstance(msg, Publish)
    frame = protocol.message_frame("r", 7, 1234, msg.data)
    payload = _unframe(frame)
    decoded = json.loads(payload)
    assert decoded == {"op": "message", "room": "r", "seq": 7, "ts": 1234, "data": value}


def _unframe(frame: bytes) -> bytes:
    assert frame[0] == 0x81
    length = frame[1]
    if length == 126:
        return frame[4 : 4 + int.from_bytes(frame[2:4], "big")]
    if length == 127:
        return frame[10 : 10 + int.from_bytes(frame[2:10], "big")]
    return frame[2 : 2 + length]


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_frames_use_the_right_length_encoding(size: int) -> None:
    """Frames use the 7-, 16- or 64-bit length form their size calls for."""
    payload = b"a" * size
    assert _unframe(protocol.text_frame(payload)) == payload
    assert protocol.binary_frame(payload)[0] == 0x82


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("{", "bad_json"),
        ("[1, 2]", "bad_message"),
        ('{"op": 1}', "bad_message"),
        ('{"op": "dance"}', "unknown_op"),
        ('{"op": "join"}', "bad_message"),
        ('{"op": "join", "room": 5}', "bad_message"),
        ('{"op": "join", "room": "a b"}', "invalid_room"),
        ('{"op": "join", "room": "' + "a" * 129 + '"}', "invalid_room"),
        ('{"op": "join", "room": ""}', "invalid_room"),
        ('{"op": "join", "room": "a", "policy": "yolo"}', "bad_message"),
        ('{"op": "publish", "room": "a"}', "bad_message"),
        ('{"op": "publish", "room": "a", "data": NaN}', "bad_json"),
        ('{"op": "publish", "room": "a", "data": Infinity}', "bad_json"),
        ('{"op": "publish", "room": "a", "data": "\\ud800"}', "bad_message"),
        ('{"op": "publish", "room": "a", "data": ' + "1" * 5000 + "}", "bad_json"),
        (
            '{"op": "publish", "room": "a", "data": ' + "[" * 100_000 + "]" * 100_000 + "}",
            "bad_json",
        ),
        ('{"op": "ping", "id": true}', "bad_message"),
        ('{"op": "ping", "id": 1.5}', "bad_message"),
        ('{"op": "ping", "id": "' + "x" * 65 + '"}', "bad_message"),
        ('{"op": "ping", "id": 9007199254740992}', "bad_message"),
        ('{"op": "ping", "id": "\\udc00"}', "bad_message"),
    ],
)
def test_bad_input_gets_the_documented_code(text: str, code: str) -> None:
    """Each kind of bad input gets the error code docs/protocol.md gives it."""
    with pytest.raises(ProtocolError) as info:
        parse(text)
    assert info.value.code == code


def test_errors_keep_the_request_id_when_it_could_be_read() -> None:
    """An error keeps the request's id when it could be read."""
    with pytest.raises(ProtocolError) as info:
        parse('{"op": "join", "room": "bad room", "id": 42}')
    assert info.value.id == 42


def test_valid_messages_parse() -> None:
    """Valid join, leave, publish and ping messages parse to their values."""
    assert parse('{"op":"join","room":"lobby","id":1}') == Join("lobby", 1)
    assert parse('{"op":"join","room":"t","policy":"drop_oldest"}') == Join(
        "t", None, "drop_oldest"
    )
    assert parse('{"op":"leave","room":"lobby","id":"x"}') == Leave("lobby", "x")
    assert parse('{"op":"publish","room":"a.b:c-d_e","data":{"k":[1,2.5,"é"]}}') == Publish(
        "a.b:c-d_e", '{"k":[1,2.5,"é"]}'.encode()
    )
    assert parse('{"op":"ping"}') == Ping(None)


def test_deep_but_legal_nesting_round_trips() -> None:
    """Data nested 200 deep is accepted and round-trips."""
    data = json.loads("[" * 200 + "]" * 200)
    msg = parse(json.dumps({"op": "publish", "room": "a", "data": data}))
    assert isinstance(msg, Publish)
    assert json.loads(msg.data) == data


def test_floats_stay_finite() -> None:
    """A float at the edge of the double range stays finite."""
    msg = parse('{"op":"publish","room":"a","data":1e308}')
    assert isinstance(msg, Publish)
    assert math.isfinite(json.loads(msg.data))
