#!/usr/bin/env python3
"""The publish API's HTTP layer: ``POST /api/publish`` pipelined on one keep-alive connection.

    python bench/api_pipeline.py                  # 2000 requests, 3 runs
    python bench/api_pipeline.py --requests 5000 --runs 5

A gateway subprocess serves the API on loopback; each run opens one
connection, writes every request at once and reads the answers, which must
all be 200. The room has no members, so what is measured is the wire (head,
body, response) and the hub's publish call, not fan-out. Printed per run and
as the median: requests per second of wall time, and the gateway's CPU time
per request (from /proc, in nanoseconds), the figure to compare on a machine
shared with the load generator. To compare two commits, run the script from
each checkout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rtgateway.testing import GatewayProcess


def cpu_s(pid: int) -> float:
    """CPU seconds that ``pid``'s threads have run so far (schedstat: nanoseconds, not ticks)."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return sum(int((task / "schedstat").read_text().split()[0]) for task in tasks) / 1e9


def requests(count: int) -> bytes:
    parts = []
    for i in range(count):
        body = json.dumps({"room": "bench", "data": {"n": i}}).encode()
        parts.append(
            b"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
    return b"".join(parts)


async def run(port: int, wire: bytes, count: int) -> float:
    """Write ``count`` pipelined requests, read every answer; the seconds it took."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.perf_counter()
    writer.write(wire)
    for _ in range(count):
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            raise SystemExit(f"not 200: {head[:40]!r}")
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        await reader.readexactly(length)
    elapsed = time.perf_counter() - start
    writer.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="per run (default 2000)")
    parser.add_argument("--runs", type=int, default=3, help="default 3")
    args = parser.parse_args()
    wire = requests(args.requests)
    env = {"RTG_API_ADDR": "127.0.0.1:0", "RTG_STATS_INTERVAL_S": "0"}
    rates, cpu_us = [], []
    with GatewayProcess(env) as gateway:
        assert gateway.proc is not None
        listening = next(e for e in gateway.events if e.get("event") == "gateway_listening")
        port = int(listening["api_addresses"][0].rsplit(":", 1)[1])
        asyncio.run(run(port, requests(100), 100))  # warm up
        for i in range(args.runs):
            before = cpu_s(gateway.proc.pid)
            elapsed = asyncio.run(run(port, wire, args.requests))
            cpu = cpu_s(gateway.proc.pid) - before
            rates.append(args.requests / elapsed)
            cpu_us.append(cpu / args.requests * 1e6)
            print(
                f"run {i + 1}: {rates[-1]:8.0f} requests/s  "
                f"{cpu_us[-1]:6.1f} µs gateway CPU per request"
            )
    print(
        f"median: {statistics.median(rates):8.0f} requests/s  "
        f"{statistics.median(cpu_us):6.1f} µs gateway CPU per request "
        f"({args.requests} pipelined requests, {args.runs} runs)"
    )


if __name__ == "__main__":
    main()
