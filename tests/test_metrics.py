"""metrics.py: every verb moves its family, live state is read at scrape time, the text parses.

Each test scrapes :meth:`Metrics.render` and reads it back with
prometheus_client's own parser, as Prometheus would read ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rtgateway.errors import DISCONNECT_REASONS, RATE_LIMITED, SLOW_CONSUMER
from rtgateway.metrics import HANDSHAKE_REJECTIONS, Histogram, Metrics
from rtgateway.protocol import ERROR_CODES

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics() -> Metrics:
    return Metrics(version="1.2.3", websockets_version="17.4")


def scrape(m: Metrics) -> Samples:
    """Every rtgateway_ sample of one render: {(name, sorted labels): value}."""
    samples: Samples = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for sample in family.samples:
            if sample.name.startswith("rtgateway_"):
                samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def families(m: Metrics) -> set[str]:
    return {f.name for f in text_string_to_metric_families(m.render().decode())}


# Sample changes that no verb causes: they move by themselves.
MOVING = ("rtgateway_log_events", "rtgateway_tasks_current")


def changes(before: Samples, after: Samples) -> dict[tuple[str, tuple[Any, ...]], float]:
    keys = set(before) | set(after)
    return {
        key: after.get(key, 0.0) - before.get(key, 0.0)
        for key in keys
        if after.get(key, 0.0) != before.get(key, 0.0) and not key[0].startswith(MOVING)
    }


def le(bound: str) -> tuple[tuple[str, str], ...]:
    return (("le", bound),)


VERBS: dict[str, tuple[Callable[[Metrics], None], dict[tuple[str, tuple[Any, ...]], float]]] = {
    "connection_opened": (
        lambda m: m.connection_opened(),
        {("rtgateway_connections_current", ()): 1, ("rtgateway_connections_total", ()): 1},
    ),
    "connection_closed": (
        lambda m: m.connection_closed(SLOW_CONSUMER),
        {
            ("rtgateway_connections_current", ()): -1,
            ("rtgateway_disconnects_total", (("reason", "slow_consumer"),)): 1,
        },
    ),
    "handshake_rejected": (
        lambda m: m.handshake_rejected("origin"),
        {("rtgateway_handshake_rejections_total", (("reason", "origin"),)): 1},
    ),
    "received": (
        lambda m: m.received(42),
        {("rtgateway_messages_received_total", ()): 1, ("rtgateway_received_bytes_total", ()): 42},
    ),
    "sent": (
        lambda m: m.sent(3, 300),
        {("rtgateway_messages_sent_total", ()): 3, ("rtgateway_sent_bytes_total", ()): 300},
    ),
    "protocol_error": (
        lambda m: m.protocol_error("bad_json"),
        {("rtgateway_protocol_errors_total", (("code", "bad_json"),)): 1},
    ),
    "rate_limit_refused": (
        lambda m: m.rate_limit_refused(),
        {("rtgateway_rate_limited_total", ()): 1},
    ),
    "message_dropped": (
        lambda m: m.message_dropped("drop_newest"),
        {("rtgateway_messages_dropped_total", (("policy", "drop_newest"),)): 1},
    ),
    "room_opened": (lambda m: m.room_opened(), {("rtgateway_rooms_current", ()): 1}),
    "room_closed": (lambda m: m.room_closed(), {("rtgateway_rooms_current", ()): -1}),
    "member_joined": (lambda m: m.member_joined(), {("rtgateway_room_members_current", ()): 1}),
    "member_left": (lambda m: m.member_left(), {("rtgateway_room_members_current", ()): -1}),
    "published": (
        lambda m: m.published(7, 0.003),
        {
            ("rtgateway_publishes_total", ()): 1,
            ("rtgateway_deliveries_total", ()): 7,
            **{("rtgateway_fanout_recipients_bucket", le(b)): 1 for b in ("10.0", "50.0")},
            ("rtgateway_fanout_recipients_count", ()): 1,
            ("rtgateway_fanout_recipients_sum", ()): 7,
            ("rtgateway_publish_seconds_bucket", le("0.005")): 1,
            ("rtgateway_publish_seconds_count", ()): 1,
            ("rtgateway_publish_seconds_sum", ()): 0.003,
        },
    ),
}


@pytest.mark.parametrize("verb", list(VERBS))
def test_each_verb_moves_its_family_and_nothing_else(verb: str) -> None:
    """One call, one scrape: exactly the samples the verb stands for changed, by that much."""
    call, expected = VERBS[verb]
    m = metrics()
    before = scrape(m)
    call(m)
    got = changes(before, scrape(m))
    # Histogram buckets are cumulative: every bucket from the first that holds it moves.
    for key in list(got):
        if key[0].endswith("_bucket") and key not in expected:
            assert got.pop(key) == 1, key
    assert got == pytest.approx(expected)


def test_the_broker_families_appear_once_there_is_a_broker_and_count_on() -> None:
    """No broker, no broker series; with one, its gauge and its three counters."""
    m = metrics()
    assert not any(name.startswith("rtgateway_broker") for name in families(m))
    m.broker_state(connected=False)
    assert scrape(m)["rtgateway_broker_connected", ()] == 0
    m.broker_state(connected=True)
    m.broker_reconnected()
    m.broker_error(3)
    m.broker_error()
    m.broker_stale_dropped()
    samples = scrape(m)
    assert samples["rtgateway_broker_connected", ()] == 1
    assert samples["rtgateway_broker_reconnects_total", ()] == 1
    assert samples["rtgateway_broker_errors_total", ()] == 4
    assert samples["rtgateway_broker_stale_total", ()] == 1


def test_the_api_families_exist_only_while_the_api_serves() -> None:
    """Before api_started and after api_stopped there is no API series at all."""
    m = metrics()
    assert "rtgateway_api_requests" not in families(m)
    m.api_started(["/api/publish", "/api/info"])
    samples = scrape(m)
    assert samples["rtgateway_api_request_seconds_count", (("endpoint", "/api/info"),)] == 0
    m.api_request("/api/publish", 200, 0.002)
    m.api_request("/api/publish", 200, 0.004)
    m.api_request("/api/publish", 503, 0.001)
    samples = scrape(m)
    requests = "rtgateway_api_requests_total"
    assert samples[requests, (("endpoint", "/api/publish"), ("status", "200"))] == 2
    assert samples[requests, (("endpoint", "/api/publish"), ("status", "503"))] == 1
    assert samples["rtgateway_api_request_seconds_count", (("endpoint", "/api/publish"),)] == 3
    m.api_stopped()
    assert not any(name.startswith("rtgateway_api") for name in families(m))


class State:
    """What metrics.Live reads: the server's state, changed between scrapes."""

    def __init__(self) -> None:
        self.draining = False
        self.max_connections = 100
        self.pending_handshakes = 0
        self.queued_bytes = 0


def test_live_state_is_read_at_scrape_time() -> None:
    """The gauges follow the state without a verb: two scrapes, two values."""
    m = metrics()
    assert scrape(m)["rtgateway_connections_max", ()] == 0  # no state yet
    state = State()
    m.live = state
    assert scrape(m)["rtgateway_connections_max", ()] == 100
    state.draining = True
    state.pending_handshakes = 7
    state.queued_bytes = 4096
    samples = scrape(m)
    assert samples["rtgateway_draining", ()] == 1
    assert samples["rtgateway_pending_handshakes_current", ()] == 7
    assert samples["rtgateway_outbox_queued_bytes", ()] == 4096


def test_labelled_families_carry_every_label_of_their_fixed_set_from_the_start() -> None:
    """A reason at 0 is a series too: rate() works from the first increment."""
    samples = scrape(metrics())

    def labels(name: str, key: str) -> set[str]:
        return {dict(lbls)[key] for n, lbls in samples if n == name}

    assert labels("rtgateway_disconnects_total", "reason") == set(DISCONNECT_REASONS)
    assert labels("rtgateway_handshake_rejections_total", "reason") == set(HANDSHAKE_REJECTIONS)
    assert labels("rtgateway_protocol_errors_total", "code") == set(ERROR_CODES)
    assert labels("rtgateway_messages_dropped_total", "policy") == {"drop_oldest", "drop_newest"}


def test_build_info_names_the_versions() -> None:
    """One series, value 1, labelled with the gateway's and websockets' versions."""
    [(labels, value)] = [
        (dict(lbls), v) for (n, lbls), v in scrape(metrics()).items() if n == "rtgateway_build_info"
    ]
    assert value == 1
    assert (labels["version"], labels["websockets"]) == ("1.2.3", "17.4")
    assert labels["python"].count(".") == 2


def test_tasks_are_counted_only_when_scraped_from_the_event_loop() -> None:
    """Outside a running loop (this test) there is no tasks gauge rather than a wrong one."""
    assert "rtgateway_tasks_current" not in families(metrics())


async def test_tasks_are_counted_when_scraped_on_the_event_loop() -> None:
    """On the loop the gauge counts the tasks alive, this test's own among them."""
    assert scrape(metrics())["rtgateway_tasks_current", ()] >= 1


def test_a_histogram_is_cumulative_with_an_inf_bucket_equal_to_its_count() -> None:
    """Values land in the first bucket they fit; +Inf holds them all."""
    h = Histogram((1, 5))
    for value in (0.5, 1, 3, 99):
        h.observe(value)
    assert h.buckets() == [("1.0", 2), ("5.0", 3), ("+Inf", 4)]
    assert (h.count, h.sum) == (4, 103.5)


def test_the_exposition_with_every_family_populated_parses() -> None:
    """Prometheus's parser reads the whole text, process and GC families included."""
    m = metrics()
    m.live = State()
    m.broker_state(connected=True)
    m.api_started(["/api/rooms/{room}"])
    m.api_request("/api/rooms/{room}", 404, 0.1)
    m.connection_closed(RATE_LIMITED)
    m.flush_frames.observe(3)
    m.loop_lag.observe(0.01)
    names = families(m)
    assert {"process_cpu_seconds", "rtgateway_event_loop_lag_seconds"} <= names
    assert all(name.startswith(("rtgateway_", "process_", "python_")) for name in names)
