"""bench/c100k.py on one Redis, then on a Redis Cluster: deliveries/s and Redis CPU per publication.

    make c100k-cluster                                  # the defaults below, ~3 minutes
    python bench/c100k_cluster.py --connections 3000 -- --rooms-rate 200

What a run does, in order:

1. starts one ``redis-server`` and a Redis Cluster of 3 masters with a replica
   each (six ``redis-server --cluster-enabled yes`` and ``redis-cli --cluster
   create --cluster-replicas 1``), all on free ports of 127.0.0.1;
2. for each broker, the single Redis then the cluster
   (``redis+cluster://...``): measures every server's idle CPU for
   ``--idle`` seconds (``INFO cpu``: ``used_cpu_sys`` + ``used_cpu_user``),
   runs ``bench/c100k.py --broker-url URL`` with the same arguments (workers,
   connections, rooms, publication rates: anything after ``--`` is passed on),
   and reads ``INFO cpu`` again;
3. prints, per broker: publications acknowledged, deliveries received and
   lost, deliveries/s and deliveries per gateway CPU-second in each publishing
   phase, and Redis CPU per publication on the masters (less their idle CPU
   over the same time; a cluster's gossip costs CPU while idle) and on the
   replicas; then the cluster's figures as ratios of the single Redis's.

A load generator on the same host competes with the gateway and Redis for
CPU: compare the ratios of one run, not wall-clock rates between machines.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
C100K = ROOT / "bench" / "c100k.py"
NO_PERSISTENCE = ("--save", "", "--appendonly", "no")


def free_port() -> int:
    # Below the ephemeral range (32768-60999): no collision with client sockets.
    for _ in range(1000):
        port = random.randrange(21000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below 32000")


class Servers:
    """``redis-server`` processes on 127.0.0.1; stopped together."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, *options: str) -> int:
        port = free_port()
        self.procs[port] = subprocess.Popen(
            [self.binary, "--port", str(port), "--bind", "127.0.0.1", *NO_PERSISTENCE, *options],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait(lambda: answers(port), f"redis-server on {port}")
        return port

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            proc.wait(10)


def answers(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def wait(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def start_cluster(servers: Servers, cli: str, workdir: Path) -> list[int]:
    ports = [
        servers.start(
            *("--cluster-enabled", "yes"),
            # A replica writes the RDB it syncs from into its directory.
            *("--dir", str(workdir)),
            *("--cluster-config-file", str(workdir / f"nodes-{n}.conf")),
            *("--cluster-port", str(free_port())),
            *("--cluster-node-timeout", "2000"),
            *("--cluster-require-full-coverage", "no"),
            *("--repl-diskless-sync-delay", "0"),
        )
        for n in range(6)
    ]
    subprocess.run(
        [
            *(cli, "--cluster", "create"),
            *(f"127.0.0.1:{p}" for p in ports),
            *("--cluster-replicas", "1", "--cluster-yes"),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )

    def settled() -> bool:
        for port in ports:
            client = redis.Redis(port=port, socket_timeout=2)
            if b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                return False
            info = client.info("replication")
            if info["role"] == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    wait(settled, "the cluster: state ok, every replica in sync")
    return ports


def cpu(ports: list[int]) -> dict[int, tuple[str, float]]:
    """Port -> (role, CPU seconds used so far)."""
    figures = {}
    for port in ports:
        client = redis.Redis(port=port, socket_timeout=5)
        info = client.info("cpu")
        role = client.info("replication")["role"]
        figures[port] = (role, info["used_cpu_sys"] + info["used_cpu_user"])
    return figures


def run_broker(
    name: str, url: str, ports: list[int], args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    print(f"\n== {name}: {url}", file=sys.stderr, flush=True)
    idle0 = cpu(ports)
    time.sleep(args.idle)  # the servers' idle CPU over this window is the baseline
    idle1 = cpu(ports)
    idle_rate = {p: (idle1[p][1] - idle0[p][1]) / args.idle for p in ports}
    report_path = workdir / f"c100k-{name}.json"
    command = [
        sys.executable,
        str(C100K),
        "--broker-url",
        url,
        "--workers",
        str(args.workers),
        "--connections",
        str(args.connections),
        "--json",
        str(report_path),
        "--no-plot",
        "--label",
        f"c100k_cluster {name}",
        *args.c100k,
    ]
    started = time.monotonic()
    cpu0 = cpu(ports)
    subprocess.run(command, check=True, cwd=ROOT, stdout=sys.stderr)
    cpu1 = cpu(ports)
    elapsed = time.monotonic() - started
    report = json.loads(report_path.read_text())
    acked = sum(phase["acked"] for phase in report["phases"].values())
    used = {role: 0.0 for role in ("master", "slave")}
    net = {role: 0.0 for role in ("master", "slave")}
    for port in ports:
        role = cpu1[port][0]
        delta = cpu1[port][1] - cpu0[port][1]
        used[role] += delta
        net[role] += delta - idle_rate[port] * elapsed
    return {
        "broker": name,
        "url": url,
        "publications_acked": acked,
        "phases": {
            phase_name: {
                key: phase.get(key)
                for key in (
                    "acked",
                    "refused",
                    "deliveries_received",
                    "lost",
                    "seq_gaps",
                    "deliveries_per_s",
                    "deliveries_per_gateway_cpu_s",
                    "gateway_cpu_s",
                )
            }
            for phase_name, phase in report["phases"].items()
        },
        "elapsed_s": round(elapsed, 1),
        "redis_masters_cpu_s": round(used["master"], 3),
        "redis_replicas_cpu_s": round(used["slave"], 3),
        "redis_idle_cpu_s_per_s": round(sum(idle_rate.values()), 4),
        "redis_masters_us_per_publication": round(1e6 * net["master"] / max(1, acked), 1),
        "redis_replicas_us_per_publication": round(1e6 * net["slave"] / max(1, acked), 1),
    }


def print_table(results: list[dict[str, Any]]) -> None:
    print("\nbroker   phase  acked  deliveries  lost  deliveries/s  per gateway CPU-s")
    for r in results:
        for name, phase in r["phases"].items():
            print(
                f"{r['broker']:<8} {name:<6} {phase['acked']:>6} {phase['deliveries_received']:>11}"
                f" {phase['lost']:>5} {phase['deliveries_per_s'] or 0:>13,.0f}"
                f" {phase['deliveries_per_gateway_cpu_s'] or 0:>18,.0f}"
            )
    print(
        "\nbroker   publications  Redis masters µs/publication  replicas µs/publication  idle CPU/s"
    )
    for r in results:
        print(
            f"{r['broker']:<8} {r['publications_acked']:>12}"
            f" {r['redis_masters_us_per_publication']:>29}"
            f" {r['redis_replicas_us_per_publication']:>24} {r['redis_idle_cpu_s_per_s']:>11}"
        )
    if len(results) == 2:
        single, cluster = results
        print("\ncluster / single:")
        for name in single["phases"]:
            a = single["phases"][name]["deliveries_per_s"] or 0
            b = cluster["phases"][name]["deliveries_per_s"] or 0
            print(f"  {name}: deliveries/s x{b / a:.2f}" if a else f"  {name}: -")
        a, b = (r["redis_masters_us_per_publication"] for r in results)
        print(f"  Redis master CPU per publication x{b / a:.2f}" if a > 0 else "  -")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=6000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU baseline")
    parser.add_argument("--json", default=str(ROOT / "results" / "c100k_cluster.json"))
    parser.add_argument("c100k", nargs="*", help="after --: more bench/c100k.py arguments")
    args = parser.parse_args()
    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not binary or not cli:
        parser.error("needs redis-server and redis-cli on PATH")
    servers = Servers(binary)
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="rtg-cluster-bench-") as tmp:
            workdir = Path(tmp)
            single = servers.start()
            cluster = start_cluster(servers, cli, workdir)
            url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in cluster[:3])
            results.append(
                run_broker("single", f"redis://127.0.0.1:{single}", [single], args, workdir)
            )
            results.append(run_broker("cluster", url, cluster, args, workdir))
    finally:
        servers.stop()
    print_table(results)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
