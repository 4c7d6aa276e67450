"""The benchmark in its tiny mode: every figure, for the gateway and the baseline, nothing lost.

``bench/bench.py --tiny`` runs every scenario with a few hundred connections
against a gateway subprocess and against stock websockets. Timings are the
benchmark's business (docs/performance.md); this test asserts only that each
figure was produced for both servers and that no publication was lost.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

BENCH = ROOT / "bench" / "bench.py"
ROOM_FIGURES = (
    "deliveries",
    "deliveries_per_s",
    "cpu_s_per_1000",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "writes_per_delivery",
    "lost",
)
ECHO_FIGURES = ("round_trips", "round_trips_per_s", "cpu_s_per_1000", "p50_ms", "p99_ms")


@pytest.mark.timeout(180)
def test_tiny_benchmark_reports_every_figure_for_both_servers_and_loses_nothing(
    tmp_path: Path,
) -> None:
    """bench.py --tiny reports every figure for the gateway and the baseline, and loses nothing."""
    report_path = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--no-plot", "--json", str(report_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_path.read_text())
    rows = {(row["scenario"], row["phase"]): row for row in report["rows"]}
    assert set(rows) == {
        ("idle", ""),
        ("fanout", "rate"),
        ("fanout", "max"),
        ("rooms", "rate"),
        ("burst", "rate"),
        ("echo", "closed_loop"),
    }
    for (scenario, _), row in rows.items():
        for kind in ("gateway", "baseline"):
            figures = row[kind]
            assert figures["failed"] == 0, (scenario, kind, figures)
            assert figures["connected"] == row["clients"], (scenario, kind, figures)
            if scenario == "idle":
                assert figures["kib_per_conn"] > 0, (kind, figures)
            elif scenario == "echo":
                for key in ECHO_FIGURES:
                    assert figures[key] is not None, (scenario, kind, key)
                assert figures["round_trips"] > 0
            else:
                for key in ROOM_FIGURES:
                    assert figures.get(key) is not None, (scenario, kind, key)
                assert figures["deliveries"] > 0, (scenario, kind, figures)
                assert figures["lost"] == 0, (scenario, kind, figures)
                assert figures["out_of_order"] == 0, (scenario, kind, figures)
        assert row["ratio"], scenario
    # The gateway's own count of frames per write backs the syscall count.
    assert rows[("burst", "rate")]["gateway"]["flush_frames"] > 0
    # The terminal table carries the ratios, and the report says what the baseline was.
    assert "gw/base" in done.stdout
    assert report["baseline"] == "stock websockets"


def test_heap_objects_lists_what_one_idle_connection_holds() -> None:
    """bench/heap_objects.py walks one joined connection: its protocol, parser, outbox, session."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "heap_objects.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for held in (
        "connection (GatewayConnection)",
        "protocol (ServerProtocol)",
        "['parser'] (generator)",
        "outbox (Outbox)",
        "handler (Session)",
        "rooms (dict)",
        "transport (",
    ):
        assert held in done.stdout, (held, done.stdout)
    total = int(done.stdout.splitlines()[-1].split()[-2])
    assert total > 0
