"""Real Redis topologies on loopback for the topology tests: a Sentinel group (primary, replica,
three sentinels), a three-primary Cluster, and a server listening on a unix socket only.

Every process is started by PID and stopped by PID; every wait is bounded.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from tests.support.ports import free_port, wait_port
from tests.support.redis_server import require_binary


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (redis.RedisError, OSError):
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what}: not reached after {timeout}s")


@dataclass
class Node:
    """One redis-server (or redis-sentinel) process with its own directory and config file."""

    workdir: Path
    config: str
    port: int = 0
    binary: str = "redis-server"
    unixsocket: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Node:
        path = require_binary(self.binary)
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "redis.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.workdir}\n"
            f"logfile {self.workdir / 'redis.log'}\n" + self.config
        )
        self.proc = subprocess.Popen([path, str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        if self.port:
            wait_port(self.port)
        elif self.unixsocket:
            wait_until(lambda: os.path.exists(str(self.unixsocket)), 10, "unix socket")
        return self

    def client(self) -> redis.Redis:
        if self.unixsocket and not self.port:
            return redis.Redis(unix_socket_path=self.unixsocket, socket_timeout=2)
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def kill(self) -> None:
        """SIGKILL: the process dies without a chance to hand anything over."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        log = self.workdir / "redis.log"
        if not log.exists():
            return ""
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _info(client: redis.Redis, section: str) -> dict[str, Any]:
    return dict(client.info(section))


@dataclass
class SentinelGroup:
    """A primary, one replica and three sentinels watching `service_name`."""

    root: Path
    service_name: str = "gwprimary"
    primary: Node | None = None
    replica: Node | None = None
    sentinels: list[Node] = field(default_factory=list)

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    def start(self) -> SentinelGroup:
        require_binary("redis-sentinel")
        base = "save \"\"\nappendonly no\n"
        self.primary = Node(self.root / "primary", base, free_port()).start()
        self.replica = Node(self.root / "replica",
                            base + f"replicaof 127.0.0.1 {self.primary.port}\n",
                            free_port()).start()
        replica = self.replica.client()
        wait_until(lambda: _info(replica, "replication").get("master_link_status") == "up",
                   10, "replica linked to primary")
        replica.close()
        for i in range(3):
            conf = (
                f"sentinel monitor {self.service_name} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.service_name} 1000\n"
                f"sentinel failover-timeout {self.service_name} 3000\n"
                f"sentinel parallel-syncs {self.service_name} 1\n"
            )
            self.sentinels.append(
                Node(self.root / f"sentinel{i}", conf, free_port(), "redis-sentinel").start()
            )
        # A failover needs every sentinel to know the replica and its two peers (hello messages
        # travel every 2 s), so wait for that instead of hoping.
        for s in self.sentinels:
            c = s.client()
            try:
                wait_until(lambda c=c: len(c.sentinel_slaves(self.service_name)) == 1
                           and len(c.sentinel_sentinels(self.service_name)) == 2,
                           20, f"sentinel {s.port} sees the replica and its peers")
            finally:
                c.close()
        return self

    def master_port(self) -> int:
        """The primary port the sentinels currently report."""
        c = self.sentinels[0].client()
        try:
            _host, port = c.sentinel_get_master_addr_by_name(self.service_name)
            return int(port)
        finally:
            c.close()

    def wait_replicated(self, timeout: float = 5.0) -> None:
        """Until the replica has applied everything the primary has (offsets equal)."""
        assert self.primary is not None and self.replica is not None
        p, r = self.primary.client(), self.replica.client()
        try:
            def caught_up() -> bool:
                target = int(_info(p, "replication")["master_repl_offset"])
                have = int(_info(r, "replication").get("slave_repl_offset", -1))
                return have >= target

            wait_until(caught_up, timeout, "replica caught up with the primary", 0.02)
        finally:
            p.close()
            r.close()

    def stop(self) -> None:
        for node in [*self.sentinels, self.replica, self.primary]:
            if node is not None:
                node.stop()


@dataclass
class Cluster:
    """Three primaries, no replicas, all 16384 slots assigned by `redis-cli --cluster create`."""

    root: Path
    nodes: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> Cluster:
        cli = require_binary("redis-cli")
        for i in range(3):
            port = free_port()
            # The bus port defaults to port + 10000, which may be taken or above 65535.
            conf = (f"cluster-enabled yes\ncluster-port {free_port()}\n"
                    "cluster-config-file nodes.conf\n"
                    "cluster-node-timeout 2000\nsave \"\"\nappendonly no\n")
            self.nodes.append(Node(self.root / f"node{i}", conf, port).start())
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        done = subprocess.run(
            [cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, timeout=30, check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"cluster create failed: {done.stdout!r} {done.stderr!r}")
        for n in self.nodes:
            c = n.client()
            try:
                wait_until(lambda c=c: c.cluster("INFO").get("cluster_state") == "ok"
                           and int(c.cluster("INFO").get("cluster_known_nodes", 0)) == 3,
                           20, f"cluster node {n.port} ok")
            finally:
                c.close()
        return self

    def subscribers(self, channel: str) -> int:
        """Subscribers of `channel` summed over the nodes (PUBSUB NUMSUB is per node)."""
        total = 0
        for n in self.nodes:
            c = n.client()
            try:
                total += int(dict(c.pubsub_numsub(channel)).get(channel.encode(), 0))
            finally:
                c.close()
        return total

    def owner_of(self, key: str) -> Node:
        c = self.nodes[0].client()
        try:
            slot = int(c.cluster("KEYSLOT", key))
            for low, high, (host, port, *_), *_ in c.cluster("SLOTS"):  # type: ignore[misc]
                if low <= slot <= high:
                    return next(n for n in self.nodes if n.port == int(port))
        finally:
            c.close()
        raise LookupError(key)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def unix_socket_server(root: Path) -> Node:
    """A redis-server listening on a unix socket only (`port 0`)."""
    path = str(root / "redis.sock")
    conf = f"unixsocket {path}\nunixsocketperm 700\nsave \"\"\nappendonly no\n"
    return Node(root, conf, 0, unixsocket=path).start()


def short_tmpdir() -> Path:
    """Unix socket paths are limited to ~107 bytes; pytest's tmp_path can be longer."""
    return Path(tempfile.mkdtemp(prefix="gw-topo-"))


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def can_connect(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
