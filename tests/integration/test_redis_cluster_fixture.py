"""The local Redis Cluster helper itself (``tests.support.redis_cluster``): it starts
N masters that cover all slots, redis-py's cluster client routes keys of different slots
to different nodes, a killed node comes back with its slots, and no redis-server is left
behind on exit — also when the start fails half way.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster

from tests.support.redis_cluster import ClusterProcesses, redis_cluster_running, slot_ranges
from tests.support.redis_server import ping

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def port_of(client: RedisCluster, key: str) -> int:
    """The port of the node the cluster client sends ``key`` to."""
    node = client.get_node_from_key(key)
    assert node is not None
    return int(node.port)


def key_for_each_node(client: RedisCluster, nodes: int) -> list[str]:
    """One key whose slot is in each node's range (in the order of the nodes)."""
    keys: list[str | None] = [None] * nodes
    ranges = slot_ranges(nodes)
    i = 0
    while None in keys:
        key = f"key-{i}"
        slot = client.keyslot(key)
        owner = next(n for n, (lo, hi) in enumerate(ranges) if lo <= slot <= hi)
        keys[owner] = keys[owner] or key
        i += 1
    return [k for k in keys if k is not None]


async def test_keys_of_different_slots_land_on_different_nodes(tmp_path: Path) -> None:
    with redis_cluster_running(tmp_path) as rc:
        assert len(rc.ports) == len(set(rc.ports)) == 3
        assert len(rc.pids) == 3
        client = RedisCluster.from_url(rc.url, decode_responses=True)
        try:
            keys = key_for_each_node(client, 3)
            for key in keys:
                assert await client.set(key, key)
            for node, key in zip(rc.nodes, keys, strict=True):
                assert port_of(client, key) == node.port
                with node.client() as direct:  # each node holds its key, and only it
                    assert direct.execute_command("DBSIZE") == 1
                    assert direct.execute_command("GET", key) == key
            assert await client.get(keys[2]) == keys[2]
        finally:
            await client.aclose()
    assert all(gone(pid) for pid in rc.pids)
    assert not any(ping(port) for port in rc.ports)


async def test_a_killed_node_comes_back_with_its_slots(tmp_path: Path) -> None:
    with redis_cluster_running(tmp_path) as rc:
        node = rc.nodes[1]
        old_pid = node.pid
        node.kill()
        node.start()
        rc.wait_ok()
        assert node.pid != old_pid
        client = RedisCluster.from_url(rc.url, decode_responses=True)
        try:
            key = key_for_each_node(client, 3)[1]
            assert await client.set(key, "back")
            assert port_of(client, key) == node.port
        finally:
            await client.aclose()


def test_nothing_is_left_running_when_the_start_fails_half_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[ClusterProcesses] = []

    def fail(self: ClusterProcesses, timeout: float = 0.0) -> None:
        started.append(self)
        raise TimeoutError("as if the nodes never agreed")

    monkeypatch.setattr(ClusterProcesses, "wait_ok", fail)
    with pytest.raises(TimeoutError), redis_cluster_running(tmp_path):
        pass
    [rc] = started
    assert len(rc.pids) == 3
    assert all(gone(pid) for pid in rc.pids)
