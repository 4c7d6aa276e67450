"""Helpers for the hostile-input, fuzz, conformance and soak tests.

- :func:`scrape` reads a gateway's ``/metrics`` into a dict keyed by sample
  name and labels, e.g. ``m["rtgateway_disconnects_total", ("aborted",)]``.
- :func:`tracebacks` finds the log lines that carry an exception.
- :func:`tls_client_hello` makes the bytes a real TLS client sends first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl

from prometheus_client.parser import text_string_to_metric_families
from support import http_get

__all__ = [
    "Samples",
    "ascrape",
    "metric",
    "open_fds",
    "rss_bytes",
    "scrape",
    "tls_client_hello",
    "tracebacks",
]

Samples = dict[tuple[str, tuple[str, ...]], float]


def scrape(base_url: str) -> Samples:
    """Every sample of ``base_url``/metrics: {(name, label values): value}."""
    status, body, _ = http_get(base_url + "/metrics")
    assert status == 200, (status, body[:200])
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[sample.name, tuple(sample.labels.values())] = sample.value
    return samples


async def ascrape(base_url: str) -> Samples:
    """:func:`scrape` off the event loop (the gateway may share it)."""
    return await asyncio.to_thread(scrape, base_url)


def tracebacks(lines: list[str]) -> list[str]:
    """Log lines that report an exception: a traceback, or an ``exception`` field."""
    bad = []
    for line in lines:
        if "Traceback" in line:
            bad.append(line)
            continue
        try:
            event = json.loads(line)
        except ValueError:
            # Anything that is not a JSON line is itself a finding: the
            # gateway logs JSON only (a bare traceback would land here).
            if line.strip():
                bad.append(line)
            continue
        if isinstance(event, dict) and ("exception" in event or "exc_info" in event):
            bad.append(line)
    return bad


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def tls_client_hello() -> bytes:
    """The first flight of a real TLS client (a ClientHello record)."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="gateway.example")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16", hello[:8]  # a TLS handshake record
    return hello


def metric(samples: Samples, name: str, *labels: str) -> float:
    return samples.get((name, tuple(labels)), 0.0)
