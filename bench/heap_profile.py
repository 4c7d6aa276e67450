"""Where a gateway's memory per connection goes: tracemalloc around N joined connections.

    .venv/bin/python bench/heap_profile.py --connections 2000 --rooms 20

Two processes, so that the clients' allocations stay out of the picture:

- the server (this script with ``--serve``) runs the real :class:`rtgateway.app.Gateway`
  in-process on uvloop, as ``python -m rtgateway`` does, with ``tracemalloc`` tracing
  ``--frames`` frames per allocation; it takes a snapshot before any client and one after;
- the parent opens ``--connections`` WebSockets (websockets' asyncio client, no compression),
  joins each to one of ``--rooms`` rooms, has one member per room publish one message, waits
  for every delivery, then asks the server for the second snapshot.

The server prints the growth between the snapshots grouped by file and by line, the total per
connection, and the growth of its RSS per connection over the same interval. tracemalloc sees
only Python's allocators: the difference between RSS and traced growth is memory that C code
(uvloop/libuv buffers, the kernel's socket accounting is not in RSS at all) and allocator
overhead took. Tracing slows the server down and adds its own bookkeeping to RSS; the traced
figures, not the RSS ones, are this script's result.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_bytes() -> int:
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


def short(filename: str) -> str:
    for marker in ("site-packages/", "lib/python3", "rtgateway/"):
        index = filename.find(marker)
        if index >= 0:
            return filename[index:] if marker == "rtgateway/" else filename[index + len(marker) :]
    return filename


def report(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, n: int, top: int) -> None:
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<*")]
    before, after = before.filter_traces(ignore), after.filter_traces(ignore)
    by_line = after.compare_to(before, "lineno")
    total = sum(stat.size_diff for stat in by_line)
    count = sum(stat.count_diff for stat in by_line)
    print(f"traced growth: {total / 2**20:.2f} MiB in {count} blocks for {n} connections")
    print(f"traced per connection: {total / n:.0f} bytes in {count / n:.1f} blocks")
    print(f"\ntop {top} by file (bytes per connection, blocks per connection):")
    for stat in after.compare_to(before, "filename")[:top]:
        frame = stat.traceback[0]
        print(f"{stat.size_diff / n:9.0f} B {stat.count_diff / n:6.1f}  {short(frame.filename)}")
    print(f"\ntop {top} by line:")
    for stat in by_line[:top]:
        frame = stat.traceback[0]
        print(
            f"{stat.size_diff / n:9.0f} B {stat.count_diff / n:6.1f}  "
            f"{short(frame.filename)}:{frame.lineno}"
        )
    print("\ntop 5 by traceback (innermost last):")
    for stat in after.compare_to(before, "traceback")[:5]:
        print(f"{stat.size_diff / n:9.0f} B per connection")
        for line in stat.traceback.format()[-12:]:
            print("    " + line.replace(str(ROOT) + "/", "").strip())


async def serve(connections: int, frames: int, top: int) -> None:
    sys.path.insert(0, str(ROOT))  # the gateway of this checkout, not another install
    from rtgateway import log
    from rtgateway.app import Gateway
    from rtgateway.config import Config

    log.configure("warning", "json")
    config = Config(
        addr="127.0.0.1:0",
        api_addr="",
        demo=False,
        log_level="warning",
        max_connections=connections + 100,
        stats_interval_s=3600,
    )
    gateway = Gateway(config)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.serve(stop.wait))
    await gateway.ready.wait()
    loop = asyncio.get_running_loop()
    readline = lambda: loop.run_in_executor(None, sys.stdin.readline)  # noqa: E731
    gc.collect()
    tracemalloc.start(frames)
    before, rss_before = tracemalloc.take_snapshot(), rss_bytes()
    print(json.dumps({"port": int(gateway.addresses[0].rsplit(":", 1)[1])}), flush=True)
    await readline()  # the parent says: every client is connected, joined and served
    gc.collect()
    after, rss_after = tracemalloc.take_snapshot(), rss_bytes()
    traced_now, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"connections open at the snapshot: {len(gateway.outboxes)}")
    print(f"rooms: {len(gateway.hub.rooms) if hasattr(gateway.hub, 'rooms') else '?'}")
    n = max(1, len(gateway.outboxes))
    print(
        f"RSS: {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB, "
        f"{(rss_after - rss_before) / n / 1024:.1f} KiB per connection (tracing included)"
    )
    print(f"traced now {traced_now / 2**20:.1f} MiB, peak {traced_peak / 2**20:.1f} MiB")
    report(before, after, n, top)
    print("END", flush=True)
    await readline()
    stop.set()
    await task


async def drive(args: argparse.Namespace) -> int:
    from websockets.asyncio.client import connect

    child = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve",
        "--connections",
        str(args.connections),
        "--frames",
        str(args.frames),
        "--top",
        str(args.top),
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    port = json.loads(await child.stdout.readline())["port"]
    url = f"ws://127.0.0.1:{port}/ws"
    clients = []
    received = 0

    async def member(i: int) -> None:
        nonlocal received
        ws = await connect(url, compression=None, max_queue=None)
        clients.append(ws)
        json.loads(await ws.recv())  # hello
        await ws.send(json.dumps({"op": "join", "room": f"heap-{i % args.rooms}", "id": 1}))
        json.loads(await ws.recv())  # ack

    for start in range(0, args.connections, 200):
        stop = min(start + 200, args.connections)
        await asyncio.gather(*(member(i) for i in range(start, stop)))
    # One publication per room, so that every room's encode/fan-out path has run once.
    for i in range(args.rooms):
        await clients[i].send(
            json.dumps({"op": "publish", "room": f"heap-{i}", "data": {"x": i}, "id": 2})
        )

    async def drain(ws: object) -> None:
        nonlocal received
        while True:
            msg = json.loads(await ws.recv())  # type: ignore[attr-defined]
            if msg["op"] == "message":
                received += 1
                return

    await asyncio.gather(*(drain(ws) for ws in clients))
    print(f"clients: {len(clients)} connected, {received} deliveries received", flush=True)
    child.stdin.write(b"snap\n")
    await child.stdin.drain()
    while True:
        line = (await child.stdout.readline()).decode()
        if not line or line.strip() == "END":
            break
        print(line, end="")
    await asyncio.gather(*(ws.close() for ws in clients))
    child.stdin.write(b"quit\n")
    await child.stdin.drain()
    return await child.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--rooms", type=int, default=20)
    parser.add_argument("--frames", type=int, default=12, help="tracemalloc frames kept")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(args.connections, args.frames, args.top))
        return 0
    return asyncio.run(drive(args))


if __name__ == "__main__":
    sys.exit(main())
