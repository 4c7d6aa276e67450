"""httpmsg.py: the publish API's messages, and the head checks stricter than h11 (pure).

:func:`~rtgateway.httpmsg.check_head` runs on the raw head before h11 reads
it; here it is given heads directly. What the API answers on a socket for
each of these is ``test_http11.py``'s and ``test_hostile_http.py``'s.
"""

from __future__ import annotations

import json

import pytest

from rtgateway.httpmsg import MAX_HEADERS, OTHER, HttpError, Request, Response, check_head


def head(*fields: str, line: str = "POST /api/publish HTTP/1.1") -> bytearray:
    """A request head as it arrives: CRLF line endings, an empty line at the end."""
    return bytearray("\r\n".join([line, "Host: x", *fields]).encode() + b"\r\n\r\n")


@pytest.mark.parametrize(
    ("fields", "length"),
    [
        ((), 0),
        (("Content-Length: 27",), 27),
        (("content-length:   5  ",), 5),
        (("Content-Length: 0",), 0),
        (("Transfer-Encoding: chunked",), None),
        (("TRANSFER-ENCODING: Chunked",), None),
    ],
    ids=["no_body", "length", "lowercase_and_spaces", "zero", "chunked", "chunked_any_case"],
)
def test_a_well_framed_head_passes_and_says_how_its_body_is_framed(
    fields: tuple[str, ...], length: int | None
) -> None:
    """The body's length, 0 without one, None when it is chunked."""
    assert check_head(head(*fields)) == length


@pytest.mark.parametrize(
    "fields",
    [
        ("Content-Length: 3", "Content-Length: 3"),
        ("Content-Length: 3, 3",),
        ("Content-Length: +3",),
        ("Content-Length: 3", "Transfer-Encoding: chunked"),
        ("Transfer-Encoding: chunked", "Transfer-Encoding: chunked"),
        ("Transfer-Encoding: chunked, chunked",),
        ("Transfer-Encoding: gzip",),
        ("X-Folded: a", " continued"),
        ("X-Tab-Folded: a", "\tcontinued"),
        ("X-Control: a\x01b",),
        ("X-Delete: a\x7fb",),
    ],
    ids=[
        "length_twice",
        "length_list",
        "length_signed",
        "length_and_coding",
        "coding_twice",
        "coding_list",
        "coding_not_chunked",
        "obs_fold",
        "obs_fold_tab",
        "control_character",
        "delete",
    ],
)
def test_a_head_a_proxy_could_read_another_way_is_refused_400_and_closed(
    fields: tuple[str, ...],
) -> None:
    """Each of these is a request-smuggling lever (RFC 9112 §11.2): 400, then close."""
    with pytest.raises(HttpError) as refused:
        check_head(head(*fields))
    assert (refused.value.status, refused.value.close) == (400, True)


def test_a_tab_inside_a_field_value_is_no_control_character() -> None:
    """HTAB is legal in a field value (RFC 9110 §5.5)."""
    assert check_head(head("X-Tab: a\tb")) == 0


def test_more_header_fields_than_the_limit_get_431() -> None:
    """MAX_HEADERS fields pass; one more is refused."""
    fields = [f"X-{n}: y" for n in range(MAX_HEADERS - 1)]  # with Host: the limit
    assert check_head(head(*fields)) == 0
    with pytest.raises(HttpError) as refused:
        check_head(head(*fields, "X-One-More: y"))
    assert (refused.value.status, refused.value.close) == (431, True)


def test_leading_zeros_are_read_as_the_value_and_trimmed_for_h11_past_20_characters() -> None:
    """RFC 9110 §8.6 allows them; h11 reads at most 20 characters, so it is given fewer."""
    short = head("Content-Length: 007")
    assert check_head(short) == 7
    assert b"Content-Length: 007\r\n" in short  # untouched: h11 reads it as it is
    long = head("Content-Length: " + "0" * 38 + "27")
    assert check_head(long) == 27
    assert b"\r\nContent-Length: 27\r\n" in long


def test_a_length_of_more_than_18_digits_is_too_large_not_malformed() -> None:
    """Past any limit the API has: 413, before int() could be asked for 5000 digits."""
    with pytest.raises(HttpError) as refused:
        check_head(head("Content-Length: " + "9" * 5000))
    assert (refused.value.status, refused.value.close) == (413, True)


def test_a_json_response_is_compact_utf8_with_its_content_type() -> None:
    """The API's answers: no spaces, UTF-8 as it is, application/json."""
    response = Response.json(200, {"room": "café", "seq": 1}, {"X-A": "1"})
    assert response.body == '{"room":"café","seq":1}'.encode()
    assert json.loads(response.body) == {"room": "café", "seq": 1}
    assert (response.content_type, response.headers, response.close) == (
        "application/json",
        {"X-A": "1"},
        False,
    )


def test_an_http_error_keeps_the_connection_unless_told_and_carries_its_headers() -> None:
    """close defaults to False; headers go with the answer."""
    plain = HttpError(404, "not found")
    assert (plain.status, plain.message, plain.close, plain.headers, str(plain)) == (
        404,
        "not found",
        False,
        {},
        "not found",
    )
    busy = HttpError(503, "busy", close=True, headers={"Retry-After": "2"})
    assert (busy.close, busy.headers) == (True, {"Retry-After": "2"})


def test_a_request_matched_by_no_route_is_labelled_other() -> None:
    """The endpoint label defaults to OTHER until a route names it."""
    request = Request("GET", "/nowhere", "", "1.1", {})
    assert request.endpoint == OTHER == "other"
