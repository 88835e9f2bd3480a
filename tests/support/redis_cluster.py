"""A real Redis Cluster for integration tests: N redis-servers in cluster mode, each a
master without replicas, on free loopback ports, in subfolders of a temporary folder,
joined and given all 16384 slots here (CLUSTER ADDSLOTSRANGE / SET-CONFIG-EPOCH / MEET
through redis-py's sync client — no redis-cli needed), and stopped by their PIDs.

Each node is a ``tests.support.redis_server.RedisServer`` with the cluster options added,
so a test can kill one and start it again: it comes back on the same port with its
``nodes.conf`` (same node id, same slots) and rejoins.

The cluster bus port is chosen free as well (``--cluster-port``) rather than left at the
default ``port + 10000``: a free port above 55535 (Linux hands out up to 60999) would
give a bus port past 65535 and the node would refuse to start.

Usage::

    with redis_cluster_running(tmp_path) as rc:
        rc.url                  # redis://127.0.0.1:PORT of the first node
        rc.ports, rc.pids
        rc.nodes[1].kill(); rc.nodes[1].start(); rc.wait_ok()
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.support.procs import free_port
from tests.support.redis_server import RedisServer
from tests.support.requirements import require_binary

SLOTS = 16384
NODE_TIMEOUT_MS = 2000
# A master turns cluster_state:ok no sooner than 2 s after it starts (Redis's
# CLUSTER_WRITABLE_DELAY), so a healthy start takes 2-3 s; this bounds a sick one.
JOIN_TIMEOUT_S = 15.0
POLL_S = 0.05


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (``free_port`` alone may hand one out twice)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


@dataclass
class ClusterNodeProcess(RedisServer):
    """A redis-server with ``--cluster-enabled yes``; its ``nodes.conf`` in its folder."""

    bus_port: int = 0

    def args(self) -> list[str]:
        return [
            *super().args(),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-port",
            str(self.bus_port),
            "--cluster-node-timeout",
            str(NODE_TIMEOUT_MS),
        ]

    def client(self) -> redis.Redis:
        """A plain (non-cluster) sync client to this node alone, for admin commands."""
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=5.0, decode_responses=True
        )


def slot_ranges(nodes: int) -> list[tuple[int, int]]:
    """All slots split into ``nodes`` contiguous, inclusive ranges, as redis-cli does."""
    bounds = [SLOTS * i // nodes for i in range(nodes + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(nodes)]


def cluster_info(node: ClusterNodeProcess) -> dict[str, str]:
    """CLUSTER INFO's fields as text (``{"error": ...}`` when the node does not answer)."""
    try:
        with node.client() as c:
            # As one word redis-py parses the reply into a dict; as two it is the raw text.
            info = c.execute_command("CLUSTER INFO")
    except redis.RedisError as e:
        return {"error": str(e)}
    if isinstance(info, dict):
        return {str(k): str(v) for k, v in info.items()}
    text = info.decode() if isinstance(info, bytes) else str(info)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


@dataclass
class ClusterProcesses:
    """N cluster nodes; needs no pytest (the bench can run one too)."""

    binary: str
    folder: Path
    size: int = 3
    nodes: list[ClusterNodeProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The first node's URL: a seed for ``RedisCluster.from_url``."""
        return self.nodes[0].url

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    @property
    def pids(self) -> list[int]:
        return [n.pid for n in self.nodes if n.pid is not None]

    def start(self) -> None:
        """Start every node, assign the slots, join them, and wait for ``cluster_state:ok``.
        The caller stops them (``stop``) whatever happens here: see ``redis_cluster_running``.
        """
        assert not self.nodes, "already started"
        ports = free_ports(2 * self.size)
        for i in range(self.size):
            folder = self.folder / f"node-{i}"
            folder.mkdir(parents=True, exist_ok=True)
            node = ClusterNodeProcess(self.binary, folder, ports[2 * i], bus_port=ports[2 * i + 1])
            self.nodes.append(node)  # before start: a half-started one is stopped too
            node.start()
        for i, (node, (first, last)) in enumerate(
            zip(self.nodes, slot_ranges(self.size), strict=True)
        ):
            with node.client() as c:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
                # Distinct epochs up front (as redis-cli does) rather than waiting for the
                # collision handling to tell apart N masters all at epoch 0.
                c.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
        with self.nodes[0].client() as c:
            for node in self.nodes[1:]:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, node.bus_port)
        self.wait_ok()

    def wait_ok(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        """Until every running node says ``cluster_state:ok``, knows all N nodes and sees
        all slots assigned (after a start, or after a node was killed and started again)."""
        deadline = time.monotonic() + timeout
        last: dict[int, dict[str, str]] = {}
        while True:
            pending = False
            for node in self.nodes:
                if not node.running:
                    continue
                fields = cluster_info(node)
                last[node.port] = fields
                if (
                    fields.get("cluster_state") != "ok"
                    or fields.get("cluster_known_nodes") != str(self.size)
                    or fields.get("cluster_slots_assigned") != str(SLOTS)
                ):
                    pending = True
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not ok after {timeout}s: {last}")
            time.sleep(POLL_S)

    def stop(self) -> None:
        """Stop every node by PID (SIGTERM, SIGKILL if it lingers); never raises early, so
        one node failing to stop does not leave the others running."""
        errors: list[BaseException] = []
        for node in self.nodes:
            try:
                node.stop()
            except BaseException as e:  # keep stopping the others
                errors.append(e)
        if errors:
            raise errors[0]

    def log(self) -> str:
        return "\n".join(f"--- node {n.port}\n{n.log()}" for n in self.nodes)


@contextmanager
def redis_cluster_running(folder: Path, nodes: int = 3) -> Iterator[ClusterProcesses]:
    """A Redis Cluster of ``nodes`` masters in ``folder`` (skips outside CI, fails in CI,
    when redis-server is not installed); every process stopped on exit, also when the
    start fails half way."""
    binary = require_binary("redis-server")
    folder.mkdir(parents=True, exist_ok=True)
    cluster = ClusterProcesses(binary, folder, nodes)
    with ExitStack() as stack:
        stack.callback(cluster.stop)
        cluster.start()
        yield cluster
