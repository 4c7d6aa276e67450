"""The publish API's readers and errors (rtgateway/apimsg.py), pure: no sockets.

What reaches them over the real listener is tested in test_api.py and
test_moderation.py; here, each reader's limits one by one, hostile input
included: every refusal is an :class:`ApiError` with a documented code,
never another exception.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from rtgateway import protocol
from rtgateway.apimsg import (
    API_ERROR_CODES,
    HTTP_ERROR_CODES,
    MAX_PAGE,
    STATUS_OF,
    ApiError,
    conn_id_of,
    load_json,
    page_of,
    reason_of,
)
from rtgateway.httpmsg import HttpError


def refusal(call: Any, *args: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        call(*args)
    return info.value


def test_every_code_has_its_status_and_the_api_keeps_the_protocols() -> None:
    """Each code the API may answer with maps to one HTTP status; the protocol's codes are kept."""
    assert set(protocol.ERROR_CODES) <= set(API_ERROR_CODES)
    assert "unknown_connection" in HTTP_ERROR_CODES
    for code in ("unknown_namespace", "unknown_connection", "not_joined"):
        assert STATUS_OF[code] == 404
    assert all(400 <= status <= 599 for status in STATUS_OF.values())
    assert set(STATUS_OF) <= set(API_ERROR_CODES)


def test_an_error_answers_its_code_status_and_index_as_json() -> None:
    """ApiError's response is {"error": {"code", "message", "index"?}} with the code's status."""
    error = ApiError("unknown_namespace", "x is not a namespace", index=3)
    response = error.response()
    assert response.status == 404
    assert json.loads(response.body) == {
        "error": {"code": "unknown_namespace", "message": "x is not a namespace", "index": 3}
    }
    assert ApiError.from_http(HttpError(431, "too many headers")).code == "bad_request"
    assert ApiError.from_http(HttpError(502, "?")).code == "internal"
    assert ApiError.from_http(error) is error


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe", b"[" * 100_000, b"NaN", b'{"a": Infinity}', b"1e999", b"9" * 5000, b"{"],
)
def test_load_json_refuses_what_the_room_protocol_refuses_with_bad_json(body: bytes) -> None:
    """Not UTF-8, too deep, NaN, out of range, past 4300 digits, truncated: bad_json."""
    assert refusal(load_json, body).code == "bad_json"


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "x.y",
        {},
        {"conn_id": 5},
        {"conn_id": "no-dot"},
        {"conn_id": "a.b.c"},
        {"conn_id": "a\n.b"},
        {"conn_id": "a.b\r\nlevel=error"},
        {"conn_id": "\x1b[31m.x"},
        {"conn_id": "x" * 33 + ".y"},
        {"conn_id": "x." + "y" * 100_000},
        {"conn_id": "é.b"},
    ],
)
def test_conn_id_of_refuses_anything_but_a_hellos_conn_id(body: Any) -> None:
    """A missing, non-string, oversized or hostile conn_id (newlines, escapes) is bad_message."""
    error = refusal(conn_id_of, body)
    assert error.code == "bad_message"
    assert "\n" not in error.message and "\x1b" not in error.message


def test_conn_id_of_takes_the_two_tokens_of_a_hello() -> None:
    """<node>.<token>, each 1-32 of A-Z a-z 0-9 _ -, is taken as it is."""
    assert conn_id_of({"conn_id": "Ab_9-." + "z" * 32}) == "Ab_9-." + "z" * 32


@pytest.mark.parametrize("reason", [5, None, ["x"], "x" * 124, "é" * 62, "\ud800"])
def test_reason_of_refuses_what_does_not_fit_a_close_frame(reason: Any) -> None:
    """Not a string, over 123 bytes of UTF-8, or not encodable (a lone surrogate): bad_message."""
    assert refusal(reason_of, {"reason": reason}).code == "bad_message"


def test_reason_of_takes_up_to_123_bytes_and_defaults_to_empty() -> None:
    """A reason of exactly 123 bytes is kept; none given is the empty string."""
    assert reason_of({"reason": "é" * 61 + "x"}) == "é" * 61 + "x"
    assert reason_of({}) == ""


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        f"limit={MAX_PAGE + 1}",
        "limit=-1",
        "limit=1.5",
        "limit=%EF%BC%91",  # a full-width digit: isdigit() but not ASCII
        "limit=" + "9" * 5000,  # past int()'s digit limit
        "limit=1&limit=2",
        "cursor=a&cursor=b",
        "cursor=bad%20cursor",
        "cursor=" + "x" * 10_000,
        "cursor=%ff",
        "&".join(f"k{n}=v" for n in range(65)),  # more fields than a listing ever needs
    ],
)
def test_page_of_refuses_limits_and_cursors_outside_the_documented_range(query: str) -> None:
    """A limit outside 1-1000, a repeated or malformed parameter, a bad cursor: bad_request."""
    error = refusal(page_of, query, protocol.valid_room, "a room name")
    assert error.code == "bad_request" and error.status == 400


def test_page_of_reads_limit_and_cursor_and_their_defaults() -> None:
    """No query is the default page from the start; leading zeros and unknown keys are fine."""
    assert page_of("", protocol.valid_room, "") == (100, None)
    assert page_of("limit=0007&cursor=news:eu&x=1", protocol.valid_room, "") == (7, "news:eu")
    assert page_of(f"limit={MAX_PAGE}", protocol.valid_conn_id, "")[0] == MAX_PAGE
