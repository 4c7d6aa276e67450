"""log.py: the repeat limiter and its counters, and what a logged traceback may hold.

The limiter is driven by a fake clock. The rendering tests configure logging
for real (JSON lines on a captured stdout) and put the process's logging back
as it was afterwards.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog
from recording import FakeClock

from rtgateway import log
from rtgateway.log import EVENTS, MAX_KEYS, REPEAT_BURST, SUPPRESSED, RepeatLimiter


def test_a_burst_of_one_event_is_written_then_the_rest_of_the_window_is_counted_not_written() -> (
    None
):
    """REPEAT_BURST writes per name per window; every one counted, the others as suppressed."""
    limiter = RepeatLimiter(clock=FakeClock())
    events, suppressed = EVENTS["error"], SUPPRESSED["error"]
    allowed = [limiter.allow("error", "message_failed")[0] for _ in range(REPEAT_BURST + 5)]
    assert allowed == [True] * REPEAT_BURST + [False] * 5
    assert EVENTS["error"] - events == REPEAT_BURST + 5
    assert SUPPRESSED["error"] - suppressed == 5


def test_the_first_event_written_after_a_suppression_says_how_many_were_left_out() -> None:
    """Nothing is lost silently: the next line written carries repeats_suppressed."""
    clock = FakeClock()
    limiter = RepeatLimiter(burst=2, window_s=10.0, clock=clock)
    for _ in range(5):
        limiter.allow("warning", "slow")
    clock.advance(10.0)
    assert limiter.allow("warning", "slow") == (True, 3)
    assert limiter.allow("warning", "slow") == (True, 0)


def test_names_are_limited_apart_and_quieter_levels_not_at_all() -> None:
    """One noisy event does not silence another; info and debug are never held back or counted."""
    limiter = RepeatLimiter(burst=1, clock=FakeClock())
    info = dict(EVENTS)
    assert limiter.allow("warning", "a") == (True, 0)
    assert limiter.allow("warning", "a") == (False, 0)
    assert limiter.allow("warning", "b") == (True, 0)
    assert all(limiter.allow("info", "a")[0] for _ in range(10))
    assert EVENTS["warning"] - info["warning"] == 3


@pytest.mark.parametrize(("method", "level"), [("warn", "warning"), ("exception", "error")])
def test_aliases_count_under_their_level(method: str, level: str) -> None:
    """logger.exception() is an error, logger.warn() a warning, for the counters too."""
    limiter = RepeatLimiter(clock=FakeClock())
    before = EVENTS[level]
    limiter.allow(method, "x")
    assert EVENTS[level] == before + 1


def test_the_limiter_forgets_the_oldest_name_past_max_keys() -> None:
    """Event names chosen from input could not grow its memory without bound."""
    limiter = RepeatLimiter(burst=1, clock=FakeClock())
    for n in range(MAX_KEYS + 10):
        limiter.allow("warning", f"event-{n}")
    assert len(limiter.windows) == MAX_KEYS
    assert "event-0" not in limiter.windows
    assert f"event-{MAX_KEYS + 9}" in limiter.windows


def test_as_a_processor_it_drops_the_suppressed_and_marks_the_next_one() -> None:
    """structlog's chain: DropEvent when over the limit, a field when something was dropped."""
    clock = FakeClock()
    limiter = RepeatLimiter(burst=1, clock=clock)
    assert limiter(None, "error", {"event": "e"}) == {"event": "e"}
    with pytest.raises(structlog.DropEvent):
        limiter(None, "error", {"event": "e"})
    clock.advance(60)
    assert limiter(None, "error", {"event": "e"}) == {"event": "e", "repeats_suppressed": 1}


@pytest.fixture
def configured(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """capsys, for a test that calls log.configure(); the process's logging restored after.

    (configure() binds the sys.stdout of the moment: the test's, not the fixture's.)
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    websockets_level = logging.getLogger("websockets").level
    try:
        yield capsys
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("websockets").setLevel(websockets_level)


def lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_a_logged_traceback_has_its_frames_but_not_their_local_variables(
    configured: pytest.CaptureFixture[str],
) -> None:
    """A request's locals hold its headers, a bearer token among them: never in the log."""
    log.configure("info", "json")
    logger = log.get_logger(conn_id="c1")

    def handle(authorization: str) -> None:
        token = authorization.removeprefix("Bearer ")
        raise ValueError(f"bad request of {len(token)} characters")

    try:
        handle("Bearer s3cr3t-t0k3n")
    except ValueError:
        logger.exception("request_failed")
    out = configured.readouterr().out
    assert "s3cr3t" not in out
    [event] = [json.loads(line) for line in out.splitlines()]
    assert (event["event"], event["level"], event["conn_id"]) == ("request_failed", "error", "c1")
    [exception] = event["exception"]
    assert exception["exc_type"] == "ValueError"
    frames = exception["frames"]
    assert [f["name"] for f in frames][-1] == "handle"
    assert all(not f.get("locals") for f in frames)


def test_records_of_the_standard_library_are_limited_the_same_way(
    configured: pytest.CaptureFixture[str],
) -> None:
    """asyncio's or websockets' repeated warnings: a burst written, the rest counted."""
    log.configure("info", "json")
    suppressed = SUPPRESSED["warning"]
    noisy = logging.getLogger("asyncio")
    for _ in range(REPEAT_BURST + 3):
        noisy.warning("socket.send() raised exception.")
    written = lines(configured)
    assert len(written) == REPEAT_BURST
    assert {e["event"] for e in written} == {"socket.send() raised exception."}
    assert SUPPRESSED["warning"] - suppressed == 3


def test_websockets_per_connection_info_lines_are_turned_down(
    configured: pytest.CaptureFixture[str],
) -> None:
    """Ten thousand clients do not write ten thousand 'connection open' lines."""
    log.configure("info", "json")
    logging.getLogger("websockets.server").info("connection open")
    logging.getLogger("websockets.server").warning("something worth a line")
    assert [e["event"] for e in lines(configured)] == ["something worth a line"]
