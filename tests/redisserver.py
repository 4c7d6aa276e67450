"""Real ``redis-server`` processes for the tests that need them: free ports, no persistence.

:class:`RedisServer` can be stopped, restarted empty, frozen (SIGSTOP) and
thawed; :func:`redis_server` is the fixture. :class:`RedisCluster` is a real
Redis Cluster of 3 masters with a replica each, made by ``redis-cli --cluster
create``, whose masters can be killed; :func:`redis_cluster` is its fixture.
``redis-cli``-style commands go through redis-py's synchronous client, a real
client on a real socket.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from support import free_port, require_tool, wait_until

__all__ = ["RedisCluster", "RedisServer", "redis_cluster", "redis_server"]

NO_PERSISTENCE = ("--save", "", "--appendonly", "no")


class RedisServer:
    """``redis-server`` on a free port, without persistence; can be stopped and restarted."""

    def __init__(self, binary: str, *options: str) -> None:
        self.binary = binary
        self.port = free_port()
        self.options = options
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *NO_PERSISTENCE,
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.answers, 10, what="redis-server answering PING")

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen server cannot act on SIGTERM
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def restart_empty(self) -> None:
        """Stop and start again on the same port: every key is gone."""
        self.stop()
        self.start()

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def command(self, *args: Any) -> Any:
        """One command on a fresh connection of redis-py's synchronous client."""
        with redis.Redis(port=self.port, socket_timeout=5) as client:
            return client.execute_command(*args)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(require_tool("redis-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


# A master silent this long is failed over: short, so that a test's failover
# takes about a second, and long enough for a loaded 2-core machine.
CLUSTER_NODE_TIMEOUT_MS = 1000


class RedisCluster:
    """Six ``redis-server --cluster-enabled yes``: 3 masters with a replica each."""

    def __init__(self, binary: str, cli: str, workdir: Path) -> None:
        self.cli = cli
        self.servers = [
            RedisServer(
                binary,
                *("--cluster-enabled", "yes"),
                # A replica writes the RDB it syncs from into its directory.
                *("--dir", str(workdir)),
                *("--cluster-config-file", str(workdir / f"nodes-{n}.conf")),
                # The bus port is PORT + 10000 unless set: past 65535 for
                # an ephemeral PORT.
                *("--cluster-port", str(free_port())),
                *("--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS)),
                # A replica takes over however long it was cut off.
                *("--cluster-replica-validity-factor", "0"),
                # The other shards serve while one has no master.
                *("--cluster-require-full-coverage", "no"),
                # Replicas in sync at once, not after the default 5 s wait.
                *("--repl-diskless-sync-delay", "0"),
            )
            for n in range(6)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in self.servers[:3])

    def start(self) -> None:
        for server in self.servers:
            server.start()
        subprocess.run(
            [
                self.cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{s.port}" for s in self.servers),
                *("--cluster-replicas", "1", "--cluster-yes"),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )
        wait_until(self.settled, 30, what="every cluster node sees 3 masters, each with a replica")

    def settled(self) -> bool:
        """Every live node says the cluster is ok; 3 masters, each with a replica in sync."""
        replicas = 0
        for server in self.live():
            if b"cluster_state:ok" not in server.command("CLUSTER", "INFO"):
                return False
            replication = server.command("INFO", "replication")
            if replication["role"] == "slave":
                if replication.get("master_link_status") != "up":
                    return False
                replicas += 1
        # redis-py parses CLUSTER SHARDS into a dict per shard and per node.
        shards = self.live()[0].command("CLUSTER", "SHARDS")
        return replicas == 3 and sorted(len(shard[b"nodes"]) for shard in shards) == [2, 2, 2]

    def live(self) -> list[RedisServer]:
        return [s for s in self.servers if s.proc is not None and s.proc.poll() is None]

    def masters(self) -> dict[int, tuple[int, int]]:
        """Port -> (first slot, last slot) of each master, as a live node sees the map."""
        slots = self.live()[0].command("CLUSTER", "SLOTS")
        return {int(entry[2][1]): (int(entry[0]), int(entry[1])) for entry in slots}

    def server(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port``: no goodbye to its clients or to the cluster."""
        server = self.server(port)
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait(10)
        server.proc = None

    def promoted(self, killed: int) -> bool:
        """Every other live node maps the dead (or frozen) master's slots to another master."""
        for server in self.live():
            if server.port == killed:
                continue  # frozen, it answers nothing
            slots = server.command("CLUSTER", "SLOTS")
            if any(int(entry[2][1]) == killed for entry in slots) or len(slots) < 3:
                return False
        return True

    def node_id(self, port: int) -> bytes:
        return bytes(self.server(port).command("CLUSTER", "MYID"))

    def move_slot(self, slot: int, source: int, target: int) -> None:
        """Reshard one slot from master ``source`` to master ``target``, keys and all.

        The steps of ``redis-cli --cluster reshard`` for one slot: importing,
        migrating, MIGRATE every key, then the slot's new owner told to every
        master.
        """
        source_id, target_id = self.node_id(source), self.node_id(target)
        self.server(target).command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        self.server(source).command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while keys := self.server(source).command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            self.server(source).command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        for port in (target, source, *self.masters()):
            self.server(port).command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    cluster = RedisCluster(require_tool("redis-server"), require_tool("redis-cli"), tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
