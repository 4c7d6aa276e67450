"""testing.py: GatewayProcess, the one launcher of a gateway subprocess, and its log parser.

Tests use it through :mod:`support` (which closes the output pipe it leaves
open, see there); the one test of that pipe uses the package's class itself.
"""

from __future__ import annotations

import json
import signal

import pytest
from support import GatewayProcess, http_get

from rtgateway import testing
from rtgateway.testing import parse_log_line


def test_it_starts_on_a_port_the_kernel_chose_and_says_which() -> None:
    """Ready once the gateway logged where it listens; the port answers."""
    with GatewayProcess() as gw:
        assert gw.port is not None and gw.port > 0
        listening = [e for e in gw.events if e.get("event") == "gateway_listening"]
        assert [e["addresses"] for e in listening] == [[f"127.0.0.1:{gw.port}"]]
        assert http_get(gw.url + "/healthz")[:2] == (200, "ok")
        assert gw.ws_url == f"ws://127.0.0.1:{gw.port}"


def test_stop_drains_and_returns_the_exit_status() -> None:
    """SIGTERM, the drain, status 0; every line the gateway wrote is kept."""
    gw = GatewayProcess({"RTG_DRAIN_WINDOW_S": "0.1"}).start()
    try:
        assert gw.stop() == 0
        events = [e.get("event") for e in gw.events]
        assert events.index("drain_started") < events.index("drain_finished")
        assert gw.tracebacks() == []
    finally:
        gw.kill()


def test_stop_returns_the_status_of_a_process_that_already_ended() -> None:
    """A gateway killed meanwhile: stop() reports how it ended rather than signalling again."""
    with GatewayProcess() as gw:
        gw.signal(signal.SIGKILL)
        assert gw.wait(10) == -signal.SIGKILL
        assert gw.stop() == -signal.SIGKILL


def test_a_gateway_that_cannot_start_is_reported_with_its_output() -> None:
    """A bad setting: start() raises with what the gateway said, and leaves nothing running."""
    gw = GatewayProcess({"RTG_MAX_CONNECTIONS": "many"})
    with pytest.raises(RuntimeError) as failed:
        gw.start(timeout=5)
    assert "RTG_MAX_CONNECTIONS: expected an integer" in str(failed.value)
    assert gw.proc is not None and gw.proc.poll() == 2


def test_the_open_files_limit_is_set_before_the_gateway_starts() -> None:
    """nofile= is the child's soft and hard RLIMIT_NOFILE; the gateway's limits follow it."""
    with GatewayProcess(nofile=256) as gw:
        assert gw.proc is not None
        with open(f"/proc/{gw.proc.pid}/limits") as f:
            [line] = [line for line in f if line.startswith("Max open files")]
        assert line.split()[3:5] == ["256", "256"]
        [limits] = [e for e in gw.events if e.get("event") == "limits"]
        assert limits["nofile_soft"] == 256


def test_entering_a_started_gateway_does_not_start_another() -> None:
    """``with GatewayProcess().start() as gw`` runs one process, the one it started."""
    gw = testing.GatewayProcess().start()
    first = gw.proc
    assert first is not None
    with gw as entered:
        assert entered.proc is first
    assert first.poll() is not None


def test_the_output_pipe_is_closed_once_the_gateway_is_gone() -> None:
    """Nothing of a stopped gateway stays open in the process that ran it."""
    gw = testing.GatewayProcess().start()
    try:
        assert gw.stop() == 0
        assert gw.proc is not None and gw.proc.stdout is not None
        closed = gw.proc.stdout.closed
    finally:
        assert gw.proc is not None and gw.proc.stdout is not None
        gw.proc.stdout.close()
    assert closed


@pytest.mark.parametrize(
    ("line", "event"),
    [
        ('{"event": "gateway_listening", "addresses": ["127.0.0.1:1"]}', "gateway_listening"),
        ("Traceback (most recent call last):", None),
        ('["a", "list"]', None),
        ("", None),
    ],
    ids=["json_event", "plain_text", "json_not_an_object", "empty"],
)
def test_parse_log_line_reads_json_objects_and_nothing_else(line: str, event: str | None) -> None:
    """A JSON object is an event; any other line is {} (it is still kept as a line)."""
    parsed = parse_log_line(line)
    if event is None:
        assert parsed == {}
    else:
        assert parsed == json.loads(line)


def test_tracebacks_finds_the_lines_that_carry_an_exception() -> None:
    """A plain traceback or a JSON event with an exception field; not other lines."""
    gw = GatewayProcess()
    gw.lines = [
        '{"event": "gateway_listening"}',
        '{"event": "message_failed", "exception": [{"exc_type": "ValueError"}]}',
        "Traceback (most recent call last):",
    ]
    assert gw.tracebacks() == gw.lines[1:]
