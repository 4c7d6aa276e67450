"""A short soak in CI: bench/soak.py for 40 s of churn against a gateway subprocess.

The full soak is `make soak DURATION=...` (docs/hardening.md). This one fails on
any publication lost by a healthy client, on a traceback in the gateway's log,
on descriptors or asyncio tasks left behind once every client has gone, and on
RSS growth past 24 MiB against the baseline taken after a warm-up (a 40 s run
grows by about 2 MiB; a per-connection leak of 1 KiB over its ~2000 connections
would show as 2 MiB more, so the bound catches only gross leaks, while
descriptors and tasks must return exactly).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

SOAK = ROOT / "bench" / "soak.py"
MAX_RSS_GROWTH_MIB = 24


@pytest.mark.timeout(240)
def test_short_soak_loses_nothing_and_returns_to_its_baseline(tmp_path: Path) -> None:
    """A 40 s soak loses nothing and the gateway returns to its baseline after."""
    report_path = tmp_path / "soak.json"
    done = subprocess.run(
        [
            sys.executable,
            str(SOAK),
            "--duration",
            "40",
            "--warmup",
            "8",
            "--max-rss-growth-mib",
            str(MAX_RSS_GROWTH_MIB),
            "--max-fd-growth",
            "0",
            "--max-task-growth",
            "0",
            "--json",
            str(report_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=200,
    )
    print(done.stdout)
    report = json.loads(report_path.read_text())
    assert done.returncode == 0, done.stdout + done.stderr

    delivery = report["delivery"]
    assert delivery["published_acked"] > 500
    assert delivery["lost"] == 0
    assert delivery["delivered_to_observers"] == delivery["expected_deliveries_to_observers"]
    assert report["churn"]["gaps"] == report["churn"]["own_publications_missing"] == 0
    assert report["churn"]["cycles"] > 100
    assert report["growth"]["open_fds"] == 0
    assert report["growth"]["rss_mib"] <= MAX_RSS_GROWTH_MIB
    if report["growth"]["tasks"] is not None:
        assert report["growth"]["tasks"] == 0
    # The abuse happened and was handled the documented way.
    gateway = report["gateway"]
    assert gateway.get('disconnects_total{reason="rate_limited"}', 0) > 0
    assert gateway.get('disconnects_total{reason="protocol_error"}', 0) > 0
    assert gateway.get('disconnects_total{reason="message_too_large"}', 0) > 0
    assert gateway.get('disconnects_total{reason="aborted"}', 0) > 0
    assert report["gateway_tracebacks"] == []
    assert report["gateway_exit_status"] == 0
