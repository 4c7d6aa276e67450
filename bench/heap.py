#!/usr/bin/env python3
"""Where an idle connection's bytes go: tracemalloc inside a gateway subprocess.

    python bench/heap.py --connections 5000 --out results/heap.txt   # `make bench-heap`
    python bench/heap.py --gateway-src DIR ...   # the rtgateway package in DIR (an A/B)

Runs the gateway (``python bench/heap.py --serve`` wraps ``python -m rtgateway``
with tracemalloc on), takes a snapshot with no client, connects the clients
(each joined to one room, from ``bench/loadclient.py`` processes), takes a
second snapshot, and prints the growth per connection, by the package that
allocated it (the innermost frame in rtgateway, websockets, asyncio or uvloop)
and by source line.

tracemalloc sees what Python and uvloop allocate through Python's allocators
(uvloop's libuv handles included: it allocates them with PyMem_RawMalloc); the
RSS figure also holds allocator slack and what C code mallocs directly. Socket
buffers live in the kernel, not in RSS.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

FRAMES = 16
PACKAGES = ("rtgateway", "websockets", "uvloop", "asyncio")


def serve() -> None:
    """The subprocess: the gateway with tracemalloc, a snapshot on each SIGUSR1."""
    import runpy

    tracemalloc.start(FRAMES)
    out_dir = Path(os.environ["HEAP_SNAPSHOT_DIR"])
    taken = 0

    def snapshot(signum: int, frame: object) -> None:
        nonlocal taken
        path = out_dir / f"snap{taken}.tmp"
        tracemalloc.take_snapshot().dump(str(path))
        path.rename(out_dir / f"snap{taken}")
        taken += 1

    signal.signal(signal.SIGUSR1, snapshot)
    if os.environ.get("HEAP_GATEWAY_SRC"):
        sys.path.insert(0, os.environ["HEAP_GATEWAY_SRC"])
        assert "rtgateway" not in sys.modules
    sys.argv = ["rtgateway"]
    runpy.run_module("rtgateway", run_name="__main__")


def take(pid: int, out_dir: Path, index: int) -> tracemalloc.Snapshot:
    os.kill(pid, signal.SIGUSR1)
    path = out_dir / f"snap{index}"
    deadline = time.monotonic() + 120
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("no snapshot from the gateway")
        time.sleep(0.1)
    return tracemalloc.Snapshot.load(str(path))


def owner(trace: tracemalloc.Traceback) -> tuple[str, str]:
    """(package, file:line) of the innermost frame in one of PACKAGES."""
    for frame in reversed(trace):  # most recent first
        for package in PACKAGES:
            if f"/{package}/" in frame.filename or frame.filename.endswith(f"{package}.py"):
                short = frame.filename.split(f"/{package}/", 1)[-1]
                return package, f"{package}/{short}:{frame.lineno}"
    frame = trace[-1]
    return "other", f"{Path(frame.filename).name}:{frame.lineno}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--out", default="results/heap.txt")
    parser.add_argument(
        "--gateway-src", default=None, help="profile the rtgateway package found in this directory"
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return 0
    # Not before serve(): bench imports rtgateway, and --gateway-src must come first.
    from bench import Load, Server

    snap_dir = Path(args.out).parent / "heap-snapshots"
    snap_dir.mkdir(parents=True, exist_ok=True)
    for old in snap_dir.glob("snap*"):
        old.unlink()
    os.environ["HEAP_SNAPSHOT_DIR"] = str(snap_dir.resolve())
    if args.gateway_src:
        os.environ["HEAP_GATEWAY_SRC"] = str(Path(args.gateway_src).resolve())
    server = Server("gateway", "rooms", argv=[str(Path(__file__).resolve()), "--serve"])
    n = args.connections
    load = Load(max(1, -(-n // 9000)))
    try:
        time.sleep(0.5)
        rss0 = server.rss_bytes()
        before = take(server.pid, snap_dir, 0)
        conn = load.connect(server, ["idle"] * n, echo=False, publisher=False)
        time.sleep(1.0)
        rss1 = server.rss_bytes()
        after = take(server.pid, snap_dir, 1)
    finally:
        load.close()
        server.kill()
    connected = conn["connected"]
    diffs = after.compare_to(before, "traceback")
    by_package: dict[str, int] = defaultdict(int)
    by_line: dict[str, int] = defaultdict(int)
    for diff in diffs:
        package, line = owner(diff.traceback)
        by_package[package] += diff.size_diff
        by_line[line] += diff.size_diff
    traced = sum(by_package.values())
    lines = [
        f"{connected} idle connections, each joined to one room (tracemalloc, {FRAMES} frames)",
        f"gateway: the rtgateway package in {args.gateway_src or 'this checkout'}",
        f"RSS growth:    {(rss1 - rss0) / 1024 / connected:8.2f} KiB per connection "
        "(with tracemalloc's own overhead)",
        f"traced growth: {traced / 1024 / connected:8.2f} KiB per connection",
        "",
        "by package (innermost frame in rtgateway, websockets, uvloop, asyncio):",
    ]
    for package, size in sorted(by_package.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {package:<12}{size / connected:10.0f} B/conn")
    lines += ["", "top source lines:"]
    for line, size in sorted(by_line.items(), key=lambda kv: -kv[1])[:25]:
        lines.append(f"  {size / connected:8.0f} B/conn  {line}")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
